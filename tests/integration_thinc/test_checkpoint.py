"""optim.checkpoint: atomic checkpoint directories, stable parameter names, random
generators, and the Thinc API `save_checkpoint` / `load_checkpoint` (issue 15).

The Thinc contract: a loop saved at step N and resumed in a fresh process (where the
model's ids differ) ends bitwise equal to the loop that never stopped, dropout included.
"""
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

import optim
from optim import checkpoint
from optim.checkpoint import CheckpointError, Checkpoints

OPTIM_PATH = os.path.dirname(os.path.dirname(os.path.abspath(optim.__file__)))


# ------------------------------------------------------------------ checkpoint files

def test_a_bundle_reads_back_and_each_kind_of_damage_is_named(tmp_path):
    files = {"a.bin": os.urandom(1000), "b.json": b"{}"}
    checkpoint.write_bundle(tmp_path / "ck", files)
    assert checkpoint.read_bundle(tmp_path / "ck") == files
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary left
    data = (tmp_path / "ck").read_bytes()
    position = data.index(files["a.bin"][:50])
    damaged = {
        "truncated": (data[: len(data) // 2], "truncated \\(627 bytes of 1255\\)"),
        "cut in the header": (data[:40], "truncated \\(40 bytes\\)"),
        "flipped": (data[:position] + bytes([data[position] ^ 1]) + data[position + 1:],
                    "a.bin is corrupt \\(checksum mismatch\\)"),
        "empty": (b"", "truncated \\(0 bytes\\)"),
        "longer": (data + b"x", "1 bytes too many"),
        "foreign": (b"\x80", "not an optim checkpoint file"),
    }
    for name, (content, message) in damaged.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=message):
            checkpoint.read_bundle(tmp_path / name)
    with pytest.raises(CheckpointError, match="no such file"):
        checkpoint.read_bundle(tmp_path / "missing")


def test_a_write_that_fails_midway_leaves_the_old_file_intact(tmp_path):
    checkpoint.write_bundle(tmp_path / "ck", {"a": b"old"})

    class Unwritable:
        pass

    with pytest.raises(TypeError):
        checkpoint.write_bundle(tmp_path / "ck", {"a": Unwritable()})
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]
    assert checkpoint.read_bundle(tmp_path / "ck") == {"a": b"old"}


def test_checkpoints_keeps_the_last_two_and_falls_back_past_damage(tmp_path):
    store = Checkpoints(tmp_path / "cks")
    assert store.newest() is None
    for step in (5, 10, 15):
        store.write(step, {"step": str(step).encode() * 50})
    assert [s for s, _ in store.steps()] == [15, 10]
    newest = tmp_path / "cks" / "step-00000015.ckpt"
    newest.write_bytes(newest.read_bytes()[:-3])
    warnings = []
    path, files = store.newest(warn=warnings.append)
    assert path.name == "step-00000010.ckpt" and files == {"step": b"10" * 50}
    assert warnings == [f"skipping a damaged checkpoint: {newest}: truncated "
                        f"({newest.stat().st_size} bytes of {newest.stat().st_size + 3}); "
                        "using step-00000010.ckpt"]
    (tmp_path / "cks" / "step-00000010.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no intact checkpoint in .*step-00000015.*"
                                              "step-00000010.ckpt: truncated"):
        store.newest()
    assert len(store.steps()) == 2  # nothing deleted
    assert Checkpoints(tmp_path / "x", writer=False).write(1, {"a": b""}) is None
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="keep"):
        Checkpoints(tmp_path, keep=0)
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="cannot write checkpoints to"):
        Checkpoints(tmp_path / "file" / "cks").check_writable()


# ------------------------------------------------------------------ random generators

def test_rng_state_restores_python_numpy_and_torch_draws():
    """torch's generator is saved when torch is imported (the test extra installs it)."""
    import srsly

    torch = sys.modules.get("torch")

    def draws():
        return (random.random(), numpy.random.normal(size=3).tolist(),
                torch.rand(3).tolist() if torch is not None else None)

    random.seed(3)
    numpy.random.seed(4)
    numpy.random.normal()  # leaves a cached gaussian in NumPy's state
    if torch is not None:
        torch.manual_seed(5)
    state = srsly.msgpack_loads(srsly.msgpack_dumps(checkpoint.rng_state()))  # as on disk
    assert ("torch" in state) == (torch is not None)
    first = draws()
    random.seed(0)
    numpy.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)
    assert draws() != first
    checkpoint.set_rng_state(state)
    assert draws() == first


# ------------------------------------------------------------------ Thinc

THINC_LOOP = textwrap.dedent("""
    import sys
    import numpy
    import optim
    from optim.thinc import save_checkpoint, load_checkpoint
    from thinc.api import Dropout, Relu, Softmax, chain, fix_random_seed

    def build():
        return chain(Relu(16), Dropout(0.2), Relu(16), Softmax())

    fix_random_seed(0)
    data = numpy.random.RandomState(1)
    X = data.uniform(-1, 1, (400, 8)).astype("float32")
    Y = numpy.eye(3, dtype="float32")[data.randint(0, 3, 400)]
    mode, path, total, save_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    if mode != "straight":
        [build() for _ in range(3)]  # other ids than in the first process
    model = build()
    model.initialize(X=X[:5], Y=Y[:5])
    opt = optim.Adam(0.01, grad_clip=1.0, use_averages=True)
    start = 0
    if mode != "straight":
        opt, extra = load_checkpoint(path, model, restore_rng=mode == "resume")
        start = extra["step"]
    for step in range(start, total):
        idx = numpy.random.permutation(len(X))[:32]       # the data order: NumPy's RNG
        Yh, backprop = model.begin_update(X[idx])
        backprop((Yh - Y[idx]) / len(idx))
        model.finish_update(opt)
        opt.step_schedules()
        if step + 1 == save_at:
            save_checkpoint(path, model, opt, step=step + 1)
    weights = {f"{i}/{n}": node.get_param(n) for i, node in enumerate(model.walk())
               for n in node.param_names if node.has_param(n)}
    averages = {f"{i}/{n}": opt.averages[(node.id, n)] for i, node in enumerate(model.walk())
                for n in node.param_names if node.has_param(n)}
    numpy.savez(path + f".{mode}.npz", **weights, **{"avg:" + k: v for k, v in averages.items()})
""")


def _thinc_loop(tmp_path, mode, path, total, save_at):
    script = tmp_path / "loop.py"
    script.write_text(THINC_LOOP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([OPTIM_PATH, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script), mode, str(path), str(total), str(save_at)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(numpy.load(str(path) + f".{mode}.npz"))


def test_thinc_loop_resumed_in_a_fresh_process_is_bitwise_the_uninterrupted_loop(tmp_path):
    pytest.importorskip("thinc")
    path = tmp_path / "ckpt.bin"
    straight = _thinc_loop(tmp_path, "straight", path, total=40, save_at=17)
    resumed = _thinc_loop(tmp_path, "resume", path, total=40, save_at=0)
    assert straight.keys() == resumed.keys() and len(straight) == 12
    for name in straight:
        assert straight[name].tobytes() == resumed[name].tobytes(), name
    # the random generators matter: without them the dropout masks and batches differ
    unseeded = _thinc_loop(tmp_path, "resume_without_rng", path, total=40, save_at=0)
    assert any(straight[n].tobytes() != unseeded[n].tobytes() for n in straight)


def test_load_checkpoint_names_another_model_a_newer_format_and_a_damaged_file(tmp_path):
    thinc_api = pytest.importorskip("thinc.api")
    from optim.thinc import load_checkpoint, save_checkpoint

    def build(width):
        model = thinc_api.chain(thinc_api.Relu(width), thinc_api.Softmax())
        model.initialize(X=numpy.zeros((2, 4), "f"), Y=numpy.zeros((2, 3), "f"))
        return model

    model, opt = build(8), optim.Adam(0.01)
    for node in model.walk():
        for name in node.param_names:
            if node.has_param(name):
                opt((node.id, name), node.get_param(name), numpy.ones_like(node.get_param(name)))
    save_checkpoint(tmp_path / "a", model, opt, step=1, note="x")
    assert sorted(checkpoint.param_names(model).values()) == ["1/W", "1/b", "2/W", "2/b"]
    with pytest.raises(CheckpointError, match=r"not a checkpoint of this model: 1/W: shape "
                                              r"\(6, 4\) here, \(8, 4\) in the checkpoint"):
        load_checkpoint(tmp_path / "a", build(6))
    loaded, extra = load_checkpoint(tmp_path / "a", build(8), optim.Adam(0.01))
    assert extra == {"step": 1, "note": "x"} and loaded.nr_update and len(loaded.mom1) == 4
    data = (tmp_path / "a").read_bytes()
    (tmp_path / "b").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated \(\d+ bytes of \d+\)"):
        load_checkpoint(tmp_path / "b", build(8))
    import srsly

    files = checkpoint.read_bundle(tmp_path / "a")
    msg = srsly.msgpack_loads(files["state.msgpack"])
    msg["version"] = checkpoint.FORMAT_VERSION + 1
    checkpoint.write_bundle(tmp_path / "c", {**files, "state.msgpack": srsly.msgpack_dumps(msg)})
    with pytest.raises(CheckpointError, match="written by a newer optim"):
        load_checkpoint(tmp_path / "c", build(8))
    with pytest.raises(TypeError, match="msgpack-able"):
        save_checkpoint(tmp_path / "d", model, opt, bad=object())
    assert not (tmp_path / "d").exists()
    with pytest.raises(TypeError, match="Thinc Model or a spaCy Language"):
        checkpoint.param_names(object())


def test_files_written_atomically_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: what open() gives (0666 less the umask), so a checkpoint or a
    state file can be read by whoever could read any other file of the run."""
    old = os.umask(0o027)
    try:
        checkpoint.write_bundle(tmp_path / "a", {"x": b"1"})
        optim.Adam(0.1).to_disk(tmp_path / "b")
    finally:
        os.umask(old)
    for name in ("a", "b"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640
