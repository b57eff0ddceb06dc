"""``python -m gptkernels generate``: run a model from a local checkpoint or a tiny random config.

    python -m gptkernels generate --model /path/to/checkpoint --prompt "Hello" --max-new-tokens 32
    python -m gptkernels generate --tiny gpt-neox --prompt "1 2 3" --prompt "4 5" --max-new-tokens 8
    python -m gptkernels generate --model DIR --prompt "Hello" --quantize int4 --kv-cache-dtype float8_e4m3fn

Prints the tokens (and the text when a tokenizer is saved in the checkpoint directory) and tokens/s.
Without a tokenizer, prompts are token ids separated by spaces or commas. Nothing is downloaded.

A mistake in the command (a bad path, number, device or backend, a token outside the vocabulary) is
one line on stderr and exit status 2; ``--debug`` shows the Python traceback instead.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from ._policy import FP8_KV_DTYPES
from .quant import DEFAULT_GROUP_SIZE, FORMATS as QUANT_FORMATS, check_group_size

PROG = "python -m gptkernels"
#: --kv-cache-dtype: the name -> generate's kv_cache_dtype (auto: None, the model's dtype).
KV_CACHE_DTYPES = {"auto": None, **{str(d).replace("torch.", ""): d for d in FP8_KV_DTYPES}}
#: Files that mean a tokenizer is saved in a checkpoint directory (transformers reads them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


class UsageError(Exception):
    """A mistake in the command line that the CLI itself detects."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line (no usage block): ``prog: error: ... (see --help)``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, where it has a meaningful one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" not in text and action.option_strings and not any(
                action.default is none for none in (None, False, argparse.SUPPRESS)):  # 0 is a default
            text += " (default: %(default)s)"
        return text


def _number(kind, *, lo=None, lo_open=False, hi=None, what=None):
    """An argparse type: a finite ``kind`` in the given range, with a one-line message otherwise."""
    lo_text = None if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
    want = what or " and ".join(filter(None, [
        "an int" if kind is int else "a number", lo_text, None if hi is None else f"<= {hi}"]))

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}") from None
        if not math.isfinite(value) or (lo is not None and (value <= lo if lo_open else value < lo)) \
                or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {want}, got {text!r}")
        return value

    parse.__name__ = "int" if kind is int else "number"  # argparse names the type in some messages
    return parse


def _group_size(text: str) -> int:
    """An argparse type: an int group size under gptkernels.quant's rule (check_group_size)."""
    try:
        value = int(text)
    except ValueError:
        value = text  # check_group_size says what it must be
    try:
        return check_group_size("--group-size", value)
    except (TypeError, ValueError) as e:  # "--group-size: group_size must be ..." -> "must be ..."
        raise argparse.ArgumentTypeError(str(e).split("group_size ", 1)[-1]) from None


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = sub.add_parser("generate", help="generate tokens with a reference model",
                       description=__doc__.replace("``", ""), formatter_class=_HelpFormatter)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint directory")
    src.add_argument("--tiny", choices=["gpt2", "gpt-neo", "gpt-neox", "opt"],
                     help="a tiny random model of this family (gptkernels.models.TINY)")
    g.add_argument("--prompt", action="append", required=True,
                   help="prompt text (token ids without a tokenizer); repeat for a batch")
    # At least one new token, as in transformers' generate (gptkernels.generate has the same rule).
    g.add_argument("--max-new-tokens", type=_number(int, lo=1), default=32, metavar="N",
                   help="tokens to generate per prompt")
    g.add_argument("--backend", choices=["triton", "cuda", "torch"], default=None,
                   help="kernel backend (default: $GPTKERNELS_BACKEND, else triton on CUDA, torch on CPU; "
                        "the summary names the one used)")
    g.add_argument("--device", default=None, metavar="DEVICE",
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    g.add_argument("--tp", type=_number(int, lo=1), default=None, metavar="N",
                   help="tensor parallel over N processes started by torchrun (torchrun --nproc-per-node N "
                        "-m gptkernels generate ... --tp N): NCCL with one GPU per rank, gloo on CPU")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute dtype (default: bfloat16 on CUDA, float32 on CPU)")
    g.add_argument("--quantize", choices=list(QUANT_FORMATS), default=None,
                   help="weight-only quantization of the blocks' linear layers while loading: int8 (one scale "
                        "per output channel) or int4 (a scale and zero point per --group-size input channels); "
                        "embeddings and the LM head stay in --dtype (default: off)")
    g.add_argument("--group-size", type=_group_size, default=None, metavar="G",
                   help=f"input channels per int4 scale, a power of two >= 32 dividing the hidden and MLP "
                        f"widths; with --quantize int4 only (default: {DEFAULT_GROUP_SIZE})")
    g.add_argument("--kv-cache-dtype", choices=list(KV_CACHE_DTYPES), default="auto",
                   help="the paged KV cache's dtype: auto (the model's dtype) or float8_e4m3fn (half the "
                        "bytes per token, scales calibrated on the prompts; triton and torch backends)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=_number(float, lo=0), default=1.0, metavar="T",
                   help="sampling temperature; 0 means greedy decoding, with or without --do-sample")
    g.add_argument("--top-k", type=_number(int, lo=0), default=0, metavar="K",
                   help="sample from the k likeliest (0: off)")
    g.add_argument("--top-p", type=_number(float, lo=0, lo_open=True, hi=1), default=1.0, metavar="P",
                   help="nucleus sampling (1: off)")
    g.add_argument("--repetition-penalty", type=_number(float, lo=0, lo_open=True), default=1.0, metavar="R",
                   help="penalise tokens already in the row (1: off)")
    g.add_argument("--eos-token-id", type=int, default=None, metavar="ID",
                   help="stop a row at this token (default: the config's, with --model)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="random weights (--tiny) and sampling")
    g.add_argument("--no-cuda-graph", action="store_true", help="decode without a CUDA graph")
    g.add_argument("--compile-step", action="store_true",
                   help="torch.compile the decode step (fuses the small per-layer ops)")
    g.add_argument("--debug", action="store_true", help="on an error, show the Python traceback")
    return p


def _device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UsageError(f"--device {text!r}: the models run on cpu or cuda only")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {text}: no CUDA GPU is visible (torch.cuda.is_available() is False); "
                         "use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {text}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0 to "
                         f"cuda:{torch.cuda.device_count() - 1})")
    return device


def _backend(name: str | None, device: torch.device) -> str:
    """The backend every kernel call will use (the summary names it), or a one-line reason why not."""
    from ._backend import BackendUnavailableError, resolve

    try:
        return resolve(name, device, "generate")
    except ValueError as e:  # a bad $GPTKERNELS_BACKEND (argparse checked --backend)
        raise UsageError(str(e)) from None
    except BackendUnavailableError as e:
        source = f"--backend {name}" if name else f"backend {os.environ.get('GPTKERNELS_BACKEND') or 'default'}"
        raise UsageError(f"{source} cannot run on {device}: {str(e).split('is unavailable: ', 1)[-1]}") from None


def _check_model_dir(path: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"--model {path}: no such directory")
    if not os.path.isdir(path):
        raise UsageError(f"--model {path}: not a directory (give the checkpoint's directory)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UsageError(f"--model {path}: no config.json there (a local Hugging Face checkpoint directory "
                         "holds config.json and its weight files)")


def _parse_ids(text: str, model_dir: str | None) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        saved = model_dir is not None and any(os.path.exists(os.path.join(model_dir, f)) for f in TOKENIZER_FILES)
        if saved and not _have_transformers():
            raise UsageError(f"--prompt {text!r}: {model_dir} has a tokenizer but transformers is not installed "
                             "(pip install 'gptkernels[hf]'); or give the prompt as token ids") from None
        where = "in the checkpoint directory" if model_dir else "for a --tiny model"
        raise UsageError(f"--prompt {text!r}: no tokenizer {where}: give the prompt as token ids "
                         "separated by spaces or commas") from None
    if not ids:
        raise UsageError("--prompt is empty: give at least one token")
    return ids


def _have_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _check_quantize_args(args) -> int:
    """--quantize / --group-size / --kv-cache-dtype that contradict each other or the backend; returns
    the int4 group size."""
    if args.group_size is not None and args.quantize != "int4":
        raise UsageError(f"--group-size {args.group_size} applies to --quantize int4 only")
    requested = args.backend or os.environ.get("GPTKERNELS_BACKEND") or None
    if KV_CACHE_DTYPES[args.kv_cache_dtype] is not None and requested == "cuda":
        source = "--backend cuda" if args.backend else "backend cuda (from $GPTKERNELS_BACKEND)"
        raise UsageError(f"--kv-cache-dtype {args.kv_cache_dtype}: {source} has no fp8 KV-cache kernels; "
                         "use --backend triton or torch")
    return args.group_size if args.group_size is not None else DEFAULT_GROUP_SIZE


def _check_quantize_fits(args, group_size: int, cfg) -> None:
    """int4's group size divides the quantized layers' input widths (before any weight is read)."""
    from .models.quantize import check_quantize

    flag = f"--quantize {args.quantize}" + (f" --group-size {group_size}" if args.quantize == "int4" else "")
    try:
        check_quantize(flag, args.quantize, group_size, cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _quantized_gemms_on(model, backend: str, device: torch.device) -> str | None:
    """The backend of a quantized model's weight-only GEMMs: the command's, except "cuda", which has
    none (BackendUnavailableError): then the device's default (Triton on CUDA), named in the summary.
    None for a float model."""
    from ._backend import resolve
    from .models.quantize import QuantLinear

    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        return None
    gemm = backend if backend != "cuda" else resolve(None, device, "generate")
    for m in layers:
        m.backend = gemm
    return gemm


def _check_vocab(flag: str, ids: list[int], vocab: int, text: str | None = None) -> None:
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        what = f"{flag} {text!r}" if text is not None else flag
        raise UsageError(f"{what}: token {bad[0]} is outside the model's vocabulary [0, {vocab})")


def _generate(args) -> int:
    from . import generate
    from .models import TINY, from_config, from_hf_config, from_pretrained
    from .models.loading import find_tokenizer, read_config

    device = _device(args.device)
    from .models.tp import init_from_env  # tensor parallel: the group torchrun describes (or none)

    tp_group, device = init_from_env(args.tp, device)
    if tp_group is not None and torch.distributed.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # every rank computes the same tokens; rank 0 prints them
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    group_size = _check_quantize_args(args)
    kv_cache_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype]
    backend = _backend(args.backend, device)
    greedy = not args.do_sample or args.temperature == 0  # temperature 0: greedy, as transformers users expect
    torch.manual_seed(args.seed)
    quant = dict(quantize=args.quantize, group_size=group_size)
    if args.model:
        _check_model_dir(args.model)
        if args.quantize:
            _check_quantize_fits(args, group_size, read_config(os.path.join(args.model, "config.json"))[1])
        model = from_pretrained(args.model, dtype=dtype, device=device, tp_group=tp_group, **quant)
        tokenizer = find_tokenizer(args.model)
    else:
        if args.quantize:
            _check_quantize_fits(args, group_size, from_hf_config(TINY[args.tiny]))
        model = from_config(TINY[args.tiny], dtype=dtype, device=device, tp_group=tp_group, **quant)
        tokenizer = None
    cfg = model.config
    gemm_backend = _quantized_gemms_on(model, backend, device)

    prompts = []
    for text in args.prompt:
        ids = tokenizer.encode(text) if tokenizer is not None else _parse_ids(text, args.model)
        if not ids:
            raise UsageError(f"--prompt {text!r}: the tokenizer gives no tokens")
        _check_vocab("--prompt", ids, cfg.vocab_size, text)
        prompts.append(ids)
    eos = args.eos_token_id if args.eos_token_id is not None else (cfg.eos_token_id if args.model else None)
    if args.eos_token_id is not None:
        _check_vocab("--eos-token-id", [args.eos_token_id], cfg.vocab_size)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos if eos is not None else 0)
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    gen = None if greedy else torch.Generator(device=device).manual_seed(args.seed)
    stats: dict = {}
    out = generate(model, ids.to(device), args.max_new_tokens, attention_mask=mask.to(device),
                   do_sample=not greedy, temperature=1.0 if greedy else args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, eos_token_id=eos,
                   pad_token_id=pad, generator=gen, backend=backend,
                   cuda_graph=False if args.no_cuda_graph else None, compile_step=args.compile_step,
                   kv_cache_dtype=kv_cache_dtype, stats=stats)
    new = out[:, longest:].tolist()
    for i, toks in enumerate(new):
        print(f"[{i}] new tokens: {' '.join(map(str, toks))}")
        if tokenizer is not None:
            print(f"[{i}] text: {tokenizer.decode(prompts[i] + toks)}")
    total = stats["prefill_s"] + stats["capture_s"] + stats["decode_s"]
    steps = stats["decode_steps"]
    decode = (f"decode {len(new) * steps / stats['decode_s']:.1f} tokens/s" if steps and stats["decode_s"] > 0
              else "no decode step")
    mode = "greedy" if greedy else f"sampling at temperature {args.temperature:g}"
    what = [str(dtype).replace("torch.", "")]
    if args.quantize:
        detail = [f"group {group_size}"] if args.quantize == "int4" else []
        detail += [f"GEMMs on {gemm_backend}"] if gemm_backend != backend else []
        what.append(f"{args.quantize} weights" + (f" ({', '.join(detail)})" if detail else ""))
    if kv_cache_dtype is not None:
        what.append(f"{args.kv_cache_dtype} KV cache")
    print(f"{cfg.family} on {device} ({', '.join(what)}, backend {backend}, {mode}): "
          f"{stats['new_tokens']} new tokens in {total:.3f} s = {stats['new_tokens'] / total:.1f} tokens/s; "
          f"prefill {stats['prompt_tokens'] / stats['prefill_s']:.1f} tokens/s, {decode}")
    return 0


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, (UsageError, ValueError, TypeError)) else f"{type(e).__name__}: {text}"


def main(argv=None) -> int:
    """The command line. Returns 0; a mistake raises SystemExit(2) after one line on stderr (as argparse)."""
    from ._backend import BackendUnavailableError
    from .kv_cache import CacheFullError

    args = _parser().parse_args(argv)
    # Mistakes in what the command asks for. Anything else is a bug in gptkernels: its traceback shows.
    user_errors = (UsageError, ValueError, TypeError, OSError, ImportError, BackendUnavailableError,
                   CacheFullError, torch.OutOfMemoryError)
    from .models.tp import end_process_group

    try:
        if args.command == "generate":
            status = _generate(args)
            end_process_group(clean=True)
            return status
        return 2  # pragma: no cover - argparse rejects other commands
    except user_errors as e:
        if args.debug:
            raise
        hint = "" if isinstance(e, UsageError) else " (--debug shows the traceback)"
        print(f"{PROG} {args.command}: error: {_one_line(e)}{hint}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        code = 130
    finally:
        # After an error (a no-op once ended cleanly). Run once the except block has ended: the
        # error's traceback would keep the model, and with it the group, alive.
        end_process_group(clean=False)
    raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(main())
