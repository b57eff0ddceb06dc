"""Tensor-parallel rows of the model suite (issue 15): decode and prefill at TP 1 vs TP 2.

pythia-1.4b- and OPT-1.3b-shaped models with random weights (``from_config`` after the same seed:
the TP 2 shards are the TP 1 model), bf16, the Triton backend, one GPU per rank with NCCL. Each size
runs in its own processes (``torch.multiprocessing.spawn``; TP 1 is the plain single-GPU model).

* check first: TP 2's last-16-position logits of the batch-1 prompt against the model in float64
  (SPEC's parity rule, TP 1's bf16 logits as the yardstick); a failing check is not timed.
* decode: ``generate(stats=)``'s own decode-phase time / steps (CUDA graph on), B / step time.
* prefill: the median of a fixed number of forwards over B x prompt tokens (every rank runs the
  same count: a timing loop that adapts its repetitions per rank would leave one in a collective).

Needs two CUDA GPUs; elsewhere every row is skipped and says so.
"""

from __future__ import annotations

import os
import tempfile

import torch

from .results import Row, Table

MODELS = ("pythia-1.4b", "opt-1.3b")
BATCHES = (1, 32)
PROMPT = 512
SIZES = (1, 2)
TABLE_ID = "model-tp"


def impl(tp: int) -> str:
    return f"gptkernels triton TP {tp}"


def table(new: int) -> Table:
    return Table(id=TABLE_ID, suite="model", title=f"Tensor parallel decode, bf16, prompt {PROMPT}, {new} new "
                 "tokens: TP 1 vs TP 2 (one GPU per rank, NCCL)", x="model, batch", unit="tok/s", plot="bar",
                 formula="B / decode step time",
                 note="decode step = generate's decode-phase time / steps; extra: prefill_ms, param_bytes_per_rank, "
                      "speedup over TP 1.")


def rows() -> list[tuple[str, str, str]]:
    """(table, case, impl) of every row."""
    return [(TABLE_ID, f"{name} B={b}", impl(tp)) for name in MODELS for b in BATCHES for tp in SIZES]


def planned_rows() -> int:
    return len(rows())


# ---- one rank ------------------------------------------------------------------------------------------


def _fixed_ms(fn, reps: int) -> float:
    """Median of ``reps`` timed calls after 2 warm-ups (CUDA events): the same count on every rank."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _worker(rank: int, world: int, name: str, out: str, rendezvous: str, new: int, reps: int) -> None:
    import torch.distributed as dist

    import gptkernels
    from gptkernels.models import PRESETS, from_config

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    group = None
    if world > 1:
        dist.init_process_group("nccl", init_method="file://" + rendezvous, rank=rank, world_size=world,
                                device_id=device)
        group = dist.group.WORLD
    preset = PRESETS[name]
    ids = torch.randint(0, preset["vocab_size"], (max(BATCHES), PROMPT), generator=torch.Generator().manual_seed(0))
    prompts = {b: ids[:b].to(device) for b in BATCHES}  # the same tokens on every rank
    res: dict = {"world": world}
    if world == 1:  # the float64 reference of the check (same seed: the same weights)
        torch.manual_seed(0)
        ref = from_config(preset, dtype=torch.float64, device=device)
        with torch.no_grad():
            res["ref"] = ref(prompts[1], backend="torch")[:, -16:].cpu()
        del ref
        torch.cuda.empty_cache()
    torch.manual_seed(0)
    model = from_config(preset, dtype=torch.bfloat16, device=device, tp_group=group)
    res["param_bytes_per_rank"] = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():
        res["logits"] = model(prompts[1], backend="triton")[:, -16:].cpu()
        for b in BATCHES:
            res[f"prefill_ms_{b}"] = _fixed_ms(lambda: model(prompts[b], backend="triton"), reps=5)
    for b in BATCHES:
        gptkernels.generate(model, prompts[b], 8, backend="triton")  # warm-up: compiles, captures
        steps = []
        for _ in range(reps):
            st: dict = {}
            gptkernels.generate(model, prompts[b], new, backend="triton", stats=st)
            steps.append(1e3 * st["decode_s"] / st["decode_steps"])
        res[f"step_ms_{b}"] = sorted(steps)[len(steps) // 2]
    if rank == 0:
        torch.save(res, out)
    if group is not None:
        dist.barrier()
        dist.destroy_process_group()


def _spawn(world: int, name: str, new: int, reps: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out, rendezvous = os.path.join(tmp, "result.pt"), os.path.join(tmp, "rendezvous")
        mp.spawn(_worker, args=(world, name, out, rendezvous, new, reps), nprocs=world, join=True)
        return torch.load(out, weights_only=False)


# ---- the rows -------------------------------------------------------------------------------------------


def run(sess, quick: bool, new: int) -> None:
    from .checks import compare

    sess.table(table(new))
    wanted = [r for r in rows() if sess.wanted(*r)]
    if not wanted:
        return
    gpus = torch.cuda.device_count()
    for name in MODELS:
        mine = [r for r in wanted if r[1].startswith(f"{name} B=")]
        if not mine:
            continue
        why = ("time budget of the suite spent" if sess.budget.exhausted() else
               None if gpus >= 2 else f"TP 1 vs TP 2 needs 2 CUDA GPUs; this machine has {gpus}")
        if why is not None:
            for t, case, i in mine:
                sess.skip(t, case, i, why, ours=True)
            continue
        try:
            got = {tp: _spawn(tp, name, new, 1 if quick else 3) for tp in SIZES}
        except Exception as e:
            for t, case, i in mine:
                sess.fail(t, case, i, e, ours=True)
            continue
        ref, base = got[1]["ref"].cuda(), got[1]["logits"].cuda()
        for t, case, i in mine:
            tp = int(i.rsplit(" ", 1)[1])
            b = int(case.rsplit("=", 1)[1])
            res = got[tp]
            chk = compare([("logits", res["logits"].cuda(), ref, base)])
            params = {"model": name, "B": b, "prompt": PROMPT, "new": new, "tp": tp, "dtype": "bfloat16"}
            if not chk.ok:
                sess.add(Row(table=t, case=case, impl=i, status="mismatch", ours=True, message=chk.problem,
                             err=chk.err, bound=chk.bound, params=params))
                continue
            step = res[f"step_ms_{b}"]
            extra = {"prefill_ms": res[f"prefill_ms_{b}"], "param_bytes_per_rank": res["param_bytes_per_rank"],
                     "speedup_over_tp1": got[1][f"step_ms_{b}"] / step}
            sess.add(Row(table=t, case=case, impl=i, status="ok", ours=True, ms=step, value=b / (step * 1e-3),
                         err=chk.err, bound=chk.bound, params=params, extra=extra))
