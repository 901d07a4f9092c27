"""optim's update loops built for the avx512 SIMD level (flags in setup.py)."""
cdef const char* ISA = b"avx512"

include "_loops.pxi"
