"""The command line (``python -m gptkernels generate``): every user mistake is one line on stderr and
exit status 2 (no traceback unless --debug); --help shows defaults; the summary names the backend
used; --temperature 0 is greedy; zero new tokens are refused by the CLI and the API alike.

Tiny random models on CPU with the torch backend: each call takes well under a second.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import gptkernels
from gptkernels.__main__ import main
from gptkernels.models import TINY, from_config
from tests.helpers import torchrun_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CPU = ["generate", "--tiny", "gpt2", "--device", "cpu", "--backend", "torch", "--max-new-tokens", "3"]


def _mistake(capsys, argv) -> str:
    """Runs the CLI on a mistake: exit status 2 and exactly one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("python -m gptkernels") and "error:" in lines[0], lines[0]
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_model_directory_missing(capsys, tmp_path):
    line = _mistake(capsys, ["generate", "--model", str(tmp_path / "nope"), "--prompt", "1 2", "--device", "cpu"])
    assert "--model" in line and "no such directory" in line


def test_model_is_a_file(capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    line = _mistake(capsys, ["generate", "--model", str(tmp_path / "weights.bin"), "--prompt", "1", "--device", "cpu"])
    assert "not a directory" in line


def test_model_without_config(capsys, tmp_path):
    line = _mistake(capsys, ["generate", "--model", str(tmp_path), "--prompt", "1 2", "--device", "cpu"])
    assert "no config.json" in line


def test_model_with_broken_config(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", ')
    line = _mistake(capsys, ["generate", "--model", str(tmp_path), "--prompt", "1 2", "--device", "cpu"])
    assert "config.json" in line  # the loader's message names the file


def test_model_without_weights(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY["gpt2"]))
    line = _mistake(capsys, ["generate", "--model", str(tmp_path), "--prompt", "1 2", "--device", "cpu"])
    assert "no weights" in line


def test_token_outside_vocabulary(capsys):
    line = _mistake(capsys, [*TINY_CPU, "--prompt", "1 2 128"])
    assert "token 128 is outside the model's vocabulary [0, 128)" in line
    line = _mistake(capsys, [*TINY_CPU, "--prompt", "5", "--eos-token-id", "500"])
    assert "--eos-token-id" in line and "outside" in line


def test_prompt_not_token_ids(capsys):
    line = _mistake(capsys, [*TINY_CPU, "--prompt", "Hello world"])
    assert "no tokenizer" in line and "token ids" in line
    line = _mistake(capsys, [*TINY_CPU, "--prompt", " , "])
    assert "empty" in line


def test_backend_unavailable(capsys):
    line = _mistake(capsys, ["generate", "--tiny", "gpt2", "--prompt", "1 2", "--device", "cpu", "--backend", "cuda"])
    assert "--backend cuda cannot run on cpu" in line
    line = _mistake(capsys, [*TINY_CPU, "--prompt", "1", "--backend", "tpu"])
    assert "--backend" in line and "invalid choice" in line


def test_device(capsys):
    line = _mistake(capsys, [*TINY_CPU, "--prompt", "1", "--device", "gpu0"])
    assert "--device 'gpu0' is not a device" in line
    line = _mistake(capsys, [*TINY_CPU, "--prompt", "1", "--device", "meta"])
    assert "cpu or cuda only" in line
    if torch.cuda.is_available():
        line = _mistake(capsys, [*TINY_CPU, "--prompt", "1", "--device", "cuda:999"])
        assert "CUDA GPUs" in line
    else:
        line = _mistake(capsys, ["generate", "--tiny", "gpt2", "--prompt", "1", "--device", "cuda"])
        assert "no CUDA GPU is visible" in line and "--device cpu" in line


@pytest.mark.parametrize("flag,value,expected", [
    ("--max-new-tokens", "0", "must be an int and >= 1, got '0'"),
    ("--max-new-tokens", "-4", "must be an int and >= 1"),
    ("--max-new-tokens", "many", "must be an int and >= 1, got 'many'"),
    ("--temperature", "-0.5", "must be a number and >= 0"),
    ("--temperature", "nan", "must be a number and >= 0"),
    ("--top-k", "-1", "must be an int and >= 0"),
    ("--top-p", "0", "must be a number and > 0 and <= 1"),
    ("--top-p", "1.5", "must be a number and > 0 and <= 1"),
    ("--repetition-penalty", "0", "must be a number and > 0"),
    ("--seed", "x", "invalid int value"),
])
def test_bad_numbers(capsys, flag, value, expected):
    line = _mistake(capsys, [*TINY_CPU, "--prompt", "1", flag, value])
    assert flag in line and expected in line


def test_missing_arguments(capsys):
    line = _mistake(capsys, ["generate", "--tiny", "gpt2"])
    assert "--prompt" in line and "required" in line
    line = _mistake(capsys, ["generate", "--prompt", "1"])
    assert "--model" in line and "--tiny" in line


def test_request_beyond_the_models_positions(capsys):
    # Caught from the API (gptkernels.generate checks it): the same one line, with a hint for --debug.
    line = _mistake(capsys, [*TINY_CPU[:-1], "1000", "--prompt", "1 2"])
    assert "positions" in line and "--debug" in line


def test_debug_shows_the_exception(capsys):
    with pytest.raises(ValueError, match="positions"):
        main([*TINY_CPU[:-1], "1000", "--prompt", "1 2", "--debug"])


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("tokens to generate per prompt (default: 32)", "(default: 1.0)", "(default: 0)",
                 "0 means greedy", "default: cuda if available, else cpu", "default: bfloat16 on CUDA"):
        assert text in out, text


def _new_tokens(out: str) -> list[str]:
    return [ln.split(":", 1)[1].split() for ln in out.splitlines() if "new tokens:" in ln]


def test_summary_names_the_backend_used(capsys, monkeypatch):
    monkeypatch.delenv("GPTKERNELS_BACKEND", raising=False)
    assert main(["generate", "--tiny", "gpt-neox", "--device", "cpu", "--prompt", "1 2", "--max-new-tokens", "2"]) == 0
    summary = capsys.readouterr().out.splitlines()[-1]
    # Under TRITON_INTERPRET=1 (tests/conftest.py, no GPU) CPU tensors go to triton; else torch.
    used = gptkernels._backend.resolve(None, torch.device("cpu"), "test")
    assert f"backend {used}, greedy)" in summary and "default" not in summary
    monkeypatch.setenv("GPTKERNELS_BACKEND", "torch")
    assert main(["generate", "--tiny", "gpt-neox", "--device", "cpu", "--prompt", "1 2", "--max-new-tokens", "2"]) == 0
    assert "backend torch" in capsys.readouterr().out.splitlines()[-1]


def test_temperature_zero_is_greedy(capsys):
    runs = {}
    for name, extra in {"greedy": [], "t0": ["--temperature", "0"],
                        "t0-sample": ["--temperature", "0", "--do-sample", "--top-k", "5"]}.items():
        assert main([*TINY_CPU[:-1], "6", "--prompt", "3 4 5", "--prompt", "7", *extra]) == 0
        out = capsys.readouterr().out
        runs[name] = _new_tokens(out)
        assert "greedy" in out.splitlines()[-1]
    assert runs["t0"] == runs["greedy"] == runs["t0-sample"]
    assert main([*TINY_CPU, "--prompt", "3 4 5", "--do-sample", "--temperature", "0.7"]) == 0
    assert "sampling at temperature 0.7" in capsys.readouterr().out


def test_zero_new_tokens_same_rule_in_api():
    # The CLI refuses --max-new-tokens 0 (test_bad_numbers); so does the API, as transformers does.
    model = from_config(TINY["gpt2"])
    with pytest.raises(ValueError, match="generate: max_new_tokens must be >= 1, got 0"):
        gptkernels.generate(model, torch.tensor([[1, 2]]), 0, backend="torch")
    assert gptkernels.generate(model, torch.tensor([[1, 2]]), 1, backend="torch").shape == (1, 3)


def test_exit_status_from_the_shell(tmp_path):
    """The real process: one line, status 2, no traceback (what a person at a terminal sees)."""
    res = subprocess.run([sys.executable, "-m", "gptkernels", "generate", "--model", str(tmp_path / "nope"),
                          "--prompt", "1"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "no such directory" in res.stderr
    assert res.stdout == ""


# ---- --quantize, --group-size, --kv-cache-dtype -----------------------------------------------------

TINY_CKPT = os.path.join(ROOT, "checkpoints", "tiny-stdlib")


@pytest.mark.parametrize("argv,expected", [
    (["--group-size", "64"], "--group-size 64 applies to --quantize int4 only"),
    (["--quantize", "int8", "--group-size", "64"], "--group-size 64 applies to --quantize int4 only"),
    # the tiny models are 64 wide: int4's default group (128) does not divide them
    (["--quantize", "int4"], "--quantize int4 --group-size 128: in_features of the quantized layers "
                             "(hidden_size = 64) must be divisible by group_size (128)"),
    (["--quantize", "int4", "--group-size", "24"], "argument --group-size: must be a power of two >= 32, got 24"),
    (["--quantize", "int4", "--group-size", "0"], "argument --group-size: must be a power of two >= 32, got 0"),
    (["--quantize", "int4", "--group-size", "many"], "argument --group-size: must be an int, got 'many'"),
    (["--quantize", "int2"], "argument --quantize: invalid choice: 'int2'"),
    (["--kv-cache-dtype", "fp8"], "argument --kv-cache-dtype: invalid choice: 'fp8'"),
    # before the backend's availability: the combination is the mistake on any machine
    (["--kv-cache-dtype", "float8_e4m3fn", "--backend", "cuda"],
     "--kv-cache-dtype float8_e4m3fn: --backend cuda has no fp8 KV-cache kernels; use --backend triton or torch"),
])
def test_quantize_and_cache_mistakes(capsys, argv, expected):
    line = _mistake(capsys, [*TINY_CPU, "--prompt", "1 2", *argv])
    assert expected in line, line
    assert "--debug" not in line  # the CLI's own checks: no traceback to offer


def test_fp8_cache_refused_for_a_cuda_backend_from_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("GPTKERNELS_BACKEND", "cuda")
    line = _mistake(capsys, ["generate", "--tiny", "gpt2", "--device", "cpu", "--prompt", "1",
                             "--kv-cache-dtype", "float8_e4m3fn"])
    assert "backend cuda (from $GPTKERNELS_BACKEND) has no fp8 KV-cache kernels" in line


def test_help_shows_quantization_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--quantize {int8,int4}", "(default: off)", "--kv-cache-dtype {auto,float8_e4m3fn}",
                 "(default: auto)", f"(default: {gptkernels.quant.DEFAULT_GROUP_SIZE})"):
        assert text in out, text


@pytest.mark.parametrize("argv,loaded,cache,summary", [
    (["--quantize", "int8"], dict(quantize="int8", group_size=128), None, "(float32, int8 weights, backend torch"),
    (["--quantize", "int4", "--group-size", "32", "--kv-cache-dtype", "float8_e4m3fn"],
     dict(quantize="int4", group_size=32), torch.float8_e4m3fn,
     "(float32, int4 weights (group 32), float8_e4m3fn KV cache, backend torch"),
    (["--kv-cache-dtype", "auto"], dict(quantize=None, group_size=128), None, "(float32, backend torch"),
])
def test_quantize_and_cache_reach_the_api(capsys, monkeypatch, argv, loaded, cache, summary):
    """The flags reach from_config and generate as their arguments; the GEMMs run on --backend; the
    tokens are the API's with the same arguments; the summary says what ran."""
    from gptkernels import models
    from gptkernels.models.quantize import QuantLinear

    seen = {}
    real_from_config, real_generate = models.from_config, gptkernels.generate

    def spy_from_config(*a, **kw):
        seen["model"] = real_from_config(*a, **kw)
        seen["load"] = {k: kw.get(k) for k in ("quantize", "group_size")}
        return seen["model"]

    def spy_generate(*a, **kw):
        seen["kv_cache_dtype"] = kw.get("kv_cache_dtype")
        return real_generate(*a, **kw)

    monkeypatch.setattr(models, "from_config", spy_from_config)
    monkeypatch.setattr(gptkernels, "generate", spy_generate)
    args = ["generate", "--tiny", "gpt-neox", "--device", "cpu", "--backend", "torch", "--prompt", "5 6 7",
            "--prompt", "9", "--max-new-tokens", "4"]
    assert main([*args, *argv]) == 0
    out = capsys.readouterr().out
    assert seen["load"] == loaded and seen["kv_cache_dtype"] == cache
    gemms = [m for m in seen["model"].modules() if isinstance(m, QuantLinear)]
    assert len(gemms) == (0 if loaded["quantize"] is None else 4 * 2) and all(m.backend == "torch" for m in gemms)
    assert summary in out.splitlines()[-1], out
    # the API with the same arguments: the same tokens
    torch.manual_seed(0)
    model = real_from_config(TINY["gpt-neox"], quantize=loaded["quantize"], group_size=loaded["group_size"])
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = "torch"
    ids, mask = torch.tensor([[5, 6, 7], [0, 0, 9]]), torch.tensor([[1, 1, 1], [0, 0, 1]])
    want = real_generate(model, ids, 4, attention_mask=mask, eos_token_id=None, pad_token_id=0, backend="torch",
                         kv_cache_dtype=cache)
    assert _new_tokens(out) == [[str(t) for t in row] for row in want[:, 3:].tolist()]


def test_shipped_checkpoint_int4_and_fp8_cache(capsys):
    """checkpoints/tiny-stdlib (real weights, width 256: int4's default group of 128 fits), int4 and an
    fp8 cache: the same text as from_pretrained(quantize="int4") + generate(kv_cache_dtype=fp8)."""
    from gptkernels.models import from_pretrained
    from gptkernels.models.loading import find_tokenizer
    from gptkernels.models.quantize import QuantLinear

    assert main(["generate", "--model", TINY_CKPT, "--prompt", "def ", "--max-new-tokens", "6", "--device", "cpu",
                 "--dtype", "float32", "--backend", "torch", "--quantize", "int4",
                 "--kv-cache-dtype", "float8_e4m3fn"]) == 0
    out = capsys.readouterr().out
    assert "(float32, int4 weights (group 128), float8_e4m3fn KV cache, backend torch, greedy)" in out
    model = from_pretrained(TINY_CKPT, dtype=torch.float32, quantize="int4")
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.backend = "torch"
    tok = find_tokenizer(TINY_CKPT)
    ids = torch.tensor([tok.encode("def ")])
    want = gptkernels.generate(model, ids, 6, eos_token_id=model.config.eos_token_id, backend="torch",
                               kv_cache_dtype=torch.float8_e4m3fn)
    assert f"[0] text: {tok.decode(want[0].tolist())}" in out.splitlines(), out


def test_torchrun_tp2_int4_fp8_cache_matches_single_process(capsys):
    """--tp 2 with --quantize int4 and an fp8 cache: each rank quantizes its slices (int4 groups do
    not cross them) and calibrates its own KV heads' scales, so the tokens are the single process's."""
    args = ["generate", "--tiny", "gpt-neox", "--prompt", "5 6 7 8", "--prompt", "9 10", "--max-new-tokens", "5",
            "--backend", "torch", "--quantize", "int4", "--group-size", "32", "--kv-cache-dtype", "float8_e4m3fn"]
    proc = torchrun_cli([*args, "--tp", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args) == 0
    single = capsys.readouterr().out
    assert len(_new_tokens(single)) == 2
    assert _new_tokens(proc.stdout) == _new_tokens(single), proc.stdout
    assert "int4 weights (group 32), float8_e4m3fn KV cache" in proc.stdout.splitlines()[-1]
