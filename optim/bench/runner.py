"""The run: every configuration, every implementation, into the result dict."""
from __future__ import annotations

import gc
import sys
import time
from functools import partial
from typing import Any, Callable, Dict, List

import numpy

from .cases import BYTES_MODEL, PROG, SCHEMA_VERSION, Case, Config, _cases
from .devices import Device, get_device, machine_info
from .errors import NotReady, Skip
from .peers import (build_numpy, build_optim, build_optim_one_thread, build_roofline,
                    build_thinc, build_torch, peer_missing)
from .report import _fmt_count, notes
from .timing import _loop, _threadpool_limits, measure


def run(cfg: Config) -> Dict[str, Any]:
    """Run the bench; returns the result dict (what ``--json`` writes)."""
    dev = get_device(cfg.device)
    try:
        import optim
        for cls in ("SGD", "Adam", "RAdam"):
            getattr(optim, cls)
    except (ImportError, AttributeError) as err:
        raise NotReady(f"optim's core is not importable ({err}); build it first: "
                           "python setup.py build_ext --inplace") from err

    skipped: List[Dict[str, str]] = []
    peers = []
    for peer in cfg.compare:
        why = peer_missing(peer)
        if why:
            skipped.append({"impl": peer, "reason": why})
        else:
            peers.append(peer)
    builders: Dict[str, Callable[[Device, Case], Callable]] = {"optim": build_optim}
    if cfg.threads > 1 and cfg.device == "cpu":
        builders["optim-1t"] = build_optim_one_thread
    if cfg.groups > 0:
        builders["optim+groups"] = partial(build_optim, groups=cfg.groups)
    if cfg.nonfinite != "apply":
        builders[f"optim+{cfg.nonfinite}"] = partial(build_optim, nonfinite=cfg.nonfinite)
    for peer in peers:
        builders[peer] = {"thinc": build_thinc, "numpy": build_numpy,
                          "torch": partial(build_torch, threads=cfg.threads)}[peer]

    cases = _cases(cfg)
    results: List[Dict[str, Any]] = []
    limits = _threadpool_limits(cfg.threads)
    saved_threads = optim.get_num_threads()
    optim.set_num_threads(cfg.threads)  # --threads applies to optim's CPU kernels too
    started = time.perf_counter()
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(cases), file=sys.stderr, unit="config", leave=False,
                   dynamic_ncols=True, disable=None if cfg.progress else True)
        try:
            for case in cases:
                bar.set_description(
                    f"{case.spec.name} {case.dtype} {_fmt_count(case.n)} {case.layout}")
                results.extend(_run_case(dev, cfg, case, builders, skipped))
                gc.collect()
                bar.update(1)
        finally:
            bar.close()
    finally:
        optim.set_num_threads(saved_threads)
        if limits is not None:
            limits.unregister()
    return {
        "schema_version": SCHEMA_VERSION,
        "command": PROG,
        "config": {
            "optimizers": cfg.optimizers, "sizes": cfg.sizes, "dtypes": cfg.dtypes,
            "layouts": cfg.layouts, "tensor_size": cfg.tensor_size,
            "repeats": cfg.repeats, "threads": cfg.threads, "device": cfg.device,
            "compare": cfg.compare, "quick": cfg.quick, "min_block_s": cfg.min_block_s,
            "clock": cfg.resolved_clock,
        },
        "machine": machine_info(dev, cfg),
        "bytes_model": BYTES_MODEL,
        "gradient": "zeros",
        "notes": notes(cfg),
        "skipped": skipped,
        "elapsed_s": time.perf_counter() - started,
        "results": results,
    }


def _run_case(dev: Device, cfg: Config, case: Case, builders: Dict[str, Callable],
              skipped: List[Dict[str, str]]) -> List[Dict[str, Any]]:
    blocks: Dict[str, Callable[[int], Any]] = {}
    variants: Dict[str, str] = {}
    for impl, build in builders.items():
        try:
            step = build(dev, case)
            step()  # fail here, not in the timing loop
        except Exception as err:
            if impl == "optim" and not isinstance(err, Skip):
                raise
            skipped.append({"impl": impl, "optimizer": case.spec.name, "dtype": case.dtype,
                            "n_params": case.n, "layout": case.layout,
                            "reason": f"{type(err).__name__}: {err}"
                            if not isinstance(err, Skip) else str(err)})
            continue
        variants[impl] = getattr(step, "variant", "")
        blocks[impl] = _loop(step)
    if not blocks:
        return []
    roof_threads = (1, cfg.threads) if cfg.threads > 1 and dev.name == "cpu" else (1,)
    roof_runs = build_roofline(dev, case, roof_threads)
    blocks["roofline"] = roof_runs[roof_threads[-1]]
    if len(roof_threads) > 1:
        blocks["roofline-1t"] = roof_runs[1]
    timed = measure(blocks, cfg.repeats_for(case.n), cfg.min_block_s, dev.sync,
                    clock=cfg.resolved_clock)
    itemsize = numpy.dtype(case.dtype).itemsize
    bpp = case.spec.bytes_per_param(itemsize)
    roof = timed.pop("roofline")
    roof_1t = timed.pop("roofline-1t", roof)
    ours = timed.get("optim", {}).get("time_s")
    rows = []
    for impl, t in timed.items():
        secs = t["time_s"]
        rows.append({
            "section": case.section,
            "optimizer": case.spec.name,
            "label": case.spec.label,
            "dtype": case.dtype,
            "n_params": case.n,
            "layout": case.layout,
            "n_tensors": len(case.sizes),
            "impl": impl,
            "variant": variants.get(impl, ""),
            "threads": 1 if impl == "optim-1t" else cfg.threads,
            "time_s": secs,
            "times_s": t["times_s"],
            "wall_time_s": t["wall_time_s"],
            "clock": t["clock"],
            "calls_per_sample": t["number"],
            "params_per_s": case.n / secs,
            "bytes_per_param": bpp,
            "gb_per_s": case.n * bpp / secs / 1e9,
            "roofline_s": roof["time_s"],
            "roofline_times_s": roof["times_s"],
            "ratio": roof["time_s"] / secs,
            "roofline_1t_s": roof_1t["time_s"],
            "ratio_1t": roof_1t["time_s"] / secs,
            "optim_speedup": secs / ours if ours else None,
        })
    return rows
