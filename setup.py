"""Builds dmi_ext._C with torch.utils.cpp_extension, against the torch installed in this
environment:

    pip install --no-build-isolation .        # or -e . for a checkout you edit

CPU always, from csrc/*.cpp and csrc/cpu/*.cpp; CUDA too, from csrc/cuda/*.cu, when the installed
torch is a CUDA build and nvcc is found (CUDA_HOME). DMI_EXT_FORCE_CPU=1 forces a CPU build,
DMI_EXT_FORCE_CUDA=1 a CUDA build (to compile-check the kernels on a machine without a GPU:
scripts/cuda_compile_check.sh). DMI_EXT_CUDA_INCLUDE adds an include directory for the CUDA build
(the CUDA wheels' nvidia/cu13/include when the toolkit lacks the cuBLAS/cuSOLVER headers).
Sources and flags: dmi_ext/_build_config.py, shared with the JIT build of a checkout.

The package requires exactly the torch it was built with (a compiled extension uses torch's C++
ABI, which changes between releases), as torchvision's wheels do.
"""

import importlib.util
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    # Under pip's build isolation this runs in a fresh environment without the user's torch; a
    # torch pulled in there would be another release (often a CUDA build of several GB) than the
    # one the extension must load into. Fail now, in seconds, and say what to run.
    sys.exit(
        "\ndmi_ext must be built against the torch installed where it will run, and this build "
        "environment has no torch.\n"
        "  - pip's build isolation (the default of `pip install .`) builds in a fresh environment "
        "without your torch: install with\n"
        "        pip install --no-build-isolation .      (or -e . for an editable checkout)\n"
        "  - and install torch first if you have not: pip install torch\n")


def _load_build_config():
    spec = importlib.util.spec_from_file_location(
        "dmi_ext_build_config", os.path.join(HERE, "dmi_ext", "_build_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


config = _load_build_config()
TORCH_VERSION = torch.__version__.split("+")[0]  # the public release: 2.13.0+cpu -> 2.13.0


class BuildExt(BuildExtension):
    """Writes _build_info.py beside each built library: which torch it was built against, read by
    the loader to explain an ABI mismatch (dmi_ext/_library.py). Beside the library, so a compile
    check built elsewhere (build/cuda-check) never overwrites the checkout's."""

    @staticmethod
    def info_path(library: str) -> str:
        return os.path.join(os.path.dirname(library), "_build_info.py")

    def build_extension(self, ext):
        super().build_extension(ext)
        cuda = any(source.endswith(".cu") for source in ext.sources)
        with open(self.info_path(self.get_ext_fullpath(ext.name)), "w") as f:
            f.write('"""Written by setup.py at build time: what dmi_ext._C was built against."""'
                    f"\n\nTORCH_VERSION = {torch.__version__!r}\nTORCH_CUDA = {torch.version.cuda!r}"
                    f"\nWITH_CUDA = {cuda!r}\n")

    def copy_extensions_to_source(self):
        # An editable install builds elsewhere and copies the libraries into the checkout.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace, regular = self._get_inplace_equivalent(build_py, ext)
            self.copy_file(self.info_path(regular), self.info_path(inplace), level=self.verbose)


def extension():
    try:
        compiler = config.find_compiler()
    except config.CompilerError as error:
        sys.exit(f"\n{error}\n")
    openmp = config.openmp_supported(compiler)
    if not openmp:
        print(config.NO_OPENMP_WARNING, file=sys.stderr)
    cuda = config.want_cuda(torch.version.cuda, CUDA_HOME)
    debug = os.environ.get("DMI_EXT_DEBUG") == "1"
    cxx = config.cxx_flags(openmp, debug)
    link = config.link_flags(openmp)
    sources = config.sources(HERE, cuda)
    if not cuda:
        return CppExtension("dmi_ext._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link)
    # With no GPU to read the architecture from (a compile check), build for Hopper (sm_90), the
    # GPUs of the contract's GPU rows, instead of torch's long default list.
    # TORCH_CUDA_ARCH_LIST overrides.
    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    extra_include = os.environ.get("DMI_EXT_CUDA_INCLUDE")  # e.g. the wheel set's nvidia/cu13/include
    macro = config.CUDA_MACRO
    return CUDAExtension(
        "dmi_ext._C", sources,
        include_dirs=[extra_include] if extra_include else [],
        define_macros=[(macro, None)],
        extra_compile_args={"cxx": cxx + [f"-D{macro}"], "nvcc": config.NVCC_FLAGS},
        extra_link_args=link,
    )


setup(
    name="dmi_ext",
    version=VERSION,
    description="Fast, exact and safe L_DMI loss for PyTorch (C++/CUDA extension)",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    license_files=["LICENSE"],
    packages=find_packages(include=["dmi_ext", "dmi_ext.*"]),
    package_data={"dmi_ext": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=[f"torch=={TORCH_VERSION}", "numpy"],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis"],
        "toolkit": ["scikit-learn", "tqdm", "matplotlib"],
    },
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
