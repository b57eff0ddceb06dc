"""Attention (issue 2): forward and backward, bf16, causal, head dim 128 and 64, S from 1k to 16k.

B x S = 16k tokens and H = 2048 / D heads (a 2048-wide model), so every S fills the GPU the same way
(FlashAttention's benchmark convention). Beside our backends: torch SDPA per backend (flash, cuDNN,
efficient), FlexAttention compiled, the eager reference (small S) and the matmul ceiling. Then
window 256 at S = 16k against full causal and against FlexAttention's sliding window.

Last, decode: one query row against a dense KV cache (batch 1, Llama-3-8B's 32/8 heads), which
`flash_attn` serves with split keys; GB/s of K/V read against the copy ceiling.

Correctness before timing: the outputs (and gradients) of two (batch, head) slices, the first and the
last, against the float64 reference on the same inputs, held to SPEC's parity rule with the eager
bf16 computation as the yardstick. Heads are independent, so a slice's reference is exact.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from . import formulas, peers, timing
from .checks import compare
from .harness import Session, free_memory
from .results import Table

TOKENS, HIDDEN, WINDOW = 16384, 2048, 256
DTYPE = torch.bfloat16
OURS = ("triton", "cuda")
EAGER_MAX_S = 2048  # the eager reference materialises B*H*S*S float32 scores: small S only


#: Decode shape (Hq, Hkv, D): Llama-3-8B's attention, batch 1, one query row.
DECODE_HEADS = (32, 8, 128)


def config(quick: bool) -> dict:
    if quick:
        return {"dims": {128: (1024, 4096, 16384), 64: (4096,)}, "window_s": (16384,),
                "decode_sk": (32768,)}
    return {"dims": {128: (1024, 2048, 4096, 8192, 16384), 64: (1024, 2048, 4096, 8192, 16384)},
            "window_s": (4096, 16384), "decode_sk": (4096, 16384, 65536)}


def decode_impls() -> list[str]:
    return [f"gptkernels {b}" for b in OURS] + [f"torch sdpa {b}" for b in peers.SDPA_BACKENDS] + \
        ["flexattention (compiled)"]


#: The backward also runs with atomic dQ (FlashAttention-2's single dK/dV/dQ kernel, not bit-exact).
ATOMIC_DQ = "gptkernels triton (deterministic=False)"


def impls(direction: str, s: int, window: int | None, quick: bool) -> list[str]:
    names = [f"gptkernels {b}" for b in OURS]
    if direction == "bwd":
        names.insert(1, ATOMIC_DQ)
    if window is None:
        names += [f"torch sdpa {b}" for b in peers.SDPA_BACKENDS]
    names.append("flexattention (compiled)")
    if window is None and s <= EAGER_MAX_S and not (quick and direction == "bwd"):
        names.append("gptkernels torch (eager)")
    return names


def planned_rows(quick: bool) -> int:
    cfg = config(quick)
    n = 0
    for d, seqs in cfg["dims"].items():
        for s in seqs:
            n += len(impls("fwd", s, None, quick)) + len(impls("bwd", s, None, quick))
    for s in cfg["window_s"]:
        n += len(impls("fwd", s, WINDOW, quick)) + len(impls("bwd", s, WINDOW, quick))
    return n + len(cfg["decode_sk"]) * len(decode_impls())


def tables(quick: bool) -> list[Table]:
    out = []
    for d in config(quick)["dims"]:
        h = HIDDEN // d
        for direction, word in (("fwd", "forward"), ("bwd", "backward")):
            f = formulas.attention_flops(1, 1, 1, 1, 1, causal=True, backward=direction == "bwd").formula
            out.append(Table(
                id=f"attn-{direction}-d{d}", suite="attention",
                title=f"Attention {word}, bf16, causal, D={d}, H={h}, B=16k/S",
                x="S", unit="TFLOP/s", formula=f, ceiling="matmul", plot="line"))
    for direction, word in (("fwd", "forward"), ("bwd", "backward")):
        f = formulas.attention_flops(1, 1, 1, 1, 1, window=WINDOW, backward=direction == "bwd").formula
        out.append(Table(
            id=f"attn-window-{direction}", suite="attention",
            title=f"Sliding-window attention {word}, bf16, W={WINDOW}, D=128, H=16, B=16k/S",
            x="S", unit="TFLOP/s", formula=f, ceiling="matmul", plot="line",
            note="FLOPs count only the band's (query, key) pairs, so TFLOP/s compares the useful work."))
    hq, hkv, d = DECODE_HEADS
    out.append(Table(
        id="attn-decode", suite="attention",
        title=f"Decode attention over a dense KV cache, bf16, B=1, Sq=1, Hq={hq}, Hkv={hkv}, D={d}",
        x="Sk", unit="GB/s", formula=formulas.paged_kv_bytes([1], 1, 1, 2).formula.replace("seq_lens", "Sk"),
        ceiling="copy", plot="line",
        note="flash_attn splits the keys across programs here (flash-decoding); SDPA and Flex get GQA "
             "natively (enable_gqa) and is_causal=False (one row sees every key)."))
    return out


# --------------------------------------------------------------------------------------------------


class Case:
    """One shape: its input sets (shared by every implementation) and its float64 reference (lazy)."""

    def __init__(self, s: int, d: int, window: int | None, direction: str):
        self.s, self.d, self.window, self.direction = s, d, window, direction
        self.b, self.h = max(1, TOKENS // s), HIDDEN // d
        self.params = {"B": self.b, "H": self.h, "S": s, "D": d, "causal": True, "window": window,
                       "dtype": "bfloat16"}
        self.flops = formulas.attention_flops(self.b, self.h, s, s, d, causal=True, window=window,
                                              backward=direction == "bwd").value
        per_set = 4 * self.b * s * self.h * d * 2  # q, k, v, (dout | out)
        self.sets = [self._make() for _ in range(timing.n_sets(per_set))]
        self._ref = None

    def _make(self):
        shape = (self.b, self.s, self.h, self.d)
        grad = self.direction == "bwd"
        t = [torch.randn(shape, device=timing.DEVICE, dtype=DTYPE).requires_grad_(grad) for _ in range(3)]
        dout = torch.randn(shape, device=timing.DEVICE, dtype=DTYPE) if grad else None
        return SimpleNamespace(q=t[0], k=t[1], v=t[2], dout=dout, out=None)

    # (batch, head) slices the check looks at: the first and the last
    def _slices(self):
        return [(0, 0), (self.b - 1, self.h - 1)]

    def reference(self):
        """Per slice: float64 reference and eager bf16 (out, and dq/dk/dv for the backward)."""
        if self._ref is None:
            from gptkernels import reference

            s0 = self.sets[0]
            refs = []
            for b, h in self._slices():
                per = {}
                for tag, dtype, upcast in (("ref", torch.float64, True), ("base", DTYPE, False)):
                    q, k, v = (t.detach()[b:b + 1, :, h:h + 1].to(dtype).clone().requires_grad_(
                        self.direction == "bwd") for t in (s0.q, s0.k, s0.v))
                    with torch.set_grad_enabled(self.direction == "bwd"):
                        out = reference.attention(q, k, v, causal=True, window=self.window, upcast=upcast)
                        if self.direction == "bwd":
                            out.backward(s0.dout[b:b + 1, :, h:h + 1].to(dtype))
                            per[tag] = (q.grad, k.grad, v.grad)
                        else:
                            per[tag] = (out.detach(),)
                    del q, k, v, out
                refs.append(per)
                free_memory()
            self._ref = refs
        return self._ref

    def check(self, outs):
        """``outs``: the tensors to check, laid out (B, S, H, D): (out,) or (dq, dk, dv)."""
        names = ("out",) if self.direction == "fwd" else ("dq", "dk", "dv")
        pairs = []
        for (b, h), per in zip(self._slices(), self.reference()):
            for i, name in enumerate(names):
                got = outs[i][b:b + 1, :, h:h + 1]
                pairs.append((f"{name}[b={b},h={h}]", got, per["ref"][i], per["base"][i]))
        return compare(pairs)


def _forward_fn(impl: str, window: int | None):
    """The forward of one implementation on (B, S, H, D) tensors, returning (B, S, H, D)."""
    import gptkernels

    if impl.startswith("gptkernels "):
        backend = impl.split()[1]  # "triton", "cuda", or "torch" (the eager reference)
        deterministic = impl != ATOMIC_DQ
        return lambda q, k, v: gptkernels.flash_attn(q, k, v, causal=True, window=window, backend=backend,
                                                     deterministic=deterministic)
    if impl.startswith("torch sdpa "):
        name = impl.split()[2]
        return lambda q, k, v: peers.sdpa(name, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True).transpose(1, 2)
    if impl.startswith("flexattention"):
        flex = peers.flex_compiled()
        masks = {}

        def run(q, k, v):
            s = q.shape[1]
            if s not in masks:  # built once per shape, outside the timed calls after the first
                mod = peers.causal_mod if window is None else peers.sliding_window_mod(window)
                masks[s] = peers.flex_block_mask(mod, s, s, q.device)
            return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        block_mask=masks[s]).transpose(1, 2)

        return run
    raise ValueError(f"unknown attention implementation {impl!r}")


def _measure(sess: Session, table: str, case: Case, impl: str):
    common = dict(ours=impl.startswith("gptkernels"), x=case.s, params=case.params, flops=case.flops)
    label = str(case.s)
    if impl.startswith("flexattention"):  # a Flex compile that cannot finish is not started
        need = timing.COMPILE_S[f"flex {case.direction}"]
        if not sess.budget.allows(need):
            return sess.skip(table, label, impl, sess.budget.why_not(need, "a FlexAttention compile"), **common)
    try:
        fwd = _forward_fn(impl, case.window)
    except Exception as e:
        return sess.fail(table, label, impl, e, **common)
    if case.direction == "fwd":
        def run(s):
            return fwd(s.q, s.k, s.v)

        with torch.no_grad():
            return sess.measure(table, label, impl, run=run, sets=case.sets,
                                check=lambda out, s0: case.check((out,)), **common)

    def setup(sets):
        for s in sets:  # one forward per set; the timed backward reuses its graph
            s.q.grad = s.k.grad = s.v.grad = None
            s.out = fwd(s.q, s.k, s.v)
        return sets

    def run(s):
        s.out.backward(s.dout, retain_graph=True)

    def check(_, s0):
        return case.check((s0.q.grad, s0.k.grad, s0.v.grad))

    grads = [t for s in case.sets for t in (s.q, s.k, s.v)]
    try:
        return sess.measure(table, label, impl, run=run, sets=case.sets, check=check, setup=setup,
                            grad_to_none=grads, **common)
    finally:
        for s in case.sets:  # drop the graph before the next implementation builds its own
            s.out = None
            s.q.grad = s.k.grad = s.v.grad = None


class DecodeCase:
    """One query row per head against Sk cached keys (GQA), checked whole against float64."""

    def __init__(self, sk: int):
        hq, hkv, d = DECODE_HEADS
        self.sk, self.shape_q, self.shape_kv = sk, (1, 1, hq, d), (1, sk, hkv, d)
        self.params = {"B": 1, "Sq": 1, "Sk": sk, "Hq": hq, "Hkv": hkv, "D": d, "dtype": "bfloat16"}
        self.bytes = formulas.paged_kv_bytes([sk], hkv, d, formulas.dtype_bytes(DTYPE)).value
        self.sets = [self._make() for _ in range(timing.n_sets(int(self.bytes)))]
        self._ref = None

    def _make(self):
        q = torch.randn(self.shape_q, device=timing.DEVICE, dtype=DTYPE)
        k, v = (torch.randn(self.shape_kv, device=timing.DEVICE, dtype=DTYPE) for _ in range(2))
        return SimpleNamespace(q=q, k=k, v=v)

    def check(self, out):
        from gptkernels import reference

        if self._ref is None:
            s0 = self.sets[0]
            ref = reference.attention(s0.q.double(), s0.k.double(), s0.v.double(), causal=True)
            base = reference.attention(s0.q, s0.k, s0.v, causal=True, upcast=False)
            self._ref = (ref, base)
        return compare([("out", out, *self._ref)])


def _decode_fn(impl: str):
    """(B, 1, Hq, D) x (B, Sk, Hkv, D) -> (B, 1, Hq, D): one row that sees every key."""
    import gptkernels

    if impl.startswith("gptkernels "):
        backend = impl.split()[1]
        return lambda q, k, v: gptkernels.flash_attn(q, k, v, causal=True, backend=backend)
    t = (lambda x: x.transpose(1, 2))  # noqa: E731
    if impl.startswith("torch sdpa "):
        name = impl.split()[2]
        return lambda q, k, v: t(peers.sdpa(name, t(q), t(k), t(v), is_causal=False, enable_gqa=True))
    if impl.startswith("flexattention"):
        flex = peers.flex_compiled()
        return lambda q, k, v: t(flex(t(q), t(k), t(v), enable_gqa=True))
    raise ValueError(f"unknown decode implementation {impl!r}")


def _measure_decode(sess: Session, case: DecodeCase, impl: str):
    common = dict(ours=impl.startswith("gptkernels"), x=case.sk, params=case.params, bytes=case.bytes)
    if impl.startswith("flexattention") and not sess.budget.allows(timing.COMPILE_S["flex decode"]):
        return sess.skip("attn-decode", str(case.sk), impl,
                         sess.budget.why_not(timing.COMPILE_S["flex decode"], "a FlexAttention compile"), **common)
    try:
        fn = _decode_fn(impl)
    except Exception as e:
        return sess.fail("attn-decode", str(case.sk), impl, e, **common)
    with torch.no_grad():
        return sess.measure("attn-decode", str(case.sk), impl, run=lambda s: fn(s.q, s.k, s.v),
                            sets=case.sets, check=lambda out, s0: case.check(out), **common)


def run(sess: Session, quick: bool) -> None:
    for t in tables(quick):
        sess.table(t)
    cfg = config(quick)
    # what the targets read first (full causal at D=128 and the window at the longest S, then the
    # rest, longest first), so a run that reaches its time budget skips the least important rows
    both = ("fwd", "bwd")
    head_d = next(iter(cfg["dims"]))  # 128, the headline head dim
    longest = max(cfg["dims"][head_d])
    jobs = [(f"attn-{direction}-d{head_d}", longest, head_d, None, direction) for direction in both]
    jobs += [(f"attn-window-{direction}", s, 128, WINDOW, direction)
             for s in sorted(cfg["window_s"], reverse=True) for direction in both]
    jobs += [(f"attn-{direction}-d{d}", s, d, None, direction) for d, seqs in cfg["dims"].items()
             for s in sorted(seqs, reverse=True) if (d, s) != (head_d, longest) for direction in both]
    for table, s, d, window, direction in jobs:
        names = [n for n in impls(direction, s, window, quick) if sess.wanted(table, str(s), n)]
        if not names:  # none of its rows is in this run's plan: the inputs are not even built
            continue
        try:
            case = Case(s, d, window, direction)
        except Exception as e:  # e.g. out of memory building the inputs: every row says so
            for impl in names:
                sess.fail(table, str(s), impl, e, x=s, ours=impl.startswith("gptkernels"))
            continue
        for impl in names:
            _measure(sess, table, case, impl)
        del case
    for sk in cfg["decode_sk"]:
        names = [n for n in decode_impls() if sess.wanted("attn-decode", str(sk), n)]
        if not names:
            continue
        try:
            dcase = DecodeCase(sk)
        except Exception as e:
            for impl in names:
                sess.fail("attn-decode", str(sk), impl, e, x=sk, ours=impl.startswith("gptkernels"))
            continue
        for impl in names:
            _measure_decode(sess, dcase, impl)
        del dcase
        free_memory()
        free_memory()
