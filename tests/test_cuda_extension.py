"""The "cuda" backend's extension API (every machine): gptkernels._C imports and registers its ops
with the right schemas; the C++ guards of a direct call (torch.ops.gptkernels_C.*, which run before
any device work, so CPU tensors reach them) refuse what would take a kernel out of bounds; options
the kernels do not implement become BackendUnavailableError; the fake implementations trace;
setup.py decides when to build. The kernels themselves: tests/test_cuda_emulated.py (CPU emulator)
and tests/test_cuda_gpu.py (a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

import gptkernels
from gptkernels import cuda as cuda_backend
from gptkernels._backend import BackendUnavailableError
from tests.cuda_cases import ROOT, build_blocker, flash_kw, ops  # noqa: F401  (ops: a fixture)
from tests.helpers import DEVICE, ON_GPU, randn


def test_backends_reports_why_cuda_is_unavailable():
    reason = gptkernels.backends()["cuda"]
    if ON_GPU and importlib.util.find_spec("gptkernels._C") is not None:
        assert reason is None
    else:
        assert isinstance(reason, str) and ("not built" in reason or "no CUDA GPU" in reason)


SCHEMAS = {
    "flash_attn_fwd": "flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
                      "Tensor? block_table, Tensor? seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, "
                      "int? window, float softmax_scale, bool bottom_right) -> (Tensor out, Tensor lse)",
    "rotary_out": "rotary_out(Tensor q, Tensor? k, Tensor cos, Tensor sin, Tensor? positions, Tensor? offsets, "
                  "int offset, bool interleaved, bool conjugate, Tensor(a!) q_out, Tensor(b!)? k_out) -> ()",
    "rotary_inplace": "rotary_inplace(Tensor(a!) q, Tensor(b!)? k, Tensor cos, Tensor sin, Tensor? positions, "
                      "Tensor? offsets, int offset, bool interleaved, bool conjugate) -> ()",
    "paged_append": "paged_append(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
                    "Tensor slot_mapping) -> ()",
    "paged_decode": "paged_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
                    "float softmax_scale, int? window, int num_splits) -> (Tensor out, Tensor lse)",
}


def test_extension_registers_ops_with_schemas(ops):
    for name, schema in SCHEMAS.items():
        assert str(getattr(ops, name).default._schema) == "gptkernels_C::" + schema
    mutated = {name: [a.name for a in getattr(ops, name).default._schema.arguments
                      if a.alias_info is not None and a.alias_info.is_write] for name in SCHEMAS}
    assert mutated == {"flash_attn_fwd": [], "rotary_out": ["q_out", "k_out"], "rotary_inplace": ["q", "k"],
                       "paged_append": ["k_cache", "v_cache"], "paged_decode": []}


def _h(*shape, dtype=torch.float16):
    return torch.randn(*shape).to(dtype)


def _i(*values):
    return torch.tensor(values, dtype=torch.int32)


# (op, args, exception, message): every case reaches a C++ guard before any device work. The guards
# keep a direct call in bounds (the public ops check first, with their own messages: those are
# tested with the ops); what only repeats a Python rule without protecting memory is not guarded.
CPP_CHECKS = [
    ("flash_attn_fwd", lambda: (_h(1, 4, 2, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64, dtype=torch.bfloat16),
                                None, None, None, None, 4, 4, True, None, 0.1, True), TypeError, "k and v"),
    ("flash_attn_fwd", lambda: (_h(4, 2, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64), None, None, None, None, 4, 4,
                                True, None, 0.1, True), ValueError, "q must be 4-D"),
    ("flash_attn_fwd", lambda: (_h(2, 4, 2, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64), None, None, None, None, 4, 4,
                                True, None, 0.1, True), ValueError, r"k\.shape\[0\]"),
    ("flash_attn_fwd", lambda: (_h(1, 4, 3, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64), None, None, None, None, 4, 4,
                                True, None, 0.1, True), ValueError, "3 query heads are not a multiple of 2 k heads"),
    ("flash_attn_fwd", lambda: (_h(1, 4, 2, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64), None, None, None, None, 4, 4,
                                True, 0, 0.1, True), ValueError, "window must be >= 1"),
    ("flash_attn_fwd", lambda: (_h(5, 2, 64), _h(5, 2, 64), _h(5, 2, 64), _i(0, 5), None, None, None, 5, 5,
                                True, None, 0.1, True), ValueError, "cu_seqlens_q and cu_seqlens_k"),
    ("flash_attn_fwd", lambda: (_h(5, 2, 64), _h(5, 2, 64), _h(5, 2, 64), _i(0, 2, 5), _i(0, 5), None, None, 5,
                                5, True, None, 0.1, True), ValueError, "cu_seqlens_q"),
    ("flash_attn_fwd", lambda: (_h(5, 2, 64), _h(5, 2, 64), _h(5, 2, 64), _i(0, 5).long(), _i(0, 5), None,
                                None, 5, 5, True, None, 0.1, True), TypeError, "cu_seqlens_q must be int32"),
    ("flash_attn_fwd", lambda: (_h(2, 1, 2, 64), _h(4, 16, 2, 64), _h(4, 16, 2, 64), None, None,
                                _i(0, 1).view(2, 1), None, 1, 16, True, None, 0.1, True), ValueError,
     "block_table and seqlens_k"),
    ("flash_attn_fwd", lambda: (_h(3, 1, 2, 64), _h(4, 16, 2, 64), _h(4, 16, 2, 64), None, None,
                                _i(0, 1).view(2, 1), _i(3, 5), 1, 16, True, None, 0.1, True), ValueError,
     r"q\.shape\[0\]"),
    ("flash_attn_fwd", lambda: (_h(1, 4, 2, 64), _h(1, 4, 2, 64), _h(1, 4, 2, 64), None, None, None, None, 4, 4,
                                True, None, 0.1, True), ValueError, "q must be a CUDA tensor"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), _h(2, 4, 2, 8), _h(10, 4, dtype=torch.float32),
                            _h(10, 4, dtype=torch.float32), None, None, 0, False, False, _h(2, 3, 2, 8),
                            _h(2, 4, 2, 8)), ValueError, "k must be shaped like q"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), None, _h(10, 5, dtype=torch.float32), _h(10, 5, dtype=torch.float32),
                            None, None, 0, False, False, _h(2, 3, 2, 8), None), ValueError, "rotary_dim"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), None, _h(10, 4, dtype=torch.float32), _h(10, 3, dtype=torch.float32),
                            None, None, 0, False, False, _h(2, 3, 2, 8), None), ValueError, "sin must be shaped"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), None, _h(10, 4, dtype=torch.float32), _h(10, 4, dtype=torch.float32),
                            _i(1, 2, 3), None, 0, False, False, _h(2, 3, 2, 8), None), ValueError, "positions"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), None, _h(10, 4, dtype=torch.float32), _h(10, 4, dtype=torch.float32),
                            None, _i(1, 2, 3), 0, False, False, _h(2, 3, 2, 8), None), ValueError, "offset"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), None, _h(10, 4, dtype=torch.float32), _h(10, 4, dtype=torch.float32),
                            None, None, 0, False, False, _h(2, 3, 2, 6), None), ValueError, "q_out"),
    ("rotary_inplace", lambda: (_h(2, 3, 2, 8), None, _h(10, 4, dtype=torch.float32),
                                _h(10, 4, dtype=torch.float32), None, None, 0, False, False), ValueError,
     "q must be a CUDA tensor"),
    ("paged_append", lambda: (_h(3, 2, 8), _h(3, 2, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1)), ValueError,
     r"slot_mapping\.shape\[0\]"),
    ("paged_append", lambda: (_h(3, 2, 8), _h(3, 2, 8), _h(4, 8, 3, 8), _h(4, 8, 3, 8), _i(0, 1, 2)), ValueError,
     r"k\.shape\[1\]"),
    ("paged_append", lambda: (_h(3, 2, 8), _h(3, 2, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2).float()),
     TypeError, "slot_mapping must be int32 or int64"),
    ("paged_append", lambda: (_h(3, 2, 8), _h(3, 2, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2)), ValueError,
     "k must be a CUDA tensor"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2, 3).view(2, 2), _i(3),
                              0.3, None, 1), ValueError, r"seq_lens\.shape\[0\]"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8, dtype=torch.bfloat16),
                              _i(0, 1, 2, 3).view(2, 2), _i(3, 4), 0.3, None, 1), TypeError, "v_cache"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 3, 8), _h(4, 8, 3, 8), _i(0, 1, 2, 3).view(2, 2), _i(3, 4),
                              0.3, None, 1), ValueError, "4 query heads are not a multiple of 3 k_cache heads"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2, 3).view(2, 2), _i(3, 4),
                              0.3, 0, 1), ValueError, "window must be >= 1"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2, 3).view(2, 2), _i(3, 4),
                              0.3, None, 1), ValueError, "q must be a CUDA tensor"),
    ("flash_attn_fwd", lambda: (_h(1, 4, 2, 64), _h(1, 4, 2, 32), _h(1, 4, 2, 32), None, None, None, None, 4, 4,
                                True, None, 0.1, True), ValueError, "q and k head dims differ"),
    ("flash_attn_fwd", lambda: (_h(0, 2, 64), _h(0, 2, 64), _h(0, 2, 64), _i(), _i(), None, None, 0, 0, True, None,
                                0.1, True), ValueError, "cu_seqlens_k is empty"),
    ("rotary_out", lambda: (_h(2, 3, 2, 8), _h(2, 3, 1, 8), _h(10, 4, dtype=torch.float32),
                            _h(10, 4, dtype=torch.float32), None, None, 0, False, False, _h(2, 3, 2, 8), None),
     ValueError, "k_out must be given exactly when k is"),
    ("paged_append", lambda: (_h(3, 2, 8), _h(3, 2, 8), _h(4, 0, 2, 8), _h(4, 0, 2, 8), _i(0, 1, 2)), ValueError,
     r"block size k_cache\.shape\[1\] must be >= 1"),
    # int32 key counts: max_blocks * block_size (a stride-0 table: no memory)
    ("flash_attn_fwd", lambda: (_h(1, 1, 2, 32), _h(1, 1024, 2, 32), _h(1, 1024, 2, 32), None, None,
                                _i(0).view(1, 1).expand(1, 1 << 21), _i(5), 1, 5, True, None, 0.1, True),
     ValueError, "block_table covers more than 2"),
    ("paged_decode", lambda: (_h(1, 2, 8), _h(1, 1024, 2, 8), _h(1, 1024, 2, 8), _i(0).view(1, 1).expand(1, 1 << 21),
                              _i(5), 0.3, None, 1), ValueError, "block_table covers more than 2"),
    # grid limits (gridDim.y and .z <= 65535)
    ("flash_attn_fwd", lambda: (_h(1, 1, 65536, 32), _h(1, 1, 1, 32), _h(1, 1, 1, 32), None, None, None, None, 1,
                                1, True, None, 0.1, True), ValueError, "at most 65535 sequences and heads"),
    ("paged_decode", lambda: (_h(65536, 1, 8), _h(1, 8, 1, 8), _h(1, 8, 1, 8),
                              torch.zeros(65536, 1, dtype=torch.int32), torch.ones(65536, dtype=torch.int32), 0.3,
                              None, 1), ValueError, "at most 65535 sequences"),
    ("paged_decode", lambda: (_h(2, 4, 8), _h(4, 8, 2, 8), _h(4, 8, 2, 8), _i(0, 1, 2, 3).view(2, 2), _i(3, 4),
                              0.3, None, 0), ValueError, "num_splits must be >= 1"),
]


@pytest.mark.parametrize("case", range(len(CPP_CHECKS)))
def test_cpp_checks_name_the_argument(ops, case):
    name, args, exc, match = CPP_CHECKS[case]
    with pytest.raises(exc, match=match):
        getattr(ops, name)(*[a.to(DEVICE) if isinstance(a, torch.Tensor) and "CUDA tensor" not in match else a
                             for a in args()])


@pytest.mark.parametrize("what", ["float32", "head_dim", "unaligned", "cos_dtype", "decode_head_dim",
                                  "decode_cache_layout", "append_dtype"])
def test_unsupported_options_raise_backend_unavailable(ops, what):
    dev = DEVICE
    if what == "float32":
        q = randn(1, 4, 2, 64, device=dev)
        call, match = lambda: cuda_backend.flash_attn_forward(q, q, q, **flash_kw()), "float32"
    elif what == "head_dim":
        q = randn(1, 4, 2, 48, dtype=torch.float16, device=dev)
        call, match = lambda: cuda_backend.flash_attn_forward(q, q, q, **flash_kw()), "head dim 48"
    elif what == "unaligned":  # head dim not contiguous: no 16-byte row loads
        q = randn(1, 4, 2, 128, dtype=torch.float16, device=dev)[..., ::2]
        call, match = lambda: cuda_backend.flash_attn_forward(q, q, q, **flash_kw()), "16-byte aligned rows"
    elif what == "cos_dtype":
        q = randn(1, 4, 2, 8, dtype=torch.float16, device=dev)
        cos = randn(10, 4, dtype=torch.bfloat16, device=dev)
        call, match = (lambda: cuda_backend.apply_rotary(q, None, cos, cos, positions=None, offset=0, interleaved=False,
                                                  inplace=False, conjugate=False)), "cos/sin"
    elif what == "decode_head_dim":
        q, kc = randn(1, 2, 6, dtype=torch.float16, device=dev), randn(2, 8, 2, 6, dtype=torch.float16, device=dev)
        t, n = torch.zeros(1, 2, dtype=torch.int32, device=dev), torch.ones(1, dtype=torch.int32, device=dev)
        call, match = (lambda: cuda_backend.paged_decode(q, kc, kc, t, n, softmax_scale=0.5, window=None,
                                                         num_splits=1)), "head dim 6"
    elif what == "decode_cache_layout":  # head dim strided in the cache
        q = randn(1, 2, 8, dtype=torch.float16, device=dev)
        kc = randn(2, 8, 2, 16, dtype=torch.float16, device=dev)[..., ::2]
        t, n = torch.zeros(1, 2, dtype=torch.int32, device=dev), torch.ones(1, dtype=torch.int32, device=dev)
        call, match = (lambda: cuda_backend.paged_decode(q, kc, kc, t, n, softmax_scale=0.5, window=None,
                                                         num_splits=1)), "contiguous head dim"
    else:
        k = randn(3, 2, 8, dtype=torch.float16, device=dev)
        kc = randn(4, 8, 2, 8, device=dev)
        s = torch.arange(3, device=dev)
        call, match = lambda: cuda_backend.paged_append(k, k, kc, kc, s), "dtypes must match"
    with pytest.raises(BackendUnavailableError, match=match):
        call()


def test_no_attention_backward_on_cuda():
    """attention.py asks the backend for flash_attn_backward when grads are needed: cuda has none."""
    assert not hasattr(cuda_backend, "flash_attn_backward")
    if ON_GPU:
        q = randn(1, 8, 2, 64, dtype=torch.float16, device="cuda").requires_grad_()
        with pytest.raises(BackendUnavailableError, match="flash_attn_backward"):
            gptkernels.flash_attn(q, q, q, backend="cuda")


def test_public_ops_refuse_cuda_backend_without_gpu():
    if ON_GPU:
        pytest.skip("needs a machine without a CUDA GPU: this one has one")
    q = randn(1, 4, 2, 64, dtype=torch.float16)
    with pytest.raises(BackendUnavailableError, match="cuda"):
        gptkernels.flash_attn(q, q, q, backend="cuda")


def test_fake_implementations_trace(ops):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 5, 4, 64, dtype=torch.float16)
        k = torch.empty(2, 7, 2, 64, dtype=torch.float16)
        out, lse = ops.flash_attn_fwd(q, k, k, None, None, None, None, 5, 7, True, None, 0.1, True)
        assert out.shape == q.shape and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
        qv = torch.empty(9, 4, 64, dtype=torch.float16)
        cu = torch.empty(3, dtype=torch.int32)
        out, lse = ops.flash_attn_fwd(qv, qv, qv, cu, cu, None, None, 5, 5, True, None, 0.1, True)
        assert out.shape == qv.shape and lse.shape == (4, 9)
        qd = torch.empty(3, 4, 64, dtype=torch.bfloat16)
        cache = torch.empty(10, 16, 2, 64, dtype=torch.bfloat16)
        out, lse = ops.paged_decode(qd, cache, cache, torch.empty(3, 4, dtype=torch.int32),
                                    torch.empty(3, dtype=torch.int32), 0.1, None, 1)
        assert out.shape == qd.shape and lse.shape == (3, 4)


# --------------------------------------------------------------------------------------------------
# setup.py's build decision (no build: the extension object only)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def setup_mod(monkeypatch):
    for var in ("GPTKERNELS_BUILD_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME", "CUDA_PATH"):
        monkeypatch.delenv(var, raising=False)  # restored after the test, whatever setup.py sets
    spec = importlib.util.spec_from_file_location("gptkernels_setup", os.path.join(ROOT, "setup.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # __name__ is not "__main__": setup() does not run
    return mod


def test_setup_skips_when_told(setup_mod, monkeypatch):
    monkeypatch.setenv("GPTKERNELS_BUILD_CUDA", "0")
    assert setup_mod._cuda_extensions() == ([], {})


def test_setup_without_cuda_torch(setup_mod, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    assert setup_mod._cuda_extensions() == ([], {})  # the pure package still installs
    monkeypatch.setenv("GPTKERNELS_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="GPTKERNELS_BUILD_CUDA=1.*not a CUDA build"):
        setup_mod._cuda_extensions()


def test_setup_without_nvcc(setup_mod, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(setup_mod, "_toolkit_from_nvcc", lambda: None)
    assert setup_mod._cuda_extensions() == ([], {})
    monkeypatch.setenv("GPTKERNELS_BUILD_CUDA", "1")
    with pytest.raises(RuntimeError, match="nvcc"):
        setup_mod._cuda_extensions()


@pytest.mark.parametrize("arch", [None, "9.0"])
def test_setup_builds_every_source(setup_mod, monkeypatch, arch):
    blocker = build_blocker()
    if blocker:
        pytest.skip(f"the CUDA extension cannot be built here: {blocker}")
    if arch:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch)
    exts, cmdclass = setup_mod._cuda_extensions()
    assert [e.name for e in exts] == ["gptkernels._C"] and "build_ext" in cmdclass
    srcs = {os.path.normpath(s) for s in exts[0].sources}
    on_disk = {os.path.relpath(os.path.join(d, f), ROOT) for d, _, fs in os.walk(os.path.join(ROOT, "csrc"))
               for f in fs if f.endswith((".cu", ".cpp"))}
    assert srcs == on_disk
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == (arch or "8.0;9.0")
    assert os.path.exists(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))

