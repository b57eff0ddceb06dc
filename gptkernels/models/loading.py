"""Configs and weights from Hugging Face: :func:`from_hf_config`, :func:`from_pretrained`,
:func:`from_config`. Only local files are read (config.json and the checkpoint's own weight files,
see :func:`weight_files`); nothing is ever downloaded.
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


#: The weight files of a checkpoint, in the order transformers looks for them: one file, else its
#: index's shards; safetensors before pickle. Nothing else in the directory is read (a stray
#: ``optimizer_extra.safetensors`` or ``training_args.bin`` must not replace a model weight).
_WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                 ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def _index_shards(index: str) -> list[str]:
    """The shard file names an index file (``*.index.json``) maps the weights to."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"from_pretrained: {index!r} is not a valid weight index "
                         f"(a JSON object with a 'weight_map' of tensor name -> file): {e}") from e
    for name in names:
        if not isinstance(name, str) or os.path.basename(name) != name:
            raise ValueError(f"from_pretrained: {index!r} names a shard {name!r} that is not a file "
                             "name in the checkpoint directory")
        if not os.path.isfile(os.path.join(os.path.dirname(index), name)):
            raise FileNotFoundError(f"from_pretrained: shard {name!r} named by {index!r} is missing")
    return names


def weight_files(path: str) -> list[str]:
    """The files :func:`from_pretrained` reads the weights from (full paths), chosen as transformers
    chooses: ``model.safetensors``, else the shards ``model.safetensors.index.json`` names, else
    ``pytorch_model.bin``, else the shards ``pytorch_model.bin.index.json`` names. Any other file in
    ``path`` is ignored."""
    for single, index in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, single)):
            return [os.path.join(path, single)]
        if os.path.isfile(os.path.join(path, index)):
            return [os.path.join(path, name) for name in _index_shards(os.path.join(path, index))]
    raise FileNotFoundError(f"from_pretrained: no weights in {path!r} (expected one of "
                            f"{', '.join(name for pair in _WEIGHT_FILES for name in pair)})")


def _load_file(file: str) -> dict:
    """The tensors of one weight file; an unreadable file is an error that names it."""
    try:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            tensors = load_file(file)
        else:
            tensors = torch.load(file, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as e:  # safetensors' SafetensorError, pickle's UnpicklingError, EOFError...
        raise ValueError(f"from_pretrained: cannot read weight file {file!r}: "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(tensors, dict):
        raise ValueError(f"from_pretrained: weight file {file!r} holds a {type(tensors).__name__}, "
                         "not a dict of tensors")
    return tensors


def _read_weights(path: str) -> dict:
    """Every tensor of the checkpoint in ``path`` (the files :func:`weight_files` names)."""
    out = {}
    for file in weight_files(path):
        out.update(_load_file(file))
    return out


def read_config(cfg_file: str) -> tuple[dict, ModelConfig]:
    """config.json -> (its dict, the :class:`ModelConfig`). A file that is not a JSON object, or a
    field of the wrong type or value, is an error naming the file (and, from the family's rules,
    the field)."""
    try:
        with open(cfg_file) as f:
            d = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"from_pretrained: {cfg_file!r} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"from_pretrained: {cfg_file!r} must hold a JSON object, got {type(d).__name__}")
    try:
        cfg = from_hf_config(d)
    except (ValueError, TypeError) as e:
        raise type(e)(f"{e} (in {cfg_file!r})") from e
    return d, cfg


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
    d, cfg = read_config(cfg_file)
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
