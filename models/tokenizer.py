"""The model's tokenizer and chat template, behind one small class.

A GGUF carries its tokenizer as metadata, which transformers needs ~6 s to turn into a fast
tokenizer; the result is cached as a tokenizer.json folder so later loads take ~0.2 s.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from models.disk_cache import cache_dir, file_key
from models.loader import ModelLoadError, ModelSource, gguf_metadata, hf_eos_token_ids

logger = logging.getLogger(__name__)

# bump when what the cache holds changes, so stale entries are ignored
_CACHE_FORMAT = 1


class Tokenizer:
    """Text <-> token ids and chat prompts for one model; `.hf` is the fast tokenizer."""

    def __init__(self, hf: PreTrainedTokenizerFast, eos_token_ids: Sequence[int]) -> None:
        self.hf = hf
        self.eos_token_ids: tuple[int, ...] = tuple(eos_token_ids)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return len(self.hf)

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of the special tokens (BOS, EOS, UNK, PAD, ...)."""
        return list(self.hf.all_special_ids)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, or None for models that have none."""
        return self.hf.chat_template

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds BOS where the model wants one."""
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`."""
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat template applied to OpenAI-style messages (and tools), as text.

        Raises ValueError when the model has no chat template.
        """
        if self.chat_template is None:
            raise ValueError("this model has no chat template; pass one with --chat-template")
        return self.hf.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The chat template applied to OpenAI-style messages (and tools), as token ids."""
        # the template writes the special tokens itself, as transformers assumes too
        return self.encode(
            self.render_chat(messages, add_generation_prompt, tools), add_special_tokens=False
        )


def load_tokenizer(source: ModelSource, chat_template: str | None = None) -> Tokenizer:
    """Load the tokenizer of `source`; `chat_template` (a file path or a literal template)
    replaces the model's own.

    Raises ModelLoadError when the tokenizer or the template file cannot be read.
    """
    if source.kind == "gguf":
        hf = _cached_gguf_tokenizer(source)
        eos = [hf.eos_token_id]
    else:
        hf = _hf_folder_tokenizer(source.path)
        eos = [hf.eos_token_id, *hf_eos_token_ids(source.path)]
    if chat_template is not None:
        hf.chat_template = _read_chat_template(chat_template)
    return Tokenizer(hf, [i for i in dict.fromkeys(eos) if i is not None])


def _read_chat_template(value: str) -> str:
    # like vLLM: text with template syntax or line breaks is a template, anything else a path
    # (checked first: a long template is not a valid file name, and stat() would raise)
    if any(c in value for c in "{}\n"):
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text()
    except FileNotFoundError as e:
        raise ModelLoadError(f"chat template file not found: {path}") from e
    except OSError as e:
        raise ModelLoadError(f"cannot read chat template {path}: {e}") from e


def _hf_folder_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    try:
        hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer in {folder}: {e}") from e
    if not hf.is_fast:
        raise ModelLoadError(f"{folder} has no fast tokenizer (tokenizer.json)")
    return hf


def _cached_gguf_tokenizer(source: ModelSource) -> PreTrainedTokenizerFast:
    folder = cache_dir() / "tokenizers" / file_key(source.path, "tokenizer", _CACHE_FORMAT)
    if (folder / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            logger.warning("rebuilding the damaged tokenizer cache %s: %s", folder, e)
            shutil.rmtree(folder, ignore_errors=True)
    hf = _gguf_tokenizer(source)
    _save_atomically(hf, folder)
    return hf


def _gguf_tokenizer(source: ModelSource) -> PreTrainedTokenizerFast:
    path = source.path
    try:
        hf = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"cannot build the tokenizer of {path}: {e}") from e
    # transformers copies the template too, but the GGUF metadata is the source of truth
    template = gguf_metadata(source, "tokenizer.chat_template")
    if template is not None:
        hf.chat_template = template
    return hf


def _save_atomically(hf: PreTrainedTokenizerFast, folder: Path) -> None:
    # NOTE: several processes may build the same entry at once; each writes a private folder
    # and renames it into place, so a reader never sees a half-written one
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    except OSError as e:
        logger.warning("cannot cache the tokenizer in %s: %s", folder.parent, e)
        return
    try:
        hf.save_pretrained(tmp)
        tmp.rename(folder)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():  # else another process got there first
            logger.warning("cannot cache the tokenizer in %s: %s", folder, e)
