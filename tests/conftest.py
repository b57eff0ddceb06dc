"""Test setup: without a GPU, Triton kernels run on CPU tensors in the interpreter.

TRITON_INTERPRET must be set before triton is imported, which is why it happens here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
