"""Optional ahead-of-time build of the fused CUDA kernels (``csrc/``).

Package metadata lives in pyproject.toml; this file only adds the extension and ships the kernel
sources. By default nothing is compiled at install: the kernels are built just in time on first
use (see ``mp/fused/extension.py``), from ``csrc/`` copied into the package as
``mp/fused/csrc``. To compile at install time, against the torch already installed:

    MP_BUILD_CUDA_EXT=1 pip install --no-build-isolation .

(``--no-build-isolation`` so the build sees that torch rather than a fresh one.)
``TORCH_CUDA_ARCH_LIST`` picks the GPU architectures, as for any torch extension.
"""

import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


class BuildPyWithKernelSources(build_py):
    """Copy csrc/ into the built package as mp/fused/csrc, for just-in-time builds."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "mp" / "fused" / "csrc"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(CSRC, target, ignore=shutil.ignore_patterns("*.o", "__pycache__"))


def cuda_extension_args() -> dict:
    if os.environ.get("MP_BUILD_CUDA_EXT") != "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CUDAExtension
    except ImportError as error:
        raise SystemExit("MP_BUILD_CUDA_EXT=1 needs torch importable at build time: install torch "
                         "first, then `pip install --no-build-isolation .`") from error
    extension = CUDAExtension(
        name="mp.fused._fused_kernels",
        sources=sorted(f"csrc/{p.name}" for p in CSRC.iterdir() if p.suffix in (".cpp", ".cu")),
        include_dirs=[str(CSRC)],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_py": BuildPyWithKernelSources,
                                                     "build_ext": BuildExtension}}


setup(**({"cmdclass": {"build_py": BuildPyWithKernelSources}} | cuda_extension_args()))
