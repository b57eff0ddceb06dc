"""Tensor parallelism (gptkernels.models.tp) on CPU with gloo: 2 and 4 processes against the
single-process model and Hugging Face (float32 logits <= 1e-4, generation token for token), every
family and its quirks; the plan's rules; bad input; the torchrun CLI.

The multi-process runs are two spawns (2 and 4 ranks) that run every case at once
(tests/tp_worker.py) and one torchrun of the CLI: process start-up is most of the time.
"""

from __future__ import annotations

import json
import os
import re
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import gptkernels
from gptkernels.models import TINY, from_config, from_hf_config
from gptkernels.models.tp import head_split, make_plan
from tests import tp_worker
from tests.helpers import requires_gpu, torchrun_cli
from tests.hf_models import VARIANTS, hf_model, hf_positions

TOL = 1e-4

#: Every family and the quirks sharding must keep: GPT-2's Conv1D and fused c_attn, GPT-Neo's local
#: layers, GPT-NeoX's per-head qkv with parallel and sequential residual, OPT's project_in/out and
#: post-LayerNorm blocks.
CHECKPOINTS = ["gpt2", "gpt2-untied", "gpt-neo-window4", "gpt-neox-parallel-pct0.5",
               "gpt-neox-sequential-pct0.25", "opt-pre-ln-project", "opt-post-ln"]
BIN_CHECKPOINT = "gpt-neox-parallel-pct0.5"  # also saved as pytorch_model.bin (the memory-mapped path)
#: What each group size runs (process start-up and gloo on 2 shared cores are the cost): 2 ranks
#: every checkpoint both ways, 4 ranks one of each family and residual kind, from safetensors slices.
RUNS = {
    2: dict(checkpoints=CHECKPOINTS + ["bin"], how=["from_pretrained", "load_hf_state_dict"],
            triton=["gpt-neox-parallel-pct0.5"]),
    4: dict(checkpoints=["gpt2", "gpt-neo-window4", "gpt-neox-parallel-pct0.5", "gpt-neox-sequential-pct0.25",
                         "opt-pre-ln-project"], how=["from_pretrained"], triton=[]),
}
CASES = [(world, name, how) for world, run in RUNS.items() for name in run["checkpoints"] for how in run["how"]]

ERRORS = {
    "heads": dict(config=dict(TINY["gpt-neox"], hidden_size=96, num_attention_heads=6)),
    "mlp": dict(config=dict(TINY["gpt-neox"], intermediate_size=130)),
    "mixed-devices": dict(config=TINY["gpt2"], device_of_rank={"1": "meta"}),
    "mixed-dtypes": dict(config=TINY["gpt2"], dtype_of_rank={"1": "float16"}),
}


def _save_checkpoints(root: str) -> dict:
    """HF checkpoints (safetensors; one also as .bin) and what HF and our single process say on them."""
    from gptkernels.models import from_pretrained

    expected = {}
    for name in CHECKPOINTS + ["bin"]:
        variant = BIN_CHECKPOINT if name == "bin" else name
        hf = hf_model(VARIANTS[variant], seed=len(variant))
        path = os.path.join(root, name)
        if name == "bin":
            os.makedirs(path)
            hf.config.save_pretrained(path)
            torch.save({k: v.clone() for k, v in hf.state_dict().items()}, os.path.join(path, "pytorch_model.bin"))
        else:
            hf.save_pretrained(path)
        ours = from_pretrained(path)
        dense, padded, mask = tp_worker._inputs(ours.config.vocab_size)
        with torch.no_grad():
            hf_dense = hf(dense).logits
            hf_padded = hf(padded, attention_mask=mask, position_ids=hf_positions(mask)).logits
        expected[name] = dict(single=tp_worker.observe(ours, "torch", gen_seed=100), hf_dense=hf_dense,
                              hf_padded=hf_padded, mask=mask, config=ours.config)
    return expected


def _spawn(root: str, world: int) -> list[dict]:
    rendezvous = tempfile.mktemp(dir=root, prefix=f"rendezvous-{world}-")  # a fresh file store each time
    mp.spawn(tp_worker.run, args=(world, root, rendezvous), nprocs=world, join=True)
    return [torch.load(os.path.join(root, f"result-{world}-{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tp"))
    expected = _save_checkpoints(root)
    tiny = {}
    for family in TINY:
        torch.manual_seed(0)
        tiny[family] = tp_worker.observe(from_config(TINY[family]), "torch", gen_seed=100)
    runs = {}
    for world in (2, 4):
        spec = dict(RUNS[world], tiny=list(TINY), errors=ERRORS if world == 4 else {})
        with open(os.path.join(root, "spec.json"), "w") as f:
            json.dump(spec, f)
        runs[world] = _spawn(root, world)
        for r, res in enumerate(runs[world]):
            assert "crash" not in res, f"rank {r} of {world}:\n{res['crash']}"
    return expected, tiny, runs


def _err(a, b, mask=None):
    if mask is not None:
        a, b = a[mask.bool()], b[mask.bool()]
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("world, name, how", CASES)
def test_logits_and_tokens_match_single_process_and_hf(tp_runs, world, name, how):
    expected, _, runs = tp_runs
    exp = expected[name]
    single = exp["single"]
    for rank, res in enumerate(runs[world]):
        got = res[(name, how)]
        where = f"{name} via {how}, rank {rank} of {world}"
        assert got["dense"].shape == exp["hf_dense"].shape, where
        assert _err(got["dense"], exp["hf_dense"]) <= TOL, where
        assert _err(got["padded"], exp["hf_padded"], exp["mask"]) <= TOL, where
        assert _err(got["dense"], single["dense"]) <= TOL, where
        assert bool((got["padded"][~exp["mask"].bool()] == 0).all()), where
        assert torch.equal(got["greedy"], single["greedy"]), where
        # Each rank sampled with its own seed (100 + rank): rank 0's draws are everyone's.
        assert torch.equal(got["sampled"], single["sampled"]), where


@pytest.mark.parametrize("world", [2, 4])
def test_random_init_is_the_single_process_model(tp_runs, world):
    """from_config with tp_group: rank 0's random state drawn whole, each rank keeping its part."""
    _, tiny, runs = tp_runs
    for family, single in tiny.items():
        for rank, res in enumerate(runs[world]):
            got = res[("tiny", family)]
            assert _err(got["dense"], single["dense"]) <= 1e-5, (family, rank)
            assert torch.equal(got["greedy"], single["greedy"]), (family, rank)
            assert torch.equal(got["sampled"], single["sampled"]), (family, rank)


def test_triton_backend_per_rank(tp_runs):
    expected, _, runs = tp_runs
    name = "gpt-neox-parallel-pct0.5"
    exp = expected[name]
    for rank, res in enumerate(runs[2]):
        got = res[(name, "triton")]
        assert _err(got["dense"], exp["hf_dense"]) <= TOL, rank
        assert _err(got["padded"], exp["hf_padded"], exp["mask"]) <= TOL, rank
        assert torch.equal(got["greedy"], exp["single"]["greedy"][:, :-3]), rank


def _replicated_block_bytes(cfg, nbytes: int = 4) -> int:
    """Per layer: LayerNorm weights and biases, the row-parallel biases (attention out, MLP out)."""
    norms = 4 * cfg.hidden_size if cfg.norm_affine else 0
    biases = cfg.hidden_size * (int(cfg.out_bias) + int(cfg.mlp_bias))
    return cfg.num_layers * (norms + biases) * nbytes


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_holds_one_nth_of_the_blocks(tp_runs, world):
    expected, _, runs = tp_runs
    for name in RUNS[world]["checkpoints"]:
        full = expected[name]["single"]["block_bytes"]
        replicated = _replicated_block_bytes(expected[name]["config"])
        for rank, res in enumerate(runs[world]):
            got = res[(name, "from_pretrained")]["block_bytes"]
            assert got == (full - replicated) // world + replicated, (name, rank)
            assert got <= 1.05 * full / world, (name, rank)
            # Outside the blocks: the vocab-parallel tables keep ceil(V / N) rows; the rest is replicated.
            cfg = expected[name]["config"]
            tables = 1 if cfg.tie_word_embeddings else 2
            dropped = tables * cfg.embed_dim * 4 * (cfg.vocab_size - -(-cfg.vocab_size // world))
            single_rest = expected[name]["single"]["bytes"] - full
            assert res[(name, "from_pretrained")]["bytes"] - got == single_rest - dropped, (name, rank)


def test_bad_input_raises_on_every_rank(tp_runs):
    _, _, runs = tp_runs
    want = {
        "heads": r"number of attention heads \(6\) must be divisible by the tensor-parallel size \(4\)",
        "mlp": r"MLP width \(intermediate_size 130\) must be divisible by the tensor-parallel size \(4\)",
        "mixed-devices": r"tp_group mixes devices \(rank 0 on cpu, rank 1 on meta",
        "mixed-dtypes": r"ask for different dtypes \(rank 0: float32, rank 1: float16",
    }
    for label, pattern in want.items():
        for rank, res in enumerate(runs[4]):
            assert re.search(pattern, res[("error", label)]), (label, rank, res[("error", label)])


# ---- the plan, in one process ----------------------------------------------------------------------


def test_head_split_replicates_kv_heads_when_fewer_than_ranks():
    # 8 query heads, 2 K/V heads, 4 ranks: each K/V head on the 2 ranks whose queries read it.
    splits = [head_split(8, 2, r, 4) for r in range(4)]
    assert splits == [((0, 2), (0, 1)), ((2, 4), (0, 1)), ((4, 6), (1, 2)), ((6, 8), (1, 2))]
    # MQA: one K/V head everywhere; GQA with enough K/V heads: split with the queries.
    assert [head_split(8, 1, r, 4)[1] for r in range(4)] == [(0, 1)] * 4
    assert [head_split(8, 4, r, 2) for r in range(2)] == [((0, 4), (0, 2)), ((4, 8), (2, 4))]
    for h, kv, world, pattern in [(6, 6, 4, r"attention heads \(6\) must be divisible"),
                                  (12, 6, 4, r"K/V heads \(6\) must be divisible"),
                                  (12, 3, 4, r"multiple of the K/V heads")]:
        with pytest.raises(ValueError, match=pattern):
            head_split(h, kv, 0, world)


def test_vocab_rows_pad_the_last_rank():
    cfg = from_hf_config(dict(TINY["gpt2"], vocab_size=130))
    plans = [make_plan(cfg, r, 4) for r in range(4)]
    assert [p.vocab for p in plans] == [(0, 33), (33, 66), (66, 99), (99, 130)]
    assert all(p.vocab_rows == 33 for p in plans)  # rank 3's 31 rows + 2 zero rows


def test_tp_group_without_initialised_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        from_config(TINY["gpt2"], tp_group=object())


def test_one_rank_group_and_bad_groups():
    """A group of one (what a 1-GPU machine runs) is the single-process model; a group that is not
    one, or one destroyed since, is refused."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        group = dist.group.WORLD
        with pytest.raises(TypeError, match="tp_group must be a torch.distributed ProcessGroup"):
            from_config(TINY["gpt2"], tp_group="world")
        torch.manual_seed(0)
        single = from_config(TINY["opt"])
        torch.manual_seed(0)
        model = from_config(TINY["opt"], tp_group=group)
        assert model.tp is not None and model.kv_heads == 4
        ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert _err(model(ids, backend="torch"), single(ids, backend="torch")) <= 1e-6
        assert torch.equal(gptkernels.generate(model, ids, 4, backend="torch"),
                           gptkernels.generate(single, ids, 4, backend="torch"))
        # A checkpoint of another shape: the error names the weight.
        sd = hf_model(dict(TINY["opt"], ffn_dim=96)).state_dict()
        with pytest.raises(ValueError, match=r"fc1\.weight' has shape \(96, 64\); this config needs 128"):
            model.load_hf_state_dict(sd)
    finally:
        dist.destroy_process_group()
    with pytest.raises(ValueError, match="not initialised"):
        from_config(TINY["gpt2"], tp_group=group)  # destroyed since


def test_sharded_flag_needs_a_tp_model():
    with pytest.raises(ValueError, match="sharded=True needs a tensor-parallel model"):
        from_config(TINY["gpt2"]).load_hf_state_dict({}, sharded=True)


def test_model_too_big_for_the_device(monkeypatch):
    from gptkernels.models import loading

    monkeypatch.setattr(loading, "_device_free_bytes", lambda device: 1000)
    with pytest.raises(ValueError, match=r"from_config: the model needs 0.00 GiB .* has 0.00 GiB free: split it"):
        from_config(TINY["gpt2"])


# ---- the CLI under torchrun ---------------------------------------------------------------------------


def _tokens(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"\[\d+\] new tokens:", line)]


def test_cli_torchrun_tp2_matches_single_process(capsys):
    from gptkernels.__main__ import main

    args = ["generate", "--tiny", "gpt-neox", "--prompt", "5 6 7 8", "--prompt", "9 10",
            "--max-new-tokens", "6", "--backend", "torch"]
    proc = torchrun_cli([*args, "--tp", "2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args) == 0
    single = _tokens(capsys.readouterr().out)
    assert len(single) == 2
    assert _tokens(proc.stdout) == single, proc.stdout  # printed once (rank 0), the same tokens


# ---- on a GPU: NCCL, every kernel backend, CUDA graphs ------------------------------------------------


@requires_gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_nccl_group_on_gpu_matches_single_process(backend):
    """A one-rank NCCL group (what a 1-GPU machine can run): the collectives in the forward, inside
    the decode step's CUDA graph, with each kernel backend; bf16 tokens equal the single model's."""
    if gptkernels.backends()[backend] is not None:
        pytest.skip(f"backend {backend!r} unavailable: {gptkernels.backends()[backend]}")
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    try:
        for family in ("gpt-neox", "opt"):
            torch.manual_seed(0)
            single = from_config(TINY[family], dtype=torch.bfloat16, device="cuda")
            torch.manual_seed(0)
            model = from_config(TINY[family], dtype=torch.bfloat16, device="cuda", tp_group=dist.group.WORLD)
            ids = torch.randint(3, 128, (2, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
            with torch.no_grad():
                assert torch.equal(model(ids, backend=backend), single(ids, backend=backend))
            got = gptkernels.generate(model, ids, 8, backend=backend)  # CUDA graph on
            assert torch.equal(got, gptkernels.generate(single, ids, 8, backend=backend))
    finally:
        dist.destroy_process_group()


def test_benchmark_rows_say_why_they_are_skipped_without_two_gpus():
    from benchmarks import model_tp
    from benchmarks.harness import Session

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has 2 GPUs: the rows run (make bench)")
    sess = Session(quick=True, ceilings=None)
    model_tp.run(sess, True, new=8)
    assert len(sess.rows) == model_tp.planned_rows() == 8
    assert all(r.status == "skipped" and "needs 2 CUDA GPUs" in r.message for r in sess.rows)


def test_cli_tp_must_match_the_processes(monkeypatch, capsys):
    from gptkernels.__main__ import main

    args = ["generate", "--tiny", "gpt2", "--prompt", "1 2", "--max-new-tokens", "2", "--backend", "torch"]
    with pytest.raises(SystemExit) as e:
        main(args + ["--tp", "2"])  # not under torchrun
    assert e.value.code == 2 and "--tp 2: start 2 processes with torchrun" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(args)
    assert "torchrun started 2 processes without --tp: --tp must equal" in capsys.readouterr().err
    assert not dist.is_initialized()
