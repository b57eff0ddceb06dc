"""Checking and packing a batch of token ids: the one place where padding and positions are decided.

A padded batch (``attention_mask`` with zeros) is packed: its real tokens are gathered into one
(T,) stream with ``cu_seqlens`` offsets, and run through varlen attention. Padding never reaches the
layers, so it cannot change a real token's result on any backend (no mask to get subtly wrong).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


@dataclass
class Batch:
    ids: torch.Tensor                  # (B, S) dense, or (T,) packed real tokens
    positions: torch.Tensor            # int64, like ids
    shape: tuple[int, int]             # (B, S) of the input
    lengths: list[int]                 # real tokens per row (host)
    cu_seqlens: Optional[torch.Tensor] = None  # int32 (B+1,) when packed
    max_seqlen: int = 0
    index: Optional[torch.Tensor] = None       # int64 (T,): flat index b * S + s of each packed token

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(T, ...) per packed token -> (B, S, ...), zeros at padded positions (dense: unchanged)."""
        if not self.packed:
            return x
        b, s = self.shape
        out = x.new_zeros(b * s, *x.shape[1:])
        out[self.index] = x
        return out.view(b, s, *x.shape[1:])

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """The rows of x at each sequence's last real token: (B, ...)."""
        if not self.packed:
            return x[:, -1]
        return x[self.cu_seqlens[1:].long() - 1]


def check_input_ids(cfg, input_ids, op: str) -> None:
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"{op}: input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in INT_DTYPES:
        raise TypeError(f"{op}: input_ids must be an integer tensor (token ids), got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"{op}: input_ids must be (batch, seq_len) with both >= 1, "
                         f"got shape {tuple(input_ids.shape)}")
    # A bad id would be a device-side assert in the embedding on CUDA: check here (one sync).
    lo, hi = torch.aminmax(input_ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= cfg.vocab_size:
        raise ValueError(f"{op}: input_ids must lie in [0, {cfg.vocab_size}) (the vocabulary), "
                         f"got values from {lo} to {hi}")


def check_attention_mask(attention_mask, input_ids, op: str) -> torch.Tensor:
    """A (B, S) 0/1 mask on input_ids' device -> bool; each row's ones one contiguous run."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{op}: attention_mask must be None or a torch.Tensor, got "
                        f"{type(attention_mask).__name__}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"{op}: attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.device != input_ids.device:
        raise ValueError(f"{op}: attention_mask must be on input_ids' device ({input_ids.device}), "
                         f"got {attention_mask.device}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_complex():
            raise TypeError(f"{op}: attention_mask must be bool or 0/1 numbers, got {attention_mask.dtype}")
        if bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError(f"{op}: attention_mask must hold only 0 (padding) and 1 (token)")
    mask = attention_mask.bool()
    s = mask.shape[1]
    count = mask.sum(1)
    first = mask.int().argmax(1)
    last = s - 1 - mask.flip(1).int().argmax(1)
    ok = (count == 0) | (last - first + 1 == count)
    if not bool(ok.all()):
        row = int((~ok).nonzero()[0, 0])
        raise ValueError(f"{op}: attention_mask row {row} has padding between tokens; each row's ones "
                         "must be one contiguous run (left or right padding)")
    return mask


def check_position_ids(position_ids, input_ids, op: str) -> torch.Tensor:
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"{op}: position_ids must be None or a torch.Tensor, got {type(position_ids).__name__}")
    if position_ids.dtype not in INT_DTYPES:
        raise TypeError(f"{op}: position_ids must be an integer tensor, got {position_ids.dtype}")
    if position_ids.shape != input_ids.shape:
        raise ValueError(f"{op}: position_ids must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(position_ids.shape)}")
    if position_ids.device != input_ids.device:
        raise ValueError(f"{op}: position_ids must be on input_ids' device ({input_ids.device}), "
                         f"got {position_ids.device}")
    return position_ids.long()


def check_positions_fit(cfg, positions: torch.Tensor, name: str, op: str) -> None:
    if positions.numel() == 0:
        return
    lo, hi = torch.aminmax(positions)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= cfg.max_positions:
        raise ValueError(f"{op}: {name} give positions from {lo} to {hi}; this model has "
                         f"{cfg.max_positions} positions (max_position_embeddings): [0, {cfg.max_positions})")


def pack_batch(cfg, input_ids, attention_mask=None, position_ids=None, *, op: str,
               force_packed: bool = False) -> Batch:
    """Check a batch and decide its layout: dense when nothing is padded (and not ``force_packed``),
    else packed real tokens with cu_seqlens."""
    check_input_ids(cfg, input_ids, op)
    b, s = input_ids.shape
    dev = input_ids.device
    mask = None if attention_mask is None else check_attention_mask(attention_mask, input_ids, op)
    pos = None if position_ids is None else check_position_ids(position_ids, input_ids, op)
    padded = mask is not None and not bool(mask.all())
    if pos is None:
        if mask is not None:
            pos = (mask.long().cumsum(1) - 1).clamp_min(0)
        else:
            pos = torch.arange(s, device=dev).expand(b, s)
    ids = input_ids.long()
    if not padded and not force_packed:
        check_positions_fit(cfg, pos, "position_ids" if position_ids is not None else "input_ids", op)
        return Batch(ids=ids, positions=pos, shape=(b, s), lengths=[s] * b)
    if mask is None:
        mask = torch.ones(b, s, dtype=torch.bool, device=dev)
    flat = mask.reshape(-1)
    index = flat.nonzero().squeeze(1)
    lengths_t = mask.sum(1)
    lengths = lengths_t.tolist()
    cu = torch.zeros(b + 1, dtype=torch.int32, device=dev)
    cu[1:] = lengths_t.cumsum(0)
    packed_pos = pos.reshape(-1)[index]
    check_positions_fit(cfg, packed_pos, "position_ids" if position_ids is not None else "input_ids", op)
    return Batch(ids=ids.reshape(-1)[index], positions=packed_pos, shape=(b, s), lengths=lengths,
                 cu_seqlens=cu, max_seqlen=max(lengths), index=index)
