"""Drift alarm for optim/training/loop.py, the mirror of spaCy's training loop (issue 28).

`optim.training.loop` copies spaCy 3.8's `train`, `train_while_improving` and
`create_train_batches` line for line, with optim's steps marked `# optim:`. A copy does not
follow spaCy by itself: these tests pin the SHA-256 of the installed spaCy's source of
each function copied and fail, naming the function and saying what to re-check, when
spaCy changes one. They also check that the mirror still reads against spaCy function by
function: the same names in the same order, spaCy's parameters, and every difference
marked as optim's. (The numbers are compared with `python -m spacy train` in
tests/integration_spacy/test_spacy_resume.py.)
"""
import hashlib
import inspect
import re
import subprocess
import sys

import pytest

pytest.importorskip("spacy")  # the only reason to skip

from spacy.training import loop as spacy_loop  # noqa: E402

from optim.training import loop as mirror  # noqa: E402

CHECKED_VERSION = "3.8.18"  # the spaCy whose functions optim/training/loop.py copies
PINNED = {  # sha256 of inspect.getsource(spacy.training.loop.<name>) in CHECKED_VERSION
    "train": "b45deacc105a4868ce20df934c60b91503af20dfebd5f2cb5a148049209de367",
    "train_while_improving":
        "01f78c08929ca8e72a8b321e57ec71b4abbdb684945ce19afe922354a7493822",
    "create_train_batches":
        "cb557108db4b075e0b7f089c245d9103ff7bf39bfa68fae22caadf2b3cfd7a1b",
}


def _digest(function):
    return hashlib.sha256(inspect.getsource(function).encode("utf8")).hexdigest()


@pytest.mark.parametrize("name", list(PINNED))
def test_the_spacy_function_mirrored_is_the_one_checked(name):
    import spacy

    now = _digest(getattr(spacy_loop, name))
    assert now == PINNED[name], (
        f"spaCy {spacy.__version__} changed spacy.training.loop.{name} (sha256 {now}; "
        f"optim/training/loop.py's {name} was checked against spaCy {CHECKED_VERSION}'s, "
        f"sha256 {PINNED[name]}). optim.training.loop.{name} is a line-for-line copy of it "
        "with optim's steps marked '# optim:': re-check it against the new one. "
        "`python -m optim.training.loop` prints a unified diff of each mirrored function "
        "against the installed spaCy's: each difference not marked as optim's is a change "
        f"of spaCy's since {CHECKED_VERSION} to bring over (or to judge harmless). Then run "
        "tests/integration_spacy/test_spacy_resume.py (its byte-for-byte comparisons with `python -m spacy "
        "train`) and record the new hash and version in tests/integration_spacy/test_spacy_loop_mirror.py.")


def test_the_mirror_copies_the_pinned_functions_in_spacys_order():
    assert mirror.MIRRORED == tuple(PINNED)

    def order(module):
        return sorted(mirror.MIRRORED,
                      key=lambda n: inspect.getsourcelines(getattr(module, n))[1])

    assert order(spacy_loop) == list(mirror.MIRRORED)
    assert order(mirror) == list(mirror.MIRRORED)
    for name in mirror.MIRRORED:  # defined here, not imported from spaCy
        assert getattr(mirror, name).__module__ == "optim.training.loop", name


@pytest.mark.parametrize("name", list(PINNED))
def test_the_mirror_takes_every_argument_spacys_function_takes(name):
    ours = inspect.signature(getattr(mirror, name)).parameters
    theirs = inspect.signature(getattr(spacy_loop, name)).parameters
    for arg, param in theirs.items():
        assert arg in ours, f"{name}: spaCy's argument {arg!r} is missing"
        assert ours[arg].kind == param.kind, (name, arg)
        assert ours[arg].default == param.default, (name, arg)
    # spaCy's positional arguments, in spaCy's order
    positional = [a for a, p in theirs.items() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert list(ours)[:len(positional)] == positional, name


def test_every_difference_from_spacy_is_marked_as_optims():
    diff = mirror.diff_against_spacy()
    files = re.findall(r"^\+\+\+ (\S+)$", diff, flags=re.M)
    assert files == [f"optim.training.loop.{name}" for name in mirror.MIRRORED]
    hunks = re.split(r"^@@ .*@@$", diff, flags=re.M)[1:]
    assert hunks
    for hunk in hunks:
        added = [line for line in hunk.splitlines() if line.startswith("+")
                 and not line.startswith("+++")]
        assert any("optim" in line for line in added), \
            f"a difference from spaCy not marked as optim's:\n{hunk}"
    # spaCy's lines outnumber optim's changes: the copy is the text, not a rewrite
    for name in mirror.MIRRORED:
        theirs = inspect.getsource(getattr(spacy_loop, name)).splitlines()
        ours = set(inspect.getsource(getattr(mirror, name)).splitlines())
        kept = sum(line in ours for line in theirs)
        assert kept >= 0.8 * len(theirs), (name, kept, len(theirs))


def test_python_m_optim_spacy_loop_prints_the_diff():
    proc = subprocess.run([sys.executable, "-m", "optim.training.loop"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == mirror.diff_against_spacy()
    assert "--- spacy.training.loop.train_while_improving" in proc.stdout
