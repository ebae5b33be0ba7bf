"""One KV-cache mechanism for every LLM in the zoo (in the spirit of litgpt's and vLLM's static caches).

A ``KVCache`` is preallocated once: (layers, rows [+ 1 scratch row], kv_heads, max_len, head_dim) for
keys and for values. Sessions take rows (several when a model needs them: Mini-Omni's batch trick,
Hertz-dev's resynthesizer channels) and give them back; each row's length is known on the host.

A forward over some rows is described by ``Rows``, built on the host from host-known starts: the row
index and the positions as device tensors, the attention width, and the attention mask. Nothing in
``attend`` reads a tensor back to the host, so a decode step can be captured in a CUDA graph
(``zoo.core.graphs.DecodeGraphs``). ``attend`` is the one attention-over-cache function: it writes the new keys and
values at their positions and runs SDPA (with GQA when there are fewer KV heads) over the cache.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .devices import to_device

# cuDNN's attention rebuilds its plan for every new key length: milliseconds of CPU per call when
# decoding one position at a time (measured on an H200). The other backends have no such cost.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass(frozen=True)
class Rows:
    """The cache rows a forward writes and reads. ``index`` (B,) and ``positions`` (B, T) (the absolute
    position of every new token) are device tensors; ``width`` cache positions are read; ``view`` is
    the rows as a slice when contiguous (read without a copy), else ``index``. ``rows`` / ``starts``
    are the host copies (None in a CUDA-graph capture, whose inputs change at every replay).
    ``mask`` (B, 1, T, width) is None when no position needs hiding: a prefill from position 0 (then
    ``fresh``: causal attention over the new tokens alone) or a decode step whose rows all fill
    ``width`` exactly."""

    index: torch.Tensor
    positions: torch.Tensor
    width: int
    view: slice | torch.Tensor
    mask: torch.Tensor | None
    rows: tuple[int, ...] | None = None
    starts: tuple[int, ...] | None = None
    fresh: bool = False
    absolute: torch.Tensor | None = None  # a ring's absolute positions (``positions`` are its slots)

    @property
    def absolute_positions(self) -> torch.Tensor:
        """(B, T) absolute position of every new token (what RoPE rotates by)."""
        return self.positions if self.absolute is None else self.absolute

    @classmethod
    def make(cls, rows: Sequence[int], starts: Sequence[int], new: int, device, width: int | None = None,
             masked: bool = False) -> Rows:
        """``new`` tokens per row, row i's first at position ``starts[i]``. ``width`` defaults to the
        longest row after this forward; ``masked`` keeps a mask even where none is needed (a graph
        replays the mask it captured)."""
        rows, starts = tuple(int(r) for r in rows), tuple(int(s) for s in starts)
        needed = max(starts) + new
        width = needed if width is None else width
        if width < needed:
            raise ValueError(f"width {width} is shorter than the {needed} positions this forward reads")
        index = to_device(rows, device)
        positions = to_device([[s + t for t in range(new)] for s in starts], device)
        contiguous = rows == tuple(range(rows[0], rows[0] + len(rows)))
        view = slice(rows[0], rows[0] + len(rows)) if contiguous else index
        fresh = not masked and width == new and not any(starts)
        exact = not masked and new == 1 and all(s + 1 == width for s in starts)
        mask = None if fresh or exact else _visible(positions, width)
        return cls(index, positions, width, view, mask, rows, starts, fresh)

    @classmethod
    def ring(cls, rows: Sequence[int], starts: Sequence[int], new: int, capacity: int, context: int,
             device, width: int | None = None) -> Rows:
        """Rows over a ring of ``capacity`` slots per row (absolute position p lives in slot
        p % capacity; the oldest positions are overwritten), for models that attend to a sliding
        window and run indefinitely (Moshi's RingKVCache). Token at position q sees the held
        positions p with q - context < p <= q. ``starts`` are absolute positions. ``width``
        (default: the slots written so far) may be wider, up to ``capacity``: the slots no row has
        written yet are masked (a padded graph step reads a bucketed width)."""
        rows, starts = tuple(int(r) for r in rows), tuple(int(s) for s in starts)
        needed = min(capacity, max(starts) + new)
        width = needed if width is None else width
        if not needed <= width <= capacity:
            raise ValueError(f"ring width {width} outside {needed}..{capacity}")
        index = to_device(rows, device)
        absolute = to_device([[s + t for t in range(new)] for s in starts], device)
        last = absolute[:, -1:]  # (B, 1): the newest position once these are written
        slots = torch.arange(width, device=device)[None]
        delta = slots - last % capacity
        held = torch.where(delta <= 0, last + delta, last + delta - capacity)  # (B, width)
        behind = absolute[:, :, None] - held[:, None, :]  # (B, T, width)
        mask = (held[:, None, :] >= 0) & (behind >= 0) & (behind < context)
        contiguous = rows == tuple(range(rows[0], rows[0] + len(rows)))
        view = slice(rows[0], rows[0] + len(rows)) if contiguous else index
        # starts stay None: the new keys are scattered to their slots (a write may wrap the ring)
        return cls(index, absolute % capacity, width, view, mask[:, None], rows, None, absolute=absolute)

    @classmethod
    def placeholder(cls, batch: int, width: int, row: int, device, ring: bool = False) -> Rows:
        """Static single-token rows for a graph capture: every row is ``row`` at position 0
        (``ring``: with the absolute positions a ring's rows carry, replayed like the others)."""
        index = torch.full((batch,), row, dtype=torch.long, device=device)
        positions = torch.zeros(batch, 1, dtype=torch.long, device=device)
        absolute = positions.clone() if ring else None
        return cls(index, positions, width, index, _visible(positions, width), absolute=absolute)

    @property
    def start(self) -> int | None:
        """The host-known start all rows share (the new K/V then go in as one slice), else None."""
        if self.starts is None or len(set(self.starts)) != 1:
            return None
        return self.starts[0]


def padded_ends(lengths: Sequence[int], device) -> torch.Tensor | None:
    """Each row's last real position in a forward right-padded to the longest of ``lengths``: (B,)
    on ``device``, for ``at_ends``. None when no row is padded (the last position is every row's)."""
    if len(set(lengths)) == 1:
        return None
    return to_device([n - 1 for n in lengths], device)


def at_ends(x: torch.Tensor, ends: torch.Tensor | None) -> torch.Tensor:
    """x (B, T, ...) -> (B, ...): row b at position ``ends[b]`` (``padded_ends``), or at the last
    position when ``ends`` is None. Tensor operations only (a CUDA graph may capture it)."""
    if ends is None:
        return x[:, -1]
    return x[torch.arange(x.size(0), device=x.device), ends]


def _visible(positions: torch.Tensor, width: int) -> torch.Tensor:
    """(B, T) positions -> (B, 1, T, width): token t sees cache positions up to its own."""
    return (torch.arange(width, device=positions.device) <= positions[:, :, None])[:, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
           rows: Rows) -> torch.Tensor:
    """q (B, H, T, D), new k/v (B, G, T, D) (after RoPE); cache_k/v (all rows, G, max_len, D) of one
    layer. Writes k/v at ``rows.positions``, returns attention over each row's cache (B, H, T, D)."""
    T, start = q.size(2), rows.start
    if start is not None:
        cache_k[rows.view, :, start : start + T] = k
        cache_v[rows.view, :, start : start + T] = v
    else:  # a scatter to (row, position) pairs; each row may be at its own position
        cache_k[rows.index[:, None], :, rows.positions] = k.transpose(1, 2)
        cache_v[rows.index[:, None], :, rows.positions] = v.transpose(1, 2)
    gqa = q.size(1) != k.size(1)
    with sdpa_kernel(ATTENTION_BACKENDS):
        if rows.fresh:  # the cache holds nothing older than these tokens
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        if isinstance(rows.view, slice):
            keys, values = cache_k[rows.view, :, : rows.width], cache_v[rows.view, :, : rows.width]
        else:
            keys = cache_k[:, :, : rows.width].index_select(0, rows.view)
            values = cache_v[:, :, : rows.width].index_select(0, rows.view)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=rows.mask, enable_gqa=gqa)


class KVCache:
    """Keys and values of ``layers`` layers for ``rows`` sequences of up to ``max_len`` positions,
    stored per KV head (never expanded to the query heads). With ``scratch``, one more row that CUDA
    graph captures write instead of a live one. ``lengths[row]`` is each row's filled length."""

    def __init__(self, layers: int, rows: int, kv_heads: int, max_len: int, head_dim: int, dtype, device,
                 scratch: bool = False) -> None:
        shape = (layers, rows + int(scratch), kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.scratch = rows if scratch else None
        self.lengths = [0] * rows
        self._free = set(range(rows))

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def free_rows(self) -> list[int]:
        return sorted(self._free)

    def allocate(self, n: int = 1) -> list[int]:
        """The ``n`` lowest free rows, emptied (a freed row is reused first)."""
        if len(self._free) < n:
            raise RuntimeError("no free KV-cache rows: too many sessions at once")
        rows = self.free_rows[:n]
        for row in rows:
            self._free.remove(row)
            self.lengths[row] = 0
        return rows

    def release(self, rows: Sequence[int]) -> None:
        for row in rows:
            self.lengths[row] = 0
            self._free.add(row)

    def room(self, row: int) -> int:
        return self.max_len - self.lengths[row]

    def rows_for(self, rows: Sequence[int], new: int, width: int | None = None, masked: bool = False) -> Rows:
        """``Rows`` appending ``new`` tokens to each row at its host-known length."""
        for row in rows:
            if self.room(row) < new:
                raise ValueError(f"row {row} needs {new} more positions; {self.room(row)} are left of {self.max_len}")
        return Rows.make(rows, [self.lengths[r] for r in rows], new, self.device, width, masked)

    def advance(self, rows: Sequence[int], new: int) -> None:
        for row in rows:
            self.lengths[row] += new

    def copy_prefix(self, source: int, targets: Sequence[int], length: int) -> None:
        """Give ``targets`` the first ``length`` positions of ``source`` (a shared prompt prefix)."""
        index = torch.tensor(list(targets), device=self.device)
        self.k[:, index, :, :length] = self.k[:, source : source + 1, :, :length]
        self.v[:, index, :, :length] = self.v[:, source : source + 1, :, :length]
        for row in targets:
            self.lengths[row] = length

    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def bucket_width(needed: int, max_len: int, minimum: int = 256) -> int:
    """``needed`` rounded up to a power of two (at least ``minimum``, at most ``max_len``), so that few
    attention widths occur: each is one CUDA graph."""
    return min(max_len, max(minimum, 1 << (needed - 1).bit_length()))
