"""Builds the extension moss_kernels._C from csrc/ with ninja (torch.utils.cpp_extension).

Install with ``pip install --no-build-isolation -e .``: build isolation would fetch a second,
multi-GB torch into the build environment, and the extension must be compiled against the torch
that will run it. Environment:

    MOSS_BUILD_EXT=0   skip the extension (the package still works on the reference backend)
    DEBUG=1            -O0 -g and assertions
    MAX_JOBS           parallel compile jobs (read by torch's ninja builder)

No network, submodule or pip calls happen here.
"""

import os
from glob import glob

from setuptools import setup


def _extension():
    if os.environ.get("MOSS_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    debug = os.environ.get("DEBUG", "0") == "1"
    torch_version = torch.__version__.split("+")[0]
    cxx = ["-O0", "-g"] if debug else ["-O3", "-DNDEBUG"]
    cxx += ["-fopenmp", f"-DMOSS_TORCH_VERSION={torch_version}"]
    sources = sorted(glob("csrc/*.cpp") + glob("csrc/cpu/*.cpp"))
    ext = CppExtension(
        "moss_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"]
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
