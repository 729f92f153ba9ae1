"""Block pool, free queue and KV cache manager: bookkeeping invariants and prefix caching."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine_core.block_pool import BlockPool, FreeBlockQueue, KVBlock
from engine_core.kv_cache_manager import KVCacheManager, cdiv
from engine_core.messages.sampling_params import SamplingParams
from engine_core.request import Request, hash_block_tokens

BS = 4  # block size for every test here


def make_request(req_id: str, prompt: list[int], salt: str | None = None) -> Request:
    return Request(req_id, prompt, SamplingParams(), BS, cache_salt=salt)


def run_prefill(kv: KVCacheManager, request: Request) -> list[int]:
    """Admit a request with its cache hits and 'compute' its whole prompt."""
    hits, num_hit = kv.get_computed_blocks(request)
    assert kv.allocate_slots(request, request.num_tokens - num_hit, hits) is not None
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request)
    return kv.get_block_ids(request)


# -- free queue ------------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(st.sampled_from(["pop", "append", "appendleft", "remove"]), st.integers(0, 7))
    )
)
def test_free_queue_matches_a_list(ops: list[tuple[str, int]]) -> None:
    blocks = [KVBlock(i) for i in range(8)]
    queue = FreeBlockQueue(blocks)
    model = list(blocks)
    for op, index in ops:
        block = blocks[index]
        if op == "pop" and model:
            assert queue.popleft() is model.pop(0)
        elif op in ("append", "appendleft") and block not in model:
            getattr(queue, op)(block)
            model.insert(len(model) if op == "append" else 0, block)
        elif op == "remove" and block in model:
            queue.remove(block)
            model.remove(block)
        assert list(queue) == model
        assert len(queue) == len(model)


def test_free_queue_rejects_double_insert_and_double_remove() -> None:
    block = KVBlock(1)
    queue = FreeBlockQueue([block])
    with pytest.raises(ValueError):
        queue.append(block)
    queue.remove(block)
    with pytest.raises(ValueError):
        queue.remove(block)
    with pytest.raises(IndexError):
        queue.popleft()


# -- block pool ------------------------------------------------------------------------


def test_block_zero_is_never_handed_out() -> None:
    pool = BlockPool(5)
    ids = [b.block_id for b in pool.get_new_blocks(4)]
    assert sorted(ids) == [1, 2, 3, 4]
    assert pool.usage == 1.0
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)


def test_double_free_raises() -> None:
    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(ValueError):
        pool.free_blocks([block])


def test_cached_free_blocks_are_evicted_lru_and_lose_their_hash() -> None:
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(4)
    hashes = [hash_block_tokens(None, [i]) for i in range(4)]
    for block, block_hash in zip(blocks, hashes, strict=True):
        pool.cache_block(block, block_hash)
    order = [blocks[2], blocks[0], blocks[3], blocks[1]]
    pool.free_blocks(order)
    for expected in order:
        (got,) = pool.get_new_blocks(1)
        assert got is expected
        assert got.block_hash is None
        assert pool.get_cached_block(hashes[blocks.index(got)]) is None
    assert pool.cached == {}


def test_uncached_blocks_are_reused_before_cached_ones() -> None:
    pool = BlockPool(4)
    cached, plain = pool.get_new_blocks(2)
    pool.cache_block(cached, hash_block_tokens(None, [1]))
    pool.free_blocks([cached, plain])
    got = pool.get_new_blocks(2)
    assert cached not in got  # the never-used block 3 and the worthless `plain` go first
    assert pool.get_cached_block(hash_block_tokens(None, [1])) is cached


def test_touch_takes_a_cached_free_block_out_of_the_free_queue() -> None:
    pool = BlockPool(3)
    (block,) = pool.get_new_blocks(1)
    pool.cache_block(block, hash_block_tokens(None, [1]))
    pool.free_blocks([block])
    assert pool.num_free_blocks == 2
    pool.touch([block])
    assert block.ref_cnt == 1
    assert pool.num_free_blocks == 1
    assert block not in list(pool.free_queue)


# -- KV cache manager ------------------------------------------------------------------


def test_prefix_hit_returns_the_same_blocks_even_after_the_owner_finished() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    first = make_request("a", list(range(10)))
    first_ids = run_prefill(kv, first)
    second = make_request("b", [*range(8), 50, 51, 52])
    hits, num_hit = kv.get_computed_blocks(second)
    assert num_hit == 8
    assert [b.block_id for b in hits] == first_ids[:2]
    assert (
        kv.allocate_slots(second, second.num_tokens - num_hit, hits) == kv.get_block_ids(second)[2:]
    )
    assert kv.get_block_ids(second)[:2] == first_ids[:2]
    assert [kv.pool.blocks[i].ref_cnt for i in first_ids[:2]] == [2, 2]
    kv.free(first)
    kv.free(second)
    third = make_request("c", [*range(8), 60])
    assert [b.block_id for b in kv.get_computed_blocks(third)[0]] == first_ids[:2]


def test_a_finished_request_is_evicted_tail_first() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=BS)  # 4 usable blocks
    first = make_request("a", list(range(13)))  # 4 blocks, the first 3 full and cached
    ids = run_prefill(kv, first)
    kv.free(first)
    other = make_request("b", [50] * 8)
    kv.allocate_slots(other, 8)
    assert kv.get_block_ids(other) == [ids[3], ids[2]]  # the shared prefix survives longest
    assert kv.get_computed_blocks(make_request("c", list(range(13))))[1] == 8


def test_last_prompt_token_is_never_a_cache_hit() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    run_prefill(kv, make_request("a", list(range(8))))
    _, num_hit = kv.get_computed_blocks(make_request("b", list(range(8))))
    assert num_hit == 4  # the second block holds the last token, which must be computed


def test_cache_salt_separates_prefixes() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    run_prefill(kv, make_request("a", list(range(9)), salt="alice"))
    assert kv.get_computed_blocks(make_request("b", list(range(9)), salt="bob"))[1] == 0
    assert kv.get_computed_blocks(make_request("c", list(range(9))))[1] == 0
    assert kv.get_computed_blocks(make_request("d", list(range(9)), salt="alice"))[1] == 8


def test_no_hits_when_prefix_caching_is_disabled() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS, enable_prefix_caching=False)
    run_prefill(kv, make_request("a", list(range(9))))
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert kv.pool.cached == {}


def test_blocks_are_cached_only_once_computed() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    request = make_request("a", list(range(9)))
    kv.allocate_slots(request, 9)
    kv.cache_blocks(request)
    assert kv.get_computed_blocks(make_request("b", list(range(9))))[1] == 0
    request.num_computed_tokens = 5
    kv.cache_blocks(request)
    assert kv.get_computed_blocks(make_request("c", list(range(9))))[1] == 4


def test_failed_allocation_changes_nothing_and_counts_nothing() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=BS)  # 3 usable blocks
    cached = make_request("a", list(range(9)))
    run_prefill(kv, cached)
    kv.free(cached)  # 2 cached free blocks + 1 plain free block
    big = make_request("b", [*range(8), *range(100, 108)])  # hits 2 blocks, needs 2 more
    hits, num_hit = kv.get_computed_blocks(big)
    assert num_hit == 8
    assert kv.allocate_slots(big, big.num_tokens - num_hit, hits) is None
    assert kv.pool.num_free_blocks == 3
    assert all(block.ref_cnt == 0 for block in hits)
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (9, 0)


def test_prefix_cache_counters_are_in_tokens_per_admission() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    first = make_request("a", list(range(9)))
    run_prefill(kv, first)
    kv.allocate_slots(first, 1)  # a decode step is not a new query
    run_prefill(kv, make_request("b", list(range(10))))
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (19, 8)


# -- random operation sequences ---------------------------------------------------------

NUM_BLOCKS = 12
PREFIXES = [[], [1, 2, 3, 4, 5], [1, 2, 3, 4, 6, 7, 8, 9, 10], [7] * 9]


def next_token(tokens: list[int]) -> int:
    # deterministic, so equal prefixes keep growing alike and share blocks
    return (sum(tokens) + len(tokens)) % 4


class KVCacheMachine(RuleBasedStateMachine):
    """Random admissions, chunked steps, finishes and preemptions over one manager.

    `content` stands in for the KV tensors: each slot records which (salt, token prefix)
    was computed into it, so a prefix hit that points at the wrong KV fails loudly.
    """

    def __init__(self) -> None:
        super().__init__()
        self.kv = KVCacheManager(NUM_BLOCKS, BS)
        self.live: dict[str, Request] = {}  # hold blocks
        self.parked: dict[str, Request] = {}  # preempted: no blocks, tokens kept
        self.content: dict[int, object] = {}  # block_id * BS + offset -> KV identity
        self.count = 0

    @rule(
        prefix=st.sampled_from(PREFIXES),
        tail=st.lists(st.integers(0, 3), max_size=6),
        salt=st.sampled_from([None, "s"]),
        chunk=st.integers(1, 12),
    )
    def admit_new(self, prefix: list[int], tail: list[int], salt: str | None, chunk: int) -> None:
        self.count += 1
        prompt = [*prefix, *tail] or [0]
        self._admit(make_request(f"r{self.count}", prompt, salt), chunk)

    @precondition(lambda self: self.parked)
    @rule(data=st.data(), chunk=st.integers(1, 12))
    def resume(self, data: st.DataObject, chunk: int) -> None:
        request = self.parked.pop(data.draw(st.sampled_from(sorted(self.parked))))
        self._admit(request, chunk)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), chunk=st.integers(1, 12))
    def step(self, data: st.DataObject, chunk: int) -> None:
        request = self.live[data.draw(st.sampled_from(sorted(self.live)))]
        num_new = min(chunk, request.num_tokens - request.num_computed_tokens)
        if self.kv.allocate_slots(request, num_new) is not None:
            self._compute(request, num_new)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), preempt=st.booleans())
    def release(self, data: st.DataObject, preempt: bool) -> None:
        request = self.live.pop(data.draw(st.sampled_from(sorted(self.live))))
        self.kv.free(request)
        if preempt:
            request.num_computed_tokens = 0
            self.parked[request.request_id] = request

    def _admit(self, request: Request, chunk: int) -> None:
        hits, num_hit = self.kv.get_computed_blocks(request)
        assert num_hit < request.num_tokens
        for pos in range(num_hit):
            assert self.content[self._slot(hits, pos)] == self._identity(request, pos)
        num_new = min(chunk, request.num_tokens - num_hit)
        if self.kv.allocate_slots(request, num_new, hits) is None:
            self.parked[request.request_id] = request
            return
        request.num_computed_tokens = num_hit
        self.live[request.request_id] = request
        self._compute(request, num_new)

    def _compute(self, request: Request, num_new: int) -> None:
        blocks = [self.kv.pool.blocks[i] for i in self.kv.get_block_ids(request)]
        start = request.num_computed_tokens
        for pos in range(start, start + num_new):
            block = blocks[pos // BS]
            # writing into shared or published KV would corrupt another request
            assert block.ref_cnt == 1 and block.block_hash is None
            self.content[self._slot(blocks, pos)] = self._identity(request, pos)
        request.num_computed_tokens += num_new
        self.kv.cache_blocks(request)
        if request.num_computed_tokens == request.num_tokens and request.num_tokens < 40:
            request.append_output_token(next_token(request.all_token_ids))

    @staticmethod
    def _slot(blocks: list[KVBlock], pos: int) -> int:
        return blocks[pos // BS].block_id * BS + pos % BS

    @staticmethod
    def _identity(request: Request, pos: int) -> object:
        return (request.cache_salt, tuple(request.all_token_ids[: pos + 1]))

    @invariant()
    def ref_counts_equal_holders(self) -> None:
        tables = {rid: self.kv.get_block_ids(r) for rid, r in self.live.items()}
        holders = Counter(i for ids in tables.values() for i in ids)
        for block in self.kv.pool.blocks:
            assert block.ref_cnt == holders[block.block_id]
        for rid, ids in tables.items():
            assert len(set(ids)) == len(ids) and 0 not in ids
            assert len(ids) == cdiv(self.live[rid].num_computed_tokens, BS)
        for request in self.parked.values():
            assert self.kv.get_block_ids(request) == []

    @invariant()
    def free_queue_is_exactly_the_unreferenced_blocks(self) -> None:
        free = [block.block_id for block in self.kv.pool.free_queue]
        assert len(free) == len(set(free)) == self.kv.pool.num_free_blocks
        unreferenced = {b.block_id for b in self.kv.pool.blocks[1:] if b.ref_cnt == 0}
        assert set(free) == unreferenced

    @invariant()
    def cache_map_agrees_with_blocks(self) -> None:
        for block_hash, block in self.kv.pool.cached.items():
            assert block.block_hash == block_hash
        published = [b for b in self.kv.pool.blocks if b.block_hash is not None]
        assert len(published) == len(self.kv.pool.cached)

    def teardown(self) -> None:
        for request in self.live.values():
            self.kv.free(request)
        pool = self.kv.pool
        assert pool.num_free_blocks == NUM_BLOCKS - 1
        assert pool.usage == 0.0
        assert all(block.ref_cnt == 0 for block in pool.blocks)


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestKVCacheManager = KVCacheMachine.TestCase
