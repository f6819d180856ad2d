"""Packaging: the installed metadata pins the torch the library was built with and carries the
licence; a library that cannot be loaded, a copy without one and a checkout without a build each
give an ImportError that says what is wrong and how to fix it. (The wheel, build isolation and the
JIT build of a clean checkout are exercised end to end by scripts/package_check.sh in CI.)"""

import importlib.machinery
import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest
import torch

import dmi_ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_metadata_pins_the_build_torch_and_names_the_licence():
    requires = importlib.metadata.requires("dmi_ext")
    assert f"torch=={torch.__version__.split('+')[0]}" in requires
    meta = importlib.metadata.metadata("dmi_ext")
    assert "BSD-3-Clause" in (meta.get("License-Expression") or meta.get("License") or "")


def test_build_info_matches_the_running_torch():
    from dmi_ext import _build_info

    assert _build_info.TORCH_VERSION == torch.__version__
    assert _build_info.WITH_CUDA == dmi_ext.WITH_CUDA


def test_licence_and_citation_are_in_the_repository():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        assert "BSD 3-Clause" in f.read()
    with open(os.path.join(ROOT, "CITATION.cff")) as f:
        citation = f.read()
    assert "cff-version: 1.2.0" in citation and "1909.03388" in citation


def copy_package(tmp_path, with_sources=False):
    """The Python files of dmi_ext (no compiled library) in tmp_path/dmi_ext, optionally with
    csrc/ beside it (a checkout)."""
    shutil.copytree(os.path.join(ROOT, "dmi_ext"), tmp_path / "dmi_ext",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__", "_build_info.py"))
    if with_sources:
        shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    return tmp_path


# The test environment's editable install of this checkout puts a finder on sys.meta_path that
# would resolve dmi_ext._C from the checkout; a copy elsewhere must not see it.
IMPORT_WITHOUT_EDITABLE_FINDER = (
    "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'Editable' not in "
    "getattr(f, '__name__', type(f).__name__)]; import dmi_ext")


def import_in(path, **env):
    environment = dict(os.environ, PYTHONPATH=str(path), **env)
    return subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_EDITABLE_FINDER], cwd=path,
                          env=environment, capture_output=True, text=True, timeout=120)


def test_unloadable_library_names_both_torches_and_the_rebuild_command(tmp_path):
    root = copy_package(tmp_path)
    suffix = next(s for s in importlib.machinery.EXTENSION_SUFFIXES if s.endswith(".so"))
    (root / "dmi_ext" / f"_C{suffix}").write_bytes(b"not a shared library")
    (root / "dmi_ext" / "_build_info.py").write_text(
        "TORCH_VERSION = '2.12.0+cpu'\nTORCH_CUDA = None\nWITH_CUDA = False\n")
    done = import_in(root)
    assert done.returncode != 0
    assert "ImportError" in done.stderr
    assert "built against torch 2.12.0+cpu" in done.stderr
    assert f"this environment has torch {torch.__version__}" in done.stderr
    assert "pip install torch==2.12.0" in done.stderr
    assert "pip install --no-build-isolation --no-deps --force-reinstall ." in done.stderr


def test_installed_copy_without_library_says_it_is_incomplete(tmp_path):
    done = import_in(copy_package(tmp_path))
    assert done.returncode != 0
    assert "the compiled library dmi_ext._C is missing" in done.stderr
    assert "partially initialized" not in done.stderr


def test_checkout_without_build_and_no_jit_says_how_to_build(tmp_path):
    done = import_in(copy_package(tmp_path, with_sources=True), DMI_EXT_JIT="0")
    assert done.returncode != 0
    assert "has no compiled library" in done.stderr
    assert "pip install --no-build-isolation --no-deps -e ." in done.stderr
    assert "partially initialized" not in done.stderr


def test_no_compiler_is_a_clear_error(monkeypatch):
    from dmi_ext import _build_config

    monkeypatch.setenv("CXX", "no-such-compiler-dmi")
    with pytest.raises(_build_config.CompilerError, match="no C.. compiler found.*no-such-compiler-dmi.*install g\\+\\+"):
        _build_config.find_compiler()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="g++ with OpenMP is the Linux case")
def test_openmp_probe_answers_for_this_compiler():
    from dmi_ext import _build_config

    # g++ on this project's machines has OpenMP; the probe must say so (a broken probe would
    # silently build a one-thread library).
    compiler = _build_config.find_compiler()
    assert _build_config.openmp_supported(compiler) is True
    assert _build_config.openmp_supported("/bin/false") is False
