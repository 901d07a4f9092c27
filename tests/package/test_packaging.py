"""The distribution: its name and version, the install commands we print, and what happens
when the unrelated PyPI project ``optim`` shares the package folder (optim/about.py)."""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import optim
from optim import about

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(optim.__file__).resolve().parent  # the optim this process imported
# `pip install optim...` (any options, quoted or not) installs the unrelated project.
FOREIGN_INSTALL = re.compile(r"""pip3?\s+install\s+(?:-\S+\s+)*["']?optim(?![\w.-])""")
# What users read: the package (its error texts), and, in a checkout or sdist, the rest.
PRINTED = ["README.md", "CHANGELOG.md", "docs/*.md", "examples/*.py", "bin/*.py", ".ci/run",
           "pyproject.toml", "setup.cfg", ".github/workflows/*.yml"]
# The unrelated project's files, as its 0.1.0 sdist installs them.
FOREIGN_INIT = "__author__ = 'Todd Young'\n__email__ = 'youngmt1@ornl.gov'\n__version__ = '0.1.0'\n"


def test_version_is_the_distributions():
    assert optim.__version__ == about.__version__
    assert importlib.metadata.version(optim.__title__) == optim.__version__
    assert optim.__title__ == "thinc-optim"


def test_distribution_ships_its_license():
    dist = importlib.metadata.distribution(optim.__title__)
    assert dist.metadata["Name"] == "thinc-optim"
    assert "License :: OSI Approved :: MIT License" in dist.metadata.get_all("Classifier")
    licenses = [f for f in dist.files if f.name == "LICENSE"]
    assert licenses and "MIT License" in licenses[0].read_text()


@pytest.mark.parametrize("text", [
    "pip install optim", 'pip install "optim[cuda12x]"', "pip install 'optim[distributed]'",
    "pip install -U optim[plot]", "pip3 install --upgrade optim==0.2.0"])
def test_foreign_install_pattern_matches(text):
    assert FOREIGN_INSTALL.search(text)


@pytest.mark.parametrize("text", [
    "pip install thinc-optim", 'pip install "thinc-optim[cuda12x]"', "pip install -e .",
    'pip install -e ".[test]"', "pip install optimum", "pip uninstall -y optim thinc-optim",
    "pip install optim-extras"])
def test_foreign_install_pattern_passes(text):
    assert not FOREIGN_INSTALL.search(text)


def test_no_printed_install_command_names_the_unrelated_project():
    files = sorted(PACKAGE.rglob("*.py")) + [p for pattern in PRINTED for p in ROOT.glob(pattern)]
    assert len(files) > 20  # the package's modules at least
    bad = [f"{path}: {match.group(0)}" for path in files
           for match in FOREIGN_INSTALL.finditer(path.read_text(encoding="utf8"))]
    assert not bad


# ---------------------------------------------------------------- the unrelated 'optim'


def test_foreign_files_none_in_our_package():
    assert about.foreign_files(str(PACKAGE)) is None


def test_foreign_files_found(tmp_path):
    assert about.foreign_files(str(tmp_path)) is None
    (tmp_path / "optim.py").write_text("")
    message = about.foreign_files(str(tmp_path))
    assert message is not None and "Playground for optimizers" in message
    assert "pip uninstall -y optim thinc-optim && pip install thinc-optim" in message


def test_foreign_files_rejects_a_non_path():
    with pytest.raises(TypeError, match="package_dir must be a path"):
        about.foreign_files(3)


def _copy_package(tmp_path: Path) -> Path:
    """This optim (compiled modules included) in tmp_path/site/optim."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "optim",
                    ignore=shutil.ignore_patterns("*.c", "__pycache__", "*.pyx"))
    return site


def _run(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site), "OPTIM_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=site, env=env, capture_output=True,
                          text=True, timeout=120)


def test_foreign_package_installed_before_ours_warns(tmp_path):
    """Ours last: our __init__.py, their optim.py beside it. optim works, with a warning."""
    site = _copy_package(tmp_path)
    (site / "optim" / "optim.py").write_text("# the unrelated project's module\n")
    done = _run(site, "-c", "import optim; print(optim.__file__, optim.Adam.__name__)")
    assert done.returncode == 0, done.stderr
    assert str(site) in done.stdout and "Adam" in done.stdout
    assert "RuntimeWarning" in done.stderr and about.FIX in done.stderr


def test_foreign_package_installed_after_ours_is_named(tmp_path):
    """Theirs last: their __init__.py. Our entry points fail with the fix, not an
    AttributeError."""
    site = _copy_package(tmp_path)
    (site / "optim" / "__init__.py").write_text(FOREIGN_INIT)
    (site / "optim" / "optim.py").write_text("")
    done = _run(site, "-m", "optim", "bench", "--quick")
    assert done.returncode == 1
    assert "another project's package (version 0.1.0" in done.stderr and about.FIX in done.stderr
    done = _run(site, "-c", "import optim.thinc")  # what Thinc's registry imports
    assert done.returncode == 1
    assert "ImportError" in done.stderr and "version 0.1.0" in done.stderr
    assert about.FIX in done.stderr


def test_an_unbuilt_source_tree_says_so_on_import(tmp_path):
    """optim's sources without their compiled modules (a fresh checkout or an unpacked
    sdist on the path): import says what to build, not "circular import"."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "optim",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__"))
    # (an editable install of this checkout would find the compiled modules by name)
    done = _run(site, "-c", "import sys; sys.meta_path[:] = [f for f in sys.meta_path if "
                "'__editable__' not in getattr(f, '__module__', '')]; import optim")
    assert done.returncode == 1
    assert "optim's compiled kernels are not built" in done.stderr, done.stderr
    assert "pip install -e ." in done.stderr and "circular import" not in done.stderr
