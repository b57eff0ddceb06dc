"""Models (issue 5): random-weight pythia-1.4b-shaped (GPT-NeoX) and gpt2-medium-shaped models, bf16.

Prefill tokens/s and decode tokens/s at batch 1 and 32 (prompt 512, 256 new), beside HF
transformers' ``generate`` with its SDPA attention, on the same weights (HF's random init, loaded
into ours with ``load_hf_state_dict``), and the same HF model with ``attn_implementation="gptkernels"``
(:mod:`gptkernels.hf`: what a transformers user gets from our attention alone). Batch-1 decode step time against its bandwidth floor
(weight bytes + KV bytes per step / copy GB/s), shown as effective GB/s and % of the copy ceiling.

* prefill: the median time of one forward over B x 512 tokens (full logits, both sides).
* decode: generate(N) and generate(1) timed whole (CUDA events); decode step = (t_N - t_1)/(N - 1);
  decode tokens/s = B / step. Greedy, no EOS, so every row makes N tokens.
* check first: our logits on the batch-1 prompt against HF's model in float64 (SPEC's parity rule,
  HF's bf16 logits as the yardstick); a failing check is reported and that backend is not timed.
* model-hf-padded (issue 17): HF ``generate`` on a batch of left-padded prompts of different lengths,
  transformers' sdpa vs our attention (``gptkernels.hf``: unpadded to varlen ``flash_attn``) vs
  ``flash_attention_2`` where the flash-attn package is installed (the GPU image has none: that row
  says so). Checked first on two padded rows (real positions) against float64.
"""

from __future__ import annotations

import copy

import torch

from . import formulas, timing
from .checks import compare
from . import model_tp  # the tensor-parallel rows (TP 1 vs TP 2)
from .harness import Session, free_memory
from .results import Row, Table

MODELS = ("pythia-1.4b", "gpt2-medium")
BATCHES = (1, 32)
PROMPT = 512
DTYPE = torch.bfloat16
OURS = ("triton", "cuda")
HF = "hf transformers (sdpa)"
HF_OURS = "hf transformers (gptkernels attention)"
HF_FA2 = "hf transformers (flash_attention_2)"
#: model-step-variants: the batch-1 decode step of the triton backend with generate's switches that
#: only a GPU can decide (issue 14 item 6): the fused decode ops (default on) and compile_step (default
#: off), each on and off. impl -> generate's keywords.
STEP_VARIANTS = {
    "triton fused (default)": {},
    "triton unfused (fused=False)": {"fused": False},
    "triton fused + compile_step": {"compile_step": True},
    "triton unfused + compile_step": {"fused": False, "compile_step": True},
}
#: model-hf-padded: batch, and prompt lengths drawn from [PADDED_MIN, PROMPT], left-padded to PROMPT
PADDED_BATCH, PADDED_MIN = 32, 128
PADDED_IMPLS = (HF, HF_OURS, HF_FA2)


def config(quick: bool) -> dict:
    return {"new": 256, "reps": 1 if quick else 3}


def impls() -> list[str]:
    return [f"gptkernels {b}" for b in OURS] + [HF, HF_OURS]


def planned_rows(quick: bool) -> int:
    # per model and impl: prefill and decode per batch, and the batch-1 step row
    return len(MODELS) * len(impls()) * (2 * len(BATCHES) + 1) + len(MODELS) * len(PADDED_IMPLS) + \
        len(MODELS) * len(STEP_VARIANTS) + model_tp.planned_rows()


def tables(quick: bool) -> list[Table]:
    new = config(quick)["new"]
    return [
        Table(id="model-prefill", suite="model", title=f"Prefill, bf16, prompt {PROMPT}, random weights",
              x="model, batch", unit="tok/s", ceiling="matmul", plot="bar",
              formula=formulas.prefill_flops(1, 1, 1, 1, 1, 1, 1).formula + " (for % of matmul)"),
        Table(id="model-decode", suite="model", title=f"Decode, bf16, prompt {PROMPT}, {new} new tokens, greedy",
              x="model, batch", unit="tok/s", plot="bar",
              formula="B / decode step time",
              note="decode step = generate's own decode-phase time / steps (ours, CUDA-graph capture "
                   "excluded and reported apart), or (t(N new) - t(1 new)) / (N - 1) for HF's generate."),
        Table(id="model-step", suite="model", title="Batch-1 decode step against its bandwidth floor",
              x="model", unit="GB/s", ceiling="copy", plot=None,
              formula=formulas.decode_step_bytes(1, 1, 1, 1, 1, 1).formula + " per step / step time",
              note="floor = these bytes / copy GB/s; x floor = step time / floor (target <= 1.5)."),
        Table(id="model-hf-padded", suite="model", x="model, batch", unit="tok/s", plot="bar",
              title=f"HF generate, left-padded prompts of {PADDED_MIN}-{PROMPT} tokens, {new} new, bf16",
              formula="B / decode step time",
              note="transformers' generate, attn_implementation sdpa / gptkernels (gptkernels.hf) / "
                   "flash_attention_2 (only where flash-attn is installed: not on the GPU image). decode "
                   "step = (t(N new) - t(1 new)) / (N - 1); extra: prefill_ms = t(1 new), fallbacks = "
                   "gptkernels.hf's calls handed to transformers (0 expected), same_tokens = rows whose "
                   "first 16 new tokens equal sdpa's."),
        model_tp.table(new),
        Table(id="model-step-variants", suite="model", x="model", unit="ms", plot=None,
              title="Batch-1 decode step, triton backend: fused decode ops and compile_step on and off",
              formula="generate's decode-phase time / steps (CUDA graph on)",
              note="decides generate's defaults on CUDA (issue 14 item 6): fused=None (the fused ops, on) "
                   "and compile_step=False (off) until these rows say otherwise. extra: x_floor (step / "
                   "bandwidth floor), greedy_agreement_16 with the default, compile_ms."),
    ]


def _hf_model(preset: dict):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**preset)
    with torch.device(timing.DEVICE):
        hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    hf = hf.to(DTYPE).eval()
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    return hf


def _ours(preset: dict, hf):
    from gptkernels.models import from_config

    model = from_config(preset, dtype=DTYPE, device=timing.DEVICE)
    model.load_hf_state_dict(hf.state_dict())
    return model


def _weight_bytes(model) -> tuple[int, int]:
    """(bytes a decode step reads, matmul weights for the prefill flop count), for our model or HF's.

    A step reads every weight once, except embedding tables (token, position), of which it reads one
    row each: those are left out unless they are also the LM head (tied). Matmul weights: every
    nn.Linear and HF's GPT-2 Conv1D.
    """
    seen, total, matmul, linear_weights = set(), 0, 0, set()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D":
            linear_weights.add(id(m.weight))
            matmul += m.weight.numel()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and id(m.weight) not in linear_weights:
            total -= m.weight.numel() * m.weight.element_size()
    return total, matmul


class ModelBench:
    def __init__(self, sess: Session, name: str, quick: bool):
        from gptkernels.models import PRESETS, from_hf_config

        self.sess, self.name, self.quick = sess, name, quick
        self.preset = PRESETS[name]
        self.cfg = from_hf_config(self.preset)
        self.new, self.reps = config(quick)["new"], config(quick)["reps"]
        self.hf = _hf_model(self.preset)
        self.weight_bytes, self.matmul_params = _weight_bytes(self.hf)  # same shapes as ours
        self.ours = self.hf_ours = None
        gen = torch.Generator(device=timing.DEVICE).manual_seed(0)
        vocab = self.cfg.vocab_size
        self.prompts = {b: torch.randint(0, vocab, (b, PROMPT), device=timing.DEVICE, generator=gen) for b in BATCHES}
        self.prompts[1] = self.prompts[max(BATCHES)][:1].clone()  # batch 1 is batch 32's first row
        with torch.no_grad():
            ids = self.prompts[1]
            self.base = self.hf(input_ids=ids, use_cache=False).logits
            hf64 = copy.deepcopy(self.hf).double()
            self.ref = hf64(input_ids=ids, use_cache=False).logits
            del hf64
        free_memory()

    def params(self, b: int) -> dict:
        c = self.cfg
        return {"model": self.name, "B": b, "prompt": PROMPT, "new": self.new, "layers": c.num_layers,
                "hidden": c.hidden_size, "heads": c.num_heads, "vocab": c.vocab_size, "dtype": "bfloat16"}

    # ---- one implementation ------------------------------------------------------------------------

    def hf_model(self, impl: str):
        """HF's model as is (HF), or a copy whose attention is ours (HF_OURS, made on first use)."""
        if impl == HF:
            return self.hf
        if impl == HF_FA2:
            model = copy.deepcopy(self.hf)
            model.set_attn_implementation("flash_attention_2")
            return model
        if self.hf_ours is None:
            import gptkernels.hf

            self.hf_ours = copy.deepcopy(self.hf)
            self.hf_ours.set_attn_implementation(gptkernels.hf.register())
        return self.hf_ours

    def forward_fn(self, impl: str):
        if impl in (HF, HF_OURS):
            hf = self.hf_model(impl)
            return lambda ids: hf(input_ids=ids, use_cache=False).logits
        backend = impl.split()[1]
        if self.ours is None:
            self.ours = _ours(self.preset, self.hf)
        return lambda ids: self.ours(ids, backend=backend)

    def generate_fn(self, impl: str):
        """gen(ids, n) -> (tokens, stats or None). Ours reports its phases in ``stats`` (prefill,
        CUDA-graph capture, decode, with syncs at the boundaries)."""
        if impl in (HF, HF_OURS):
            hf = self.hf_model(impl)

            def gen(ids, n):
                mask = torch.ones_like(ids)
                return hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False), None
            return gen
        import gptkernels

        backend = impl.split()[1]

        def gen(ids, n):
            stats = {}
            try:
                out = gptkernels.generate(self.ours, ids, n, backend=backend, stats=stats)
            except TypeError as e:  # a generate without the stats keyword: time it whole instead
                if "stats" not in str(e):
                    raise
                return gptkernels.generate(self.ours, ids, n, backend=backend), None
            return out, stats

        return gen

    def run_impl(self, impl: str) -> None:
        ours = impl != HF
        label = {b: f"{self.name} B={b}" for b in BATCHES}
        tags = [(t, b) for t, b in _tags() if self.sess.wanted(t, self.name if t == "model-step" else label[b], impl)]
        if not tags:  # none of this implementation's rows is in the run's plan
            return

        def fail_all(e):
            for table, b in tags:
                lab = self.name if table == "model-step" else label[b]
                self.sess.fail(table, lab, impl, e, ours=ours, params=self.params(b))

        if self.sess.budget.exhausted():  # the check and agreement below compile and generate: skip them too
            for table, b in tags:
                self.sess.skip(table, self.name if table == "model-step" else label[b], impl,
                               "time budget of the suite spent", ours=ours)
            return
        with torch.no_grad():
            try:
                fwd = self.forward_fn(impl)
                out = fwd(self.prompts[1])
                chk = compare([("logits", out, self.ref, self.base)])
                del out
            except Exception as e:
                return fail_all(e)
            if not chk.ok:
                for table, b in tags:
                    lab = self.name if table == "model-step" else label[b]
                    self.sess.add(Row(table=table, case=lab, impl=impl, status="mismatch", ours=ours,
                                      message=chk.problem, err=chk.err, bound=chk.bound, params=self.params(b)))
                return
            check = dict(err=chk.err, bound=chk.bound)
            agree = self._agreement(impl)
            for b in BATCHES:
                if ("model-prefill", b) in tags:
                    self._prefill(impl, fwd, b, label[b], self.matmul_params, check, ours)
            for b in BATCHES:
                wanted = [t for t in ("model-decode", "model-step") if (t, b) in tags]
                if wanted:
                    self._decode(impl, b, label[b], self.weight_bytes, check, ours, agree, wanted)

    def _agreement(self, impl: str) -> int | None:
        """How many of the first 16 greedy tokens match HF's (information: bf16 ties can flip)."""
        if impl == HF:
            return None
        try:
            n = 16
            mine = self.generate_fn(impl)(self.prompts[1], n)[0][0, PROMPT:]
            theirs = self.generate_fn(HF)(self.prompts[1], n)[0][0, PROMPT:]
            same = (mine == theirs).int().cumprod(0)
            return int(same.sum())
        except Exception:
            return None

    def _prefill(self, impl, fwd, b, label, matmul_params, check, ours):
        if self.sess.budget.exhausted():
            return self.sess.skip("model-prefill", label, impl, "time budget of the suite spent", ours=ours)
        c = self.cfg
        flops = formulas.prefill_flops(matmul_params, b * PROMPT, c.num_layers, c.num_heads, PROMPT,
                                       c.head_dim, b).value
        try:
            ids = self.prompts[b]
            ms = timing.median_ms(lambda: fwd(ids), quick=self.quick)
        except Exception as e:
            return self.sess.fail("model-prefill", label, impl, e, ours=ours, params=self.params(b))
        tflops = flops / (ms * 1e-3) / 1e12
        pct = 100 * tflops / self.sess.ceilings["matmul_tflops"] if self.sess.ceilings else None
        self.sess.add(Row(table="model-prefill", case=label, impl=impl, status="ok", ours=ours, ms=ms,
                          value=b * PROMPT / (ms * 1e-3), flops=flops, pct=pct, params=self.params(b),
                          extra={"tflops": tflops}, **check))

    def _decode(self, impl, b, label, weight_bytes, check, ours, agree, tables):
        """Decode rows of batch ``b`` for ``tables`` (model-decode, and model-step at batch 1)."""
        if self.sess.budget.exhausted():
            for t in tables:
                self.sess.skip(t, self.name if t == "model-step" else label, impl, "time budget of the suite spent",
                               ours=ours)
            return
        n = self.new
        try:
            gen = self.generate_fn(impl)
            ids = self.prompts[b]
            out, stats = gen(ids, 8)  # warm-up (compiles, autotunes)
            if out.shape != (b, PROMPT + 8):
                raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected {(b, PROMPT + 8)}")
            # how many of the first 16 greedy tokens on the batch-1 prompt match HF's (bf16 ties can flip)
            extra = {} if agree is None else {"greedy_agreement_16": agree}
            if stats is not None and "decode_s" in stats and stats.get("decode_steps"):
                # the step time generate measured itself (decode phase only, graph capture excluded)
                steps, totals = [], []
                for _ in range(self.reps):
                    totals.append(timing.wall_median_ms(lambda: steps.append(gen(ids, n)[1]), 1))
                step_ms = sorted(1e3 * st["decode_s"] / st["decode_steps"] for st in steps)[len(steps) // 2]
                extra.update(generate_ms=sorted(totals)[len(totals) // 2],
                             capture_ms=1e3 * steps[-1].get("capture_s", 0.0),
                             prefill_ms=1e3 * steps[-1].get("prefill_s", 0.0), method="generate(stats=)")
            else:
                # whole generate calls: the difference of N and 1 new tokens is N - 1 decode steps
                t1 = timing.wall_median_ms(lambda: gen(ids, 1), self.reps)
                tn = timing.wall_median_ms(lambda: gen(ids, n), self.reps)
                step_ms = (tn - t1) / (n - 1)
                extra.update(generate_ms=tn, generate_1_ms=t1, method="(t(N) - t(1)) / (N - 1)")
        except Exception as e:
            for t in tables:
                self.sess.fail(t, self.name if t == "model-step" else label, impl, e, ours=ours,
                               params=self.params(b))
            return
        extra["step_ms"] = step_ms
        if "model-decode" in tables:
            self.sess.add(Row(table="model-decode", case=label, impl=impl, status="ok", ours=ours, ms=step_ms,
                              value=b / (step_ms * 1e-3), params=self.params(b), extra=extra, **check))
        if "model-step" in tables:
            c = self.cfg
            ctx = PROMPT + n / 2  # the average context over the decode steps
            heads_kv = getattr(c, "num_kv_heads", c.num_heads)  # these families are multi-head
            step = formulas.decode_step_bytes(weight_bytes, c.num_layers, int(ctx), heads_kv, c.head_dim, 2)
            floor_ms = step.value / (self.sess.ceilings["copy_gbps"] * 1e9) * 1e3
            extra = dict(extra, floor_ms=floor_ms, x_floor=step_ms / floor_ms, weight_bytes=weight_bytes)
            self.sess.add(Row(table="model-step", case=self.name, impl=impl, status="ok", ours=ours, ms=step_ms,
                              bytes=step.value, params=self.params(1), extra=extra, **check))

    # ---- the decode step's switches (model-step-variants) ------------------------------------------

    def run_variants(self) -> None:
        """The batch-1 decode step of each :data:`STEP_VARIANTS` entry (model-step-variants)."""
        table = "model-step-variants"
        first = None  # the default's first 16 greedy tokens
        for impl in [i for i in STEP_VARIANTS if self.sess.wanted(table, self.name, i)]:
            if self.sess.budget.exhausted():
                self.sess.skip(table, self.name, impl, "time budget of the suite spent", ours=True)
                continue
            try:
                row, toks = self._step_variant(impl)
            except Exception as e:
                self.sess.fail(table, self.name, impl, e, ours=True, params=self.params(1))
                continue
            first = toks if first is None else first
            row.extra["greedy_agreement_16"] = int((toks == first).int().cumprod(0).sum())
            self.sess.add(row)

    def _step_variant(self, impl: str):
        """(the row, the first 16 greedy tokens) of one variant: generate's own decode-phase time per
        step (graph capture and compilation excluded), against the step's bandwidth floor."""
        import gptkernels

        c, kw, n, ids = self.cfg, STEP_VARIANTS[impl], self.new, self.prompts[1]
        if self.ours is None:
            self.ours = _ours(self.preset, self.hf)
        with torch.no_grad():
            compile_ms = timing.wall_median_ms(lambda: gptkernels.generate(self.ours, ids, 8, backend="triton", **kw), 1)
            toks = gptkernels.generate(self.ours, ids, 16, backend="triton", **kw)[0, PROMPT:]
            runs = []
            for _ in range(self.reps):
                stats = {}
                gptkernels.generate(self.ours, ids, n, backend="triton", stats=stats, **kw)
                runs.append(1e3 * stats["decode_s"] / stats["decode_steps"])
        step_ms = sorted(runs)[len(runs) // 2]
        step = formulas.decode_step_bytes(self.weight_bytes, c.num_layers, int(PROMPT + n / 2), c.num_heads,
                                          c.head_dim, 2)
        extra = {"compile_ms": compile_ms, "generate_kwargs": dict(kw), "step_ms": step_ms}
        if self.sess.ceilings:
            floor_ms = step.value / (self.sess.ceilings["copy_gbps"] * 1e9) * 1e3
            extra.update(floor_ms=floor_ms, x_floor=step_ms / floor_ms)
        return Row(table="model-step-variants", case=self.name, impl=impl, status="ok", ours=True, ms=step_ms,
                   bytes=step.value, params=self.params(1), extra=extra), toks

    # ---- HF generate with left-padded prompts (model-hf-padded) -----------------------------------

    def padded_batch(self):
        """(ids, mask) of PADDED_BATCH prompts, lengths uniform in [PADDED_MIN, PROMPT] (the first
        PROMPT long), left-padded to PROMPT with token 0; made once."""
        if getattr(self, "_padded", None) is None:
            gen = torch.Generator().manual_seed(1)
            lens = torch.randint(PADDED_MIN, PROMPT + 1, (PADDED_BATCH,), generator=gen)
            lens[0] = PROMPT
            mask = (torch.arange(PROMPT) >= PROMPT - lens[:, None]).long()
            ids = torch.randint(1, self.cfg.vocab_size, (PADDED_BATCH, PROMPT), generator=gen) * mask
            self._padded = ids.to(timing.DEVICE), mask.to(timing.DEVICE)
        return self._padded

    def padded_check(self, model):
        """Logits of the first two padded rows at their real positions against HF's model in
        float64 (sdpa's bf16 logits as the yardstick); the float64 reference is made once."""
        ids, mask = (t[1:3] for t in self.padded_batch())  # two rows with padding
        real = mask.bool()
        if getattr(self, "_padded_ref", None) is None:
            hf64 = copy.deepcopy(self.hf).double()
            self._padded_ref = hf64(input_ids=ids, attention_mask=mask, use_cache=False).logits[real]
            del hf64
            free_memory()
            self._padded_base = self.hf(input_ids=ids, attention_mask=mask, use_cache=False).logits[real]
        out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[real]
        return compare([("logits (padded rows)", out, self._padded_ref, self._padded_base)])

    def run_padded(self, impl: str) -> None:
        from transformers.utils import is_flash_attn_2_available

        import gptkernels.hf

        table, label, ours = "model-hf-padded", f"{self.name} B={PADDED_BATCH}", impl == HF_OURS
        params = dict(self.params(PADDED_BATCH), prompt=f"{PADDED_MIN}-{PROMPT}, left-padded")
        if impl == HF_FA2 and not is_flash_attn_2_available():
            self.sess.add(Row(table=table, case=label, impl=impl, status="unavailable", params=params,
                              message="the flash-attn package (transformers' flash_attention_2) is not "
                                      "installed here; the GPU image has none"))
            return
        if self.sess.budget.exhausted():
            self.sess.skip(table, label, impl, "time budget of the suite spent", ours=ours)
            return
        n, (ids, mask) = self.new, self.padded_batch()
        try:
            model = self.hf_model(impl)
            with torch.no_grad():
                chk = self.padded_check(model)
            if not chk.ok:
                self.sess.add(Row(table=table, case=label, impl=impl, status="mismatch", ours=ours,
                                  message=chk.problem, err=chk.err, bound=chk.bound, params=params))
                return

            def gen(k):
                return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                                      do_sample=False)

            mine = gen(16)[:, PROMPT:]  # warm-up, and the tokens to compare with sdpa's
            theirs = mine if impl == HF else self.hf_model(HF).generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False)[:, PROMPT:]
            gptkernels.hf.calls.clear()
            t1 = timing.wall_median_ms(lambda: gen(1), self.reps)
            tn = timing.wall_median_ms(lambda: gen(n), self.reps)
        except Exception as e:
            self.sess.fail(table, label, impl, e, ours=ours, params=params)
            return
        step_ms = (tn - t1) / (n - 1)
        extra = dict(prefill_ms=t1, generate_ms=tn, step_ms=step_ms, method="(t(N) - t(1)) / (N - 1)",
                     same_tokens=int((mine == theirs).all(1).sum()))
        if ours:
            extra.update(fallbacks=sum(gptkernels.hf.fallbacks().values()), calls=dict(gptkernels.hf.calls))
        self.sess.add(Row(table=table, case=label, impl=impl, status="ok", ours=ours, ms=step_ms,
                          value=PADDED_BATCH / (step_ms * 1e-3), params=params, extra=extra,
                          err=chk.err, bound=chk.bound))


def _tags() -> list[tuple[str, int]]:
    """(table, batch) of every row a model has per implementation."""
    return [("model-prefill", b) for b in BATCHES] + [("model-decode", b) for b in BATCHES] + [("model-step", 1)]


def _padded_rows(name: str) -> list[tuple[str, str, str]]:
    """(table, case, impl) of a model's model-hf-padded rows."""
    return [("model-hf-padded", f"{name} B={PADDED_BATCH}", impl) for impl in PADDED_IMPLS]


def run(sess: Session, quick: bool) -> None:
    for t in tables(quick):
        sess.table(t)
    for name in MODELS:
        rows = [(table, name if table == "model-step" else f"{name} B={b}", impl)
                for impl in impls() for table, b in _tags()] + _padded_rows(name) + \
            [("model-step-variants", name, impl) for impl in STEP_VARIANTS]
        rows = [r for r in rows if sess.wanted(*r)]
        if not rows:  # none of its rows is in the run's plan: the model is not even built
            continue

        def ours(table, impl):
            return impl == HF_OURS if table == "model-hf-padded" else impl != HF

        if sess.budget.exhausted():  # building the models and their float64 reference takes a while
            for table, label, impl in rows:
                sess.skip(table, label, impl, "time budget of the suite spent", ours=ours(table, impl))
            continue
        try:
            mb = ModelBench(sess, name, quick)
        except Exception as e:
            for table, label, impl in rows:
                sess.fail(table, label, impl, e, ours=ours(table, impl))
            free_memory()
            continue
        for impl in impls():
            mb.run_impl(impl)
        for table, label, impl in rows:
            if table == "model-hf-padded":
                mb.run_padded(impl)
        mb.run_variants()
        del mb
        free_memory()
    model_tp.run(sess, quick, config(quick)["new"])  # in its own processes, one GPU per rank
