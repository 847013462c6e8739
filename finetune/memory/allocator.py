"""Reserved memory: replay an allocation/free stream through a model of CUDA's caching allocator.

The rules, from torch's c10/cuda/CUDACachingAllocator.cpp (and the "CUDA memory
management" notes):

- every request is rounded up to a multiple of 512 B (kMinBlockSize);
- requests of at most 1 MiB (kSmallSize) come from the small pool, whose segments are
  2 MiB (kSmallBuffer); larger ones from the large pool, whose new segments are 20 MiB
  (kLargeBuffer) for requests under 10 MiB (kMinLargeAlloc), else the request rounded up
  to 2 MiB (kRoundLarge);
- a request takes the smallest free cached block of its pool that is large enough (best
  fit) and splits it when the remainder is at least 512 B (small pool) or more than
  1 MiB (large pool);
- a freed block merges with free neighbours in its segment; segments are never returned
  to the device (no `empty_cache`), so reserved only grows.

Not modelled: `max_split_size_mb` and other PYTORCH_CUDA_ALLOC_CONF settings, expandable
segments, streams, and the free-and-retry the allocator does when the device is full
(this model reports what it reserves with memory to spare).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
LARGE_BUFFER = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(nbytes: int) -> int:
    """The allocator's block size for a request: at least 512 B, a multiple of 512 B."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(size: int) -> int:
    """Bytes a new segment reserves (cudaMalloc) for a rounded request of `size`."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-size // ROUND_LARGE) * ROUND_LARGE


@dataclass
class _Block:
    segment: int
    offset: int
    size: int
    free: bool = True


@dataclass
class AllocatorPeaks:
    """Peaks of a replayed stream: allocated (rounded blocks in use) and reserved."""

    allocated_bytes: int
    reserved_bytes: int
    segments: int


class CachingAllocator:
    """A replay of CUDA's caching allocator (see the module docstring for the rules)."""

    def __init__(self) -> None:
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0
        self.segments = 0
        self._free = {True: [], False: []}  # small pool?: sorted (size, segment, offset)
        self._blocks: dict[tuple[int, int], _Block] = {}  # (segment, offset) -> block
        self._small_segment: dict[int, bool] = {}
        self._free_ending: dict[tuple[int, int], _Block] = {}  # (segment, end) -> free block
        self._owner: dict[int, _Block] = {}  # allocation key -> block

    def malloc(self, key: int, nbytes: int) -> None:
        """Serve allocation `key` of `nbytes`."""
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        pool = self._free[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i == len(pool):
            block = self._new_segment(size, small)
        else:
            _, seg, off = pool.pop(i)
            block = self._blocks[(seg, off)]
            del self._free_ending[(seg, off + block.size)]
        remaining = block.size - size
        if remaining >= MIN_BLOCK if small else remaining > SMALL_SIZE:
            rest = _Block(block.segment, block.offset + size, remaining)
            self._blocks[(rest.segment, rest.offset)] = rest
            bisect.insort(pool, (rest.size, rest.segment, rest.offset))
            self._free_ending[(rest.segment, rest.offset + rest.size)] = rest
            block.size = size
        block.free = False
        self._owner[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key: int) -> None:
        """Return allocation `key`'s block to its pool, merged with free neighbours."""
        block = self._owner.pop(key)
        self.allocated -= block.size
        small = self._small_segment[block.segment]
        pool = self._free[small]
        nxt = self._blocks.get((block.segment, block.offset + block.size))
        if nxt is not None and nxt.free:
            pool.remove((nxt.size, nxt.segment, nxt.offset))
            del self._blocks[(nxt.segment, nxt.offset)]
            del self._free_ending[(nxt.segment, nxt.offset + nxt.size)]
            block.size += nxt.size
        prev = self._free_ending.pop((block.segment, block.offset), None)
        if prev is not None:
            pool.remove((prev.size, prev.segment, prev.offset))
            del self._blocks[(block.segment, block.offset)]
            prev.size += block.size
            block = prev
        block.free = True
        bisect.insort(pool, (block.size, block.segment, block.offset))
        self._free_ending[(block.segment, block.offset + block.size)] = block

    def _new_segment(self, size: int, small: bool) -> _Block:
        nbytes = segment_size(size)
        seg = self.segments
        self.segments += 1
        self._small_segment[seg] = small
        self.reserved += nbytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        block = _Block(seg, 0, nbytes)
        self._blocks[(seg, 0)] = block
        return block


def replay(events: Iterable[tuple[int, int]]) -> AllocatorPeaks:
    """Replay (key, nbytes) events: nbytes > 0 allocates `key`, < 0 frees it.

    Returns:
        The peak allocated bytes (rounded blocks, as torch.cuda.max_memory_allocated
        counts them) and the peak reserved bytes (torch.cuda.max_memory_reserved).
    """
    alloc = CachingAllocator()
    for key, nbytes in events:
        if nbytes > 0:
            alloc.malloc(key, nbytes)
        elif key in alloc._owner:
            alloc.free(key)
    return AllocatorPeaks(alloc.peak_allocated, alloc.peak_reserved, alloc.segments)
