"""One rank of the tensor-parallel tests (tests/test_tp.py), started by torch.multiprocessing.spawn.

The parent writes ``spec.json`` and HF checkpoints under ``root``; each rank joins a gloo group,
runs every case and saves what it saw to ``root/result-{world}-{rank}.pt`` (errors as text, so the
parent's assertions say what went wrong). Light imports only (no transformers, no pytest): process
start-up is most of the cost.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import traceback

import torch
import torch.distributed as dist


def _inputs(vocab: int):
    """Prompts every rank and the parent use: dense (2, 9) and left/right padded (3, 9)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, vocab, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    return ids[:2].clone(), ids.masked_fill(mask == 0, 0), mask


def _gen_inputs(vocab: int):
    """A left-padded batch for generate."""
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(3, vocab, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def observe(model, backend: str, gen_seed: int, new_tokens: int = 6) -> dict:
    """What a test compares: logits (dense and padded), greedy and sampled tokens, parameter bytes."""
    import gptkernels

    vocab = model.config.vocab_size
    dense, padded, mask = _inputs(vocab)
    gids, gmask = _gen_inputs(vocab)
    with torch.no_grad():
        out = {"dense": model(dense, backend=backend), "padded": model(padded, attention_mask=mask, backend=backend)}
    out["greedy"] = gptkernels.generate(model, gids, new_tokens, attention_mask=gmask, backend=backend)
    g = torch.Generator().manual_seed(gen_seed)
    out["sampled"] = gptkernels.generate(model, gids, new_tokens, attention_mask=gmask, do_sample=True,
                                         temperature=1.5, generator=g, backend=backend)
    params = dict(model.named_parameters())
    out["block_bytes"] = sum(p.numel() * p.element_size() for n, p in params.items() if n.startswith("layers."))
    out["bytes"] = sum(p.numel() * p.element_size() for p in params.values())
    return out


def _error(fn) -> str:
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def run(rank: int, world: int, root: str, rendezvous: str) -> None:
    torch.set_num_threads(1)
    with open(os.path.join(root, "spec.json")) as f:
        spec = json.load(f)
    dist.init_process_group("gloo", init_method="file://" + rendezvous,
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    from safetensors.torch import load_file

    from gptkernels.models import TINY, from_config, from_pretrained

    group = dist.group.WORLD
    results: dict = {}
    try:
        for name in spec["checkpoints"]:
            path = os.path.join(root, name)
            for how in spec["how"]:
                if how == "from_pretrained":  # only this rank's slices are read
                    model = from_pretrained(path, tp_group=group)
                else:
                    model = from_config(json.load(open(os.path.join(path, "config.json"))), tp_group=group)
                    files = [f for f in os.listdir(path) if f.endswith((".safetensors", ".bin"))]
                    full = {}
                    for file in files:
                        full.update(load_file(os.path.join(path, file)) if file.endswith(".safetensors")
                                    else torch.load(os.path.join(path, file), weights_only=True))
                    model.load_hf_state_dict(full)
                # A different sampling seed per rank: the tokens must still agree (rank 0's are broadcast).
                results[(name, how)] = observe(model, "torch", gen_seed=100 + rank)
        for family in spec["tiny"]:  # random init: the shards of the single-process model
            torch.manual_seed(1000 + rank)  # differs per rank: from_config shares rank 0's state
            if rank == 0:
                torch.manual_seed(0)
            model = from_config(TINY[family], tp_group=group)
            results[("tiny", family)] = observe(model, "torch", gen_seed=100)
        for name in spec.get("triton", []):
            model = from_pretrained(os.path.join(root, name), tp_group=group)
            results[(name, "triton")] = observe(model, "triton", gen_seed=100, new_tokens=3)
        for label, case in spec.get("errors", {}).items():
            device = case.get("device_of_rank", {}).get(str(rank), "cpu")
            dtype = case.get("dtype_of_rank", {}).get(str(rank), "float32")
            results[("error", label)] = _error(lambda: from_config(case["config"], device=device, dtype=dtype,
                                                                   tp_group=group))
    except Exception:
        results["crash"] = traceback.format_exc()
    torch.save(results, os.path.join(root, f"result-{world}-{rank}.pt"))
    # Free the group before the interpreter exits, as the CLI does (gptkernels.models.tp.end_process_group):
    # the models hold it (through reference cycles), and gloo threads still releasing tensors at
    # finalization abort the process.
    group = model = None
    dist.destroy_process_group()
    gc.collect()
