"""`--dtype auto` follows the CPU, and DUET_CPU_ISA=avx2 forces the fallback choice."""

from __future__ import annotations

import pytest

from models import cpu_features, switches


def test_forced_avx2_resolves_auto_to_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx2")
    assert cpu_features.isa() == "avx2"
    assert not cpu_features.native_bf16()
    assert cpu_features.resolve_dtype("auto") == "float32"
    assert "DUET_CPU_ISA=avx2" in cpu_features.describe()


def test_auto_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cpu_features.ISA_ENV, raising=False)
    flags = cpu_features.cpu_flags()
    bf16 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} <= flags and bool(
        {"avx512_bf16", "amx_bf16"} & flags
    )
    assert cpu_features.resolve_dtype("auto") == ("bfloat16" if bf16 else "float32")


def test_explicit_dtypes_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx2")
    assert cpu_features.resolve_dtype("bfloat16") == "bfloat16"
    assert cpu_features.resolve_dtype("float32") == "float32"


def test_forced_avx512_takes_the_plain_x86_64_v4_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx512")
    assert cpu_features.isa() in ("avx512", "avx2")  # avx2 where the CPU has no AVX-512
    assert not cpu_features.native_bf16()
    assert not cpu_features.has_avx512_bf16()
    assert not cpu_features.has_vnni()
    assert cpu_features.resolve_dtype("auto") == "float32"


def test_forced_avx512bf16_takes_the_choices_of_a_cpu_without_amx(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not {"avx512_bf16", "avx512f"} <= cpu_features.cpu_flags():
        pytest.skip("no AVX512_BF16 here")
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx512bf16")
    assert cpu_features.has_avx512_bf16()
    assert not cpu_features.has_amx_bf16()
    assert cpu_features.resolve_dtype("auto") == "bfloat16"
    monkeypatch.delenv(cpu_features.ISA_ENV)
    assert cpu_features.has_amx_bf16() == ("amx_bf16" in cpu_features.cpu_flags())


def test_a_switch_holds_its_first_value_inside_one_step_and_follows_the_environment_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(cpu_features.ISA_ENV, "avx2")
    with switches.held():
        assert cpu_features.isa() == "avx2"
        monkeypatch.setenv(cpu_features.ISA_ENV, "avx512")
        with switches.held():  # a nested block keeps the outer one's values
            assert cpu_features.isa() == "avx2"
        assert switches.read(cpu_features.ISA_ENV) == "avx2"
        assert switches.read("DUET_TEST_UNSET_SWITCH") is None
        monkeypatch.setenv("DUET_TEST_UNSET_SWITCH", "1")
        assert switches.read("DUET_TEST_UNSET_SWITCH") is None  # unset at its first read
    assert switches.read(cpu_features.ISA_ENV) == "avx512"
    assert switches.read("DUET_TEST_UNSET_SWITCH") == "1"
