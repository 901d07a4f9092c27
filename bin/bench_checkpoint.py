"""What checkpoints cost (issue 15): size and write time for models of 1M and 100M
parameters, and the training time of the resume tests' spaCy pipeline with and without
`--checkpoint-every 100`.

    python bin/bench_checkpoint.py [--sizes 1e6,1e8] [--repeats 3] [--epochs 60]

Model sizes: a Thinc chain of Linear layers, one Adam step with Thinc's defaults
(moments and averages: the optimizer holds 3 arrays per weight), then
`optim.thinc.save_checkpoint` (one file, fsynced, renamed), timed over --repeats writes;
the median is reported. Pipeline: whole `python -m optim.spacy_train` runs (start-up
included), alternating the two settings, medians over --repeats runs each.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parent.parent


def model_of(n_params: int):
    from thinc.api import Linear, chain

    layers = 2 if n_params < 1e7 else 10
    width = int((n_params / layers) ** 0.5)
    model = chain(*[Linear(width, width) for _ in range(layers)])
    model.initialize(X=numpy.zeros((2, width), "f"))
    return model


def bench_sizes(sizes, repeats):
    import optim
    from optim.thinc import save_checkpoint

    rows = []
    for n in sizes:
        model = model_of(int(n))
        opt = optim.Adam(0.001, grad_clip=1.0, use_averages=True)
        params = 0
        for node in model.walk():
            for name in node.param_names:
                if node.has_param(name):
                    w = node.get_param(name)
                    params += w.size
                    opt((node.id, name), w, numpy.ones_like(w) * 1e-3)
        times = []
        with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
            path = Path(tmp) / "checkpoint.bin"
            for _ in range(repeats):
                start = time.perf_counter()
                save_checkpoint(path, model, opt, step=1)
                times.append(time.perf_counter() - start)
            size = path.stat().st_size
        rows.append((params, size, statistics.median(times), min(times)))
        del model, opt
    print("| parameters | checkpoint size | write time (median) | min | MB/s |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for params, size, med, low in rows:
        print(f"| {params:,} | {size / 2**20:,.1f} MiB | {med * 1000:,.0f} ms | "
              f"{low * 1000:,.0f} ms | {size / 2**20 / med:,.0f} |")


def bench_pipeline(repeats, epochs):
    sys.path.insert(0, str(ROOT / "tests"))
    from spacy_resume_code import CONFIG

    env = {**os.environ, "OMP_NUM_THREADS": "1", "BLIS_NUM_THREADS": "1"}
    times = {"none": [], "every 100": []}
    steps = None
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.cfg"
        config.write_text(CONFIG.replace("max_epochs = 4", f"max_epochs = {epochs}"))
        for i in range(repeats):
            for label, extra in (("none", []), ("every 100", ["--checkpoint-every", "100"])):
                out = Path(tmp) / f"out-{label.replace(' ', '')}-{i}"
                command = [sys.executable, "-m", "optim.spacy_train", str(config), "--output",
                           str(out), "--code", str(ROOT / "tests" / "integration_spacy" / "spacy_resume_code.py"),
                           *extra]
                start = time.perf_counter()
                proc = subprocess.run(command, env=env, capture_output=True, text=True)
                times[label].append(time.perf_counter() - start)
                if proc.returncode != 0:
                    raise SystemExit(proc.stderr[-2000:])
                if extra:
                    steps = max(int(p.stem[5:]) for p in (out / "checkpoints").glob("step-*.ckpt"))
    base = statistics.median(times["none"])
    print(f"\nspaCy pipeline (tok2vec + tagger + textcat, {epochs} epochs, {steps} steps), "
          f"whole runs, median of {repeats}:")
    print("| checkpoints | run time | ratio |")
    print("| --- | ---: | ---: |")
    for label, values in times.items():
        print(f"| {label} | {statistics.median(values):.2f} s | "
              f"{statistics.median(values) / base:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1e6,1e8")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--skip-pipeline", action="store_true")
    args = parser.parse_args()
    bench_sizes([float(s) for s in args.sizes.split(",")], args.repeats)
    if not args.skip_pipeline:
        bench_pipeline(args.repeats, args.epochs)


if __name__ == "__main__":
    main()
