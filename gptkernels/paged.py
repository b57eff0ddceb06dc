# PLACEHOLDER: replaced by the paged KV-cache API.
class CacheFullError(RuntimeError):
    pass


class PagedKVCache:
    pass


def paged_append(*a, **k):
    raise NotImplementedError


def paged_decode(*a, **k):
    raise NotImplementedError
