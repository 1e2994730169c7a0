"""Building and loading the fused kernels, without a GPU.

- Every kernel source compiles with nvcc for sm_80 and sm_90, and the torch binding compiles
  against the installed torch's headers (skipped, with the reason, without nvcc).
- The loader: one log line, once, when the kernels are unavailable; concurrent builders in one
  build directory take turns; a stale lock left by a killed build does not block the next.
"""

import logging
import os
import shutil
import subprocess
import sysconfig
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mp.fused import extension

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _cuda_home() -> Path | None:
    """The CUDA toolkit, looked for as torch does: CUDA_HOME, CUDA_PATH, /usr/local/cuda, nvcc."""
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 nvcc and Path(nvcc).resolve().parents[1]):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home)
    return None


def _run_all(commands: list[list[str]], timeout: float = 300) -> None:
    """Run the commands in parallel; fail with the output of each one that fails."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    failures = []
    for command, proc in zip(commands, procs):
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            failures.append(f"$ {' '.join(command)}\n{out}")
    assert not failures, "\n\n".join(failures)


def test_sources_compile_for_sm80_and_sm90(tmp_path):
    """nvcc on every kernel source, and the host compiler on the binding, all at once."""
    cuda = _cuda_home()
    compiler = shutil.which("c++") or shutil.which("g++")
    if cuda is None or compiler is None:
        pytest.skip("needs nvcc (PATH, CUDA_HOME, /usr/local/cuda) and a C++ compiler")
    sources = sorted(CSRC.glob("*.cu"))
    assert sources, f"no .cu files in {CSRC}"
    arch = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    # The flags torch's extension builds add, so what compiles here compiles there.
    torch_flags = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                   "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                   "--expt-relaxed-constexpr"]
    # cicc and ptxas at -O0: this checks that they compile, in a fraction of the time (the
    # front end parses and checks all of it either way); builds optimize.
    commands = [[str(cuda / "bin" / "nvcc"), *arch, *torch_flags, "-std=c++17", "-Xcicc", "-O0",
                 "-Xptxas", "-O0",
                 "--threads", "2", "-Werror", "all-warnings", "-c", str(src),
                 "-o", str(tmp_path / f"{src.stem}.o")] for src in sources]

    from torch.utils import cpp_extension

    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"],
                str(cuda / "include")]
    if not (Path(includes[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        shim = tmp_path / "shim" / "c10" / "cuda" / "impl"  # CPU-only torch wheels lack this
        shim.mkdir(parents=True)  # generated header; it only matters when linking
        (shim / "cuda_cmake_macros.h").write_text("#pragma once\n")
        includes.append(str(tmp_path / "shim"))
    commands.append([compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Werror",
                     *(f"-isystem{p}" for p in includes), f"-I{CSRC}",
                     "-DTORCH_EXTENSION_NAME=mp_fused_kernels", str(CSRC / "fused_binding.cpp")])
    _run_all(commands)


@pytest.fixture
def fresh_loader():
    extension.load_fused_kernels.cache_clear()
    yield
    extension.load_fused_kernels.cache_clear()


def _notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "mp.fused" and r.levelno == logging.WARNING]


def test_no_gpu_means_one_line_once(fresh_loader, monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="mp.fused"):
        assert extension.load_fused_kernels() is None
        assert extension.load_fused_kernels() is None
    (notice,) = _notices(caplog)
    assert "no CUDA device" in notice and "\n" not in notice


def test_failed_build_means_one_line_and_torch(fresh_loader, monkeypatch, caplog):
    def failing_build(sources):
        raise RuntimeError("Error building extension 'mp_fused_kernels'\nnvcc: fatal ...")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(extension, "_build", failing_build)
    with caplog.at_level(logging.WARNING, logger="mp.fused"):
        assert extension.load_fused_kernels() is None
    (notice,) = _notices(caplog)
    assert "Error building extension" in notice and "\n" not in notice


def test_concurrent_builds_take_turns_and_clear_a_stale_lock(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    directory = extension.build_directory()
    assert directory.parent == tmp_path / "mp_fused_kernels" and "9.0" in directory.name
    directory.mkdir(parents=True)
    (directory / "lock").touch()  # as a build killed midway leaves it
    inside, most = [0], [0]
    guard = threading.Lock()

    def fake_load(name, sources, build_directory, **kwargs):
        # cpp_extension would wait for its baton forever while a stale one exists
        assert not (Path(build_directory) / "lock").exists()
        assert {Path(s).name for s in sources} >= {"fused_binding.cpp", "softmax.cu"}
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.1)
        with guard:
            inside[0] -= 1
        return name

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    with ThreadPoolExecutor(3) as pool:  # flock excludes separate opens, threads included
        names = list(pool.map(lambda _: extension._build(CSRC), range(3)))
    assert names == ["mp_fused_kernels"] * 3
    assert most[0] == 1, "two builders were inside cpp_extension at once"


def test_sources_found_in_checkout():
    assert extension.kernel_sources_dir() == CSRC
