"""`python -m optim bench`: structure of its output, not its timings (no thresholds)."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from optim import bench
from optim.bench import plot as plot_bench
from optim.bench._roofline import Plan

ROOT = Path(__file__).resolve().parents[2]
# Subprocesses run from here, not ROOT: in an unpacked sdist ROOT holds optim's uncompiled
# sources, which `python -m` would import instead of the installed package.
HERE = Path(__file__).resolve().parent
# Tiny and fast: 3 samples of ~50 us blocks per implementation and configuration.
QUICK = ["--quick", "--no-progress", "--sizes", "100,1000", "--tensor-size", "10"]
RESULT_KEYS = {
    "section", "optimizer", "label", "dtype", "n_params", "layout", "n_tensors", "impl",
    "variant", "time_s", "times_s", "calls_per_sample", "params_per_s", "bytes_per_param",
    "gb_per_s", "roofline_s", "roofline_times_s", "ratio", "optim_speedup", "wall_time_s",
    "clock", "threads", "roofline_1t_s", "ratio_1t",
}
POSITIVE = ("time_s", "wall_time_s", "params_per_s", "gb_per_s", "roofline_s", "ratio")


def _strict_json(path):
    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    with open(path, encoding="utf8") as f:
        return json.load(f, parse_constant=no_constants)


def _positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def check_result(data, optimizers, sizes, tensor_size, repeats=3):
    assert data["schema_version"] == bench.SCHEMA_VERSION
    for key in ("command", "config", "machine", "bytes_model", "gradient", "notes",
                "skipped", "elapsed_s", "results"):
        assert key in data, key
    assert data["gradient"] == "zeros"
    assert "bytes/param" in data["bytes_model"]
    assert data["machine"]["device"] == "cpu"
    rows = data["results"]
    assert rows
    for r in rows:
        assert set(r) == RESULT_KEYS, set(r) ^ RESULT_KEYS
        for key in POSITIVE:
            assert _positive(r[key]), (key, r)
        assert len(r["times_s"]) == repeats and all(map(_positive, r["times_s"]))
        assert len(r["roofline_times_s"]) == repeats
        assert all(map(_positive, r["roofline_times_s"]))
        assert isinstance(r["calls_per_sample"], int) and r["calls_per_sample"] >= 1
        assert r["optimizer"] in bench.SPECS
        assert r["clock"] in ("cpu", "wall")
        assert r["dtype"] in bench.DTYPES and r["layout"] in bench.LAYOUTS
        spec = bench.SPECS[r["optimizer"]]
        assert r["bytes_per_param"] == spec.bytes_per_param(numpy.dtype(r["dtype"]).itemsize)
        assert math.isclose(r["ratio"], r["roofline_s"] / r["time_s"])
        assert math.isclose(r["params_per_s"], r["n_params"] / r["time_s"])
        assert _positive(r["optim_speedup"])
        if r["impl"] == "optim":
            assert r["optim_speedup"] == 1.0
        assert math.isclose(r["ratio_1t"], r["roofline_1t_s"] / r["time_s"])
        assert r["threads"] == (1 if r["impl"] == "optim-1t" else data["config"]["threads"])
    # optim ran every configuration: overhead rows, one tensor at every size, and many
    # tensors where there are at least 10 of them.
    ours = {(r["section"], r["optimizer"], r["n_params"], r["layout"], r["n_tensors"])
            for r in rows if r["impl"] == "optim"}
    expected = {("overhead", o, bench.OVERHEAD_PARAMS, "one", 1) for o in optimizers}
    for o in optimizers:
        for n in sizes:
            expected.add(("main", o, n, "one", 1))
            if n // tensor_size >= 10:
                expected.add(("main", o, n, "many", n // tensor_size))
    assert ours == expected


def test_bench_subprocess_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "optim", "bench", *QUICK, "--json", str(out),
         "--compare", "numpy"],
        cwd=HERE, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "roofline" in proc.stdout and "ratio" in proc.stdout
    assert "bytes/param" in proc.stdout  # the bytes model is stated
    assert "Per-call overhead" in proc.stdout
    data = _strict_json(out)
    check_result(data, list(bench.SPECS), [100, 1000], 10)
    numpy_rows = [r for r in data["results"] if r["impl"] == "numpy"]
    assert len(numpy_rows) == sum(1 for r in data["results"] if r["impl"] == "optim")


def test_bench_in_process_missing_peer(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    out = tmp_path / "bench.json"
    status = bench.main([*QUICK, "--optimizer", "adam,adam-thinc", "--layout", "one",
                         "--no-overhead", "--compare", "torch,numpy,thinc",
                         "--json", str(out)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "Skipped:" in printed and "torch" in printed and "not installed" in printed
    data = _strict_json(out)
    skipped = {s["impl"]: s["reason"] for s in data["skipped"]}
    assert "not installed" in skipped["torch"]
    impls = {r["impl"] for r in data["results"]}
    assert "torch" not in impls
    assert {"optim", "numpy"} <= impls
    # Every requested peer either ran or is named as skipped.
    for peer in ("torch", "numpy", "thinc"):
        assert peer in impls or peer in skipped
    assert all(r["section"] == "main" and r["layout"] == "one" for r in data["results"])
    for r in data["results"]:
        for key in POSITIVE:
            assert _positive(r[key]), (key, r)


def test_threaded_run_times_one_thread_beside(tmp_path, capsys):
    """--threads 2 runs optim and the roofline on 2 threads (wall clock), and both on
    one thread in the same run, on sizes large enough to split."""
    import optim

    before = optim.get_num_threads()
    n = 4 * optim._kernels.THREAD_PIECE_MIN
    out = tmp_path / "bench.json"
    status = bench.main(["--quick", "--no-progress", "--threads", "2", "--optimizer",
                         "adam-thinc", "--sizes", str(n), "--tensor-size", str(n // 40),
                         "--json", str(out)])
    assert status == 0
    assert optim.get_num_threads() == before  # the bench sets it back
    printed = capsys.readouterr().out
    assert "optim CPU kernels: SIMD " in printed and "threads 2" in printed
    assert "roof 1t" in printed and "ratio 1t" in printed and "optim-1t" in printed
    data = _strict_json(out)
    assert data["config"]["threads"] == 2 and data["config"]["clock"] == "wall"
    assert data["machine"]["optim_cpu"]["threads"] == 2
    check_result(data, ["adam-thinc"], [n], n // 40)
    one_thread = [r for r in data["results"] if r["impl"] == "optim-1t"]
    assert len(one_thread) == len([r for r in data["results"] if r["impl"] == "optim"])
    assert all(r["clock"] == "wall" for r in data["results"])


@pytest.mark.parametrize("clock", ["auto", "wall", "cpu"])
def test_run_returns_dict_without_json(clock):
    cfg = bench.Config(optimizers=["sgd"], sizes=[64], layouts=["one"], repeats=2,
                       quick=True, progress=False, overhead=False, min_block_s=1e-5,
                       clock=clock)
    data = bench.run(cfg)
    assert data["config"]["clock"] == ("cpu" if clock == "auto" else clock)
    if clock == "wall":
        assert data["results"][0]["clock"] == "wall"
    assert [r["impl"] for r in data["results"]] == ["optim"]
    assert data["results"][0]["bytes_per_param"] == 16
    json.dumps(data, allow_nan=False)  # serialisable as strict JSON
    text = bench.format_report(data)
    assert "SGD" in text and "roofline" in text


@pytest.mark.parametrize("argv,fragment", [
    (["--optimizer", "adamw"], "unknown optimizer 'adamw'"),
    (["--sizes", "abc"], "bad size 'abc'"),
    (["--sizes", "0"], "positive whole numbers"),
    (["--sizes", "1.5e3x"], "bad size"),
    (["--dtype", "float16"], "unknown dtype 'float16'"),
    (["--layout", "flat"], "unknown layout 'flat'"),
    (["--compare", "jax"], "unknown peer 'jax'"),
    (["--repeats", "0"], "positive integer"),
    (["--threads", "two"], "positive integer"),
    (["--device", "tpu"], "invalid choice"),
    (["--clock", "sundial"], "invalid choice"),
    (["--json", "/nonexistent-folder-for-optim/x.json"], "does not exist"),
    (["--frobnicate"], "unrecognized arguments"),
])
def test_bad_options_are_clear_errors(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and fragment in err and "usage:" in err


def test_gpu_without_cupy_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "gpu", "--quick", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--device gpu needs CuPy" in err


def test_module_without_command_prints_help():
    proc = subprocess.run([sys.executable, "-m", "optim"], cwd=HERE, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    assert "bench" in proc.stdout and "plot" in proc.stdout and "usage:" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "optim", "nope"], cwd=HERE,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


def test_bytes_model():
    f32 = {name: spec.bytes_per_param(4) for name, spec in bench.SPECS.items()}
    assert f32 == {"sgd": 16, "adam": 32, "radam": 32, "adam-thinc": 44}
    assert bench.SPECS["adam-thinc"].bytes_per_param(8) == 88


# --------------------------------------------------------------------------- roofline


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_roofline_rotates_and_preserves_values(dtype, k):
    arrays = [numpy.arange(37, dtype=dtype) + 100 * j for j in range(k)]
    before = [a.copy() for a in arrays]
    plan = Plan([arrays], read_index=0 if k > 1 else None)
    assert plan.n_params == 37
    itemsize = numpy.dtype(dtype).itemsize
    assert plan.bytes_per_pass == 37 * itemsize * (2 * k + (1 if k > 1 else 0))
    plan.run(1)
    if k == 1:
        numpy.testing.assert_array_equal(arrays[0], -before[0])
    else:
        for j in range(k):
            numpy.testing.assert_array_equal(arrays[j], before[(j + 1) % k])
    plan.run(2 * k - 1)  # 2k passes in all: back where we started
    for a, b in zip(arrays, before):
        numpy.testing.assert_array_equal(a, b)


def test_roofline_many_tensors():
    tensors = [[numpy.full(n, 1.0, "float32"), numpy.full(n, 2.0, "float32")]
               for n in (1, 7, 1000)]
    plan = Plan(tensors, read_index=1)
    assert plan.n_params == 1008
    plan.run(3)
    for w, g in tensors:
        assert (w == 2).all() and (g == 1).all()


@pytest.mark.parametrize("tensors,kwargs,error", [
    ([], {}, ValueError),
    ([[numpy.zeros(3, "float32")] * 7], {}, ValueError),
    ([[numpy.zeros(3, "int32")]], {}, TypeError),
    ([[numpy.zeros(3, "float32"), numpy.zeros(3, "float64")]], {}, TypeError),
    ([[numpy.zeros(3, "float32"), numpy.zeros(4, "float32")]], {}, ValueError),
    ([[numpy.zeros((3, 4), "float32").T]], {}, ValueError),
    ([[numpy.zeros(3, "float32")]], {"read_index": 1}, ValueError),
])
def test_roofline_rejects_bad_arrays(tensors, kwargs, error):
    with pytest.raises(error):
        Plan(tensors, **kwargs)


# --------------------------------------------------------------------------- plot command


def test_plot_command(tmp_path):
    """python -m optim plot (optim/bench/plot.py, in the wheel) and bin/plot_bench.py."""
    cfg = bench.Config(optimizers=["adam"], sizes=[100, 1000], layouts=["one"], repeats=2,
                       compare=["numpy"], quick=True, progress=False, overhead=True,
                       min_block_s=1e-5)
    data = bench.run(cfg)
    path = tmp_path / "bench.json"
    bench.write_json(data, str(path))
    groups = plot_bench.panels(plot_bench.load(str(path)))
    assert list(groups) == [("Adam", "float32", "one")]
    panel = groups[("Adam", "float32", "one")]
    assert sorted(panel["impls"]) == ["numpy", "optim"]
    assert sorted(panel["roofline"]) == [100, 1000]  # overhead rows are not plotted
    have_matplotlib = importlib.util.find_spec("matplotlib") is not None
    for command in ([sys.executable, "-m", "optim", "plot"],
                    [sys.executable, str(ROOT / "bin" / "plot_bench.py")]):
        png = tmp_path / f"bench{len(command)}.png"
        proc = subprocess.run(command + [str(path), "-o", str(png)], cwd=HERE,
                              capture_output=True, text=True, timeout=120)
        if have_matplotlib:
            assert proc.returncode == 0, proc.stderr
            assert png.stat().st_size > 0
        else:
            assert proc.returncode != 0 and "needs matplotlib" in proc.stderr
            assert "thinc-optim[plot]" in proc.stderr


def test_plot_command_rejects_other_files(tmp_path):
    path = tmp_path / "other.json"
    path.write_text('{"not": "a bench run"}')
    with pytest.raises(ValueError, match="is not a `python -m optim bench --json` file"):
        plot_bench.load(str(path))
    proc = subprocess.run([sys.executable, "-m", "optim", "plot", str(path)], cwd=HERE,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not a `python -m optim bench --json` file" in proc.stderr


# ---------------------------------------------------------------- --device gpu, without a GPU


def _fake_gpu(monkeypatch):
    """--device gpu on the CPU harness: optim's real GPU backend on an emulated device."""
    fc = pytest.importorskip("fake_cupy")
    if not __import__("shutil").which("g++"):
        pytest.skip("g++ is not on PATH: cannot run the CUDA kernels on the host")
    from optim import backends
    from optim.bench import devices, runner

    backend = fc.HarnessBackend(block=32)
    previous = backends.set_gpu_backend(backend)
    dev = devices.CupyDevice(backend.cupy)
    monkeypatch.setattr(runner, "get_device", lambda name: dev)
    return backend, previous


def test_gpu_path_on_the_harness(monkeypatch):
    """The GPU rows (one tensor and many; lean and Thinc defaults) run optim's device
    path, each timed call one step_many launch (+1 clip norm), against a roofline that is
    ONE launch moving the same bytes."""
    from optim import backends

    backend, previous = _fake_gpu(monkeypatch)
    try:
        cfg = bench.Config(optimizers=["adam", "adam-thinc"], sizes=[640], tensor_size=64,
                           repeats=2, quick=True, progress=False, overhead=False,
                           min_block_s=1e-5, device="gpu")
        data = bench.run(cfg)
    finally:
        backends.set_gpu_backend(previous)
    rows = data["results"]
    assert data["machine"]["device"] == "gpu"
    assert data["machine"]["processor"] == "fake device (CPU harness)"
    assert {(r["optimizer"], r["layout"], r["n_tensors"]) for r in rows} == {
        ("adam", "one", 1), ("adam", "many", 10), ("adam-thinc", "one", 1),
        ("adam-thinc", "many", 10)}
    for r in rows:
        assert r["clock"] == "wall" and r["impl"] == "optim"
        assert r["roofline_s"] > 0 and r["time_s"] > 0
    launched = backend.launches
    roofline = launched.count("optim_roofline")
    assert roofline >= 4 * 2  # every configuration, every sample: one launch
    optim_launches = [n for n in launched if n != "optim_roofline"]
    # lean: one launch per update; Thinc defaults: the clip norm before each update
    assert optim_launches.count("optim_clip_norm_many") == optim_launches.count(
        "optim_adam_avg_many")
    assert optim_launches.count("optim_clip_norm") == optim_launches.count("optim_adam_avg")
    assert "optim_adam_many" in optim_launches and "optim_adam" in optim_launches
    assert backend.moved_to_host == 0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("k, extra", [(1, False), (2, True), (5, True), (6, False)])
def test_gpu_roofline_moves_the_bytes_once(monkeypatch, dtype, k, extra):
    """One launch per timed call over every parameter of every tensor: each array's
    values rotate one place, the extra array is only read."""
    from optim import backends
    from optim.bench import devices

    backend, previous = _fake_gpu(monkeypatch)
    backends.set_gpu_backend(previous)
    dev = devices.CupyDevice(backend.cupy)
    tensors = [[dev.filled(s, dtype, 0.0) for _ in range(k)] for s in (5, 70, 33)]
    run = dev.roofline(tensors, read_index=1 if extra else None)
    run(1)
    assert backend.launches == ["optim_roofline"]
    arrays, n = run.args[:k], run.args[-1]
    assert n == 108 and all(a.size == n and a.dtype == dtype for a in arrays)
    for j, a in enumerate(arrays):
        want = -0.5 if k == 1 else 0.5 + (j + 1) % k
        assert (a == want).all(), (j, a)
    if extra:
        assert (run.args[k] == 0.25).all() and run.args[k + 1][0] == 0
    run(1)
    assert backend.launches == ["optim_roofline"] * 2


@pytest.mark.skipif(not __import__("shutil").which("nvcc"), reason="nvcc is not on PATH")
def test_gpu_roofline_compiles(tmp_path):
    import cuda_harness as ch
    from optim.bench import devices

    parts = []
    for i, (dtype, k, extra) in enumerate([("float32", 1, False), ("float32", 5, True),
                                           ("float64", 6, True), ("float64", 2, False)]):
        source = devices.roofline_source(dtype, k, extra)  # extern "C": one name each
        parts.append(f"namespace r{i} {{\n{source.replace('optim_roofline', f'r{i}')}}}\n")
    cu = tmp_path / "roofline.cu"
    cu.write_text("\n".join(parts))
    res = subprocess.run(ch.nvcc_command(cu, tmp_path / "roofline.o", [90]),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_groups_and_nonfinite_rows_beside_optim(capsys):
    """--groups N and --nonfinite skip time optim with groups bound and in skip mode,
    beside plain optim, in the same run (the cost targets of issues 21 and 22)."""
    cfg = bench.Config(optimizers=["adam-thinc"], sizes=[20000], layouts=["one", "many"],
                       repeats=2, quick=True, progress=False, overhead=True,
                       min_block_s=1e-5, groups=3, nonfinite="skip")
    data = bench.run(cfg)
    impls = [r["impl"] for r in data["results"]]
    assert impls.count("optim+groups") == impls.count("optim+skip") == impls.count("optim")
    assert impls.count("optim") == 3  # overhead, one, many
    assert all(r["time_s"] > 0 for r in data["results"])
