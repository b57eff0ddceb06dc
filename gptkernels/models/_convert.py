"""Helpers the family files share to read HF configs and convert HF state dicts."""

from __future__ import annotations

import math

import torch

_MISSING = object()


def _cfg_find(d: dict, names: tuple, default):
    """(the first of ``names`` present and not None in ``d``, its value), or (None, ``default``)."""
    for n in names:
        if d.get(n) is not None:
            return n, d[n]
    if default is _MISSING:
        raise ValueError(f"from_hf_config: config has none of the keys {names} (model_type "
                         f"{d.get('model_type')!r})")
    return None, default


def cfg_get(d: dict, *names, default=_MISSING):
    """The first of ``names`` present (and not None) in the HF config dict ``d``."""
    return _cfg_find(d, names, default)[1]


def _bad(name, value, what: str, error=ValueError):
    return error(f"from_hf_config: config field {name!r} must be {what}, got {value!r}"
                 + (f" ({type(value).__name__})" if error is TypeError else ""))


def cfg_int(d: dict, *names, default=_MISSING, minimum: int = 1) -> int:
    """:func:`cfg_get` for a count or size: an int (not a bool, not a string) >= ``minimum``;
    anything else is an error naming the field (before it can divide by zero further on)."""
    name, value = _cfg_find(d, names, default)
    if name is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, value, f"an int >= {minimum}", TypeError)
    if value < minimum:
        raise _bad(name, value, f"an int >= {minimum}")
    return value


def cfg_float(d: dict, *names, default=_MISSING, minimum: float = 0.0, maximum: float = math.inf,
              positive: bool = False) -> float:
    """:func:`cfg_get` for a real number: an int or float (not a bool, not a string), finite, in
    [``minimum``, ``maximum``] (and > 0 when ``positive``); else an error naming the field."""
    name, value = _cfg_find(d, names, default)
    if name is None:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, value, "a number", TypeError)
    value = float(value)
    if not (math.isfinite(value) and minimum <= value <= maximum) or (positive and value <= 0):
        bound = f"{'> ' if positive else '>= '}{minimum:g}" + ("" if maximum == math.inf else f" and <= {maximum:g}")
        raise _bad(name, value, f"a finite number {bound}")
    return value


def cfg_bool(d: dict, *names, default=_MISSING) -> bool:
    """:func:`cfg_get` for a switch: a JSON true/false (the string "false" would read as true)."""
    name, value = _cfg_find(d, names, default)
    if name is not None and not isinstance(value, bool):
        raise _bad(name, value, "true or false", TypeError)
    return value


def cfg_str(d: dict, *names, default=_MISSING) -> str:
    """:func:`cfg_get` for a name (an activation...): a string."""
    name, value = _cfg_find(d, names, default)
    if name is not None and not isinstance(value, str):
        raise _bad(name, value, "a string", TypeError)
    return value


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
