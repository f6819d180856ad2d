"""How the op library is compiled: the sources, flags and compiler checks shared by the two ways
to build it, ``setup.py`` (pip) and the just-in-time build of a source checkout through
``torch.utils.cpp_extension.load`` (``dmi_ext/_library.py``). One definition, so the two cannot
drift apart. Plain Python that imports nothing from dmi_ext or torch: ``setup.py`` loads it by
path, before the package (or even torch) is importable.
"""

import glob
import os
import shlex
import shutil
import subprocess
import tempfile

# -O3 and the vector extensions make the CPU kernels; -fno-math-errno lets the compiler inline
# sqrt/exp; -g0 last, because Python's own CFLAGS carry -g, which makes a 20+ MB .so
# (DMI_EXT_DEBUG=1 keeps the debug information).
_CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas",
              "-Wno-psabi"]
NVCC_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
CUDA_MACRO = "DMI_EXT_WITH_CUDA"


def sources(root: str, cuda: bool) -> list:
    """The files of the op library, relative to ``root`` (the checkout), in a fixed order."""
    patterns = ["csrc/*.cpp", "csrc/cpu/*.cpp"] + (["csrc/cuda/*.cu"] if cuda else [])
    return [os.path.relpath(p, root) for pattern in patterns
            for p in sorted(glob.glob(os.path.join(root, pattern)))]


def want_cuda(torch_cuda, cuda_home) -> bool:
    """Whether to compile csrc/cuda/ too: with a CUDA build of torch (``torch.version.cuda``) and
    a CUDA toolkit (``CUDA_HOME``). DMI_EXT_FORCE_CPU=1 forces a CPU build, DMI_EXT_FORCE_CUDA=1 a
    CUDA build (a compile check on a machine without a GPU)."""
    if os.environ.get("DMI_EXT_FORCE_CPU") == "1":
        return False
    if os.environ.get("DMI_EXT_FORCE_CUDA") == "1":
        return True
    return torch_cuda is not None and cuda_home is not None


def cxx_flags(openmp: bool, debug: bool = False) -> list:
    """Host compiler flags. -fopenmp makes at::parallel_for parallel (its loop is an OpenMP
    pragma in torch's headers); without it the op still works, on one thread."""
    return _CXX_FLAGS + (["-fopenmp"] if openmp else []) + ([] if debug else ["-g0"])


def link_flags(openmp: bool) -> list:
    return ["-fopenmp"] if openmp else []


class CompilerError(RuntimeError):
    """No usable C++ compiler: raised before any build starts, with what to install."""


def find_compiler() -> str:
    """The C++ compiler torch.utils.cpp_extension will call ($CXX, else c++), or CompilerError."""
    command = os.environ.get("CXX") or "c++"
    words = shlex.split(command) or ["c++"]
    path = shutil.which(words[0])
    if path is None:
        raise CompilerError(
            f"dmi_ext: no C++ compiler found (looked for {words[0]!r}"
            + (" from $CXX" if os.environ.get("CXX") else " on PATH") + "). dmi_ext compiles a "
            "C++ library against your torch: install g++ (Debian/Ubuntu: apt install g++; "
            "Fedora: dnf install gcc-c++; macOS: xcode-select --install) or set CXX, then retry.")
    return path


def openmp_supported(compiler: str) -> bool:
    """Whether ``compiler -fopenmp`` compiles and links a small OpenMP program (clang on macOS
    without libomp does not)."""
    program = "#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as f:
            f.write(program)
        try:
            done = subprocess.run([compiler, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                                  capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return done.returncode == 0


NO_OPENMP_WARNING = ("dmi_ext: the C++ compiler has no OpenMP (-fopenmp failed): building "
                     "without it; the CPU kernels will run on one thread.")
