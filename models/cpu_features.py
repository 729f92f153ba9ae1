"""What this CPU computes natively, read at run time, and what `--dtype auto` means here.

Machines of one kind differ (some AVX2-only, some AVX-512 with AVX512_BF16), so nothing is
assumed at build time. `DUET_CPU_ISA=avx2` makes an AVX-512 machine take the AVX2 choices
(float32 for `auto`, the AVX2 attention kernel), and `DUET_CPU_ISA=avx512` the choices of
a plain x86-64-v4 CPU (no AVX512_BF16, VNNI or AMX), and `DUET_CPU_ISA=avx512bf16` those of
an AVX512_BF16 CPU without AMX (a Zen 4's), so tests exercise each fallback on any machine
that has the faster path.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from models import switches

ISA_ENV = "DUET_CPU_ISA"
# x86-64-v4: what the AVX-512 kernel twins are compiled for
_AVX512 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
_BF16 = {"avx512_bf16", "amx_bf16"}
_AMX = {"amx_bf16", "amx_int8", "amx_tile"}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The `flags` line of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((s for s in text.splitlines() if s.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def isa() -> str:
    """ "avx512" or "avx2": the vector ISA duet's kernels use on this machine."""
    return _choices(switches.read(ISA_ENV))[0]


def _extensions() -> frozenset[str]:
    """The CPU's flags beyond x86-64-v4 that kernels may use (fewer when a switch says so)."""
    return _choices(switches.read(ISA_ENV))[1]


@functools.cache  # kernels ask per call; the flags never change and the switch rarely does
def _choices(forced: str | None) -> tuple[str, frozenset[str]]:
    """(isa, extensions) under DUET_CPU_ISA=`forced`."""
    forced = (forced or "").lower()
    if forced == "avx2" or not cpu_flags() >= _AVX512:
        return "avx2", frozenset()
    if forced == "avx512":
        return "avx512", frozenset()
    return "avx512", cpu_flags() - _AMX if forced == "avx512bf16" else cpu_flags()


def native_bf16() -> bool:
    """True when the CPU computes bf16 in hardware (AVX512_BF16 or AMX), not emulated."""
    return bool(_BF16 & _extensions())


def has_avx512_bf16() -> bool:
    """True when the bf16 pair dot product (`vdpbf16ps`, AVX512_BF16) is usable here."""
    return "avx512_bf16" in _extensions()


def has_amx_bf16() -> bool:
    """True when AMX multiplies bf16 tiles here (oneDNN's GEMMs and torch's bf16 attention
    use them)."""
    return "amx_bf16" in _extensions()


def has_amx_int8() -> bool:
    """True when AMX multiplies int8 tiles here (`tdpbusd`)."""
    return "amx_int8" in _extensions()


def has_vnni() -> bool:
    """True when the AVX-512 int8 dot product (`vpdpbusd`, AVX512_VNNI) is usable here."""
    return "avx512_vnni" in _extensions()


def resolve_dtype(dtype: str) -> str:
    """`auto` -> "bfloat16" where bf16 is native, else "float32"; other names unchanged."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if native_bf16() else "float32"


def describe() -> str:
    """One line for the start-up log: the ISA and the bf16 capability behind `auto`."""
    bf16 = sorted(_BF16 & cpu_flags()) or ["no native bf16"]
    forced = f" ({ISA_ENV}={os.environ[ISA_ENV]})" if os.environ.get(ISA_ENV) else ""
    return f"{isa()}{forced}, {', '.join(bf16)}"
