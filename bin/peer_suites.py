"""Run spaCy's and Thinc's own test suites with optim's optimizers in place of Thinc's.

Each suite runs twice on the same tests: "thinc" (Thinc's own optimizers, the baseline)
and "optim" (swapped by the pytest plugin bin/peer_swap.py, which also counts optimizer
constructions and updates per test). Outcomes are diffed per test id; a test that passes
(or skips) with Thinc and fails, errors, hangs or crashes with optim is a regression, and
the exit status is 1 iff there is one, or a PROBLEM (a run that recorded no test, a swap
not proven by the counts). Suites:

  spacy    spaCy 3.8's spacy/tests, the files the SPACY_RULE below selects (--all: all)
  thinc    Thinc 8.3's thinc/tests, the files THINC_RULE selects (--all: all)
  thinc83  Thinc 8.3's thinc/tests/test_optimizers.py as shipped (thinc) and with its
           `from thinc.api import Optimizer, registry` made `from optim import ...` (optim)
  thinc91  the same with Thinc 9.1.1's file, in a venv with thinc==9.1.1 and no spaCy

Run from the repository root after an in-place build, with the Python that has spaCy:
  python setup.py build_ext --inplace && python bin/peer_suites.py [--suites spacy,thinc]
The first run makes two virtual environments under --envs (the spaCy one borrows this
Python's site-packages and adds mock and pytest-timeout; the Thinc 9.1 one installs
thinc==9.1.1). Results: --out/summary.json, and per run a JSON-lines file and a log.
"""
import argparse
import configparser
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_path("purelib"))  # where this Python's spaCy and Thinc live
# spaCy: a file that initializes a pipeline (nlp.initialize() makes the optimizer spaCy
# keeps on nlp, so pickling, copying and nlp.pipe(n_process=2) of it are covered too),
# updates, rehearses, resumes or trains one, or names an optimizer.
SPACY_RULE = re.compile(r"initialize\(|begin_training|resume_training|create_optimizer|"
                        r"nlp\.update\(|sgd=|losses=|rehearse\(|finish_update|"
                        r"\b(Adam|SGD|RAdam|Optimizer)\b|@optimizers|\btrain\(")
# Thinc: `initialize(` is a model's there, so only files that update or name optimizers.
THINC_RULE = re.compile(r"finish_update|\b(Adam|SGD|RAdam|Optimizer)\b|optimizers")
IMPORT_LINE = "from thinc.api import Optimizer, registry\n"
BAD = ("failed", "error", "hang", "crashed")
PURE_DEPS = ["numpy", "cymem", "catalogue", "srsly", "confection", "tqdm"]
WATCHDOG_GRACE = 60  # seconds past --timeout before a test's pytest is killed


def select(package: str, rule: Optional["re.Pattern[str]"]) -> List[str]:
    """The test files of `package`/tests (relative to SITE) that `rule` matches (all: None)."""
    files = sorted((SITE / package / "tests").rglob("test_*.py"))
    return [str(f.relative_to(SITE)) for f in files
            if rule is None or rule.search(f.read_text(encoding="utf-8"))]


def make_env(path: Path, packages: List[str], borrow_site: bool) -> Path:
    """A venv at `path` with `packages`; `borrow_site` adds this Python's site-packages."""
    python = path / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    if borrow_site:
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print("
                                  "sysconfig.get_path('purelib'))"], check=True,
                                 capture_output=True, text=True).stdout.strip()
        Path(purelib, "peer-borrowed-site.pth").write_text(f"{SITE}\n")
    marker = path / "peer-packages.txt"
    if not marker.exists() or marker.read_text() != " ".join(packages):
        with open(path / "pip.log", "w") as log:  # pip.conf's find-links warn a lot
            done = subprocess.run([str(python), "-m", "pip", "install", "-q", *packages],
                                  stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            raise SystemExit(f"pip install {' '.join(packages)} failed: see {path}/pip.log")
        marker.write_text(" ".join(packages))
    return python


def thinc_tests_of(python: Path) -> Path:
    """The thinc/tests folder that `python` imports."""
    code = "import os, thinc.tests; print(os.path.dirname(thinc.tests.__file__))"
    return Path(subprocess.run([str(python), "-c", code], check=True, capture_output=True,
                               text=True).stdout.strip())


def tree_metadata(dest: Path) -> Path:
    """A dist-info with the tree's own entry points (setup.cfg), to come first on the path:
    the venv's installed thinc-optim may be another checkout's, with other entry points."""
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    version = re.search(r'__version__ = "([^"]+)"', (REPO / "optim" / "about.py").read_text())
    info = dest / f"thinc_optim-{version.group(1)}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: thinc-optim\n"
                                   f"Version: {version.group(1)}\n")
    (info / "entry_points.txt").write_text("".join(
        f"[{group}]\n{lines.strip()}\n\n" for group, lines in cfg["options.entry_points"].items()))
    return dest


def read_records(path: Path) -> Tuple[Dict[str, dict], Optional[str], List[dict]]:
    """Per-test records, the test started but not finished (if any), and other lines."""
    records: Dict[str, dict] = {}
    started: Optional[str] = None
    other: List[dict] = []
    for line in path.read_text().splitlines() if path.exists() else []:
        if not line.endswith("}"):
            continue  # a line cut by a kill
        record = json.loads(line)
        if "start" in record:
            started = record["start"]
        elif "id" in record:
            records[record["id"]] = record
            started = None if started == record["id"] else started
        else:
            other.append(record)
    return records, started, other


def run_pytest(python: Path, mode: str, root: Path, paths: List[str], run_dir: Path,
               args: argparse.Namespace) -> Dict[str, Any]:
    """pytest over `paths` (relative to `root`) with the plugin; restarts after a kill."""
    run_dir.mkdir(parents=True, exist_ok=True)
    out, skip, log = run_dir / f"{mode}.jsonl", run_dir / f"{mode}.skip", run_dir / f"{mode}.log"
    for stale in (out, skip, log):
        stale.unlink(missing_ok=True)
    ini = run_dir / "pytest.ini"  # so no ini above `root` (e.g. /work/main/setup.cfg) is read
    ini.write_text("[pytest]\n")
    path = [str(REPO), str(REPO / "bin"), str(tree_metadata(args.out / "tree-metadata"))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path),
               PEER_SWAP="optim" if mode == "optim" and args.swap else "thinc",
               PEER_OUT=str(out), PEER_SKIP=str(skip), PEER_START_METHOD=args.start_method)
    cmd = [str(python), "-m", "pytest", "-q", "-p", "peer_swap", "-p", "no:cacheprovider",
           "-c", str(ini), f"--rootdir={root}", "--continue-on-collection-errors",
           f"--timeout={args.timeout}", "--timeout-method=signal", *args.pytest_args,
           *[str(root / p) for p in paths]]
    began, restarts, killed = time.perf_counter(), 0, {}
    with open(log, "a") as log_file:
        while True:
            records, _, _ = read_records(out)
            skip.write_text("\n".join(list(records) + list(killed)))
            proc = subprocess.Popen(cmd, cwd=run_dir, env=env, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            watched, since = None, time.perf_counter()
            while proc.poll() is None:
                time.sleep(0.25)
                _, started, _ = read_records(out)
                if started != watched:
                    watched, since = started, time.perf_counter()
                elif started and time.perf_counter() - since > args.timeout + WATCHDOG_GRACE:
                    os.killpg(proc.pid, signal.SIGKILL)  # pytest-timeout did not end it
                    proc.wait()
                    killed[started] = (f"killed by the watchdog after "
                                       f"{args.timeout + WATCHDOG_GRACE} s")
            _, started, other = read_records(out)
            if started and started not in killed:
                killed[started] = f"pytest died (exit status {proc.returncode}) in this test"
            if any("totals" in o for o in other[-1:]) or not started or restarts >= 20:
                break
            restarts += 1
            log_file.write(f"\n[peer_suites] restart {restarts} after {started}\n")
            log_file.flush()
    records, _, other = read_records(out)
    for test_id, why in killed.items():
        kind = "hang" if "watchdog" in why else "crashed"
        records[test_id] = {"id": test_id, "outcome": kind, "error": [why], "counts": {}}
    counts: Dict[str, int] = {}
    for record in records.values():
        for key, value in record["counts"].items():
            counts[key] = counts.get(key, 0) + value
    outcomes: Dict[str, int] = {}
    for record in records.values():
        outcomes[record["outcome"]] = outcomes.get(record["outcome"], 0) + 1
    reached = [o for o in other if "optim_references" in o]
    return {"seconds": round(time.perf_counter() - began, 1), "restarts": restarts,
            "outcomes": outcomes, "counts": counts, "records": records,
            "swapped": next((o["swapped"] for o in other if "swapped" in o), []),
            "optim_references": reached[0]["optim_references"] if reached else [],
            "built_an_optimizer": sum(1 for r in records.values()
                                      if r["counts"].get("thinc_constructed")
                                      or r["counts"].get("optim_constructed"))}


def compare(thinc: Dict[str, Any], optim: Dict[str, Any]) -> Dict[str, List[dict]]:
    """Regressions (fine with Thinc, bad or missing with optim) and the reverse."""
    regressions, fixed = [], []
    for test_id in sorted(set(thinc["records"]) | set(optim["records"])):
        before = thinc["records"].get(test_id, {"outcome": "missing", "error": []})
        after = optim["records"].get(test_id, {"outcome": "missing", "error": []})
        row = {"id": test_id, "thinc": before["outcome"], "optim": after["outcome"]}
        if before["outcome"] not in BAD and after["outcome"] in BAD + ("missing",):
            regressions.append(dict(row, error=after["error"]))
        elif before["outcome"] in BAD + ("missing",) and after["outcome"] not in BAD:
            fixed.append(dict(row, error=before["error"]))
    return {"regressions": regressions, "fixed": fixed}


def proof(run: Dict[str, Any], mode: str) -> List[str]:
    """What is wrong with the swap's evidence in a whole-suite run (nothing: [])."""
    c = run["counts"]
    if mode == "thinc":
        return [] if c.get("thinc_constructed") else ["the baseline built no Thinc optimizer"]
    problems = []
    if not c.get("optim_constructed") or not (c.get("optim_calls") or c.get("optim_tensors")):
        problems.append("no optim optimizer was built and updated")
    if c.get("thinc_constructed") or c.get("thinc_calls"):
        built = [i for i, r in run["records"].items() if r["counts"].get("thinc_constructed")]
        problems.append(f"Thinc's own Optimizer was built {c.get('thinc_constructed', 0)} "
                        f"times and called {c.get('thinc_calls', 0)} times: {built[:5]}")
    return problems


def optimizer_tests(tests: Path, run_dir: Path) -> Tuple[Path, Path, List[str]]:
    """Thinc's test_optimizers.py as shipped and with optim's import, side by side."""
    text = (tests / "test_optimizers.py").read_text()
    if IMPORT_LINE not in text:
        raise SystemExit(f"{tests}/test_optimizers.py lacks {IMPORT_LINE!r}")
    for mode, body in (("thinc", text), ("optim", text.replace(
            IMPORT_LINE, "from optim import Optimizer, registry\n", 1))):
        (run_dir / mode).mkdir(parents=True, exist_ok=True)
        (run_dir / mode / "test_optimizers.py").write_text(body)
    return run_dir / "thinc", run_dir / "optim", ["test_optimizers.py"]


def run_suite(name: str, args: argparse.Namespace, envs: Dict[str, Path]) -> Dict[str, Any]:
    run_dir = args.out / name
    shutil.rmtree(run_dir, ignore_errors=True)
    if name in ("spacy", "thinc"):
        rule = None if args.all else (SPACY_RULE if name == "spacy" else THINC_RULE)
        paths = select(name, rule)
        roots = {"thinc": SITE, "optim": SITE}
        python = envs["spacy"]
    else:
        python = envs["spacy" if name == "thinc83" else "thinc91"]
        thinc_root, optim_root, paths = optimizer_tests(thinc_tests_of(python), run_dir)
        roots = {"thinc": thinc_root, "optim": optim_root}
    args.swap = name in ("spacy", "thinc")
    runs = {mode: run_pytest(python, mode, roots[mode], paths, run_dir, args)
            for mode in ("thinc", "optim")}
    problems = proof(runs["thinc"], "thinc") + proof(runs["optim"], "optim") if args.swap else []
    problems += [f"the {mode} run recorded no test: see {run_dir / mode}.log"
                 for mode, run in runs.items() if not run["records"]]
    return {"files": paths, "runs": runs, "problems": problems,
            **compare(runs["thinc"], runs["optim"])}


def show(name: str, suite: Dict[str, Any], lines: int) -> None:
    runs = suite["runs"]
    print(f"\n== {name}: {len(suite['files'])} files, "
          f"{len(runs['thinc']['records'])} tests with Thinc, "
          f"{len(runs['optim']['records'])} with optim")
    for mode, run in runs.items():
        c = run["counts"]
        print(f"  {mode:5}: {json.dumps(run['outcomes'], sort_keys=True)}; "
              f"Thinc Optimizer built {c.get('thinc_constructed', 0)}, calls "
              f"{c.get('thinc_calls', 0)}; optim Optimizer built "
              f"{c.get('optim_constructed', 0)}, calls {c.get('optim_calls', 0)}, step_many "
              f"{c.get('optim_step_many', 0)} ({c.get('optim_tensors', 0)} tensors); "
              f"{run['built_an_optimizer']} tests built one; {run['seconds']} s"
              + (f", {run['restarts']} restarts" if run["restarts"] else ""))
    for problem in suite["problems"]:
        print(f"  PROBLEM: {problem}")
    for title, rows in (("regressions", suite["regressions"]), ("fixed by optim", suite["fixed"])):
        print(f"  {title}: {len(rows)}")
        for row in rows:
            print(f"    {row['id']}  ({row['thinc']} -> {row['optim']})")
            for line in row["error"][:lines]:
                print(f"        {line[:200]}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default="spacy,thinc,thinc83,thinc91",
                        help="comma-separated, of spacy, thinc, thinc83, thinc91")
    parser.add_argument("--all", action="store_true", help="every test file, not the rules'")
    parser.add_argument("--list", action="store_true", help="print the selection and stop")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per test")
    parser.add_argument("--start-method", default="spawn", choices=["spawn", "fork", "forkserver"],
                        help="multiprocessing's, for nlp.pipe(n_process=2) (spawn: as macOS)")
    parser.add_argument("--envs", type=Path, default=REPO / "build" / "peer-envs")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "peer-suites")
    parser.add_argument("--error-lines", type=int, default=2)
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    args = parser.parse_args()
    suites = args.suites.split(",")
    if args.list:
        for name, rule in (("spacy", SPACY_RULE), ("thinc", THINC_RULE)):
            files = select(name, None if args.all else rule)
            print(f"{name}: {len(files)} files\n  " + "\n  ".join(files))
        return 0
    unknown = set(suites) - {"spacy", "thinc", "thinc83", "thinc91"}
    if unknown:
        parser.error(f"unknown suites: {sorted(unknown)}")
    if not [p for p in (REPO / "optim").glob("_kernels.*") if p.suffix in (".so", ".pyd")]:
        raise SystemExit("build optim in place first: python setup.py build_ext --inplace")
    envs = {}
    if {"spacy", "thinc", "thinc83"} & set(suites):
        envs["spacy"] = make_env(args.envs / "spacy", ["mock", "pytest-timeout"], True)
    if "thinc91" in suites:
        envs["thinc91"] = make_env(args.envs / "thinc91", ["thinc==9.1.1", "pytest",
                                                           "pytest-timeout", *PURE_DEPS], False)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {name: run_suite(name, args, envs) for name in suites}
    for name, suite in summary.items():
        show(name, suite, args.error_lines)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    regressions = sum(len(s["regressions"]) for s in summary.values())
    problems = sum(len(s["problems"]) for s in summary.values())
    print(f"\n{regressions} regressions, {problems} problems; details in "
          f"{args.out / 'summary.json'}")
    return 1 if regressions or problems else 0


if __name__ == "__main__":
    sys.exit(main())
