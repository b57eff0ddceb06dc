"""A CPU emulator of the CUDA extension (see build.py and emu_runtime.h)."""
