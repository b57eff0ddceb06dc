"""Helpers the family files share to read HF configs and convert HF state dicts."""

from __future__ import annotations

import torch

_MISSING = object()


def cfg_get(d: dict, *names, default=_MISSING):
    """The first of ``names`` present (and not None) in the HF config dict ``d``."""
    for n in names:
        if d.get(n) is not None:
            return d[n]
    if default is _MISSING:
        raise ValueError(f"from_hf_config: config has none of the keys {names} (model_type "
                         f"{d.get('model_type')!r})")
    return default


class StateDict:
    """An HF state dict being converted: :meth:`take` pops a weight (missing -> clear error),
    :meth:`finish` rejects what nobody took (except the known, ignorable buffers)."""

    def __init__(self, state_dict: dict, prefixes: tuple[str, ...], ignore: tuple[str, ...] = ()):
        sd = dict(state_dict)
        # Strip the first prefix every backbone weight carries (ForCausalLM -> base model names).
        for p in prefixes:
            if any(k.startswith(p) for k in sd):
                sd = {(k[len(p):] if k.startswith(p) else k): v for k, v in sd.items()}
                break
        self.sd = sd
        self.ignore = ignore
        self.out: dict[str, torch.Tensor] = {}

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str) -> torch.Tensor:
        if key not in self.sd:
            raise ValueError(f"load_hf_state_dict: state_dict has no weight {key!r}")
        return self.sd.pop(key)

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self.out[name] = tensor

    def linear(self, dst: str, src: str, *, bias: bool = True, transpose: bool = False) -> None:
        """``src.weight`` (and ``src.bias``) -> ``dst``; ``transpose`` for GPT-2's Conv1D (in, out)."""
        w = self.take(f"{src}.weight")
        self.put(f"{dst}.weight", w.t() if transpose else w)
        if bias:
            self.put(f"{dst}.bias", self.take(f"{src}.bias"))

    def norm(self, dst: str, src: str, affine: bool = True) -> None:
        if affine:
            self.linear(dst, src)

    def finish(self) -> dict[str, torch.Tensor]:
        left = sorted(k for k in self.sd if not any(k.endswith(s) for s in self.ignore))
        if left:
            raise ValueError(f"load_hf_state_dict: state_dict has unexpected weights "
                             f"{left[:8]}{'...' if len(left) > 8 else ''}")
        return self.out
