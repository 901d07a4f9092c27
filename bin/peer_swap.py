"""pytest plugin for bin/peer_suites.py: optim's optimizers in place of Thinc's, and proof.

Load it with `-p peer_swap` (bin/ on PYTHONPATH). Settings come from the environment, so
that the swap is in place before pytest imports any conftest or test module:

- PEER_SWAP: "optim" swaps; "thinc" (the baseline) leaves Thinc's optimizers in place.
  Both count constructions and updates of Thinc's class and of optim's.
- PEER_OUT: a JSON-lines file; one {"start": id} line before each test, one record per
  test after it (outcome, first error lines, counts during the test), a final "totals".
- PEER_SKIP: a file of test ids (one a line) to deselect (tests already done by a run
  that was killed).
- PEER_START_METHOD: multiprocessing's start method ("spawn" pickles `nlp` for each
  `nlp.pipe(n_process=N)` worker, as on macOS and Windows).

The swap, done when this module is imported: `Adam`, `SGD`, `RAdam` and `Optimizer`
are replaced in every loaded module of Thinc and spaCy (thinc.api, thinc.optimizers,
spacy.util, ...) and again after collection (test modules, anything imported late),
and `Adam.v1`/`SGD.v1`/`RAdam.v1` in `thinc.registry.optimizers` are re-registered.
The factories become `optim.thinc.Adam` etc. `Optimizer` becomes a subclass of Thinc's
class whose construction builds `ThincOptimizer(optim.Optimizer(...))` and whose
isinstance/issubclass checks accept any Thinc optimizer: `ThincOptimizer` subclasses
Thinc's original class (optim.thinc is imported before the swap), so spaCy's config
schema and `isinstance(x, thinc.api.Optimizer)` keep working.
"""
import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import optim
import optim.optimizer
import optim.thinc  # subclasses Thinc's own Optimizer: must come before the swap
import thinc.api
import thinc.optimizers

THINC_OPTIMIZER = thinc.optimizers.Optimizer
ORIGINALS = {"Adam": thinc.optimizers.Adam, "SGD": thinc.optimizers.SGD,
             "RAdam": thinc.optimizers.RAdam, "Optimizer": THINC_OPTIMIZER}
COUNTS: Dict[str, int] = {"thinc_constructed": 0, "thinc_calls": 0, "optim_constructed": 0,
                          "optim_calls": 0, "optim_step_many": 0, "optim_tensors": 0}
_depth = threading.local()  # step_many may update through __call__: count the outer call


class _SwapMeta(type):
    def __call__(cls, *args: Any, **kwargs: Any) -> optim.thinc.ThincOptimizer:
        return optim.thinc.ThincOptimizer(optim.Optimizer(*args, **kwargs))

    def __instancecheck__(cls, obj: Any) -> bool:
        return isinstance(obj, THINC_OPTIMIZER)

    def __subclasscheck__(cls, sub: type) -> bool:
        return issubclass(sub, THINC_OPTIMIZER)


class Optimizer(THINC_OPTIMIZER, metaclass=_SwapMeta):
    """`thinc.api.Optimizer` under the swap: `Optimizer(...)` is optim's, wrapped."""

    __slots__ = ()


REPLACEMENTS = {"Adam": optim.thinc.Adam, "SGD": optim.thinc.SGD,
                "RAdam": optim.thinc.RAdam, "Optimizer": Optimizer}


def _counted(method: Callable, name: str, tensors: str = "") -> Callable:
    """`method`, counting its outermost calls in COUNTS[name] (and len(keys) in tensors)."""
    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        outer = not getattr(_depth, "n", 0)
        if outer:
            COUNTS[name] += 1
            if tensors:
                COUNTS[tensors] += len(args[0]) if args else len(kwargs["keys"])
        _depth.n = getattr(_depth, "n", 0) + 1
        try:
            return method(self, *args, **kwargs)
        finally:
            _depth.n -= 1

    counted.__wrapped__ = method
    return counted


def _install_counters() -> None:
    THINC_OPTIMIZER.__init__ = _counted(THINC_OPTIMIZER.__init__, "thinc_constructed")
    THINC_OPTIMIZER.__call__ = _counted(THINC_OPTIMIZER.__call__, "thinc_calls")
    cls = optim.optimizer.Optimizer
    cls.__init__ = _counted(cls.__init__, "optim_constructed")
    cls.__call__ = _counted(cls.__call__, "optim_calls")
    cls.step_many = _counted(cls.step_many, "optim_step_many", "optim_tensors")


def sweep() -> List[str]:
    """Replace Thinc's optimizer names in every loaded thinc/spacy module; what changed."""
    replaced = []
    for mod_name, module in list(sys.modules.items()):
        if module is None or mod_name.split(".")[0] not in ("thinc", "spacy"):
            continue
        for attr, value in list(vars(module).items()):
            for name, original in ORIGINALS.items():
                if value is original:
                    setattr(module, attr, REPLACEMENTS[name])
                    replaced.append(f"{mod_name}.{attr}")
    return replaced


def swap() -> List[str]:
    """The whole swap: module references and the registry's names."""
    replaced = sweep()
    for name, factory in (("Adam.v1", optim.thinc.Adam), ("SGD.v1", optim.thinc.SGD),
                          ("RAdam.v1", optim.thinc.RAdam)):
        thinc.api.registry.optimizers.register(name, func=factory)
        replaced.append(f"registry.optimizers[{name!r}]")
    return replaced


MODE = os.environ.get("PEER_SWAP", "thinc")
if MODE not in ("thinc", "optim"):
    raise ValueError(f"PEER_SWAP must be 'thinc' or 'optim', not {MODE!r}")
_install_counters()
SWAPPED = swap() if MODE == "optim" else []
_out = open(os.environ["PEER_OUT"], "a") if os.environ.get("PEER_OUT") else None
_reports: Dict[str, list] = {}


def _write(record: Dict[str, Any]) -> None:
    if _out is not None and not _out.closed:
        _out.write(json.dumps(record) + "\n")
        _out.flush()


def pytest_configure(config: Any) -> None:
    method = os.environ.get("PEER_START_METHOD")
    if method:
        multiprocessing.set_start_method(method, force=True)
    _write({"mode": MODE, "swapped": SWAPPED, "optim": optim.__file__,
            "thinc": thinc.__version__ if hasattr(thinc, "__version__") else "?"})


def pytest_collection_modifyitems(session: Any, config: Any, items: List[Any]) -> None:
    skip_file = os.environ.get("PEER_SKIP")
    skip = set(Path(skip_file).read_text().split("\n")) if skip_file else set()
    if skip:
        kept = [item for item in items if item.nodeid not in skip]
        config.hook.pytest_deselected(items=[i for i in items if i.nodeid in skip])
        items[:] = kept


def pytest_collection_finish(session: Any) -> None:
    late = sweep() if MODE == "optim" else []  # anything that held Thinc's before the swap
    reached = sorted(f"{m}.{a}" for m, mod in list(sys.modules.items())
                     if mod is not None and m.split(".")[0] in ("thinc", "spacy")
                     for a, v in list(vars(mod).items())
                     if any(v is r for r in REPLACEMENTS.values()))
    _write({"late_swapped": late, "optim_references": reached})


def pytest_collectreport(report: Any) -> None:
    if report.failed:  # a module that does not import: its tests are missing, not passing
        _write({"id": report.nodeid or "<collection>", "outcome": "error", "seconds": 0,
                "error": report.longreprtext.strip().splitlines()[-3:], "counts": {}})


_before: Dict[str, Dict[str, int]] = {}
_began: Dict[str, float] = {}


def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    _write({"start": nodeid})  # a test that never finishes is the last one started
    _before[nodeid], _began[nodeid] = dict(COUNTS), time.perf_counter()


def pytest_runtest_logreport(report: Any) -> None:
    _reports.setdefault(report.nodeid, []).append(report)


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    outcome, error = _outcome(_reports.pop(nodeid, []))
    before = _before.pop(nodeid, COUNTS)
    _write({"id": nodeid, "outcome": outcome, "error": error,
            "seconds": round(time.perf_counter() - _began.pop(nodeid), 3),
            "counts": {k: COUNTS[k] - before[k] for k in COUNTS}})


def _outcome(reports: List[Any]) -> tuple:
    """passed/failed/error/hang/skipped/xfailed/xpassed and the first error lines."""
    for report in reports:
        if report.failed:
            text = report.longreprtext
            lines = [ln[2:].strip() for ln in text.splitlines() if ln.startswith("E ")]
            lines = lines[:4] or text.strip().splitlines()[-2:]
            if "Timeout" in text and "pytest-timeout" in text:
                return "hang", lines
            return ("failed" if report.when == "call" else "error"), lines
    for report in reports:
        if report.skipped:
            reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else ""
            return ("xfailed" if hasattr(report, "wasxfail") else "skipped"), [str(reason)]
    if any(hasattr(r, "wasxfail") for r in reports):
        return "xpassed", []
    return "passed", []


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    _write({"totals": dict(COUNTS), "exitstatus": int(exitstatus)})
    if _out is not None:
        _out.close()
