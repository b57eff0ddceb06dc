# PLACEHOLDER: replaced by the flash attention kernels.
def flash_attn_forward(*a, **k):
    raise NotImplementedError("triton flash_attn_forward")


def flash_attn_backward(*a, **k):
    raise NotImplementedError("triton flash_attn_backward")
