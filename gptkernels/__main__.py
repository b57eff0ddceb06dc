"""``python -m gptkernels generate``: run a model from a local checkpoint or a tiny random config.

    python -m gptkernels generate --model /path/to/checkpoint --prompt "Hello" --max-new-tokens 32
    python -m gptkernels generate --tiny gpt-neox --prompt "1 2 3" --prompt "4 5" --max-new-tokens 8

Prints the tokens (and the text when a tokenizer is saved in the checkpoint directory) and tokens/s.
Without a tokenizer, prompts are token ids separated by spaces or commas. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys

import torch


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:  # 0 would generate nothing and leave no timings to report
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gptkernels", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate tokens with a reference model")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", metavar="DIR", help="local Hugging Face checkpoint directory")
    src.add_argument("--tiny", choices=["gpt2", "gpt-neo", "gpt-neox", "opt"],
                     help="a tiny random model of this family (gptkernels.models.TINY)")
    g.add_argument("--prompt", action="append", required=True,
                   help="prompt text (token ids without a tokenizer); repeat for a batch")
    g.add_argument("--max-new-tokens", type=_positive_int, default=32)
    g.add_argument("--backend", choices=["triton", "cuda", "torch"], default=None)
    g.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    g.add_argument("--do-sample", action="store_true")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--eos-token-id", type=int, default=None, help="default: the config's (with --model)")
    g.add_argument("--seed", type=int, default=0, help="random weights (--tiny) and sampling")
    g.add_argument("--no-cuda-graph", action="store_true", help="decode without a CUDA graph")
    g.add_argument("--compile-step", action="store_true",
                   help="torch.compile the decode step (fuses the small per-layer ops)")
    return p


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise SystemExit(f"error: no tokenizer found: give --prompt as token ids, got {text!r}") from None
    if not ids:
        raise SystemExit("error: --prompt is empty")
    return ids


def _generate(args) -> int:
    from . import generate
    from .models import TINY, from_config, from_pretrained
    from .models.loading import find_tokenizer

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)
    if args.model:
        model = from_pretrained(args.model, dtype=dtype, device=device)
        tokenizer = find_tokenizer(args.model)
    else:
        model = from_config(TINY[args.tiny], dtype=dtype, device=device)
        tokenizer = None
    cfg = model.config

    prompts = [tokenizer.encode(p) if tokenizer is not None else _parse_ids(p) for p in args.prompt]
    eos = args.eos_token_id if args.eos_token_id is not None else (cfg.eos_token_id if args.model else None)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos if eos is not None else 0)
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, longest - len(p):] = torch.tensor(p)
        mask[i, longest - len(p):] = 1
    gen = torch.Generator(device=device).manual_seed(args.seed) if args.do_sample else None
    stats: dict = {}
    out = generate(model, ids.to(device), args.max_new_tokens, attention_mask=mask.to(device),
                   do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, repetition_penalty=args.repetition_penalty, eos_token_id=eos,
                   pad_token_id=pad, generator=gen, backend=args.backend,
                   cuda_graph=False if args.no_cuda_graph else None, compile_step=args.compile_step,
                   stats=stats)
    new = out[:, longest:].tolist()
    for i, toks in enumerate(new):
        print(f"[{i}] new tokens: {' '.join(map(str, toks))}")
        if tokenizer is not None:
            print(f"[{i}] text: {tokenizer.decode(prompts[i] + toks)}")
    total = stats["prefill_s"] + stats["capture_s"] + stats["decode_s"]
    steps = stats["decode_steps"]
    decode_tps = len(new) * steps / stats["decode_s"] if steps and stats["decode_s"] > 0 else float("nan")
    print(f"{cfg.family} on {device} ({str(dtype).replace('torch.', '')}, backend {args.backend or 'default'}): "
          f"{stats['new_tokens']} new tokens in {total:.3f} s = {stats['new_tokens'] / total:.1f} tokens/s; "
          f"prefill {stats['prompt_tokens'] / stats['prefill_s']:.1f} tokens/s, "
          f"decode {decode_tps:.1f} tokens/s")
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    return 2  # pragma: no cover - argparse rejects other commands


if __name__ == "__main__":
    sys.exit(main())
