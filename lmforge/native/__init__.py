"""lmforge's native kernels (`qmatmul.c`), built once per machine with its own gcc and loaded
through ctypes: matrix products straight from a GGUF file's quantized blocks.

The library is compiled on first use with `-march=native` (the machine's own vector units)
into `$LMFORGE_HOME/native/`, keyed by the source, the compiler and the CPU's flags, so a copy
built on one machine is never run on another. No Python headers, no torch headers: a build
takes about a second. Where there is no C compiler, or LMFORGE_NATIVE=0, `library()` is None
and callers run the pure-PyTorch path (dequantized weights and `F.linear`).

OpenMP: the library links libgomp.so.1 and is loaded after torch, so the dynamic linker
reuses the runtime PyTorch already loaded, and both share one pool of threads.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

from lmforge.paths import lmforge_home

SOURCE = Path(__file__).with_name("qmatmul.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
# ggml's type ids of the block formats qmatmul.c runs (gguf.constants.GGMLQuantizationType)
TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}
SIMD = {3: "AVX-512 VNNI", 2: "AVX-VNNI", 1: "AVX2", 0: "scalar"}


def enabled() -> bool:
    return os.environ.get("LMFORGE_NATIVE", "1") not in ("0", "false", "off", "")


def _cpu_key() -> str:
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return flags or platform.processor() or platform.machine()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")


def library_path(cc: str) -> Path:
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, *version, " ".join(FLAGS), _cpu_key()]).encode()).hexdigest()[:16]
    return lmforge_home() / "native" / f"qmatmul-{key}.so"


def build(cc: str, out: Path, flags: list[str] | None = None) -> None:
    """Compile qmatmul.c to `out` (atomically: a half-written library is never loaded).
    `flags` replace the defaults (tests build the AVX2-only and plain-C variants this way)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    print("lmforge: building the native kernels for this machine (once)…", file=sys.stderr, flush=True)
    r = subprocess.run([cc, *(flags or FLAGS), str(SOURCE), "-o", str(tmp), "-lm"], capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise OSError(f"{cc} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
    os.replace(tmp, out)


def _declare(lib) -> None:
    c = ctypes
    lib.lmf_matmul.restype = c.c_int
    lib.lmf_matmul.argtypes = [c.c_int, c.c_void_p, c.c_int64, c.c_int64, c.c_int64, c.c_void_p, c.c_int64, c.c_void_p, c.c_int, c.c_int]
    lib.lmf_simd_level.restype = c.c_int
    lib.lmf_dequant.restype = c.c_int
    lib.lmf_dequant.argtypes = [c.c_int, c.c_void_p, c.c_int64, c.c_int64, c.c_int64, c.c_void_p, c.c_int]
    lib.lmf_decode_step.restype = c.c_int
    lib.lmf_decode_step.argtypes = [c.c_void_p, c.c_int64, c.c_int64, c.c_void_p, c.c_int]


def load(path: Path):
    lib = ctypes.CDLL(str(path))
    _declare(lib)
    return lib


@functools.lru_cache(maxsize=1)
def library():
    """The loaded kernels, or None (no compiler, a failed build, or LMFORGE_NATIVE=0); a failure
    is said once, in one line, and lmforge goes on with PyTorch."""
    if not enabled():
        return None
    import torch  # noqa: F401  (load PyTorch's OpenMP runtime first: the library shares it)

    cc = _compiler()
    if cc is None:
        print("lmforge: no C compiler found; quantized GGUF weights run dequantized in PyTorch", file=sys.stderr)
        return None
    try:
        path = library_path(cc)
        if not path.exists():
            build(cc, path)
        return load(path)
    except OSError as e:
        print(f"lmforge: native kernels unavailable ({e}); quantized GGUF weights run dequantized in PyTorch", file=sys.stderr)
        return None


def simd_level() -> str:
    lib = library()
    return "unavailable" if lib is None else SIMD.get(lib.lmf_simd_level(), "?")
