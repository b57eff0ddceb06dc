"""The four families and the Hugging Face conversions: :func:`from_hf_config` (HF config -> our
:class:`~gptkernels.models.config.ModelConfig`) and :func:`convert_hf_state_dict` (HF weights -> our
key names and layout). Each family's rules live in its own file (gpt2.py, gpt_neo.py, ...); this
module only picks the file.
"""

from __future__ import annotations

from . import gpt2, gpt_neo, gpt_neox, opt
from .config import ModelConfig

#: HF model_type (and our family names) -> family module
FAMILY_MODULES = {
    "gpt2": gpt2, "gpt_neo": gpt_neo, "gpt-neo": gpt_neo, "gpt_neox": gpt_neox, "gpt-neox": gpt_neox,
    "opt": opt,
}


def _config_dict(config) -> dict:
    if isinstance(config, dict):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)  # a transformers PretrainedConfig
    if callable(to_dict):
        return to_dict()
    raise TypeError(f"from_hf_config: config must be a transformers config or a config.json dict, "
                    f"got {type(config).__name__}")


def from_hf_config(config) -> ModelConfig:
    """A :class:`ModelConfig` from an HF config object (``GPT2Config`` ...) or a config.json dict."""
    if isinstance(config, ModelConfig):
        return config
    d = _config_dict(config)
    model_type = d.get("model_type")
    if model_type not in FAMILY_MODULES:
        raise ValueError(f"from_hf_config: config's model_type must be one of "
                         f"{sorted(set(m.MODEL_TYPE for m in FAMILY_MODULES.values()))}, got {model_type!r}")
    return FAMILY_MODULES[model_type].config_from_hf(d)


def convert_hf_state_dict(cfg: ModelConfig, state_dict: dict) -> dict:
    """HF weights (HF key names) -> this package's key names and layout, per the config's family."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"load_hf_state_dict: state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    return FAMILY_MODULES[cfg.family].convert_state_dict(cfg, state_dict)
