"""Train the tiny GPT-2 checkpoint that ships in ``checkpoints/tiny-stdlib/`` (CPU, one core).

    nice -n 19 .venv/bin/python -m tools.train_tiny [--out checkpoints/tiny-stdlib] [--cpu-minutes 19]

Data: the ``.py`` files of the Python standard library of the interpreter that runs this script
(``sysconfig.get_paths()["stdlib"]``, without ``site-packages`` and the test suites), in a fixed
order. A file is held out when ``crc32(relative path) % 20 == 0`` (about 5% of the files); the held-out
text is saved beside the weights (``heldout.txt``) so that perplexity can be measured later on any
machine (``benchmarks/suite_quant.py``), whatever its Python version.

Tokenizer: byte-level BPE (Hugging Face ``tokenizers``) with ``VOCAB`` entries, trained here on the
training files; ``<|endoftext|>`` (id 0) separates files. Unlike GPT-2's, the pre-tokenizer keeps
whitespace apart from words (``PRE_TOKENS``: a newline, a run of other whitespace, a run of word
characters, a run of punctuation): ``"def foo"`` is ``def`` + `` `` + ``foo``, so a prompt ending in a
space or a newline (``"def "``) is a prefix the model saw in training, not a lone token GPT-2's
tokenizer only ever produced before a non-word character. It is saved as a ``PreTrainedTokenizerFast``
(``tokenizer.json`` + ``tokenizer_config.json``): ``AutoTokenizer.from_pretrained(dir)`` loads it with
no download.

Model: transformers' ``GPT2LMHeadModel`` (``MODEL`` below: 4 layers, width 256, 4 heads, 256
positions, tied LM head), AdamW, linear warm-up then cosine decay over ``--max-steps``, float32 on
CPU with one thread. Training stops after ``--cpu-minutes`` of this process's CPU time (not wall
time: the machine is shared). Saved with ``save_pretrained`` in float16 safetensors (about 7.5 MB), so
both transformers and :func:`gptkernels.models.from_pretrained` load it.

The run is deterministic for a given stdlib and torch version (seeded), apart from the stop time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sysconfig
import time
import zlib
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the tokenizer trainer: one core too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

VOCAB = 2048
EOT = "<|endoftext|>"
MODEL = dict(n_embd=256, n_layer=4, n_head=4, n_positions=256, n_inner=1024, activation_function="gelu_new",
             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5)
SEQ = 256          # training context (= n_positions: every position embedding is trained)
BATCH = 16         # sequences per step
PEAK_LR = 2e-3
WARMUP = 100
HELD_OUT_EVERY = 20  # crc32(path) % 20 == 0: held out
HELD_OUT_CHARS = 200_000  # how much held-out text ships with the checkpoint
#: Pre-tokens (BPE merges stay inside one): a newline | other whitespace | word characters | punctuation.
PRE_TOKENS = r"\n|[^\S\n]+|\w+|[^\w\s]+"


def stdlib_files() -> list[tuple[str, str]]:
    """(relative path, text) of every stdlib .py file outside site-packages and the test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if skip & set(rel.parts[:-1]):
            continue
        try:
            out.append((str(rel), p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def split(files):
    held = [(r, t) for r, t in files if zlib.crc32(r.encode()) % HELD_OUT_EVERY == 0]
    train = [(r, t) for r, t in files if zlib.crc32(r.encode()) % HELD_OUT_EVERY != 0]
    return train, held


def train_tokenizer(texts: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRE_TOKENS), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT, unk_token=EOT)


def encode(tokenizer, texts: list[str]) -> torch.Tensor:
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer.encode(t))
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int64)


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int = SEQ, max_windows: int = 64) -> float:
    """Mean next-token cross entropy (nats) over non-overlapping windows of ``data``."""
    model.eval()
    n = min((len(data) - 1) // seq, max_windows)
    x = data[: n * seq].view(n, seq)
    y = data[1: n * seq + 1].view(n, seq)
    total = 0.0
    for i in range(0, n, 16):
        logits = model(x[i:i + 16]).logits
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y[i:i + 16].flatten(),
                                                   reduction="sum").item()
    model.train()
    return total / (n * seq)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="checkpoints/tiny-stdlib")
    ap.add_argument("--cpu-minutes", type=float, default=19.0, help="stop after this much CPU time")
    ap.add_argument("--max-steps", type=int, default=780, help="the cosine schedule's length")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    cpu0 = time.process_time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    files = stdlib_files()
    train_files, held_files = split(files)
    print(f"{len(files)} stdlib files: {len(train_files)} train, {len(held_files)} held out", flush=True)
    tokenizer = train_tokenizer([t for _, t in train_files])
    tokenizer.save_pretrained(out)
    # the generic class name (transformers 5 writes its internal "TokenizersBackend"; 4.x knows this one)
    cfg_path = out / "tokenizer_config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"TokenizersBackend"', '"PreTrainedTokenizerFast"'))
    train = encode(tokenizer, [t for _, t in train_files])
    held_text = "".join(f"# file: {r}\n{t}\n" for r, t in held_files)[:HELD_OUT_CHARS]
    (out / "heldout.txt").write_text(held_text, encoding="utf-8")
    held = torch.tensor(tokenizer.encode(held_text), dtype=torch.int64)
    print(f"tokens: {len(train)} train, {len(held)} held out (vocab {VOCAB}); "
          f"{time.process_time() - cpu0:.0f} s CPU so far", flush=True)

    from transformers import GPT2Config, GPT2LMHeadModel

    eot = tokenizer.convert_tokens_to_ids(EOT)
    cfg = GPT2Config(vocab_size=VOCAB, bos_token_id=eot, eos_token_id=eot, **MODEL)
    model = GPT2LMHeadModel(cfg)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=PEAK_LR, betas=(0.9, 0.95))

    def lr_at(step):
        if step < WARMUP:
            return PEAK_LR * (step + 1) / WARMUP
        frac = min(1.0, (step - WARMUP) / max(1, args.max_steps - WARMUP))
        return PEAK_LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(args.seed)
    budget = args.cpu_minutes * 60
    log = []
    step = 0
    t_train = time.process_time()
    while step < args.max_steps and time.process_time() - cpu0 < budget:
        starts = torch.randint(0, len(train) - SEQ - 1, (BATCH,), generator=gen)
        x = torch.stack([train[s: s + SEQ] for s in starts.tolist()])
        y = torch.stack([train[s + 1: s + SEQ + 1] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = torch.nn.functional.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0 or step == 1:
            rate = step * BATCH * SEQ / (time.process_time() - t_train)
            print(f"step {step}: loss {loss.item():.3f}, lr {lr_at(step):.2e}, {rate:.0f} tokens/s CPU, "
                  f"{time.process_time() - cpu0:.0f} s CPU", flush=True)
        if step % 200 == 0:
            log.append({"step": step, "train_loss": round(loss.item(), 4),
                        "heldout_loss": round(evaluate(model, held, max_windows=16), 4)})
            print(f"  held-out loss {log[-1]['heldout_loss']:.3f}", flush=True)

    held_loss = evaluate(model, held)
    cpu = time.process_time() - cpu0
    print(f"done: {step} steps ({step * BATCH * SEQ} tokens), held-out loss {held_loss:.3f} nats "
          f"(perplexity {math.exp(held_loss):.2f}), {cpu / 60:.1f} min CPU", flush=True)
    model.half().save_pretrained(out, safe_serialization=True)
    (out / "training.json").write_text(json.dumps({
        "script": "tools/train_tiny.py", "seed": args.seed, "steps": step, "batch": BATCH, "seq": SEQ,
        "tokens_seen": step * BATCH * SEQ, "train_tokens": len(train), "heldout_tokens": len(held),
        "params": params, "vocab": VOCAB, "model": MODEL, "peak_lr": PEAK_LR, "warmup": WARMUP,
        "schedule_steps": args.max_steps, "cpu_minutes": round(cpu / 60, 2),
        "heldout_loss_float32": round(held_loss, 4), "heldout_perplexity_float32": round(math.exp(held_loss), 3),
        "log": log, "torch": torch.__version__, "python_stdlib": sysconfig.get_paths()["stdlib"],
    }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
