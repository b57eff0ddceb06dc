# PLACEHOLDER: replaced by the rotary API.
def rotary_cos_sin(*a, **k):
    raise NotImplementedError


def apply_rotary(*a, **k):
    raise NotImplementedError
