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
from .quantize import DEFAULT_GROUP_SIZE, check_quantize, init_quantized_, load_hf_state_dict_quantized, swap_linears
from .tp import ShardShapeError

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
    """GPT-style random init, in place: weights and embeddings N(0, std), biases 0, LayerNorms 1/0.

    Numbers are drawn in float32 for the whole tensor, then cast (and, on a tensor-parallel rank,
    cut to the rank's part): a model has the same weights in any dtype and at any TP size."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            shard = model.tp.model_shard(name) if model.tp is not None else None
            shape = list(p.shape)
            if shard is not None:
                shape[shard.dim] = shard.full
            full = p if shard is None and p.dtype == torch.float32 else p.new_empty(shape, dtype=torch.float32)
            if name.endswith("bias"):
                full.zero_()
            elif ".norm" in name or name.startswith("norm_f"):
                full.fill_(1.0)
            else:
                full.normal_(0.0, std, generator=generator)
            if full is not p:
                p.copy_(full if shard is None else shard.take(full, name))
    return model


def _device_free_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` (CUDA), or None where it is not checked (CPU: the OS may swap)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device, tp_group, op: str, quantize=None,
                 group_size: int = DEFAULT_GROUP_SIZE) -> CausalLM:
    """The model (this rank's shard of it with ``tp_group``) on ``device`` in ``dtype``, its
    parameters allocated but not set: built on the meta device, sharded there, then materialised,
    so no process ever holds more than its own part. A part larger than the device's free memory
    is a ValueError saying so, before anything is allocated."""
    device = torch.device(device if device is not None else "cpu")
    with torch.device("meta"):
        model = CausalLM(cfg).to(dtype)
    if tp_group is not None:
        from .tp import setup, shard_model_

        shard_model_(model, setup(tp_group, cfg, device, dtype, op=op))
    if quantize is not None:  # empty QuantLinears (of the shard): no float linear is ever allocated
        swap_linears(model, quantize, group_size=group_size)
    need = sum(p.numel() * p.element_size() for p in [*model.parameters(), *model.buffers()])
    free = _device_free_bytes(device)
    if free is not None and need > free:
        who = f"rank {model.tp.rank}'s shard of the model" if model.tp is not None else "the model"
        raise ValueError(f"{op}: {who} needs {need / 2**30:.2f} GiB of parameters in "
                         f"{str(dtype).replace('torch.', '')} but {device} has {free / 2**30:.2f} GiB free: "
                         "split it over more GPUs (tp_group, torchrun ... --tp N) or use a smaller dtype")
    model = model.to_empty(device=device)
    model.tie_weights()
    return model


def from_config(config, *, dtype=None, device=None, std: float = 0.02, tp_group=None, quantize=None,
                group_size: int = DEFAULT_GROUP_SIZE) -> CausalLM:
    """A random model (:func:`init_weights_`) from a ModelConfig, an HF config or a config.json
    dict, built directly on ``device`` (default CPU) in ``dtype`` (default float32).

    With ``tp_group`` (a ``torch.distributed`` process group, every rank calling with the same
    arguments) each rank builds only its shard (:mod:`gptkernels.models.tp`). The weights come from
    group rank 0's random state (shared with every rank first), so the shards together are the
    model a single process builds after the same ``torch.manual_seed``.

    ``quantize="int8" | "int4"`` (``group_size`` for int4) quantizes the blocks' linear layers
    (:mod:`gptkernels.models.quantize`), each drawn and quantized one at a time: the same model as
    quantizing the float one built with the same seed."""
    cfg = from_hf_config(config)
    check_quantize("from_config", quantize, group_size, cfg)
    dtype = resolve_dtype(dtype)
    model = _empty_model(cfg, dtype, device, tp_group, "from_config", quantize, group_size)
    if model.tp is not None:
        from .tp import share_random_state_

        share_random_state_(model.tp, model.device)
    if quantize is not None:
        return init_quantized_(model, lambda module: init_weights_(module, std)).eval()
    return init_weights_(model, std).eval()


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


def _load_file(file: str, select=None) -> dict:
    """The tensors of one weight file; an unreadable file is an error that names it. ``select(key)``
    -> a :class:`~gptkernels.models.tp.Shard` or None: read only that part of each tensor (a
    tensor-parallel rank's slices: ``get_slice`` for safetensors, a memory map for .bin files)."""
    try:
        if file.endswith(".safetensors"):
            if select is None:
                from safetensors.torch import load_file

                tensors = load_file(file)
            else:
                from safetensors import safe_open

                tensors = {}
                with safe_open(file, framework="pt") as f:
                    for key in f.keys():
                        shard = select(key)
                        tensors[key] = f.get_tensor(key) if shard is None else shard.take(f.get_slice(key), key)
        else:
            # mmap: a rank's slices are read from the page cache, the rest of the file never is
            tensors = torch.load(file, map_location="cpu", weights_only=True, mmap=select is not None)
            if select is not None and isinstance(tensors, dict):
                tensors = {k: (t if shard is None else shard.take(t, k).clone())
                           for k, t in tensors.items() for shard in [select(k)]}
    except (ImportError, ShardShapeError):  # a weight that does not fit the config: its own message
        raise
    except Exception as e:  # safetensors' SafetensorError, pickle's UnpicklingError, EOFError...
        raise ValueError(f"from_pretrained: cannot read weight file {file!r}: "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(tensors, dict):
        raise ValueError(f"from_pretrained: weight file {file!r} holds a {type(tensors).__name__}, "
                         "not a dict of tensors")
    return tensors


def _read_weights(path: str, select=None) -> dict:
    """Every tensor of the checkpoint in ``path`` (the files :func:`weight_files` names), or with
    ``select`` only the parts it names (see :func:`_load_file`)."""
    out = {}
    for file in weight_files(path):
        out.update(_load_file(file, select))
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


def from_pretrained(path, *, dtype=None, device=None, tp_group=None, quantize=None,
                    group_size: int = DEFAULT_GROUP_SIZE) -> CausalLM:
    """Load a local HF checkpoint directory (config.json + weights). Never downloads.

    ``dtype`` defaults to the ``dtype``/``torch_dtype`` recorded in config.json, else float32;
    ``device`` to CPU. With ``tp_group`` (a ``torch.distributed`` process group; every rank calls
    with the same path) each rank reads and holds only its shard (:mod:`gptkernels.models.tp`).
    ``quantize="int8" | "int4"`` (``group_size`` for int4) quantizes the blocks' linear layers as
    they load, one at a time (a rank its slices): the device holds the quantized model and one float
    layer at most (:mod:`gptkernels.models.quantize`).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"from_pretrained: path must be a local directory, got {type(path).__name__}")
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"from_pretrained: path {path!r} has no config.json (a local HF "
                                "checkpoint directory is expected; nothing is downloaded)")
    d, cfg = read_config(cfg_file)
    check_quantize("from_pretrained", quantize, group_size, cfg)
    saved = d.get("dtype") or d.get("torch_dtype")
    dtype = resolve_dtype(dtype, _DTYPES.get(str(saved).replace("torch.", ""), torch.float32))
    # no random init: every weight comes from the checkpoint
    model = _empty_model(cfg, dtype, device, tp_group, "from_pretrained", quantize, group_size)
    load = model.load_hf_state_dict if quantize is None else (
        lambda sd, **kw: load_hf_state_dict_quantized(model, sd, **kw))
    if model.tp is None:
        load(_read_weights(path))
    else:
        load(_read_weights(path, model.tp.hf_shard), sharded=True)
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
