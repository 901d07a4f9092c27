"""Two builds of optim, one bench: is a change as fast as what it replaces?

    python bin/compare_trees.py BASE OTHER [--rounds 11] [--threshold 1.03] -- BENCH ARGS

BASE and OTHER are source trees with their extensions built in place (`python setup.py
build_ext --inplace`, or `git worktree add` + that). `python -m optim bench BENCH ARGS
--json ...` runs in each (PYTHONPATH = the tree), alternately, --rounds times in one run;
the table gives each row's median over the rounds per tree and the paired ratio (the
median of each round's OTHER/BASE: bin/compare_compilers.py's table, whose note says why
it is the robust one on a shared machine). Rows over --threshold are marked, not failed.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_compilers import print_table, row_times  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    bench = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", type=Path)
    parser.add_argument("other", type=Path)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threshold", type=float, default=1.03)
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    trees = {"base": args.base.resolve(), "other": args.other.resolve()}
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            times = {}
            for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                path = Path(tmp) / f"{name}-{r}.json"
                subprocess.run([sys.executable, "-m", "optim", "bench", *bench,
                                "--no-progress", "--json", str(path)], cwd=trees[name],
                               env={**os.environ, "PYTHONPATH": str(trees[name])},
                               check=True, stdout=subprocess.DEVNULL)
                times[name] = row_times(path)
            rounds.append(times)
            print(f"  round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f})",
                  flush=True)
    print(f"base: {trees['base']}\nother: {trees['other']}")
    print_table(rounds, args.threshold, base="base", other="other")
    print_against_roofline(rounds)
    return 0


def print_against_roofline(rounds: List[Dict[str, Dict[str, float]]]) -> None:
    """Each optim row as a fraction of its configuration's roofline in the same run, other
    against base (paired): what is left of the comparison once the memory both trees'
    runs got is taken out (the roofline's code is the same in both)."""
    print("\noptim rows against the roofline of the same run (paired other/base):")
    for key in rounds[0]["base"]:
        roof = key[:-len("optim")] + "roofline"
        if not key.endswith("optim") or roof not in rounds[0]["base"]:
            continue
        ratio = statistics.median((r["other"][key] / r["other"][roof])
                                  / (r["base"][key] / r["base"][roof]) for r in rounds)
        print(f"  {key[:-len('optim')].strip()}: {ratio:.2f}")


if __name__ == "__main__":
    sys.exit(main())
