"""gcc against clang: the same optim built by each, the same bits, the same speed (issue 27).

    python bin/compare_compilers.py [--rounds 15] [--sizes 1e4,1e5] [--dtype float32]
                                    [--isa LEVEL] [--out DIR] [--tree DIR] [--skip-build]

Builds optim's extensions from a source tree (this checkout by default) twice, with gcc
and with clang (`CC=clang CXX=clang++`), each into a folder of its own under --out with a
copy of the package's Python files, so both are importable side by side. Needs a Python
with Cython, NumPy and setuptools (the build's requirements; run it with that Python) and
clang: `apt-get install -y clang` on Debian/Ubuntu where it is missing (on macOS, Apple's
clang is `clang`). Prints each build's error lines (there should be none).

Bits: the same seeded updates (SGD, Adam and RAdam, lean and with clipping + averages,
lookahead, coupled L2, a NaN skipped; float32 and float64; single calls and step_many)
run in each build at every SIMD level this CPU supports; the weights and the optimizer's
`to_bytes()` are hashed. Every hash must equal gcc's at baseline: exit status 1 if not.

Speed: `python -m optim bench` (1 thread, this thread's CPU time, --nonfinite skip so the
all-finite scan is timed too) in each build, alternately, --rounds times in one run; the
table gives each row's median over the rounds (each round's figure is already the bench's
median), gcc then clang, clang/gcc, and the paired ratio (the median of each round's
clang/gcc, the robust one on a busy machine: see print_table). Rows whose paired ratio is
over --threshold (1.15) are marked, not failed: speed is a measurement, not a test.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
COMPILERS = {"gcc": {"CC": "gcc", "CXX": "g++"}, "clang": {"CC": "clang", "CXX": "clang++"}}
# What a compiler prints for an error ("x.c:2:2: error: ...", "gcc: error: ..."), not a
# flag such as -Werror=... in a compile command.
ERROR_LINE = re.compile(r"\berror:", re.IGNORECASE)

# Run inside each build (PYTHONPATH = the build): where every extension was loaded from.
# (Found, not imported: a level's module may hold instructions this CPU lacks.)
IMPORT_CHECK = """
import importlib.util, json, optim, optim._kernels as k
mods = ["_kernels", "cpu._batch", "distributed._flat", "cuda._tables", "bench._roofline"] + [
    "cpu._loops_" + level for level in k.isa_built()]
print(json.dumps({"files": [importlib.util.find_spec("optim." + m).origin for m in mods],
                  "built": list(k.isa_built()), "supported": list(k.isa_supported())}))
"""

# Run inside each build at one SIMD level (OPTIM_ISA): hashes of seeded updates.
BITS = """
import hashlib, json, numpy, optim, optim._kernels
CASES = {
    "sgd": (optim.SGD, dict(learn_rate=0.01, grad_clip=0.0, use_averages=False)),
    "sgd-thinc": (optim.SGD, dict(learn_rate=0.01)),
    "adam": (optim.Adam, dict(grad_clip=0.0, use_averages=False)),
    "adam-thinc": (optim.Adam, dict()),
    "adam-lookahead-l2": (optim.Adam, dict(lookahead_k=3, L2=1e-3, L2_is_weight_decay=False)),
    "adam-skip": (optim.Adam, dict(grad_clip=0.0, use_averages=False, nonfinite="skip")),
    "radam": (optim.RAdam, dict(weight_decay=1e-2)),
}
SIZES = (1, 7, 1000, 4096 + 33, 70001)  # the last is split over threads
out = {"isa": optim._kernels.isa()}
for name, (make, kwargs) in CASES.items():
    for dtype in ("float32", "float64"):
        rng = numpy.random.default_rng(27)
        opt = make(**kwargs)
        weights = [rng.normal(size=n).astype(dtype) for n in SIZES]
        for step in range(1, 26):
            grads = [rng.normal(scale=0.5, size=n).astype(dtype) for n in SIZES]
            if step == 5 and name == "adam-skip":  # NaN payloads are not compared
                grads[2][17] = numpy.nan
            if step % 2:
                for key, (w, g) in enumerate(zip(weights, grads)):
                    opt(key, w, g)
            else:
                opt.step_many(list(range(len(SIZES))), weights, grads)
        digest = hashlib.sha256()
        for w in weights:
            digest.update(w.tobytes())
        digest.update(opt.to_bytes())
        out[name + " " + dtype] = digest.hexdigest()[:16]
print(json.dumps(out))
"""


def run_in(build: Path, args: List[str], env: Dict[str, str] = None) -> str:
    """Run the Python of this script with `build` first on the path, from a folder that
    holds no optim (so the build's is the one imported); returns stdout."""
    full_env = {**os.environ, "PYTHONPATH": str(build), **(env or {})}
    done = subprocess.run([sys.executable] + args, cwd=build.parent, env=full_env,
                          capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(args[:3])[:60]!r} failed (exit status {done.returncode}) in "
                 f"{build}:\n{done.stderr[-3000:]}")
    return done.stdout


def build(compiler: str, tree: Path, out: Path) -> Path:
    """Build the extensions of `tree` with `compiler` into out/compiler/lib, with the
    package's Python files beside them; print the build's error lines."""
    lib, temp = out / compiler / "lib", out / compiler / "temp"
    shutil.rmtree(out / compiler, ignore_errors=True)
    env = {**os.environ, **COMPILERS[compiler]}
    print(f"building with {compiler} ({env['CC']}) into {lib} ...", flush=True)
    done = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--build-lib", str(lib), "--build-temp",
         str(temp), "--force", "-j", "2"],
        cwd=tree, env=env, capture_output=True, text=True)
    log = done.stdout + done.stderr
    (out / compiler / "build.log").write_text(log)
    if done.returncode:
        sys.exit(f"the {compiler} build failed; its log: {out / compiler / 'build.log'}\n"
                 + log[-3000:])
    errors = [line for line in log.splitlines() if ERROR_LINE.search(line)]
    print(f"  {len(errors)} error line(s) in its log" + "".join(f"\n    {e}" for e in errors))
    for source in (tree / "optim").rglob("*.py"):
        target = lib / source.relative_to(tree)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return lib


def check_import(compiler: str, lib: Path) -> Dict:
    info = json.loads(run_in(lib, ["-c", IMPORT_CHECK]))
    stray = [f for f in info["files"] if not Path(f).resolve().is_relative_to(lib.resolve())]
    if stray:
        sys.exit(f"the {compiler} build imports extensions from elsewhere: {stray}")
    return info


def compare_bits(libs: Dict[str, Path], levels: List[str]) -> bool:
    """Hash the seeded updates in every build at every level; True if all are gcc's at
    baseline."""
    hashes = {(c, level): json.loads(run_in(lib, ["-c", BITS], {"OPTIM_ISA": level}))
              for c, lib in libs.items() for level in levels}
    wrong = [f"{c} {level}: ran {h['isa']}" for (c, level), h in hashes.items()
             if h["isa"] != level]
    if wrong:
        sys.exit(f"OPTIM_ISA was not honoured: {wrong}")
    reference = hashes[("gcc", levels[0])]
    cases = [k for k in reference if k != "isa"]
    columns = list(hashes)
    print("\nBits (sha256 of weights + to_bytes(), first 16 hex digits)\n")
    print(f"{'case':28s} " + " ".join(f"{c + ' ' + lv:17s}" for c, lv in columns))
    same = True
    for case in cases:
        cells = []
        for column in columns:
            value = hashes[column][case]
            equal = value == reference[case]
            cells.append(f"{value if equal else 'DIFF ' + value:17s}")
            same = same and equal
        print(f"{case:28s} " + " ".join(cells))
    print("\nsame bits: " + ("yes, every case in every build at every level" if same
                             else "NO: the builds or levels differ (DIFF)"))
    return same


def row_times(path: Path) -> Dict[str, float]:
    """One bench run's rows (optimizer rows and the roofline per configuration) -> median
    time per update in seconds."""
    times = {}
    for row in json.loads(path.read_text())["results"]:
        layout = "one" if row["layout"] == "one" else f"{row['n_tensors']}x"
        case = f"{row['label']}  {row['dtype']}  {row['n_params']:.0e}  {layout}"
        times[f"{case}  {row['impl']}"] = row["time_s"]
        if row.get("roofline_s"):
            times[f"{case}  roofline"] = row["roofline_s"]
    return times


def time_builds(libs: Dict[str, Path], args: argparse.Namespace, out: Path
                ) -> List[Dict[str, Dict[str, float]]]:
    """args.rounds rounds; a round is one bench run per build, back to back (who goes
    first alternates). Returns each round's {build: {row: seconds}}."""
    bench = ["-m", "optim", "bench", "--sizes", args.sizes, "--dtype", args.dtype,
             "--no-overhead", "--no-progress", "--nonfinite", "skip", "--threads", "1"]
    if args.repeats:
        bench += ["--repeats", str(args.repeats)]
    env = {"OPTIM_ISA": args.isa} if args.isa else {}
    rounds = []
    order = list(libs)
    for r in range(args.rounds):
        times = {}
        for compiler in (order if r % 2 == 0 else order[::-1]):
            path = out / compiler / f"bench-{r}.json"
            run_in(libs[compiler], bench + ["--json", str(path)], env)
            times[compiler] = row_times(path)
        rounds.append(times)
        print(f"  round {r + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.1f})",
              flush=True)
    return rounds


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.3g} us" if us < 1000 else f"{us:.0f} us"


def print_table(rounds: List[Dict[str, Dict[str, float]]], threshold: float,
                base: str = "gcc", other: str = "clang") -> List[str]:
    """The table; returns the rows whose paired ratio is over threshold.

    Each round's figure for a row is the bench's median; the table gives the median over
    the rounds per build, their ratio, and the paired ratio: the median over the rounds
    of other/base within a round. On a shared machine whole runs land in a slow phase
    (other processes' load; it comes and goes over seconds): the two runs of a round are
    seconds apart, so the paired ratio is the one that compares the code."""
    keys = [k for k in rounds[0][base] if all(k in r[other] for r in rounds)]
    width = max(len(k) for k in keys)
    ratio = f"{other}/{base}"
    print(f"\n{'row':{width}s}  {base:>9s}  {other:>9s}  {ratio:>9s}  paired")
    print(f"{'-' * width}  {'-' * 9}  {'-' * 9}  {'-' * max(9, len(ratio))}  ------")
    slow, paired_ratios = [], []
    for key in keys:
        a, b = (statistics.median(r[c][key] for r in rounds) for c in (base, other))
        paired = statistics.median(r[other][key] / r[base][key] for r in rounds)
        paired_ratios.append(paired)
        mark = f"  <- over {threshold:.2f}x" if paired > threshold else ""
        if mark:
            slow.append(key)
        print(f"{key:{width}s}  {fmt_us(a):>9s}  {fmt_us(b):>9s}  {b / a:9.2f}  "
              f"{paired:6.2f}{mark}")
    print(f"\npaired {ratio} over {len(keys)} rows: {min(paired_ratios):.2f} to "
          f"{max(paired_ratios):.2f}, median {statistics.median(paired_ratios):.2f}; "
          f"{len(slow)} over {threshold:.2f}x")
    return slow


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15, help="bench runs per build (15)")
    parser.add_argument("--sizes", default="1e4,1e5", help="the bench's --sizes (1e4,1e5)")
    parser.add_argument("--dtype", default="float32",
                        help="the bench's --dtype: float32, float64 or both (float32)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="the bench's --repeats (its default: 31 up to 1e5)")
    parser.add_argument("--isa", default="", help="OPTIM_ISA for the timed runs: baseline, "
                                                  "avx2, avx512 (default: optim's pick)")
    parser.add_argument("--threshold", type=float, default=1.15,
                        help="mark rows whose paired clang/gcc is over this (1.15)")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="the source tree to build (default: this checkout)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the builds (default: a temporary one, removed)")
    parser.add_argument("--skip-build", action="store_true",
                        help="reuse the builds already in --out")
    args = parser.parse_args()
    for compiler in COMPILERS.values():
        if shutil.which(compiler["CC"]) is None:
            sys.exit(f"{compiler['CC']} not found (Debian/Ubuntu: apt-get install -y "
                     f"{compiler['CC']})")
    if args.skip_build and args.out is None:
        parser.error("--skip-build needs --out")
    out = args.out or Path(tempfile.mkdtemp(prefix="optim-compilers-"))
    out = out.resolve()
    try:
        libs = {c: (out / c / "lib" if args.skip_build else build(c, args.tree.resolve(), out))
                for c in COMPILERS}
        infos = {c: check_import(c, lib) for c, lib in libs.items()}
        levels = [lv for lv in infos["gcc"]["supported"]
                  if all(lv in info["built"] for info in infos.values())]
        same = compare_bits(libs, levels)
        print(f"\nTiming {args.rounds} alternating rounds of python -m optim bench "
              f"(sizes {args.sizes}, {args.dtype}, SIMD level "
              f"{args.isa or 'optim picks: ' + levels[-1]}, 1 thread, CPU time) ...")
        print_table(time_builds(libs, args, out), args.threshold)
    finally:
        if args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
