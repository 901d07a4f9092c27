#!/usr/bin/env python
"""Plot a `python -m optim bench --json` file: the same as ``python -m optim plot``.

Kept for checkouts; the code lives in optim/bench/plot.py, which installed wheels carry.
"""
import sys

from optim.bench.plot import main

if __name__ == "__main__":
    sys.exit(main(prog="plot_bench.py"))
