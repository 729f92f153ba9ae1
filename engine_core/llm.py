"""The offline API: `LLM(model).generate(prompts, params)` in one process, no sockets."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec
from tqdm import tqdm

from engine_core.engine import EngineCore
from engine_core.lora_request import LoRARequest, per_prompt_refs
from engine_core.messages.config import EngineConfig, parse_size
from engine_core.messages.frontend import AddRequest, RequestDelta
from engine_core.messages.lora import LoRARef
from engine_core.messages.sampling_params import SamplingParams
from engine_core.outputs import CompletionOutput, RequestOutput
from engine_core.scheduler import scheduler_for
from models.detokenizer import IncrementalDetokenizer
from models.loader import resolve_model
from models.lora_files import read_adapter
from models.runner import ModelRunner
from models.tokenizer import load_tokenizer

Prompt = str | list[int]


@dataclass
class _Sample:
    """One child request in flight: where its output goes and its text state."""

    output: CompletionOutput
    detokenizer: IncrementalDetokenizer
    request: RequestOutput


class LLM:
    """Generate offline with the same scheduler, runner and sampler the server uses.

    `model=None` loads the embedded SmolLM2-135M-Instruct; a path loads a GGUF file or a
    Hugging Face folder. Keyword arguments mirror the `duet serve` flags.
    """

    def __init__(
        self,
        model: str | None = None,
        *,
        kv_cache_memory: str | int = "1GiB",
        chat_template: str | None = None,
        **engine_args: object,
    ) -> None:
        memory = (
            parse_size(kv_cache_memory) if isinstance(kv_cache_memory, str) else kv_cache_memory
        )
        self.config = EngineConfig(model=model, kv_cache_memory=memory, **engine_args)
        self.tokenizer = load_tokenizer(resolve_model(model), chat_template=chat_template)
        self.runner = ModelRunner(self.config)
        scheduler = scheduler_for(
            self.config, self.runner.model_config, self.runner.num_blocks, self.runner.max_model_len
        )
        self.engine = EngineCore(scheduler, self.runner)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Complete each prompt (text or token ids); results come back in prompt order.

        `lora_request` (one for all prompts, or one per prompt) picks a LoRA adapter; the
        LLM must be built with `enable_lora=True`."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        texts = [p if isinstance(p, str) else None for p in prompts]
        token_ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        loras = per_prompt_refs(lora_request, len(token_ids))
        for ref in dict.fromkeys(r for r in loras if r is not None):
            self._check_lora(ref)
        return self._run(texts, token_ids, sampling_params, use_tqdm, loras)

    def chat(
        self,
        conversations: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to each conversation, then generate."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]  # type: ignore[list-item]
        token_ids = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations
        ]
        return self._run([None] * len(token_ids), token_ids, sampling_params, use_tqdm)

    def _check_lora(self, ref: LoRARef) -> None:
        """Refuse an adapter before queuing anything (LoRAError, one line)."""
        if not self.config.enable_lora:
            raise ValueError("LoRA adapters need LLM(..., enable_lora=True)")
        read_adapter(ref.path, self.runner.model_config, self.config.max_lora_rank)

    def _run(
        self,
        texts: list[str | None],
        token_ids: list[list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None,
        use_tqdm: bool,
        loras: Sequence[LoRARef | None] | None = None,
    ) -> list[RequestOutput]:
        params = _per_prompt(sampling_params, len(token_ids))
        loras = loras or [None] * len(token_ids)
        results: list[RequestOutput] = []
        samples: dict[str, _Sample] = {}
        now = time.monotonic()
        for text, ids, p, lora in zip(texts, token_ids, params, loras, strict=True):
            p.validate()
            request_id = str(next(self._ids))
            result = RequestOutput(request_id, text, ids, [CompletionOutput(i) for i in range(p.n)])
            results.append(result)
            for child, child_params in enumerate(_child_params(p)):
                child_id = f"{request_id}-{child}"
                samples[child_id] = _Sample(
                    result.outputs[child],
                    IncrementalDetokenizer(self.tokenizer, child_params, ids),
                    result,
                )
                self.engine.add_request(AddRequest(child_id, ids, child_params, now, lora=lora))
        bar = tqdm(total=len(samples), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for delta in self.engine.step():
                if self._absorb(samples[delta.request_id], delta):
                    bar.update(1)
        bar.close()
        return results

    def _absorb(self, sample: _Sample, delta: RequestDelta) -> bool:
        """Fold one step's delta into a sample; True when the sample has finished."""
        out = sample.output
        if delta.error:
            raise ValueError(delta.error)
        out.token_ids.extend(delta.new_token_ids)
        sample.request.num_cached_tokens = delta.num_cached_tokens
        if delta.prompt_logprobs is not None:
            sample.request.prompt_logprobs = [None, *delta.prompt_logprobs]
        if delta.new_logprobs is not None:
            out.logprobs = (out.logprobs or []) + delta.new_logprobs
        text, stop_string = sample.detokenizer.update(
            delta.new_token_ids, delta.finish_reason is not None
        )
        out.text += text
        if stop_string is not None and delta.finish_reason is None:
            self.engine.abort_requests([delta.request_id])
            out.finish_reason, out.stop_reason = "stop", stop_string
            return True
        if delta.finish_reason is not None:
            out.finish_reason = delta.finish_reason.api_name
            out.stop_reason = stop_string if stop_string is not None else delta.stop_reason
            return True
        return False


def _per_prompt(
    params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    if len(params) != count:
        raise ValueError(f"got {len(params)} sampling params for {count} prompts")
    return list(params)


def _child_params(params: SamplingParams) -> list[SamplingParams]:
    """n samples become n requests; seeded ones get seed + i so they differ."""
    if params.n == 1:
        return [params]
    return [
        msgspec.structs.replace(params, n=1, seed=None if params.seed is None else params.seed + i)
        for i in range(params.n)
    ]
