"""Configs and weights from Hugging Face: :func:`from_hf_config`, :func:`from_pretrained`,
:func:`from_config`. Only local files are read (config.json, *.safetensors or pytorch_model*.bin,
sharded or not); nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch

from .common import CausalLM
from .config import ModelConfig
from .families import from_hf_config

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype, default: torch.dtype = torch.float32) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise TypeError(f"dtype must be a torch dtype or one of {sorted(_DTYPES)}, got {dtype!r}")


def init_weights_(model: CausalLM, std: float = 0.02, generator=None) -> CausalLM:
    """GPT-style random init, in place: weights and embeddings N(0, std), biases 0, LayerNorms 1/0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif ".norm" in name or name.startswith("norm_f"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
    return model


def from_config(config, *, dtype=None, device=None, std: float = 0.02) -> CausalLM:
    """A random model (:func:`init_weights_`) from a ModelConfig, an HF config or a config.json
    dict, built directly on ``device`` (default CPU) in ``dtype`` (default float32)."""
    cfg = from_hf_config(config)
    dtype = resolve_dtype(dtype)
    with torch.device(device if device is not None else "cpu"):
        model = init_weights_(CausalLM(cfg), std)
    return model.to(dtype=dtype).eval()


def _shard_names(path: str, files: list[str], index_name: str) -> list[str]:
    """The weight files of a checkpoint: those its index file names, if it has one, else ``files``."""
    index = os.path.join(path, index_name)
    if not os.path.exists(index):
        return files
    with open(index) as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def _read_weights(path: str) -> dict:
    """Every tensor of the checkpoint in ``path``: model.safetensors (or its shards) preferred,
    else pytorch_model.bin (or its shards)."""
    files = sorted(os.listdir(path))
    st = [f for f in files if f.endswith(".safetensors")]
    bins = [f for f in files if f.startswith("pytorch_model") and f.endswith(".bin")]
    if st:
        from safetensors.torch import load_file as load

        names = _shard_names(path, st, "model.safetensors.index.json")
    elif bins:
        def load(file):
            return torch.load(file, map_location="cpu", weights_only=True)

        names = _shard_names(path, bins, "pytorch_model.bin.index.json")
    else:
        raise FileNotFoundError(f"from_pretrained: no *.safetensors or pytorch_model*.bin weights in {path!r}")
    out = {}
    for name in names:
        out.update(load(os.path.join(path, name)))
    return out


def from_pretrained(path, *, dtype=None, device=None) -> CausalLM:
    """Load a local HF checkpoint directory (config.json + weights). Never downloads.

    ``dtype`` defaults to the ``dtype``/``torch_dtype`` recorded in config.json, else float32;
    ``device`` to CPU.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"from_pretrained: path must be a local directory, got {type(path).__name__}")
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"from_pretrained: path {path!r} has no config.json (a local HF "
                                "checkpoint directory is expected; nothing is downloaded)")
    with open(cfg_file) as f:
        d = json.load(f)
    cfg = from_hf_config(d)
    saved = d.get("dtype") or d.get("torch_dtype")
    dtype = resolve_dtype(dtype, _DTYPES.get(str(saved).replace("torch.", ""), torch.float32))
    weights = _read_weights(path)
    with torch.device("meta"):  # no random init: every weight comes from the checkpoint
        model = CausalLM(cfg)
    model = model.to_empty(device=device if device is not None else "cpu").to(dtype)
    model.tie_weights()
    model.load_hf_state_dict(weights)
    return model.eval()


def find_tokenizer(path: Optional[str]):
    """A tokenizer saved in the local directory ``path`` (transformers, local files only), or None."""
    if path is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
        return None
