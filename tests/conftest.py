"""Shared fixtures: the embedded default model, tiny random checkpoints, the kernel ISA twins."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
from checkpoints import write_tiny_llama

from models import cpu_features
from models.loader import ModelSource, resolve_model
from models.tokenizer import Tokenizer, load_tokenizer

_HAS_AVX512 = cpu_features.isa() == "avx512"


@pytest.fixture(
    params=[
        pytest.param("avx512", marks=pytest.mark.skipif(not _HAS_AVX512, reason="no AVX-512 here")),
        "avx2",
    ]
)
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test once per kernel twin this CPU can execute (AVX2 forced by DUET_CPU_ISA)."""
    if request.param == "avx2":
        monkeypatch.setenv(cpu_features.ISA_ENV, "avx2")
    assert cpu_features.isa() == request.param
    return request.param


_TWINS = [
    pytest.param(
        "avx512bf16",
        marks=pytest.mark.skipif(not cpu_features.has_avx512_bf16(), reason="no AVX512_BF16"),
    ),
    pytest.param("avx512", marks=pytest.mark.skipif(not _HAS_AVX512, reason="no AVX-512 here")),
    "avx2",
]


def _force_twin(name: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(cpu_features.ISA_ENV, name)
    assert cpu_features.has_avx512_bf16() == (name == "avx512bf16")
    assert not cpu_features.has_amx_bf16()
    return name


@pytest.fixture(params=_TWINS)
def twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each kernel twin this CPU can run, forced by DUET_CPU_ISA: bf16 in hardware
    (avx512bf16: an AVX512_BF16 CPU's choices, AMX masked), plain AVX-512 and AVX2."""
    return _force_twin(request.param, monkeypatch)


@pytest.fixture(
    params=[
        pytest.param(
            "amx",
            marks=pytest.mark.skipif(not cpu_features.has_amx_bf16(), reason="no AMX-BF16 here"),
        ),
        *_TWINS,
    ]
)
def prefill_twin(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The twins of `twin`, and first this CPU's own choices where it has AMX-BF16 (amx:
    bf16 prefill chunks on AMX tiles)."""
    if request.param != "amx":
        return _force_twin(request.param, monkeypatch)
    monkeypatch.delenv(cpu_features.ISA_ENV, raising=False)
    assert cpu_features.has_amx_bf16()
    return request.param
    monkeypatch.setenv(cpu_features.ISA_ENV, request.param)
    assert cpu_features.has_avx512_bf16() == (request.param == "avx512bf16")
    assert not cpu_features.has_amx_bf16()
    return request.param


@pytest.fixture(scope="session")
def default_source() -> ModelSource:
    """The embedded SmolLM2-135M-Instruct GGUF."""
    return resolve_model(None)


@pytest.fixture(scope="session")
def default_tokenizer(default_source: ModelSource) -> Tokenizer:
    """The default model's tokenizer (cached under $DUET_CACHE_DIR or ~/.cache/duet)."""
    return load_tokenizer(default_source)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """A factory: `tiny_checkpoint(**write_tiny_llama_kwargs) -> folder`.

    Folders are shared by every test asking for the same arguments: do not modify them.
    """
    made: dict[tuple, Path] = {}
    signature = inspect.signature(write_tiny_llama)

    def make(**kwargs: object) -> Path:
        # spelled-out defaults and omitted ones name the same checkpoint
        bound = signature.bind(None, **kwargs)
        bound.apply_defaults()
        key = tuple(sorted(bound.kwargs.items()))
        if key not in made:
            made[key] = write_tiny_llama(tmp_path_factory.mktemp("tiny"), **kwargs)
        return made[key]

    return make
