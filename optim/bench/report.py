"""Output: the notes, the table, the text report and the JSON file."""
from __future__ import annotations

import json
import math
from typing import Any, Dict, List, Sequence, Tuple

from .cases import BYTES_MODEL, OVERHEAD_PARAMS, PROG, Config


def notes(cfg: Config) -> List[str]:
    return [
        f"time/update: median of the samples; each sample times back-to-back updates "
        f"(at least {cfg.min_block_s * 1e3:g} ms or one update) after warm-up updates; "
        "all implementations of a configuration are sampled interleaved. Clock: "
        + ("this thread's CPU time (time.thread_time_ns: leaves out time the OS gave "
           "the core to other processes; wall-clock medians are in the JSON)."
           if cfg.resolved_clock == "cpu" else "wall (time.perf_counter_ns)."),
        "gradients: zeros, allocated once, never refilled (each update zeroes its "
        "gradient anyway; arithmetic on zeros costs the same on CPU, and the moments "
        "stay exactly 0, so no denormals). Thinc and NumPy skip the clip multiply when "
        "the norm is below grad_clip, which zero gradients always are.",
        (("roofline: optim.bench._roofline on arrays of the same number, sizes and dtype as the "
          "update (same bytes, read and written once; + one read of g when clipping), "
          "built for the SIMD level optim runs and split over threads as optim splits an "
          f"update; on {cfg.threads} thread(s); ratio = roofline / time (1.0 = at the speed "
          "of memory)."
          + (" roof 1t and ratio 1t: the same on one thread. optim-1t: optim on one thread "
             "in the same run; its 'optim x' is the speedup of the threads."
             if cfg.threads > 1 else ""))
         if cfg.device == "cpu" else
         "roofline: ONE kernel launch moving the update's bytes (every array read and "
         "written once over all parameters of all tensors, laid end to end; + one read "
         "of a parameter-sized array when clipping); ratio = roofline / time (1.0 = at "
         "the speed of memory in one launch)."),
        "optim x: how many times faster optim is than that implementation "
        "(its time / optim's time).",
        f"layout many: tensors of {cfg.tensor_size} parameters; optim updates them in "
        "one step_many call, torch in one step over a parameter list, Thinc and NumPy "
        "in a Python loop.",
        "overhead rows: one update of 8 float parameters, lean unless the optimizer is "
        "adam-thinc: per-call cost, not memory.",
        f"threads: {cfg.threads} for optim's CPU kernels, the roofline and the peers "
        "(--threads)."
        + (" Threaded timings use the wall clock." if cfg.threads > 1 else ""),
        BYTES_MODEL,
    ]


def _fmt_count(n: int) -> str:
    if n >= 1000:
        e = int(round(math.log10(n)))
        if 10**e == n:
            return f"1e{e}"
    return f"{n:,}" if n >= 10**4 else str(n)


def _fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    return f"{s:.3g} s"


def _fmt_si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _fmt_ratio(x: float) -> str:
    if x >= 9.95:
        return f"{x:.0f}"
    return f"{x:.2f}" if x >= 0.095 else f"{x:.2g}"


def _impl_name(row: Dict[str, Any]) -> str:
    return row["impl"] + (f" ({row['variant']})" if row.get("variant") else "")


COLUMNS = ("optimizer", "dtype", "params", "layout", "impl", "time/update", "params/s",
           "GB/s", "B/param", "roofline", "ratio", "optim x")
THREADED_COLUMNS = COLUMNS[:11] + ("roof 1t", "ratio 1t") + COLUMNS[11:]


def _threaded(rows: List[Dict[str, Any]]) -> bool:
    return any(r.get("threads", 1) > 1 for r in rows)


def table_rows(rows: List[Dict[str, Any]]) -> List[Tuple[str, ...]]:
    threaded = _threaded(rows)
    out = []
    for r in rows:
        layout = r["layout"] if r["n_tensors"] == 1 else f"{r['n_tensors']}x{_fmt_count(r['n_params'] // r['n_tensors'])}"
        speedup = r.get("optim_speedup")
        cells = (
            r["label"], r["dtype"], _fmt_count(r["n_params"]), layout, _impl_name(r),
            _fmt_time(r["time_s"]), _fmt_si(r["params_per_s"]), f"{r['gb_per_s']:.3g}",
            str(r["bytes_per_param"]), _fmt_time(r["roofline_s"]), _fmt_ratio(r["ratio"]),
        )
        if threaded:
            cells += (_fmt_time(r["roofline_1t_s"]), _fmt_ratio(r["ratio_1t"]))
        cells += ("" if r["impl"] == "optim" or speedup is None else _fmt_ratio(speedup) + "x",)
        out.append(cells)
    return out


def format_table(rows: List[Dict[str, Any]], group_by: Sequence[str] = ("optimizer", "dtype")) -> str:
    body = table_rows(rows)
    columns = THREADED_COLUMNS if _threaded(rows) else COLUMNS
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c)
              for i, c in enumerate(columns)]
    right = set(range(5, len(columns)))

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(columns), line(["-" * w for w in widths])]
    previous = None
    for r, b in zip(rows, body):
        group = tuple(r[k] for k in group_by)
        if previous is not None and group != previous:
            lines.append("")
        previous = group
        lines.append(line(b))
    return "\n".join(lines)


def format_report(result: Dict[str, Any]) -> str:
    m = result["machine"]
    cfg = result["config"]
    head = (f"{PROG} | optim {m.get('optim') or '?'} | {m['device']}: {m['processor']}, "
            f"{m['cpu_count']} CPUs | threads {cfg['threads']} | python {m['python']}, "
            f"numpy {m['numpy']}"
            + "".join(f", {p} {m[p]}" for p in ("thinc", "torch") if m.get(p)))
    parts = [head]
    if m.get("optim_cpu") and m["device"] == "cpu":
        c = m["optim_cpu"]
        parts.append(f"optim CPU kernels: SIMD {c['isa']} (available: "
                     f"{', '.join(c['isa_available'])}), threads {c['threads']}"
                     + ("" if c["thread_pool"] else " (single-threaded build)"))
    parts.append("")
    over = [r for r in result["results"] if r["section"] == "overhead"]
    main = [r for r in result["results"] if r["section"] != "overhead"]
    if over:
        parts += [f"Per-call overhead: one update of {OVERHEAD_PARAMS} parameters", "",
                  format_table(over, group_by=()), ""]
    if main:
        parts += ["Updates", "", format_table(main), ""]
    if result["skipped"]:
        parts.append("Skipped:")
        seen = set()
        for s in result["skipped"]:
            where = " ".join(str(s[k]) for k in ("optimizer", "dtype", "n_params", "layout")
                             if k in s)
            text = f"  {s['impl']}{' ' + where if where else ''}: {s['reason']}"
            if text not in seen:
                seen.add(text)
                parts.append(text)
        parts.append("")
    parts.append("Notes:")
    parts += [f"  - {n}" for n in result["notes"]]
    parts.append(f"  - elapsed: {result['elapsed_s']:.1f} s")
    return "\n".join(parts)


def write_json(result: Dict[str, Any], path: str) -> None:
    """Write the result atomically (a killed run leaves the previous file whole)."""
    from ..serialize import write_atomic

    write_atomic(path, (json.dumps(result, indent=1) + "\n").encode("utf8"))
