"""Build and load duet's C kernels for CPUs (compiled once per machine, then cached).

The C sources in `kernels/csrc` compile with the system C compiler into a cache folder
keyed by the source and the CPU's flags (the build uses -march=native). They link against
the OpenMP runtime torch already loaded, so both share one thread pool instead of two
pools spinning against each other. Without a compiler, `load()` returns None and callers
use the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCES = sorted((Path(__file__).parent / "csrc").glob("*.c"))
_FLAGS = [
    "-O3",
    "-march=native",
    "-ffast-math",
    "-fno-finite-math-only",
    "-fopenmp",
    "-shared",
    "-fPIC",
    "-std=c11",
]


def _cache_dir() -> Path:
    root = os.environ.get("DUET_CACHE_DIR") or Path.home() / ".cache" / "duet"
    return Path(root) / "kernels"


def _build_key() -> str:
    digest = hashlib.sha256(" ".join(_FLAGS).encode())
    for source in _SOURCES:
        digest.update(source.read_bytes())
    cpu_flags = next(
        (
            line
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ),
        "",
    )
    digest.update(cpu_flags.encode())
    return digest.hexdigest()[:16]


def _compile(target: Path) -> None:
    torch_lib = Path(torch.__file__).parent / "lib"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        cmd = [
            os.environ.get("CC", "cc"),
            *_FLAGS,
            *map(str, _SOURCES),
            "-o",
            str(partial),
            f"-L{torch_lib}",
            f"-Wl,-rpath,{torch_lib}",
            "-lm",
        ]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        partial.replace(target)  # atomic: concurrent workers never load a half-written file


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when this machine cannot build it."""
    if os.environ.get("DUET_DISABLE_NATIVE_KERNELS") == "1" or not _SOURCES:
        return None
    target = _cache_dir() / f"duet_kernels_{_build_key()}.so"
    try:
        if not target.exists():
            if shutil.which(os.environ.get("CC", "cc")) is None:
                logger.info("no C compiler: using the torch attention path")
                return None
            logger.info("compiling CPU kernels into %s", target)
            _compile(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning(
            "CPU kernels unavailable, using the torch path: %s", str(detail).strip()[:500]
        )
        return None
    lib.paged_decode_f32.restype = None
    lib.paged_decode_f32.argtypes = (
        [ctypes.c_void_p] * 6 + [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_int]
    )
    return lib
