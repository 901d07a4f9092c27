"""The GPU path: an optimizer's updates on a device (`updates`: plans, tables, skip-mode
counts), the CuPy launcher (`cupy`) and `step_many` engine (`engine`), the coefficient
rows and device checks (`_tables`), the clip norm's scratch memory (`workspace`). The
CUDA source itself is `optim._kernels_cuda`. Importing this package never imports CuPy."""
