"""Incremental detokenization: whole characters only, stop strings across tokens, hold-back."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

import models.detokenizer as detokenizer_module
from engine_core.messages.sampling_params import SamplingParams
from models.detokenizer import IncrementalDetokenizer
from models.tokenizer import Tokenizer

TEXT = "Hi 😀! 你好世界, très bien 🇯🇵 — The capital of Japan is Tokyo. It is big."


@pytest.fixture(scope="module")
def byte_fallback() -> SimpleNamespace:
    """A SentencePiece-style tokenizer where non-ASCII text becomes <0xNN> byte tokens."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({"▁": 259, **{c: 260 + i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz.")}})
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True)
    )
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return SimpleNamespace(hf=PreTrainedTokenizerFast(tokenizer_object=tok))


@pytest.fixture(params=["decode_stream", "offset"])
def stream_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run each test with tokenizers' DecodeStream and with the prefix/read-offset fallback."""
    if request.param == "offset":
        monkeypatch.setattr(detokenizer_module, "DecodeStream", None)
    return request.param


def _encode(tokenizer: Tokenizer | SimpleNamespace, text: str) -> list[int]:
    return tokenizer.hf.encode(text, add_special_tokens=False)


def _stream(
    tokenizer: Tokenizer | SimpleNamespace, ids: list[int], params: SamplingParams, step: int = 1
) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed ids `step` at a time (finished on the last); return each update's delta."""
    detok = IncrementalDetokenizer(tokenizer, params, prompt_token_ids=[1])
    deltas = []
    for i in range(0, len(ids), step):
        delta, stop = detok.update(ids[i : i + step], finished=i + step >= len(ids))
        deltas.append(delta)
        if stop is not None:
            break
    return deltas, detok


@pytest.mark.parametrize("name", ["default_tokenizer", "byte_fallback"])
def test_multibyte_characters_never_split(
    name: str, stream_kind: str, request: pytest.FixtureRequest
) -> None:
    tokenizer = request.getfixturevalue(name)
    text = TEXT.lower() if name == "byte_fallback" else TEXT
    ids = _encode(tokenizer, text)
    assert len(ids) > len(text.encode()) // 4, "expected characters split across tokens"
    deltas, detok = _stream(tokenizer, ids, SamplingParams())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == tokenizer.hf.decode(ids)
    assert "".join(deltas).endswith(text)  # byte_fallback's normalizer keeps a leading space


def test_stop_string_split_across_tokens(default_tokenizer: Tokenizer, stream_kind: str) -> None:
    ids = _encode(default_tokenizer, TEXT)
    deltas, detok = _stream(default_tokenizer, ids, SamplingParams(stop=["Tokyo."]))
    assert "".join(deltas) == TEXT[: TEXT.index("Tokyo.")]
    assert detok.stop_string == "Tokyo."
    consumed = default_tokenizer.hf.decode(ids[: detok.num_tokens])
    assert consumed.endswith("Tokyo.") and detok.num_tokens < len(ids)


def test_stop_string_held_back_while_streaming(
    default_tokenizer: Tokenizer, stream_kind: str
) -> None:
    ids = _encode(default_tokenizer, TEXT)
    detok = IncrementalDetokenizer(default_tokenizer, SamplingParams(stop=["Japan is Tokyo"]), [1])
    emitted = ""
    for token_id in ids:
        delta, stop = detok.update([token_id], finished=False)
        emitted += delta
        assert "Japan" not in emitted  # might have been the start of the stop string
        if stop:
            break
    assert emitted == TEXT[: TEXT.index("Japan is Tokyo")]


def test_false_alarm_is_released(default_tokenizer: Tokenizer, stream_kind: str) -> None:
    ids = _encode(default_tokenizer, "Tokyo. Tokyo is big")
    deltas, detok = _stream(default_tokenizer, ids, SamplingParams(stop=["Tokyo!"]))
    assert "".join(deltas) == "Tokyo. Tokyo is big" and detok.stop_string is None
    assert deltas[-1] == " big"  # nothing was still held back at the end


def test_held_back_text_released_when_finished(default_tokenizer: Tokenizer) -> None:
    ids = _encode(default_tokenizer, "The answer is Tok")
    deltas, _ = _stream(default_tokenizer, ids, SamplingParams(stop=["Tokyo"]))
    assert deltas[-1].endswith(" Tok") and "".join(deltas) == "The answer is Tok"


def test_include_stop_str_in_output(default_tokenizer: Tokenizer, stream_kind: str) -> None:
    ids = _encode(default_tokenizer, TEXT)
    params = SamplingParams(stop=["xyz", "Japan"], include_stop_str_in_output=True)
    deltas, detok = _stream(default_tokenizer, ids, params)
    assert "".join(deltas) == TEXT[: TEXT.index("Japan") + len("Japan")]
    assert detok.stop_string == "Japan"


def test_earliest_stop_wins_within_one_update(default_tokenizer: Tokenizer) -> None:
    ids = _encode(default_tokenizer, TEXT)
    params = SamplingParams(stop=["big", "capital"])
    deltas, detok = _stream(default_tokenizer, ids, params, step=len(ids))  # one multi-token step
    assert deltas == [TEXT[: TEXT.index("capital")]]
    assert detok.stop_string == "capital"
    assert detok.num_tokens < len(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(default_tokenizer: Tokenizer, skip: bool, stream_kind: str) -> None:
    ids = [*_encode(default_tokenizer, "Hello"), *default_tokenizer.eos_token_ids]
    deltas, _ = _stream(default_tokenizer, ids, SamplingParams(skip_special_tokens=skip))
    assert "".join(deltas) == ("Hello" if skip else "Hello<|im_end|>")
