# PLACEHOLDER: replaced by the paged KV-cache kernels.
def paged_append(*a, **k):
    raise NotImplementedError("triton paged_append")


def paged_decode(*a, **k):
    raise NotImplementedError("triton paged_decode")
