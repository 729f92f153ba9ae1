"""Grammar-constrained decoding: compiling StructuredSpecs and masking logits with them.

A request's matcher state is a pure function of (spec, output tokens so far), so a worker
that meets a request in any way (new, resumed after preemption, recomputed after a worker
died, handed over from a prefill worker with its first token) rebuilds it by replaying
the output tokens; nothing about the grammar crosses a process boundary but the spec.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence

import torch
import xgrammar as xgr

from engine_core.messages.sampling_params import StructuredSpec

logger = logging.getLogger(__name__)

# Compiled grammars are kept (LRU, by spec) up to this many bytes per process.
CACHE_LIMIT_BYTES = 256 * 2**20
# "[03:46:25] /project/cpp/regex_converter.cc:94: " in front of xgrammar's messages
_NATIVE_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class GrammarError(ValueError):
    """A spec that does not compile; the message is fit for a client."""


def tokenizer_info(hf_tokenizer: object, vocab_size: int, eos: Sequence[int]) -> xgr.TokenizerInfo:
    """xgrammar's view of the tokenizer; `vocab_size` is the model's logits width (the
    tokenizer may have fewer ids: the bitmask must cover every logit)."""
    return xgr.TokenizerInfo.from_huggingface(
        hf_tokenizer, vocab_size=vocab_size, stop_token_ids=list(eos)
    )


def make_compiler(hf_tokenizer: object, vocab_size: int, eos: Sequence[int]) -> xgr.GrammarCompiler:
    """A caching compiler for one tokenizer (see tokenizer_info)."""
    return compiler_for(tokenizer_info(hf_tokenizer, vocab_size, eos))


def compiler_for(info: xgr.TokenizerInfo) -> xgr.GrammarCompiler:
    return xgr.GrammarCompiler(info, max_threads=1, cache_limit_bytes=CACHE_LIMIT_BYTES)


def compile_spec(compiler: xgr.GrammarCompiler, spec: StructuredSpec) -> xgr.CompiledGrammar:
    """Compile `spec` (cached by the compiler); raise GrammarError if it is invalid.

    JSON is generated without free whitespace, so an object's length is bounded by its
    content and it finishes inside the token budget.
    """
    try:
        if spec.kind == "json":
            return compiler.compile_json_schema(spec.spec, any_whitespace=False, strict_mode=True)
        if spec.kind == "json_object":
            return compiler.compile_json_schema(
                '{"type": "object"}', any_whitespace=False, strict_mode=False
            )
        if spec.kind == "regex":
            return compiler.compile_regex(spec.spec)
        if spec.kind == "grammar":
            return compiler.compile_grammar(spec.spec)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise GrammarError(_NATIVE_PREFIX.sub("", str(exc)).strip()) from None
    raise GrammarError(f"unknown structured output kind {spec.kind!r}")


class RequestGrammar:
    """One request's matcher; `accept` each token the request outputs, in order."""

    def __init__(
        self,
        compiled: xgr.CompiledGrammar,
        eos: Sequence[int],
        allowed: torch.Tensor | None = None,
    ) -> None:
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(eos))
        self.eos = list(eos)
        self.allowed = allowed  # a bitmask row ANDed into every mask, if any
        self.broken = False  # a token the grammar refused: stop constraining, say so once

    def accept(self, token_id: int) -> None:
        if self.broken or self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(token_id):
            # Only a sampler stage that overrides the mask (e.g. min_tokens banning the
            # EOS the grammar demands) gets here; the output is no longer constrained.
            logger.warning("token %d does not fit the grammar; constraint dropped", token_id)
            self.broken = True

    def fill(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write this request's allowed tokens into `bitmask[row]`; False: no constraint."""
        if self.broken:
            return False
        if self.matcher.is_terminated():
            # Done (only with ignore_eos does the request go on): allow only EOS.
            bitmask[row] = 0
            for token in self.eos:
                bitmask[row, token // 32] |= _bit(token % 32)
            return True
        self.matcher.fill_next_token_bitmask(bitmask, row)
        if self.allowed is not None:
            bitmask[row] &= self.allowed
        return True


def _without_control_bytes(decoded_vocab: Sequence[bytes], vocab_size: int) -> torch.Tensor:
    """A bitmask row allowing every token but those whose bytes hold 0x00-0x1F."""
    row = xgr.allocate_token_bitmask(1, vocab_size)[0]
    for token, text in enumerate(decoded_vocab):
        if any(byte < 0x20 for byte in text):
            row[token // 32] &= ~_bit(token % 32)
    return row


def _bit(index: int) -> int:
    # int32 words: bit 31 is the sign bit
    return (1 << index) - (1 << 32 if index == 31 else 0)


class GrammarMasker:
    """A worker's structured-output side: builds RequestGrammars, masks batch logits."""

    def __init__(self, hf_tokenizer: object, vocab_size: int, eos: Sequence[int]) -> None:
        info = tokenizer_info(hf_tokenizer, vocab_size, eos)
        self.compiler = compiler_for(info)
        self.vocab_size = vocab_size
        self.eos = tuple(eos)
        self._bitmask = xgr.allocate_token_bitmask(1, vocab_size)  # [rows, ceil(V/32)]
        self._no_control = _without_control_bytes(info.decoded_vocab, vocab_size)

    def request(self, spec: StructuredSpec, output_token_ids: Sequence[int]) -> RequestGrammar:
        """A matcher for `spec` that has already accepted `output_token_ids`."""
        # NOTE: xgrammar 0.2.9 lets a string with maxLength take raw control characters,
        # which JSON forbids; JSON here has no free whitespace, so no control byte is ever
        # valid in it and they are banned outright
        allowed = self._no_control if spec.kind in ("json", "json_object") else None
        grammar = RequestGrammar(compile_spec(self.compiler, spec), self.eos, allowed)
        for token in output_token_ids:
            grammar.accept(token)
        return grammar

    def apply(self, logits: torch.Tensor, grammars: Sequence[RequestGrammar | None]) -> float:
        """Mask `logits` [S, V] in place: row i keeps only what grammars[i] allows.

        Returns the seconds it took (the structured-output overhead of the step).
        """
        if not any(grammars):
            return 0.0
        start = time.perf_counter()
        if self._bitmask.shape[0] < len(grammars):
            self._bitmask = xgr.allocate_token_bitmask(len(grammars), self.vocab_size)
        rows = [i for i, g in enumerate(grammars) if g is not None and g.fill(self._bitmask, i)]
        if rows:
            xgr.apply_token_bitmask_inplace(
                logits, self._bitmask[: len(grammars)], vocab_size=self.vocab_size, indices=rows
            )
        return time.perf_counter() - start
