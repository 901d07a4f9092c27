"""``python -m optim bench``: optimizer updates against the speed of memory.

For every configuration (optimizer, dtype, number of parameters, layout) the bench times

* ``optim``: our update, ``opt(key, w, g)`` on one tensor, or
  ``opt.step_many(keys, ws, gs)`` on many small tensors;
* the *roofline*: :class:`optim.bench._roofline.Plan` run on arrays of the same number, sizes
  and dtype as the update reads and writes (the same bytes, with trivial arithmetic). It is
  the limit for this machine, and ``ratio = roofline / time`` (1.0 = at the speed of memory);
  on the GPU (``--device gpu``) it is ONE kernel launch moving the same bytes over all the
  tensors laid end to end (a launch per tensor would time launches, not memory);
* optional peers (``--compare thinc,torch,numpy``): Thinc's optimizers, torch.optim (fused
  where torch has a fused kernel, foreach otherwise) and a plain in-place NumPy update.
  Peers that are not installed are named and skipped.

All implementations of one configuration are timed interleaved (sample 1 of each, then
sample 2 of each, ...), so drift on a shared machine hits them alike; the reported time is
the median of the samples. Each sample times a block of back-to-back updates long enough
to be well above the timer's resolution, after warm-up calls (the first update of a key
allocates its state). On CPU with one thread the clock is the thread's CPU time
(``time.thread_time_ns``), which leaves out the time a shared machine gives our core to
other processes; ``--clock wall`` uses ``time.perf_counter_ns``. Both are recorded.

Gradients are zeros, allocated once and never refilled: every update zeroes its gradient
anyway, so refilling would time a memset, and on CPU the arithmetic costs the same on zeros
(with zero gradients the moments stay exactly zero, so there are no denormals either).

Use ``main(argv)`` to run it in-process (returns the exit status) or ``run(config)`` for
the result dict that ``--json`` writes.

Modules: ``cases`` (what is benchmarked: specs, bytes model, ``Config``, ``Case``),
``cli`` (options and ``main``), ``devices`` (CPU/CuPy devices, machine info), ``peers``
(optim, Thinc, torch, NumPy and roofline builders), ``timing`` (interleaved sampling,
clocks), ``runner`` (``run``), ``report`` (table, notes, JSON), ``errors``.
"""

from .cases import (BYTES_MODEL, DEFAULT_SIZES, DTYPES, LAYOUTS, LEARN_RATE, OVERHEAD_PARAMS,
                    PEERS, PROG, QUICK_SIZES, SCHEMA_VERSION, SPECS, Case, Config, Spec)
from .cli import add_arguments, config_from_args, main, make_parser
from .devices import CupyDevice, Device, cpu_name, get_device, machine_info
from .errors import NotReady, Skip, UsageError
from .peers import (PEER_HINTS, PEER_IMPORTS, NumpyOptimizer, build_numpy, build_optim,
                    build_roofline, build_thinc, build_torch, peer_missing)
from .report import COLUMNS, format_report, format_table, notes, table_rows, write_json
from .runner import run
from .timing import CLOCKS, measure

__all__ = [
    "BYTES_MODEL", "CLOCKS", "COLUMNS", "DEFAULT_SIZES", "DTYPES", "LAYOUTS", "LEARN_RATE",
    "OVERHEAD_PARAMS", "PEERS", "PEER_HINTS", "PEER_IMPORTS", "PROG", "QUICK_SIZES",
    "SCHEMA_VERSION", "SPECS", "Case", "Config", "CupyDevice", "Device", "NotReady",
    "NumpyOptimizer", "Skip", "Spec", "UsageError", "add_arguments", "build_numpy",
    "build_optim", "build_roofline", "build_thinc", "build_torch", "config_from_args",
    "cpu_name", "format_report", "format_table", "get_device", "machine_info", "main",
    "make_parser", "measure", "notes", "peer_missing", "run", "table_rows", "write_json",
]
