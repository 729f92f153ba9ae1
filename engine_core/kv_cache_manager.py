"""Block tables of one worker pool's requests, with prefix caching over the block pool."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from engine_core.block_pool import BlockPool, KVBlock
from engine_core.request import BlockHash, Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class Reserved(NamedTuple):
    """Blocks reserved for KV coming in: how many leading ones this pool already had
    (cached, reused as they are), and the ids of the fresh ones the KV must fill."""

    num_reused: int
    block_ids: list[int]


class KVCacheManager:
    """Owns which blocks each request holds in one pool, and finds prefix-cache hits.

    A full block enters the prefix cache only after the worker has computed it (see
    `cache_blocks`), so a hit never points at KV that is still being written.
    Prefix-cache counters are in tokens and count each admission of a request once.
    """

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True
    ) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._num_cached: dict[str, int] = {}  # leading blocks already published
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    @property
    def usage(self) -> float:
        return self.pool.usage

    @property
    def capacity_tokens(self) -> int:
        """Tokens one request could hold if it had the whole pool."""
        return (self.pool.num_blocks - 1) * self.block_size

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """Longest cached prefix of a request that holds no blocks: (blocks, tokens)."""
        # as vLLM: prompt logprobs need every prompt position's hidden state, so no hits
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        # NOTE: the last token is always recomputed so the step has logits to sample from.
        hits = self._cached_prefix(request, (request.num_tokens - 1) // self.block_size)
        return hits, len(hits) * self.block_size

    def first_missing_block(self, request: Request, num_tokens: int) -> BlockHash | None:
        """The hash of the first block `reserve(request, num_tokens)` would not find cached
        here (None: every block it could share is cached)."""
        max_blocks = (num_tokens - 1) // self.block_size
        hits = len(self._cached_prefix(request, max_blocks))
        return (
            request.block_hashes[hits]
            if hits < min(max_blocks, len(request.block_hashes))
            else None
        )

    def _cached_prefix(self, request: Request, max_blocks: int) -> list[KVBlock]:
        """The cached blocks that match the request's first block hashes, at most `max_blocks`."""
        hits: list[KVBlock] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        new_computed_blocks: Sequence[KVBlock] = (),
    ) -> list[int] | None:
        """Make room for `num_new_tokens` tokens past the computed ones (and those the plans
        in flight compute); None if the pool can't.

        `new_computed_blocks` are the prefix-cache hits from `get_computed_blocks`, passed
        only when the request is admitted; they cover the tokens just before the new ones.
        Returns the ids of the freshly allocated blocks (not the hits).
        """
        req_id = request.request_id
        admitted = req_id in self._blocks
        held = self._blocks.get(req_id, [])
        if new_computed_blocks and admitted:
            raise ValueError(f"{req_id}: cache hits are only taken at admission")
        num_hits = len(new_computed_blocks)
        num_tokens = request.num_planned_computed + num_hits * self.block_size + num_new_tokens
        num_needed = max(cdiv(num_tokens, self.block_size) - len(held) - num_hits, 0)
        if admitted and num_needed == 0:
            return []  # most decode steps: the last block still has room
        # hits sitting in the free queue stop being free once touched
        num_free_hits = sum(1 for block in new_computed_blocks if block.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_free_hits:
            return None
        if not admitted:
            self._record_admission(request, num_hits)
            self._num_cached[req_id] = num_hits
        self.pool.touch(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_needed)
        self._blocks[req_id] = [*held, *new_computed_blocks, *new_blocks]
        return [block.block_id for block in new_blocks]

    def holds(self, request: Request) -> bool:
        return request.request_id in self._blocks

    def reserve(self, request: Request, num_tokens: int) -> Reserved | None:
        """Blocks for the first `num_tokens` tokens of a request that holds none here.

        For KV that another worker computed and will transfer in: the full blocks this
        pool already caches (looked up by hash, the way prefix caching matches) are taken
        as they are, so only the rest must move; the last block always moves, so every
        transfer carries something. The fresh blocks are published (cache_blocks) only
        once the request runs here. None if the pool has no room.
        """
        if self.holds(request):
            return None
        hits = self._cached_prefix(request, (num_tokens - 1) // self.block_size)
        num_needed = cdiv(num_tokens, self.block_size) - len(hits)
        # hits sitting in the free queue stop being free once touched
        num_free_hits = sum(1 for block in hits if block.ref_cnt == 0)
        if num_needed > self.pool.num_free_blocks - num_free_hits:
            return None
        self.pool.touch(hits)
        blocks = self.pool.get_new_blocks(num_needed)
        self._blocks[request.request_id] = [*hits, *blocks]
        self._num_cached[request.request_id] = len(hits)
        return Reserved(len(hits), [block.block_id for block in blocks])

    def cache_blocks(self, request: Request) -> None:
        """Publish the request's full blocks that are now computed (call after each step)."""
        held = self._blocks.get(request.request_id)
        if not self.enable_prefix_caching or held is None:
            return
        start = self._num_cached[request.request_id]
        end = min(request.num_computed_tokens // self.block_size, len(request.block_hashes))
        for index in range(start, end):
            self.pool.cache_block(held[index], request.block_hashes[index])
        self._num_cached[request.request_id] = max(start, end)

    def can_extend(self, request: Request, num_new_tokens: int, reserve: int = 0) -> bool:
        """Whether a running request's slots can grow by `num_new_tokens` and still leave
        `reserve` blocks free (for requests scheduled after it)."""
        held = len(self._blocks.get(request.request_id, ()))
        total = request.num_computed_tokens + num_new_tokens
        return cdiv(total, self.block_size) - held + reserve <= self.pool.num_free_blocks

    def trim(self, request: Request) -> None:
        """Free the tail blocks past what the request's computed tokens need.

        After rejected draft tokens are rolled back: a request then holds exactly the
        blocks it would hold without speculation. The freed blocks held only draft KV,
        were never published, and the worker drops the same tail (ModelRunner mirrors it).
        """
        held = self._blocks.get(request.request_id)
        if held is None:
            return
        keep = cdiv(request.num_computed_tokens, self.block_size)
        if len(held) > keep:
            self.pool.free_blocks(reversed(held[keep:]))
            del held[keep:]

    def free(self, request: Request) -> None:
        """Release every block the request holds (no-op if it holds none)."""
        held = self._blocks.pop(request.request_id, [])
        self._num_cached.pop(request.request_id, None)
        # NOTE: tail first, so a request's private suffix is evicted before the shared prefix.
        self.pool.free_blocks(reversed(held))

    def get_block_ids(self, request: Request) -> list[int]:
        return [block.block_id for block in self._blocks.get(request.request_id, [])]

    def _record_admission(self, request: Request, num_hit_blocks: int) -> None:
        if self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_hit_blocks * self.block_size
