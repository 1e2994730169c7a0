"""The CUDA kernels, run on the CPU, against the float64 references of the GPU tests.

Where there is no GPU this still checks the kernels' logic: indexing, the row groups and their
reductions, masking, both access paths, the persistent backward's partial sums, every launch
shape. tests/gpu/emulation/emu.h stands one host thread in for each CUDA thread; this file copies
csrc/ with its few GPU-only pieces rewritten for it (inline PTX, dynamic shared memory, <<<>>>
launches) and builds it with the host compiler. A thread missing from a shuffle or a barrier
deadlocks as on a GPU (the timeout fails the test) and a misaligned vector access aborts. Not
seen here: timing, the GPU memory model, register and shared-memory limits.

Opt in with ``MP_FUSED_EMULATE=1``: a few minutes on two cores (the build, and host threads
standing in for GPU threads).
"""

import ctypes
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_fused_norm import check_norm
from test_fused_softmax import check_softmax

pytestmark = [
    pytest.mark.skipif(os.environ.get("MP_FUSED_EMULATE") != "1",
                       reason="set MP_FUSED_EMULATE=1 to run the kernels emulated on the CPU"),
    pytest.mark.timeout(600, method="thread"),  # a deadlocked kernel blocks in C
]

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "gpu" / "emulation"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # mp_fused::DType
KIND_CODES = {"none": 0, "padding": 1, "causal": 2}  # mp_fused::SoftmaxMask

# (pattern, replacement): the GPU-only pieces of csrc/, each of which must be found.
REWRITES = [
    (r"extern __shared__ (?:__align__\(\d+\) )?([\w ]+?) (\w+)\[\];",
     r"\1* \2 = static_cast<\1*>(emu_dynamic_smem());"),
    (r"(void group_sync\(int tpr\) \{).*?\n\}",
     r"\1 emu_bar_sync(1 + static_cast<int>(threadIdx.x) / tpr, tpr); }"),
    (r"(void cp_async_16\(void\* smem, const void\* gmem\) \{).*?\n\}",
     r"\1 emu_cp_async_16(smem, gmem); }"),
    (r"(void cp_async_commit\(\) \{).*?\n\}", r"\1 }"),  # the copies are synchronous here
    (r"(void cp_async_wait\(\) \{).*?\n\}", r"\1 }"),
    (r"reinterpret_cast<(const )?Vec<T, N>\*>\(p\)", r"emu_aligned<\1Vec<T, N>>(p)"),
    (r"(\w+_kernel(?:<[^;{}]*?>)?)\s*<<<(.*?)>>>\s*\((.*?)\);",
     r"emu_launch([=] { \1(\3); }, \2);"),
]


def _cuda_include() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home) / "include"
    return None


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    include = _cuda_include()
    compiler = shutil.which("c++") or shutil.which("g++")
    if include is None or compiler is None:
        pytest.skip("needs the CUDA headers and a C++ compiler")
    build = tmp_path_factory.mktemp("emulated")
    found = [0] * len(REWRITES)
    for src in (ROOT / "csrc").iterdir():
        if src.suffix not in (".cu", ".cuh", ".h"):
            continue
        text = src.read_text()
        for i, (pattern, replacement) in enumerate(REWRITES):
            text, n = re.subn(pattern, replacement, text, flags=re.DOTALL)
            found[i] += n
        assert not re.search(r"<<<|\basm\b", text), f"{src.name}: GPU-only code left"
        (build / (src.stem + ".cpp" if src.suffix == ".cu" else src.name)).write_text(text)
    missing = [p for (p, _), n in zip(REWRITES, found) if n == 0]
    assert not missing, f"csrc/ changed: no match for {missing}"
    shutil.copy(EMULATION / "runtime.cpp", build)

    def compile_one(source: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [compiler, "-std=c++20", "-O1", "-fPIC", "-include", str(EMULATION / "emu.h"),
             f"-I{build}", f"-I{EMULATION}", f"-isystem{include}", "-c", str(source),
             "-o", str(source.with_suffix(".o"))], check=False, capture_output=True,
            text=True)

    with ThreadPoolExecutor(os.cpu_count()) as pool:
        results = list(pool.map(compile_one, sorted(build.glob("*.cpp"))))
    errors = [r.stderr for r in results if r.returncode != 0]
    assert not errors, "\n".join(errors)
    subprocess.run([compiler, "-shared", "-o", str(build / "emulated.so"),
                    *map(str, sorted(build.glob("*.o"))), "-lpthread"], check=True)
    library = ctypes.CDLL(str(build / "emulated.so"))
    p, i64, i32, f32, b = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float,
                           ctypes.c_bool)
    library.emu_softmax_forward.argtypes = [p, p, p, i64, i64, i32, i32, i32, i32, f32, i32]
    library.emu_softmax_backward.argtypes = [p, p, p, i64, i32, i32, b, f32, i32]
    library.emu_norm_forward.argtypes = [p, p, p, p, p, p, i64, i32, f32, i32]
    library.emu_norm_workspace_floats.argtypes = [p, p, p, p, p, p, p, p, i64, i32, i32]
    library.emu_norm_workspace_floats.restype = i64
    library.emu_norm_backward.argtypes = [p, p, p, p, p, p, p, p, p, i64, i32, i32]
    return library


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _tensor(shape, dtype, seed, scale=1.0, offset=0.0, misaligned=False, fill=None):
    """Random (or ``fill``) values of exactly ``shape``, one element into a larger buffer when
    ``misaligned`` (so not 16-byte aligned)."""
    n = torch.Size(shape).numel()
    if fill is None:
        g = torch.Generator().manual_seed(seed)
        flat = torch.randn(n + misaligned, generator=g, dtype=torch.float64) * scale + offset
    else:
        flat = torch.full((n + misaligned,), fill, dtype=torch.float64)
    return flat.to(dtype)[int(misaligned):].view(shape)


SOFTMAX = [  # (kind, [b, np, sq, sk], mask batches, misaligned, dtype)
    *[("causal", (2, 1, s, s), 1, False, torch.bfloat16) for s in (1, 7, 40, 264, 1024)],
    ("causal", (1, 2, 64, 64), 1, False, torch.float16),
    ("causal", (3, 1, 64, 64), 1, True, torch.bfloat16),
    ("padding", (2, 3, 5, 1), 2, False, torch.bfloat16),
    ("padding", (3, 2, 17, 33), 1, False, torch.float16),
    ("padding", (2, 2, 9, 8), 2, False, torch.bfloat16),
    ("padding", (2, 1, 8, 1001), 2, False, torch.bfloat16),
    ("padding", (1, 2, 3, 16384), 1, False, torch.bfloat16),
    ("none", (2, 2, 5, 3), 1, False, torch.float16),
    ("none", (1, 1, 3, 16384), 1, False, torch.bfloat16),
    ("none", (1, 1, 4, 16383), 1, False, torch.bfloat16),
    ("none", (1, 2, 16, 2048), 1, True, torch.bfloat16),
]


@pytest.mark.parametrize("kind,shape,mask_batches,misaligned,dtype", SOFTMAX)
def test_softmax(lib, kind, shape, mask_batches, misaligned, dtype):
    b, heads, sq, sk = shape
    x = _tensor(shape, dtype, sk, scale=4.0, misaligned=misaligned)
    mask, masked = None, None
    if kind == "causal":
        masked = torch.ones(sq, sk, dtype=torch.bool).triu(1)
    elif kind == "padding":
        g = torch.Generator().manual_seed(1)
        mask = torch.rand(mask_batches, 1, sq, sk, generator=g) < 0.3
        mask[..., 0, :] = True  # a fully masked query
        if sq > 1:
            mask[..., 1, :] = False  # and one with nothing masked
        masked = mask
    y = _tensor(shape, dtype, 0, fill=float("nan"))
    status = lib.emu_softmax_forward(_ptr(x), _ptr(y), _ptr(mask), b * heads * sq, heads * sq,
                                     mask_batches, sq, sk, KIND_CODES[kind], 0.5,
                                     DTYPE_CODES[dtype])
    assert status == 0, f"forward launch: CUDA error {status}"
    dy = _tensor(shape, dtype, sk + 1, misaligned=misaligned)
    dx = _tensor(shape, dtype, 0, misaligned=misaligned, fill=float("nan"))
    status = lib.emu_softmax_backward(_ptr(dy), _ptr(y), _ptr(dx), b * heads * sq, sq, sk,
                                      kind == "causal", 0.5, DTYPE_CODES[dtype])
    assert status == 0, f"backward launch: CUDA error {status}"
    check_softmax(x, masked, 0.5, dy, y, dx)


NORMS = [  # (rows, hidden, dtype, misaligned, emulated multiprocessors)
    *[(rows, hidden, dtype, False, 2) for dtype in (torch.float32, torch.bfloat16)
      for hidden in (1, 64, 100, 1000, 4096, 4100) for rows in (1, 37)],
    (37, 12288, torch.bfloat16, False, 3),
    (5, 16384, torch.float16, False, 2),
    (3, 16392, torch.bfloat16, False, 2),
    (300, 4096, torch.bfloat16, False, 3),  # many steps of the persistent backward
    (37, 4096, torch.bfloat16, True, 2),
]


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("rows,hidden,dtype,misaligned,sms", NORMS)
def test_norm(lib, rows, hidden, dtype, misaligned, sms, rms):
    ctypes.c_int.in_dll(lib, "emu_sms").value = sms
    x = _tensor((rows, hidden), dtype, hidden, scale=2.0, offset=3.0, misaligned=misaligned)
    weight = _tensor((hidden,), dtype, hidden + 1, offset=1.0)
    bias = None if rms else _tensor((hidden,), dtype, hidden + 2)
    dy = _tensor((rows, hidden), dtype, hidden + 3)
    nan = float("nan")
    y = _tensor((rows, hidden), dtype, 0, fill=nan)
    mean = None if rms else _tensor((rows,), torch.float32, 0, fill=nan)
    rstd = _tensor((rows,), torch.float32, 0, fill=nan)
    status = lib.emu_norm_forward(_ptr(x), _ptr(weight), _ptr(bias), _ptr(y), _ptr(mean),
                                  _ptr(rstd), rows, hidden, 1e-5, DTYPE_CODES[dtype])
    assert status == 0, f"forward launch: CUDA error {status}"
    dx = _tensor((rows, hidden), dtype, 0, fill=nan)
    dweight = _tensor((hidden,), dtype, 0, fill=nan)
    dbias = None if rms else _tensor((hidden,), dtype, 0, fill=nan)
    args = [_ptr(t) for t in (dy, x, weight, mean, rstd, dx, dweight, dbias)]
    floats = lib.emu_norm_workspace_floats(*args, rows, hidden, DTYPE_CODES[dtype])
    workspace = _tensor((floats,), torch.float32, 0, fill=nan)
    status = lib.emu_norm_backward(*args, _ptr(workspace), rows, hidden, DTYPE_CODES[dtype])
    assert status == 0, f"backward launch: CUDA error {status}"
    grads = [dx, dweight] + ([] if rms else [dbias])
    check_norm(x, weight, bias, 1e-5, dy, y, grads, [rstd] if rms else [mean, rstd])
