"""optim's update loops built for the avx2 SIMD level (flags in setup.py)."""
cdef const char* ISA = b"avx2"

include "_loops.pxi"
