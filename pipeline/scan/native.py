"""Optional compiled kernels, built at first use with the system C compiler (stdlib ctypes).

One kernel today: `screen16`, the float32 screen over float16 rows (pipeline/scan/screen16.c). It
computes what
`pipeline.scan.screen.screen_scores` computes (float32 products of float32 queries with
exactly converted float16 rows, float32 sums in another order, which the screen's error bound
covers), reading each stored row once instead of converting blocks and calling a matmul.

The shared library is cached per source and machine type under $CTRAK_NATIVE_CACHE (default
~/.cache/ctrak/native) and written by an atomic rename, so concurrent workers may build it at
once; an image can build it ahead (`python -m pipeline.scan.native`) and run without a compiler.
Everything degrades to torch's path: no compiler, a failed build, a CPU without AVX2/FMA/F16C,
or CTRAK_NATIVE=0 in the environment (to compare or to rule the kernel out). `status()` says
which and why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("screen16.c")


@dataclass(frozen=True)
class NativeStatus:
    """Whether the kernel is in use, and why not when it is not."""

    available: bool
    reason: str
    library: str | None = None


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "ctrak" / "native"
    return Path(os.environ.get("CTRAK_NATIVE_CACHE", default))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _library() -> Path:
    """Where the library built from this SOURCE for this machine lives (built or not)."""
    key = hashlib.sha256(SOURCE.read_bytes() + platform.machine().encode()).hexdigest()[:16]
    return _cache_dir() / f"screen16-{key}.so"


def _build(compiler: str, library: Path) -> None:
    """Compile SOURCE into `library` (a temporary file, then an atomic rename)."""
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        cmd = [compiler, "-O3", "-shared", "-fPIC", "-o", tmp, str(SOURCE)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise OSError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        os.replace(tmp, library)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, NativeStatus]:
    if os.environ.get("CTRAK_NATIVE", "1") == "0":
        return None, NativeStatus(False, "disabled by CTRAK_NATIVE=0")
    library, how = _library(), "prebuilt"
    try:
        if not library.is_file():
            compiler = _compiler()
            if compiler is None:
                return None, NativeStatus(False, "no C compiler (set CC or install gcc/clang)")
            _build(compiler, library)
            how = "built with " + compiler
        lib = ctypes.CDLL(str(library))
    except (OSError, subprocess.SubprocessError) as exc:
        return None, NativeStatus(False, f"build failed: {exc}")
    if not lib.ctrak_screen16_supported():
        return None, NativeStatus(False, "CPU lacks AVX2/FMA/F16C (x86-64 only)", str(library))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.ctrak_screen16.argtypes = [ptr, i64, i64, ptr, i64, ptr, i64]
    lib.ctrak_screen16.restype = None
    return lib, NativeStatus(True, how, str(library))


def status() -> NativeStatus:
    """Whether `screen16` runs natively here (builds it on first call)."""
    return _load()[1]


def screen16(phi: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> bool:
    """phi (n, k) float16 contiguous, x (q, k) float32 contiguous, out (q, n) float32 with unit
    column stride (a column slice of a wider (q, N) tensor is fine) -> out = x phi^T in float32.
    Returns False, touching nothing, when the kernel is unavailable or the layout unsupported
    (the caller then runs torch's path)."""
    lib = _load()[0]
    if lib is None or phi.device.type != "cpu" or x.device.type != "cpu":
        return False
    n, k = phi.shape
    q = x.shape[0]
    if (
        phi.dtype != torch.float16
        or x.dtype != torch.float32
        or out.dtype != torch.float32
        or not phi.is_contiguous()
        or not x.is_contiguous()
        or x.shape[1] != k
        or tuple(out.shape) != (q, n)
        or (n > 1 and out.stride(1) != 1)
    ):
        return False
    if n and q:
        lib.ctrak_screen16(phi.data_ptr(), n, k, x.data_ptr(), q, out.data_ptr(), out.stride(0))
    return True


if __name__ == "__main__":  # build (or find) the kernel now, e.g. in a container image
    print(status())
