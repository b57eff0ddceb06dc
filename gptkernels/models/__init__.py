"""Reference GPT-2, GPT-Neo, GPT-NeoX and OPT models on gptkernels' kernels.

    cfg = gptkernels.models.from_hf_config(hf_config_or_config_json_dict)   # ModelConfig
    model = gptkernels.models.from_config(cfg, dtype=torch.bfloat16, device="cuda")
    model.load_hf_state_dict(hf_model.state_dict())
    model = gptkernels.models.from_pretrained("/path/to/local/checkpoint", dtype=torch.float16)
    logits = model(input_ids, attention_mask=None, backend=None)           # (B, S, vocab)
"""

from .common import AttnContext, CausalLM
from .config import FAMILIES, ModelConfig
from .loading import from_config, from_hf_config, from_pretrained
from .presets import PRESETS, TINY

__all__ = ["AttnContext", "CausalLM", "FAMILIES", "ModelConfig", "PRESETS", "TINY", "from_config",
           "from_hf_config", "from_pretrained"]
