"""Finds the compiled op library, ``dmi_ext._C``, and says what to do when it cannot be used.

- Built (``pip install --no-build-isolation .`` or ``-e .``): it is imported.
- A source checkout without a build (the repository on ``sys.path``, e.g. ``python`` started in
  its root): the library is compiled now with ``torch.utils.cpp_extension.load``, under a name
  unique to the sources, flags and torch, cached in torch's extension folder
  (``TORCH_EXTENSIONS_DIR``), with a message while it compiles. ``DMI_EXT_JIT=0`` turns this off.
- Built but unloadable, nearly always because the installed torch is not the release it was
  built against (undefined C++ symbols): an ImportError naming both torches and the command
  that rebuilds it.
"""

import hashlib
import importlib
import os
import sys

from . import _build_config

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(PACKAGE_DIR)
REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall ."
REBUILD_EDITABLE = "pip install --no-build-isolation --no-deps -e ."


def load():
    """The extension module (``dmi_ext._C``, or its JIT-built twin)."""
    try:
        return importlib.import_module("dmi_ext._C")
    except ModuleNotFoundError as error:
        if error.name != "dmi_ext._C":
            raise
        missing = error
    except ImportError as error:
        raise ImportError(mismatch_message(error)) from error
    if not is_checkout():
        raise ImportError(
            f"dmi_ext: the compiled library dmi_ext._C is missing from {PACKAGE_DIR}: this "
            "installation is incomplete. Reinstall dmi_ext against your torch "
            f"(from a checkout: {REBUILD}).") from missing
    if os.environ.get("DMI_EXT_JIT", "1") == "0":
        raise ImportError(
            f"dmi_ext: the checkout {ROOT} has no compiled library (dmi_ext._C) and DMI_EXT_JIT=0 "
            f"forbids building one now. Build it with `{REBUILD_EDITABLE}` in {ROOT}, or unset "
            "DMI_EXT_JIT to compile it on import.") from missing
    module = jit_build()
    sys.modules["dmi_ext._C"] = module
    return module


def is_checkout() -> bool:
    """A source tree (csrc/ beside the package), as opposed to an installed copy."""
    return os.path.isfile(os.path.join(ROOT, "csrc", "ops.cpp"))


def built_against():
    """(torch version, CUDA version) the library was built with, or (None, None) if unknown."""
    try:
        from . import _build_info
    except ImportError:
        return None, None
    return _build_info.TORCH_VERSION, _build_info.TORCH_CUDA


def mismatch_message(error: BaseException) -> str:
    import torch

    built, built_cuda = built_against()
    installed = torch.__version__
    where = f"torch {built}" + (f" (CUDA {built_cuda})" if built_cuda else "") if built else \
        "an unknown torch (no dmi_ext/_build_info.py)"
    checkout = is_checkout()
    return (
        f"dmi_ext: its compiled library could not be loaded ({error}).\n"
        f"It was built against {where}; this environment has torch {installed}"
        + (f" (CUDA {torch.version.cuda})" if torch.version.cuda else "") + ".\n"
        "A compiled PyTorch extension only loads into the torch release it was built with. "
        + (f"Install that torch (pip install torch=={built.split('+')[0]}), or rebuild " if built
           else "Rebuild ")
        + "dmi_ext against the torch you have:\n    "
        + (f"cd {ROOT} && {REBUILD_EDITABLE}" if checkout else
           f"{REBUILD}    (in a dmi_ext checkout)"))


def _source_digest(files, flags, cuda: bool) -> str:
    """Names the JIT build: everything that changes the library (sources and headers, flags,
    torch), so a changed checkout or another torch never loads a stale cached build."""
    import torch

    digest = hashlib.sha1()
    digest.update(repr((torch.__version__, torch.version.cuda, flags, cuda)).encode())
    for path in files:
        digest.update(os.path.relpath(path, ROOT).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def _cached(name: str) -> bool:
    """Whether cpp_extension.load has this build in its cache already (then no message)."""
    from torch.utils import cpp_extension

    try:
        folder = cpp_extension._get_build_directory(name, verbose=False)
    except Exception:  # a private helper: if it moves, say "compiling" once too often
        return False
    return os.path.isfile(os.path.join(folder, name + ".so"))


def jit_build():
    """Compiles the op library from the checkout with torch.utils.cpp_extension.load."""
    import torch
    from torch.utils import cpp_extension

    try:
        compiler = _build_config.find_compiler()
    except _build_config.CompilerError as error:
        raise ImportError(str(error)) from None
    openmp = _build_config.openmp_supported(compiler)
    if not openmp:
        print(_build_config.NO_OPENMP_WARNING, file=sys.stderr)
    cuda = _build_config.want_cuda(torch.version.cuda, cpp_extension.CUDA_HOME)
    sources = [os.path.join(ROOT, s) for s in _build_config.sources(ROOT, cuda)]
    cflags = _build_config.cxx_flags(openmp)
    macro = [f"-D{_build_config.CUDA_MACRO}"] if cuda else []
    headers = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(ROOT, "csrc"))
               for f in sorted(files) if f.endswith((".h", ".cuh"))]
    name = "dmi_ext_C_" + _source_digest(sorted(sources + headers), cflags, cuda)
    if not _cached(name):
        print(f"dmi_ext: no compiled library in {PACKAGE_DIR}; compiling the "
              f"{'CPU + CUDA' if cuda else 'CPU'} op library now with torch.utils.cpp_extension.load "
              f"as {name} (a few minutes, once; then cached). To build it ahead instead: "
              f"{REBUILD_EDITABLE}", file=sys.stderr, flush=True)
    return cpp_extension.load(
        name=name, sources=sources, extra_cflags=cflags + macro,
        extra_ldflags=_build_config.link_flags(openmp),
        extra_cuda_cflags=_build_config.NVCC_FLAGS + macro,
        extra_include_paths=[os.path.join(ROOT, "csrc")], with_cuda=cuda, verbose=False)
