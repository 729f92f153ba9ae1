"""KV blocks, the O(1) free-block queue, and the pool that hands blocks out and caches them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from engine_core.request import BlockHash

NULL_BLOCK_ID = 0


class KVBlock:
    """Metadata of one KV block; the tensors live in the workers.

    `prev_free`/`next_free` link the block into the free queue (intrusive, so removal
    from the middle is O(1)); both are None while the block is not in the queue.
    """

    __slots__ = ("block_hash", "block_id", "next_free", "prev_free", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: BlockHash | None = None
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref_cnt={self.ref_cnt})"


class FreeBlockQueue:
    """Doubly-linked queue of free blocks: the head is evicted first.

    Sentinels at both ends keep every operation branch-free and O(1). Linking a block
    that is already linked, or unlinking one that is not, raises: that would be a
    double free or a bookkeeping bug, and it must not pass silently.
    """

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next_free = self._tail
        self._tail.prev_free = self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[KVBlock]:
        node = self._head.next_free
        while node is not self._tail:
            assert node is not None
            yield node
            node = node.next_free

    def popleft(self) -> KVBlock:
        first = self._head.next_free
        if first is self._tail or first is None:
            raise IndexError("no free blocks")
        self.remove(first)
        return first

    def append(self, block: KVBlock) -> None:
        before = self._tail.prev_free
        assert before is not None
        self._link(block, before, self._tail)

    def appendleft(self, block: KVBlock) -> None:
        after = self._head.next_free
        assert after is not None
        self._link(block, self._head, after)

    def remove(self, block: KVBlock) -> None:
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise ValueError(f"block {block.block_id} is not in the free queue")
        prev.next_free = nxt
        nxt.prev_free = prev
        block.prev_free = block.next_free = None
        self._len -= 1

    def _link(self, block: KVBlock, prev: KVBlock, nxt: KVBlock) -> None:
        if block.prev_free is not None or block.next_free is not None:
            raise ValueError(f"block {block.block_id} is already in the free queue")
        block.prev_free, block.next_free = prev, nxt
        prev.next_free = block
        nxt.prev_free = block
        self._len += 1


class BlockPool:
    """All KV blocks of one worker pool: allocation, ref counts, and the prefix cache.

    Block 0 is the null block and is never handed out: workers may point padding slots
    (padded batches, unused block-table entries) at it and scribble there harmlessly.
    A free block keeps its hash, and so stays a cache hit, until it is reused.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("need at least 2 blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks[NULL_BLOCK_ID + 1 :])
        self.cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by requests (free cached blocks count as free)."""
        return 1.0 - self.num_free_blocks / (self.num_blocks - 1)

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Take `n` free blocks (ref_cnt 1), evicting their cached contents if any."""
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} blocks, {self.num_free_blocks} free")
        blocks = [self.free_queue.popleft() for _ in range(n)]
        for block in blocks:
            self._evict(block)
            block.ref_cnt = 1
        return blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take another reference to cache-hit blocks, pulling free ones out of the queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Publish a full, computed block under its hash.

        NOTE: two requests that computed the same content concurrently both own a copy;
        only the first is published, the other stays private and is simply freed later.
        """
        if not self.enable_caching or block_hash in self.cached:
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference to each block; pass them in eviction order (first goes first).

        Blocks that reach zero references rejoin the free queue: uncached ones at the
        head (nothing is lost by reusing them), cached ones at the tail (LRU).
        """
        for block in blocks:
            if block.ref_cnt <= 0:
                raise ValueError(f"double free of block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt > 0:
                continue
            if block.block_hash is None:
                self.free_queue.appendleft(block)
            else:
                self.free_queue.append(block)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        del self.cached[block.block_hash]
        block.block_hash = None
