"""Builds the extension moss_kernels._C from csrc/ with ninja (torch.utils.cpp_extension).

Install with ``pip install --no-build-isolation -e .``: build isolation would fetch a second,
multi-GB torch into the build environment, and the extension must be compiled against the torch
that will run it. What gets built:

* always the CPU kernels (csrc/*.cpp, csrc/cpu/) and the CUDA backend's source compiled for the
  CPU emulator (csrc/emulated/: the `cuda-emulated` test backend);
* also the CUDA kernels (csrc/cuda/) when torch has CUDA and a CUDA toolkit is found
  (``CUDA_HOME`` or nvcc on the PATH), unless ``MOSS_BUILD_CUDA=0``.

Environment:

    MOSS_BUILD_EXT=0       skip the extension (the package still works on the reference backend)
    MOSS_BUILD_CUDA=0      CPU kernels only, even with a CUDA toolkit
    TORCH_CUDA_ARCH_LIST   GPU architectures; default: the visible GPUs', or "9.0+PTX" (Hopper,
                           plus PTX for newer GPUs) when none is visible
    MAX_JOBS               parallel compile jobs; default: the cores, at most one per 3 GiB of
                           memory (an nvcc job can take 2-3 GiB)
    DEBUG=1                -O0 -g (and -lineinfo for CUDA)

No network, submodule or pip calls happen here.
"""

import os
from glob import glob
from pathlib import Path

from setuptools import setup


def _default_max_jobs() -> str:
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gib = 8
    return str(max(1, min(os.cpu_count() or 1, int(mem_gib // 3))))


def _nvidia_wheel_includes() -> list[str]:
    """Headers of the nvidia-* wheels (cuBLAS, cuSPARSE, ...) that CUDA torch builds include
    but a bare CUDA toolkit may lack."""
    import importlib.util

    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    return sorted({str(p) for root in roots for p in Path(root).glob("*/include") if p.is_dir()})


def _extension():
    if os.environ.get("MOSS_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    debug = os.environ.get("DEBUG", "0") == "1"
    torch_version = torch.__version__.split("+")[0]
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    # -ffp-contract=fast: let a*b + c become one FMA in the CPU kernels (csrc/cpu/simd.h); the
    # ISO -std=c++17 mode torch compiles in would otherwise forbid it and halve their throughput.
    cxx += ["-fopenmp", "-ffp-contract=fast", f"-DMOSS_TORCH_VERSION={torch_version}"]
    sources = sorted(glob("csrc/*.cpp") + glob("csrc/cpu/*.cpp") + glob("csrc/emulated/*.cpp"))
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("MOSS_BUILD_CUDA", "1") != "0")
    if not with_cuda:
        ext = cpp_extension.CppExtension("moss_kernels._C", sources,
                                         extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])
    else:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
        cuda_flag = f"-DMOSS_WITH_CUDA={torch.version.cuda}"
        nvcc = (["-O0", "-g", "-lineinfo"] if debug else ["-O3", "-DNDEBUG"]) + [
            cuda_flag, f"-DMOSS_TORCH_VERSION={torch_version}", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension(
            "moss_kernels._C", sources + sorted(glob("csrc/cuda/*.cpp") + glob("csrc/cuda/*.cu")),
            include_dirs=_nvidia_wheel_includes(),
            extra_compile_args={"cxx": cxx + [cuda_flag], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
