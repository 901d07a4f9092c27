"""bin/check_bits.py, the cross-machine bit check: its hashes see every part of the state,
agree across thread counts, and a saved and resumed run hashes as the straight one."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy

SCRIPT = Path(__file__).resolve().parents[2] / "bin" / "check_bits.py"
_spec = importlib.util.spec_from_file_location("check_bits", SCRIPT)
check_bits = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_bits)


def cli(*args: str) -> dict:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_one_and_two_threads_agree_and_the_split_tensor_is_there():
    assert max(check_bits.SIZES) >= 2 * 32768  # large enough for optim to split it
    out, default = {}, check_bits.optim.get_num_threads()
    try:
        for threads in (1, 2):
            check_bits.optim.set_num_threads(threads)
            out[threads] = {case: check_bits.state_hash(*check_bits.run(case, 6, seed=3))
                            for case in check_bits.case_names()}
    finally:
        check_bits.optim.set_num_threads(default)
    assert out[1] == out[2]
    assert len(set(out[1].values())) == len(out[1]) // 2  # per call == step_many, else distinct
    for case, digest in out[1].items():
        assert digest == out[1][case.replace(".call", ".many")]


def test_save_then_resume_equals_the_straight_run(tmp_path):
    straight = cli("--steps", "9", "--threads", "1")
    saved = cli("--steps", "5", "--threads", "2", "--save-state", str(tmp_path))
    resumed = cli("--steps", "4", "--threads", "1,2", "--resume", str(tmp_path))
    assert resumed == straight
    assert all(saved[case] != straight[case] for case in check_bits.case_names())
    assert json.loads((tmp_path / "meta.json").read_text())["steps"] == 5


def test_the_hash_sees_weights_moments_averages_counts_and_the_step():
    opt, weights = check_bits.run("adam.f32.call", 3, seed=0)
    before = check_bits.state_hash(opt, weights)
    key = check_bits.KEYS[2]
    for array in (weights[2], opt.mom1[key], opt.mom2[key], opt.averages[key]):
        kept = array[5]
        array[5] = numpy.nextafter(kept, numpy.float32(numpy.inf))
        assert check_bits.state_hash(opt, weights) != before
        array[5] = kept
    opt.nr_update[key] += 1
    assert check_bits.state_hash(opt, weights) != before
    opt.nr_update[key] -= 1
    assert check_bits.state_hash(opt, weights) == before
    opt.step_schedules()
    assert check_bits.state_hash(opt, weights) != before


def test_thread_counts_that_disagree_fail(monkeypatch, capsys):
    monkeypatch.setattr(check_bits, "hashes", lambda args, threads: {"a": str(threads)})
    assert check_bits.main(["--threads", "1,2"]) == 1
    assert "MISMATCH between thread counts: a: 1: 1, 2: 2" in capsys.readouterr().err
    monkeypatch.setattr(check_bits, "hashes", lambda args, threads: {"a": "same"})
    assert check_bits.main(["--threads", "1,2"]) == 0
