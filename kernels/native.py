"""Build and load duet's C kernels for CPUs (compiled once per machine, then cached).

The C sources in `kernels/csrc` compile with the system C compiler into a cache folder
keyed by the source and the CPU's flags (the build uses -march=native; each kernel also
has an AVX-512 and an AVX2 twin, picked at run time by `models.cpu_features.isa()`). They link against
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

from models import cpu_features
from models.cpu_features import cpu_flags
from models.disk_cache import cache_dir

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = sorted(_CSRC.glob("*.c"))
_HEADERS = sorted(_CSRC.glob("*.h"))
# the dtypes the kernels take, as their names spell them: {base}_{dtype}_{isa}
DTYPE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}
_TWINS = [f"{t}_{i}" for t in DTYPE_SUFFIX.values() for i in ("avx512", "avx2")]
# paged_decode_{dtype}_{isa}, whose arguments are DECODE_ARGTYPES
DECODE_KERNELS = [f"paged_decode_{twin}" for twin in [*_TWINS, "bf16_avx512bf16"]]
# paged_prefill_{dtype}_{isa}: (q, k_cache, v_cache, tables, seq_lens, query_start, out,
# first_seq, num_seqs, Hq, Hkv, D, block_size, max_blocks, scale, threads)
PREFILL_KERNELS = [f"paged_prefill_{twin}" for twin in [*_TWINS, "bf16_avx512bf16", "bf16_amx"]]
_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
# (q, k_cache, v_cache, block_tables, seq_lens, out, B, Hq, Hkv, D, block_size, max_blocks,
# scale, threads)
DECODE_ARGTYPES = [_P] * 6 + [_I] * 6 + [_F, _I]
# the fused per-layer ops (fused_ops.c), {name}_{dtype}_{isa}: their argument types
FUSED_KERNELS = {
    # (x, residual or NULL, weight, out, rows, hidden, eps, threads)
    "rms_norm": [_P] * 4 + [_I, _I, _F, _I],
    # (qkv, positions, cos, sin, slots, q_out, k_cache, v_cache, cache_bf16, tokens, Hq, Hkv,
    # D, threads)
    "rope_kv": [_P] * 8 + [_I] * 6,
    # (gate_up, out, rows, inter, threads)
    "silu_mul": [_P] * 2 + [_I] * 3,
}
# the fused ops with a bf16 twin for AVX512_BF16 as well (fused_ops_avx512bf16.c)
FUSED_AVX512BF16_KERNELS = ("rms_norm", "silu_mul")
_FLAGS = [
    "-O3",
    "-march=native",
    "-ffast-math",
    "-fno-finite-math-only",
    "-fno-strict-aliasing",
    "-fopenmp",
    "-fPIC",
    "-std=c11",
]
# NOTE: linked in a step of its own, without -ffast-math: gcc would otherwise link
# crtfastmath.o, whose constructor turns on flush-to-zero for the whole process that loads
# the library (torch's results and every subnormal in Python included)
_LINK_FLAGS = ["-shared", "-fopenmp"]


def _build_key() -> str:
    digest = hashlib.sha256(" ".join(_FLAGS + _LINK_FLAGS).encode())
    for source in _SOURCES + _HEADERS:
        digest.update(source.read_bytes())
    digest.update(" ".join(sorted(cpu_flags())).encode())
    return digest.hexdigest()[:16]


def library_path() -> Path:
    """Where this build of the kernels lives (or will, once compiled): one file per source
    tree, flags and CPU, so a benchmark can keep an earlier build as its baseline."""
    return cache_dir() / "kernels" / f"duet_kernels_{_build_key()}.so"


def _compile(target: Path) -> None:
    torch_lib = Path(torch.__file__).parent / "lib"
    target.parent.mkdir(parents=True, exist_ok=True)
    cc = os.environ.get("CC", "cc")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        objects = [str(Path(tmp) / f"{source.stem}.o") for source in _SOURCES]
        for source, obj in zip(_SOURCES, objects, strict=True):
            _run([cc, *_FLAGS, f"-I{_CSRC}", "-c", str(source), "-o", obj])
        partial = Path(tmp) / target.name
        link = [cc, *_LINK_FLAGS, *objects, "-o", str(partial), f"-L{torch_lib}"]
        _run([*link, f"-Wl,-rpath,{torch_lib}", "-lm"])
        partial.replace(target)  # atomic: concurrent workers never load a half-written file


def _run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, or None when this machine cannot build it."""
    if os.environ.get("DUET_DISABLE_NATIVE_KERNELS") == "1" or not _SOURCES:
        return None
    if "avx2" not in cpu_flags():  # the kernels' oldest twin is AVX2
        logger.info("no AVX2 on this CPU: using the torch attention path")
        return None
    target = library_path()
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
    for name in DECODE_KERNELS:
        declare(lib, name, DECODE_ARGTYPES)
    for name in PREFILL_KERNELS:
        declare(lib, name, [_P] * 7 + [_I] * 7 + [_F, _I])
    for base, argtypes in FUSED_KERNELS.items():
        for twin in _TWINS:
            declare(lib, f"{base}_{twin}", argtypes)
    for base in FUSED_AVX512BF16_KERNELS:
        declare(lib, f"{base}_bf16_avx512bf16", FUSED_KERNELS[base])
    lib.amx_ready.restype = _I
    lib.amx_ready.argtypes = []
    return lib


@functools.cache
def amx_permitted() -> bool:
    """True when the kernels built and Linux lets this process use AMX tile data (asked
    once; without it the first tile instruction dies of SIGILL)."""
    lib = load()
    return lib is not None and lib.amx_ready() == 0


def twin(dtype: torch.dtype) -> str:
    """The ISA twin of the kernels for `dtype` activations on this CPU: bf16 pairs multiply
    (and round) in hardware where it has AVX512_BF16, else `cpu_features.isa()`."""
    if dtype == torch.bfloat16 and cpu_features.has_avx512_bf16():
        return "avx512bf16"
    return cpu_features.isa()


def declare(lib: ctypes.CDLL, name: str, argtypes: list) -> None:
    """Give kernel `name` of `lib` its argument types (every kernel returns void)."""
    kernel = getattr(lib, name)
    kernel.restype = None
    kernel.argtypes = argtypes
