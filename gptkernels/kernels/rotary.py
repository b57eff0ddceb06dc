# PLACEHOLDER: replaced by the rotary kernel.
def apply_rotary(*a, **k):
    raise NotImplementedError("triton apply_rotary")
