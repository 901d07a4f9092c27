"""optim's update loops built for the baseline SIMD level (flags in setup.py)."""
cdef const char* ISA = b"baseline"

include "_loops.pxi"
