"""The model runner: one worker's model, KV pool and request state; executes step plans."""

from __future__ import annotations

import logging
import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine_core.messages.config import EngineConfig
from engine_core.messages.lora import LoRARef
from engine_core.messages.worker import NewRequestData, StepPlan, StepResult
from kernels.metadata import AttentionMetadata
from models import cpu_features
from models.config import ModelConfig
from models.llama import LlamaForCausalLM
from models.loader import ModelSource, load_config, resolve_model
from models.lora import LoRAManager
from models.packed import packing_kind
from models.prompt_logprobs import step_prompt_logprobs
from models.quant_int8 import check_quantization, quantize_model
from models.rejection_sampler import verify
from models.sampler import SamplingState, sample
from models.smooth_quant import CALIBRATION_TEXT
from models.structured import GrammarMasker, RequestGrammar
from models.weights import iter_weights

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (shape, dtype) -> KV pool tensor; the shm connector passes one that lives in shared memory.
KVAllocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def zeros_allocator(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled pool that costs nothing at start-up.

    An anonymous mapping reads as zeros by definition and its pages are faulted in when a
    block is first written, instead of `torch.zeros` touching every page of a GiB-sized pool
    before the worker is ready (seconds on a VM). Zeros matter: the torch attention path
    multiplies masked slots by 0, which stale garbage could turn into NaN.

    Private, not mmap's default shared mapping: shared anonymous pages are shmem, whose
    first touch cost ~8x a private page's on a Zen 5 VM (1.3 against 0.17 s per 512 MB), paid
    inside the forward that first writes a block (4 % of a served c16 run's worker time).
    No MADV_HUGEPAGE: where the kernel compacts memory for it on the fault, a first touch
    measured slower still (1.1 s per 512 MB).
    """
    pool = mmap.mmap(-1, math.prod(shape) * dtype.itemsize, flags=mmap.MAP_PRIVATE)
    return torch.frombuffer(pool, dtype=dtype).view(shape)


def model_dtypes(config: EngineConfig) -> tuple[torch.dtype, torch.dtype]:
    """(weights and activations, KV cache) dtypes; `auto` resolves for this CPU."""
    dtype = DTYPES[cpu_features.resolve_dtype(config.dtype)]
    kv = dtype if config.kv_cache_dtype == "auto" else DTYPES[config.kv_cache_dtype]
    return dtype, kv


def kv_block_bytes(model: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes across all layers (K and V)."""
    per_token = 2 * model.num_hidden_layers * model.num_key_value_heads * model.head_dim
    return per_token * block_size * dtype.itemsize


def calibration_ids(source: ModelSource) -> list[int]:
    """CALIBRATION_TEXT in the model's tokens (W8A8 smoothing)."""
    from models.tokenizer import load_tokenizer  # transformers: only when needed

    return load_tokenizer(source).encode(CALIBRATION_TEXT)


@dataclass
class RunnerRequest:
    """The worker's copy of a request: tokens, where its KV lives, how it samples."""

    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingState
    lora: LoRARef | None = None
    grammar: RequestGrammar | None = None  # structured outputs: accepts each output token

    @property
    def num_tokens(self) -> int:
        return len(self.sampling.prompt_token_ids) + len(self.sampling.output_token_ids)

    def token(self, index: int) -> int:
        prompt = self.sampling.prompt_token_ids
        return (
            prompt[index]
            if index < len(prompt)
            else self.sampling.output_token_ids[index - len(prompt)]
        )


class ModelRunner:
    """Loads the model, owns the KV pool, and turns each StepPlan into a StepResult."""

    def __init__(self, config: EngineConfig, kv_allocator: KVAllocator = zeros_allocator) -> None:
        check_quantization(config.quantization)
        source = resolve_model(config.model)
        self.source = source
        self._masker: GrammarMasker | None = None  # built by the first structured request
        self.model_config = load_config(source)
        self.dtype, self.kv_dtype = model_dtypes(config)
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.model = LlamaForCausalLM(self.model_config, max_positions=self.max_model_len)
        # int8 quantizes from the checkpoint's fp32 values, not from bf16-rounded ones
        load_dtype = torch.float32 if config.quantization else self.dtype
        self.model.load_weights(iter_weights(source, load_dtype))
        if config.quantization:
            # LoRA deltas read the linears' inputs, which smoothing rescales: no smoothing,
            # and so float activations unless DUET_INT8_W8A8=1, with LoRA
            calibration = None if config.enable_lora else lambda: calibration_ids(source)
            quantize_model(self.model, self.dtype, calibration)
        self.model.to(self.dtype).eval()
        packed = self.model.pack_weights(fuse_activation=not config.enable_lora)
        self.lora = (
            LoRAManager(self.model, self.model_config, self.dtype, max_loras=config.max_loras,
                        max_lora_rank=config.max_lora_rank, max_cpu_loras=config.max_cpu_loras)
            if config.enable_lora
            else None
        )  # fmt: skip
        stack = self.lora is None and self.model.enable_layer_stack()
        logger.info(
            "dtype %s (asked %s; CPU: %s), KV cache %s, %d linears prepacked (%s)%s",
            self.dtype, config.dtype, cpu_features.describe(), self.kv_dtype, packed,
            packing_kind(self.dtype), ", layers in one native call" if stack else "",
        )  # fmt: skip
        self.num_blocks = config.kv_cache_memory // kv_block_bytes(
            self.model_config, self.block_size, self.kv_dtype
        )
        mc = self.model_config
        shape = (
            mc.num_hidden_layers,
            2,
            self.num_blocks,
            self.block_size,
            mc.num_key_value_heads,
            mc.head_dim,
        )
        self.kv_cache = kv_allocator(shape, self.kv_dtype)  # [L, 2, blocks, block_size, Hkv, D]
        self.requests: dict[str, RunnerRequest] = {}
        logger.info(
            "KV pool: %d blocks of %d tokens (%.2f GiB)",
            self.num_blocks,
            self.block_size,
            self.kv_cache.numel() * self.kv_dtype.itemsize / 2**30,
        )

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step: update request state from the plan, forward, sample."""
        self._apply_plan(plan)
        order = sorted(plan.num_scheduled_tokens, key=lambda r: plan.num_scheduled_tokens[r] != 1)
        if not order:
            return StepResult(step_id=plan.step_id, req_ids=[], sampled_token_ids=[])
        input_ids, positions, meta, sample_rows, sample_ids = self._prepare(
            order, plan.num_scheduled_tokens, plan.spec_token_ids
        )
        if self.lora is not None:
            self.lora.set_batch(
                [(self.requests[r].lora, plan.num_scheduled_tokens[r]) for r in order]
            )
        hidden = self.model(input_ids, positions, self.kv_cache, meta)
        chunks = [(r, meta.query_start_loc_cpu[i], plan.num_scheduled_tokens[r])
                  for i, r in enumerate(order)]  # fmt: skip
        prompt_lp = step_prompt_logprobs(self.model.compute_logits, hidden, chunks, self.requests)
        for req_id in order:
            self.requests[req_id].num_computed_tokens += plan.num_scheduled_tokens[req_id]
        if not sample_ids:
            return StepResult(plan.step_id, [], [], prompt_logprobs=prompt_lp)
        logits = self.model.compute_logits(hidden[sample_rows])  # [S, V]
        states = [self.requests[r].sampling for r in sample_ids]
        grammars = [self.requests[r].grammar for r in sample_ids]
        masking = 0.0
        if self._masker is not None:  # first: the grammar bounds every later stage
            # one logits row per verified position; constrained requests never draft
            rows = [g for r, g in zip(sample_ids, grammars, strict=True)
                    for g in [g, *[None] * len(plan.spec_token_ids.get(r, []))]]  # fmt: skip
            masking = self._masker.apply(logits, rows)
        if plan.spec_token_ids:
            result = self._verify(plan, logits, sample_ids)
            result.prompt_logprobs = prompt_lp
            result.structured_seconds = masking
            return result
        out = sample(logits, states)
        for state, token, grammar in zip(states, out.token_ids, grammars, strict=True):
            state.output_token_ids.append(token)
            if grammar is not None:
                grammar.accept(token)
        wants_logprobs = any(s.params.logprobs is not None for s in states)
        return StepResult(
            step_id=plan.step_id,
            req_ids=sample_ids,
            sampled_token_ids=out.token_ids,
            logprobs=out.logprobs if wants_logprobs else None,
            prompt_logprobs=prompt_lp,
            structured_seconds=masking,
        )

    def _verify(self, plan: StepPlan, logits: torch.Tensor, sample_ids: list[str]) -> StepResult:
        """Sample a step with draft tokens: accept a prefix of each request's drafts, then
        forget the KV of the rejected ones as the core does (KVCacheManager.trim)."""
        drafts = [plan.spec_token_ids.get(r, []) for r in sample_ids]
        states = [self.requests[r].sampling for r in sample_ids]
        out = verify(logits, states, drafts)
        result = StepResult(plan.step_id, sample_ids, out.token_ids)
        for req_id, draft, accepted, token in zip(
            sample_ids, drafts, out.accepted, out.token_ids, strict=True
        ):
            req = self.requests[req_id]
            req.sampling.output_token_ids += [*accepted, token]
            if req.grammar is not None:  # it had no drafts (NgramSpeculator.propose)
                req.grammar.accept(token)
            if draft:
                result.accepted_token_ids[req_id] = accepted
                req.num_computed_tokens -= len(draft) - len(accepted)
                del req.block_ids[-(-req.num_computed_tokens // self.block_size) :]
        if any(s.params.logprobs is not None for s in states):
            result.logprobs = out.logprobs
            result.accepted_logprobs = {
                r: lps
                for r, lps, d in zip(sample_ids, out.accepted_logprobs, drafts, strict=True)
                if lps is not None and d
            }
        return result

    def _apply_plan(self, plan: StepPlan) -> None:
        for req_id in plan.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in plan.new_requests:
            self.requests[new.req_id] = self._new_request(new)
        for cached in plan.cached_requests:
            req = self.requests[cached.req_id]
            req.block_ids.extend(cached.new_block_ids)
            req.num_computed_tokens = cached.num_computed_tokens
            req.sampling.output_token_ids.extend(cached.new_token_ids)
            if req.grammar is not None:
                for token in cached.new_token_ids:
                    req.grammar.accept(token)

    def _new_request(self, new: NewRequestData) -> RunnerRequest:
        state = SamplingState(
            params=new.sampling_params,
            prompt_token_ids=new.token_ids[: new.num_prompt_tokens],
            output_token_ids=new.token_ids[new.num_prompt_tokens :],
            eos_token_ids=self.model_config.eos_token_ids,
        )
        return RunnerRequest(
            block_ids=list(new.block_ids),
            num_computed_tokens=new.num_computed_tokens,
            sampling=state,
            lora=new.lora,
            grammar=self._grammar(state),
        )

    def _grammar(self, state: SamplingState) -> RequestGrammar | None:
        """The request's matcher, replayed over the output it already has (see structured)."""
        spec = state.params.structured
        if spec is None:
            return None
        if self._masker is None:
            from models.tokenizer import load_tokenizer  # transformers: only when needed

            hf = load_tokenizer(self.source).hf
            self._masker = GrammarMasker(hf, self.model_config.vocab_size, state.eos_token_ids)
        return self._masker.request(spec, state.output_token_ids)

    def _prepare(
        self, order: list[str], num_scheduled: dict[str, int], spec: dict[str, list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[str]]:
        """Flatten the scheduled requests (decodes first) into model inputs.

        A request with drafts (`spec`) runs as a multi-token query over its known token and
        the drafts, through the prefill path, and samples at each of those positions.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        sample_rows: list[int] = []
        sample_ids: list[str] = []
        bs = self.block_size
        for req_id in order:
            req = self.requests[req_id]
            start, count = req.num_computed_tokens, num_scheduled[req_id]
            end = start + count
            drafts = spec.get(req_id, [])
            input_ids.extend(req.token(i) for i in range(start, end - len(drafts)))
            input_ids.extend(drafts)
            positions.extend(range(start, end))
            slots.extend(req.block_ids[i // bs] * bs + i % bs for i in range(start, end))
            query_start.append(query_start[-1] + count)
            seq_lens.append(end)
            if end - len(drafts) == req.num_tokens:
                sample_rows.extend(range(query_start[-1] - 1 - len(drafts), query_start[-1]))
                sample_ids.append(req_id)
        max_blocks = max(len(self.requests[r].block_ids) for r in order)
        tables = torch.zeros(len(order), max_blocks, dtype=torch.int32)
        for row, req_id in enumerate(order):
            ids = self.requests[req_id].block_ids
            tables[row, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            block_tables=tables,
            num_decodes=sum(1 for r in order if num_scheduled[r] == 1),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
        )
        ids_t = torch.tensor(input_ids, dtype=torch.int64)
        return ids_t, torch.tensor(positions, dtype=torch.int64), meta, sample_rows, sample_ids
