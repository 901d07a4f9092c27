"""Plot a saved `python -m optim bench --json PATH` run: time per update vs parameters.

    python -m optim plot bench.json                      # writes bench.png next to it
    python -m optim plot bench.json -o out.svg --optimizer adam --layout one

(also ``python -m optim.bench.plot`` and, in a checkout, ``python bin/plot_bench.py``.)
One panel per (optimizer, dtype, layout), log-log axes, one line per implementation
(optim, thinc, torch, numpy), and the roofline measured in the same run drawn dashed.
Needs matplotlib: pip install "thinc-optim[plot]" (or pip install matplotlib).
"""
import argparse
import io
import json
import math
import os
import sys
from collections import defaultdict
from typing import Any, Dict, Iterable, Optional, Sequence

from ..serialize import write_atomic

STYLES = {"optim": "C0", "thinc": "C1", "torch": "C2", "numpy": "C3"}


def load(path: str) -> Dict[str, Any]:
    """The bench run saved at `path`; ValueError if it is not one."""
    with open(path, encoding="utf8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or "results" not in data:
        raise ValueError(f"{path} is not a `python -m optim bench --json` file")
    return data


def panels(data: Dict[str, Any], optimizers: Optional[Iterable[str]] = None,
           dtypes: Optional[Iterable[str]] = None,
           layouts: Optional[Iterable[str]] = None) -> Dict[tuple, Dict[str, Any]]:
    """{(label, dtype, layout): {"impls": {impl: [(n, t)]}, "roofline": [(n, t)]}}"""
    out = defaultdict(lambda: {"impls": defaultdict(list), "roofline": {}})
    for r in data["results"]:
        if r.get("section", "main") != "main":
            continue
        if optimizers and r["optimizer"] not in optimizers:
            continue
        if dtypes and r["dtype"] not in dtypes:
            continue
        if layouts and r["layout"] not in layouts:
            continue
        panel = out[(r["label"], r["dtype"], r["layout"])]
        name = r["impl"] + (f" ({r['variant']})" if r.get("variant") else "")
        panel["impls"][name].append((r["n_params"], r["time_s"]))
        # Every implementation of a configuration shares one roofline measurement.
        panel["roofline"][r["n_params"]] = r["roofline_s"]
    return out


def plot(data: Dict[str, Any], path: str, optimizers: Optional[Iterable[str]] = None,
         dtypes: Optional[Iterable[str]] = None,
         layouts: Optional[Iterable[str]] = None) -> str:
    """Draw the panels of `data` into the image `path` (its type from the suffix)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("python -m optim plot needs matplotlib: pip install 'thinc-optim[plot]' "
                 "(or pip install matplotlib)")
    groups = panels(data, optimizers, dtypes, layouts)
    if not groups:
        sys.exit("nothing to plot: no results match the filters")
    cols = min(2, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.6 * rows), squeeze=False)
    for ax, ((label, dtype, layout), panel) in zip(axes.flat, sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "one"))):
        roof = sorted(panel["roofline"].items())
        ax.plot([n for n, _ in roof], [t for _, t in roof], "k--", marker="x", lw=1.5,
                label="roofline (same bytes)")
        for name, points in sorted(panel["impls"].items()):
            points.sort()
            color = STYLES.get(name.split(" ")[0])
            ax.plot([n for n, _ in points], [t for _, t in points], "o-", color=color,
                    label=name, lw=2 if name == "optim" else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("parameters per update")
        ax.set_ylabel("time per update (s)")
        ax.set_title(f"{label}, {dtype}, layout: {layout}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    m = data.get("machine", {})
    fig.suptitle(f"python -m optim bench: {m.get('processor', '?')} "
                 f"({m.get('cpu_count', '?')} CPUs, device {m.get('device', '?')}), "
                 f"median time per update", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    buffer = io.BytesIO()  # then written atomically: a kill leaves the old picture whole
    fig.savefig(buffer, dpi=120, format=os.path.splitext(str(path))[1][1:] or "png")
    write_atomic(path, buffer.getvalue())
    return path


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parse `argv` (default sys.argv[1:]), plot, and return the exit status."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Plot `python -m optim bench --json` output (log-log time per "
                    "update vs parameters, roofline dashed).")
    parser.add_argument("json_path", help="a file written by python -m optim bench --json")
    parser.add_argument("-o", "--output", help="image path (default: JSON path with .png)")
    parser.add_argument("--optimizer", help="comma-separated optimizers to keep")
    parser.add_argument("--dtype", help="comma-separated dtypes to keep")
    parser.add_argument("--layout", help="comma-separated layouts to keep (one, many)")
    args = parser.parse_args(argv)
    split = lambda v: set(v.split(",")) if v else None  # noqa: E731
    try:
        data = load(args.json_path)
    except (OSError, ValueError) as err:
        parser.error(str(err))
    out = args.output or os.path.splitext(args.json_path)[0] + ".png"
    plot(data, out, split(args.optimizer), split(args.dtype), split(args.layout))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m optim.bench.plot"))
