"""Builds dmi_ext._C with torch.utils.cpp_extension.

CPU always, from csrc/*.cpp and csrc/cpu/*.cpp; CUDA too, from csrc/cuda/*.cu, when the installed
torch is a CUDA build and nvcc is found (CUDA_HOME). DMI_EXT_FORCE_CPU=1 forces a CPU build,
DMI_EXT_FORCE_CUDA=1 a CUDA build (to compile-check the kernels on a machine without a GPU:
scripts/cuda_compile_check.sh). DMI_EXT_CUDA_INCLUDE adds an include directory for the CUDA build
(the CUDA wheels' nvidia/cu13/include when the toolkit lacks the cuBLAS/cuSOLVER headers).
Install against the torch you already have: pip install --no-build-isolation -e .
"""

import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    if os.environ.get("DMI_EXT_FORCE_CPU") == "1":
        return False
    if os.environ.get("DMI_EXT_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    rel = lambda pattern: sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # -g0 last: Python's own CFLAGS carry -g, which makes a 20+ MB .so. DMI_EXT_DEBUG=1 keeps it.
    debug = os.environ.get("DMI_EXT_DEBUG") == "1"
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas", "-Wno-psabi"] + ([] if debug else ["-g0"])
    # -fopenmp makes at::parallel_for parallel; the libgomp it links is the one torch ships.
    link = ["-fopenmp"]
    if not want_cuda():
        return CppExtension("dmi_ext._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    # With no GPU to read the architecture from (a compile check), build for Hopper (sm_90), the
    # GPUs of SPEC §8, instead of torch's long default list. TORCH_CUDA_ARCH_LIST overrides.
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    extra_include = os.environ.get("DMI_EXT_CUDA_INCLUDE")  # e.g. the wheel set's nvidia/cu13/include
    include_dirs = [extra_include] if extra_include else []
    return CUDAExtension(
        "dmi_ext._C",
        sources + rel("csrc/cuda/*.cu"),
        include_dirs=include_dirs,
        define_macros=[("DMI_EXT_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx + ["-DDMI_EXT_WITH_CUDA"], "nvcc": nvcc},
        extra_link_args=link,
    )


setup(
    name="dmi_ext",
    version="0.1.0",
    description="Fast, exact and safe L_DMI loss for PyTorch (C++/CUDA extension)",
    packages=find_packages(include=["dmi_ext", "dmi_ext.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "toolkit": ["scikit-learn", "tqdm", "matplotlib"],
    },
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    zip_safe=False,
)
