"""Attention (issue 2): forward and backward, bf16, causal, head dim 128 and 64, S from 1k to 16k.

B x S = 16k tokens and H = 2048 / D heads (a 2048-wide model), so every S fills the GPU the same way
(FlashAttention's benchmark convention). Beside our backends: torch SDPA per backend (flash, cuDNN,
efficient), FlexAttention compiled, the eager reference (small S) and the matmul ceiling. Then
window 256 at S = 16k against full causal and against FlexAttention's sliding window.

Last, decode: one query row against a dense KV cache (batch 1, Llama-3-8B's 32/8 heads), which
`flash_attn` serves with split keys; GB/s of K/V read against the copy ceiling.

Then issue 19's paths, after every other row (so they never take time from a headline row): soft
cap, ALiBi, a two-sided non-causal window (256, 256) and a value head dim different from the query's
(dv 128, d 192), forward and backward at B=2, S=4096, H=16, D=128, beside plain causal attention at
the same shape and the peers that serve each one (FlexAttention with a score_mod / block mask, SDPA
where it can express it, FlashAttention's flash_attn_func where the package is installed).

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
    return n + len(cfg["decode_sk"]) * len(decode_impls()) + \
        sum(len(feature_impls(f, dr)) for f in FEATURES for dr in ("fwd", "bwd"))


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
    for direction, word in (("fwd", "forward"), ("bwd", "backward")):
        f = formulas.attention_pair_flops(1, 1, 1, 1, 1, backward=direction == "bwd").formula
        out.append(Table(
            id=f"attn-feat-{direction}", suite="attention", x="feature", unit="TFLOP/s", formula=f,
            ceiling="matmul", plot="bar",
            title=f"Attention {word} with softcap, ALiBi, a two-sided window, dv != d, bf16, B={FEAT_B}, "
                  f"S={FEAT_S}, H={FEAT_H}, D={FEAT_D}",
            note="pairs: the visible (query, key) pairs (causal S*(S+1)/2, the window's band); soft cap and "
                 "ALiBi add no matmul work, so each row's TFLOP/s against the 'causal' row is its cost. "
                 f"dv != d: D={DV_DIMS[0]}, Dv={DV_DIMS[1]} (DeepSeek MLA's). The CUDA backend refuses "
                 "these options (not listed)."))
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

    dtype = DTYPE

    # (batch, head) slices the check looks at: the first and the last
    def _slices(self):
        return [(0, 0), (self.b - 1, self.h - 1)]

    def _ref_opts(self, b: int, h: int) -> dict:
        """The reference's arguments for the one-head slice (b, h)."""
        return {"causal": True, "window": self.window}

    def reference(self):
        """Per slice: float64 reference and eager in the inputs' dtype (out, and dq/dk/dv for the
        backward)."""
        if self._ref is None:
            from gptkernels import reference

            s0 = self.sets[0]
            refs = []
            for b, h in self._slices():
                per = {}
                for tag, dtype, upcast in (("ref", torch.float64, True), ("base", self.dtype, False)):
                    q, k, v = (t.detach()[b:b + 1, :, h:h + 1].to(dtype).clone().requires_grad_(
                        self.direction == "bwd") for t in (s0.q, s0.k, s0.v))
                    with torch.set_grad_enabled(self.direction == "bwd"):
                        out = reference.attention(q, k, v, upcast=upcast, **self._ref_opts(b, h))
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


def _measure(sess: Session, table: str, case: Case, impl: str, label: str | None = None, make_fn=None):
    """One row; ``make_fn(impl)`` gives the forward (default: :func:`_forward_fn` with the case's window)."""
    x = case.s if label is None else None
    common = dict(ours=impl.startswith("gptkernels"), x=x, params=case.params, flops=case.flops)
    label = str(case.s) if label is None else label
    if impl.startswith("flexattention"):  # a Flex compile that cannot finish is not started
        need = timing.COMPILE_S[f"flex {case.direction}"]
        if not sess.budget.allows(need):
            return sess.skip(table, label, impl, sess.budget.why_not(need, "a FlexAttention compile"), **common)
    try:
        fwd = _forward_fn(impl, case.window) if make_fn is None else make_fn(impl)
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
    _features(sess)


# --------------------------------------------------------------------------------------------------
# Issue 19's paths: softcap, ALiBi, two-sided windows, dv != d (tables attn-feat-fwd / attn-feat-bwd)
# --------------------------------------------------------------------------------------------------

FEAT_B, FEAT_S, FEAT_H, FEAT_D = 2, 4096, 16, 128
SOFTCAP = 30.0  # Gemma-2's attention soft cap is 50, Grok's 30: any value exercises the same path
TWO_SIDED = (256, 256)  # FlashAttention's window_size=(left, right), causal=False
DV_DIMS = (192, 128)  # (d, dv): DeepSeek MLA's query/key and value head dims
DROPOUT_P = 0.1  # GPT-2's attn_pdrop
DROPOUT_SEED = 1234  # every timed call draws its Philox seed from a generator seeded with this
FEATURES = ("causal", f"softcap {SOFTCAP:g}", "alibi", f"window {TWO_SIDED}", f"dropout {DROPOUT_P:g}",
            f"dv {DV_DIMS[1]}, d {DV_DIMS[0]}")
SDPA_ALIBI = "torch sdpa efficient (additive mask)"
FLASH_ATTN_PEER = "flash-attn flash_attn_func"


def feature_impls(feature: str, direction: str) -> list[str]:
    """Ours (Triton) beside the peers that serve ``feature``: SDPA where it can express it (ALiBi as
    an additive float mask; dv != d natively; no soft cap, no two-sided window here), FlexAttention
    (score_mod / block mask), FlashAttention 2 where installed (it has no dv != d). "causal" is the
    plain baseline at the same shape."""
    names = ["gptkernels triton"]
    if direction == "bwd":
        names.append(ATOMIC_DQ)
    if feature == "causal" or feature.startswith("dropout"):
        # dropout: ours only; a peer's dropout mask is its own, so its output has nothing to be
        # checked against (ours is checked with the kernels' own mask, see FeatureCase._ref_opts)
        return names
    if feature == "alibi":
        names.append(SDPA_ALIBI)
    if feature.startswith("dv"):
        names += [f"torch sdpa {b}" for b in peers.SDPA_BACKENDS]  # flash: "No available kernel" (unavailable)
    names.append("flexattention (compiled)")
    if not feature.startswith("dv"):
        names.append(FLASH_ATTN_PEER)
    return names


def alibi_slopes(heads: int, device=None) -> torch.Tensor:
    """ALiBi's geometric slopes (Press et al.; BLOOM's for a power-of-two head count): 2^(-8 i / H),
    i = 1..H, float32 (H,)."""
    i = torch.arange(1, heads + 1, dtype=torch.float32)
    return torch.pow(2.0, -8.0 * i / heads).to(device)


def feature_options(feature: str, heads: int, device=None) -> dict:
    """flash_attn's arguments for ``feature`` (and the reference's)."""
    if feature.startswith("softcap"):
        return {"causal": True, "window": None, "softcap": SOFTCAP}
    if feature == "alibi":
        return {"causal": True, "window": None, "alibi_slopes": alibi_slopes(heads, device)}
    if feature.startswith("window"):
        return {"causal": False, "window": TWO_SIDED}
    if feature.startswith("dropout"):
        return {"causal": True, "window": None, "dropout_p": DROPOUT_P}
    return {"causal": True, "window": None}


def dropout_generator() -> torch.Generator:
    """A fresh generator per call, so every timed call (and the check) draws the same dropout seed."""
    return torch.Generator().manual_seed(DROPOUT_SEED)


class FeatureCase(Case):
    """One issue-19 feature at one shape (B, S, H, D; dv != d: D and Dv from DV_DIMS); the CPU test
    builds it small, in float32."""

    def __init__(self, feature: str, direction: str, *, b: int = FEAT_B, s: int = FEAT_S, h: int = FEAT_H,
                 d: int = FEAT_D, dtype: torch.dtype = DTYPE):
        self.feature, self.direction, self.s, self.b, self.h, self.dtype = feature, direction, s, b, h, dtype
        self.d, self.dv = DV_DIMS if feature.startswith("dv") else (d, d)
        self.opts = feature_options(feature, h, timing.DEVICE)
        self.window = self.opts["window"]
        left_right = self.window if isinstance(self.window, tuple) else None
        pairs = formulas.window_pairs(s, s, *left_right) if left_right else formulas.band_area(s, s, None)
        self.params = {"B": b, "H": h, "S": s, "D": self.d, "Dv": self.dv, "feature": feature,
                       "causal": self.opts["causal"], "window": list(left_right) if left_right else None,
                       "softcap": self.opts.get("softcap"), "alibi": "alibi_slopes" in self.opts,
                       "dropout_p": self.opts.get("dropout_p", 0.0),
                       "dtype": str(dtype).replace("torch.", "")}
        self.flops = formulas.attention_pair_flops(b, h, pairs, self.d, self.dv if self.dv != self.d else None,
                                                   backward=direction == "bwd").value
        per_set = 2 * b * s * h * (2 * self.d + 2 * self.dv)
        self.sets = [self._make() for _ in range(timing.n_sets(per_set))]
        self._ref = None
        self._mask = None

    def _make(self):
        grad = self.direction == "bwd"
        q, k = (torch.randn(self.b, self.s, self.h, self.d, device=timing.DEVICE, dtype=self.dtype) for _ in range(2))
        v = torch.randn(self.b, self.s, self.h, self.dv, device=timing.DEVICE, dtype=self.dtype)
        dout = torch.randn(self.b, self.s, self.h, self.dv, device=timing.DEVICE, dtype=self.dtype) if grad else None
        return SimpleNamespace(q=q.requires_grad_(grad), k=k.requires_grad_(grad), v=v.requires_grad_(grad),
                               dout=dout, out=None)

    def _ref_opts(self, b: int, h: int) -> dict:
        """The reference's arguments for the one-head slice (b, h): its ALiBi slope; with dropout the
        kernels' own keep mask for the seed every timed call draws (as FlashAttention's tests use
        its S_dmask)."""
        opts = dict(self.opts)
        if "alibi_slopes" in opts:
            opts["alibi_slopes"] = opts["alibi_slopes"][h:h + 1]
        if "dropout_p" in opts:
            from gptkernels.attention import dropout_seed
            from gptkernels.triton.flash_attn import dropout_mask

            keep = dropout_mask(dropout_seed(dropout_generator()), opts["dropout_p"], self.b, self.h, self.s,
                                self.s, device=timing.DEVICE)
            opts["dropout_mask"] = keep[b:b + 1, h:h + 1].clone()
            del keep
        return opts

    def sdpa_alibi_mask(self) -> torch.Tensor:
        """ALiBi plus the causal mask as SDPA's additive float mask (1, H, S, S) in the inputs' dtype,
        built once per case (not timed; 512 MB at the benchmark's shape), broadcast over the batch."""
        if self._mask is None:
            from gptkernels import reference

            pos = torch.arange(self.s, device=timing.DEVICE)
            bias = reference.alibi_bias(self.opts["alibi_slopes"], pos, pos, torch.float32)[None]
            causal = reference.attention_mask(self.s, self.s, causal=True, device=timing.DEVICE)
            self._mask = bias.masked_fill(~causal, float("-inf")).to(self.dtype)
        return self._mask


def dv_refusal(device=None) -> str | None:
    """Why ``flash_attn`` cannot run dv != d here (None: it runs): asked of the torch backend on tiny
    CPU tensors, which shares the public op's checks (no kernel compiled). The row is skipped with
    this reason instead of failing."""
    import gptkernels

    q, k = (torch.randn(1, 2, 1, DV_DIMS[0]) for _ in range(2))
    v = torch.randn(1, 2, 1, DV_DIMS[1])
    try:
        out = gptkernels.flash_attn(q, k, v, backend="torch")
    except Exception as e:  # ValueError/TypeError: the op refuses dv != d (this build has no such path)
        return f"flash_attn refuses dv != d here: {type(e).__name__}: {e}"[:300]
    if out.shape[-1] != DV_DIMS[1]:
        return f"flash_attn returned head dim {out.shape[-1]} for dv={DV_DIMS[1]}"
    return None


def _flex_feature_mods(case: FeatureCase):
    """(score_mod, mask_mod) of FlexAttention for the case's feature (the same scores as ours)."""
    score_mod = None
    if "softcap" in case.opts:
        cap = case.opts["softcap"]

        def score_mod(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
    elif "alibi_slopes" in case.opts:
        slopes = case.opts["alibi_slopes"]

        def score_mod(score, b, h, q_idx, kv_idx):  # Sq == Sk: bottom-right is top-left
            return score - slopes[h] * (q_idx - kv_idx).abs()
    if isinstance(case.window, tuple):
        left, right = case.window

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)
    else:
        mask_mod = peers.causal_mod
    return score_mod, mask_mod


def _feature_fn(case: FeatureCase, impl: str, flex=None):
    """The forward of one implementation of the case's feature on (B, S, H, D) tensors. ``flex``:
    FlexAttention as called (default: compiled; the CPU test passes the eager function)."""
    import gptkernels

    t = (lambda x: x.transpose(1, 2))  # noqa: E731
    if impl.startswith("gptkernels "):
        backend, deterministic = impl.split()[1], impl != ATOMIC_DQ
        if "dropout_p" in case.opts:
            return lambda q, k, v: gptkernels.flash_attn(q, k, v, backend=backend, deterministic=deterministic,
                                                         generator=dropout_generator(), **case.opts)
        return lambda q, k, v: gptkernels.flash_attn(q, k, v, backend=backend, deterministic=deterministic,
                                                     **case.opts)
    if impl == SDPA_ALIBI or impl.startswith("torch sdpa "):
        import torch.nn.functional as F
        from torch.nn.attention import sdpa_kernel

        name = "efficient" if impl == SDPA_ALIBI else impl.split()[2]
        mask = case.sdpa_alibi_mask() if impl == SDPA_ALIBI else None

        def run(q, k, v):
            with sdpa_kernel(peers.sdpa_backend(name)):
                return t(F.scaled_dot_product_attention(t(q), t(k), t(v), attn_mask=mask, is_causal=mask is None))

        return run
    if impl.startswith("flexattention"):
        flex = flex or peers.flex_compiled()
        score_mod, mask_mod = _flex_feature_mods(case)
        block_mask = peers.flex_block_mask(mask_mod, case.s, case.s, timing.DEVICE)
        return lambda q, k, v: t(flex(t(q), t(k), t(v), score_mod=score_mod, block_mask=block_mask))
    if impl == FLASH_ATTN_PEER:
        try:
            from flash_attn import flash_attn_func
        except ImportError as e:
            raise gptkernels.BackendUnavailableError(f"the flash-attn package is not installed ({e})") from e
        window = case.window if isinstance(case.window, tuple) else (-1, -1)
        slopes = case.opts.get("alibi_slopes")
        cap = case.opts.get("softcap") or 0.0
        return lambda q, k, v: flash_attn_func(q, k, v, causal=case.opts["causal"], window_size=window,
                                               softcap=cap, alibi_slopes=slopes)
    raise ValueError(f"unknown attention feature implementation {impl!r}")


def _features(sess: Session) -> None:
    """The attn-feat rows: every feature forward, then backward (Flex's backward compiles cost most)."""
    for direction in ("fwd", "bwd"):
        table = f"attn-feat-{direction}"
        for feature in FEATURES:
            names = [n for n in feature_impls(feature, direction) if sess.wanted(table, feature, n)]
            if not names:
                continue
            if feature.startswith("dv"):
                why = dv_refusal()
                if why is not None:  # the op (or its reference) has no dv != d: every row says why
                    for impl in names:
                        sess.skip(table, feature, impl, why, ours=impl.startswith("gptkernels"))
                    continue
            try:
                case = FeatureCase(feature, direction)
            except Exception as e:
                for impl in names:
                    sess.fail(table, feature, impl, e, ours=impl.startswith("gptkernels"))
                continue
            for impl in names:
                _measure(sess, table, case, impl, label=feature, make_fn=lambda i, c=case: _feature_fn(c, i))
            del case
            free_memory()
