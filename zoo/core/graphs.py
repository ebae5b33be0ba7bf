"""One decode-step mechanism for every LLM in the zoo: batch-size buckets, padding, CUDA graphs
(``DecodeGraphs``); and ``ShapeGraphs``, a whole function captured per input shape (decoders).

``DecodeGraphs`` runs a model's ``decode(inputs, rows)`` (tensor operations only: no host reads)
for one new token per cache row. It has three modes:

- exact (the default on CPU): the batch as it is, attention exactly as wide as the longest row.
  Padding a CPU batch would only add compute, so the CPU default is the plain eager step.
- bucketed: the batch is padded up to its size bucket (``batch_bucket``) with a pad row, and the
  attention width rounded up (``kv_cache.bucket_width``), so few (batch, width) shapes occur. Run
  eagerly this is the graph path without the capture: tests on CPU check that it gives the tokens
  an exact batch gives.
- captured (the default on CUDA): bucketed, and each (bucket, width) is captured once as a CUDA
  graph and replayed: at decode batch sizes a large model's thousands of kernel launches per
  token cost more host time than the GPU's weight reads.

A ring cache (``ring_context``: Moshi's temporal transformer, ``Rows.ring``) has ``max_len`` slots
per row that positions wrap around, a token seeing the last ``ring_context`` positions: its rows
run for ever (``starts`` are absolute positions, with no context limit), and the width read is
the slots written so far, bucketed the same way, at most ``max_len``.

Padding rows write to ``pad_row`` (a cache row no session owns, e.g. ``KVCache(scratch=True)``'s),
at position 0, and their outputs are dropped; every real row reads only its own cache row, so its
result does not depend on the padding (up to the floating-point effect of a different batch size
on a matrix product's blocking: identical tokens in float32 on CPU, tested).
"""
from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch

from .kv_cache import Rows, bucket_width

# Batch sizes that get a graph: powers of two, then steps of 16 (a batch of 33 pads to 48, not 64).
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 112, 128)

Inputs = torch.Tensor | tuple[torch.Tensor, ...]
Outputs = torch.Tensor | tuple[torch.Tensor, ...]


def batch_bucket(batch: int) -> int:
    """The smallest bucket holding ``batch`` (past the last one: the next multiple of 16)."""
    if batch < 1:
        raise ValueError(f"a decode step needs at least one row, got {batch}")
    for size in BATCH_BUCKETS:
        if size >= batch:
            return size
    return -(-batch // 16) * 16


def _as_tuple(x: Inputs | Outputs) -> tuple[torch.Tensor, ...]:
    return x if isinstance(x, tuple) else (x,)


def _like(template: Inputs | Outputs, parts: Sequence[torch.Tensor]) -> Inputs | Outputs:
    return tuple(parts) if isinstance(template, tuple) else parts[0]


def _padded(x: torch.Tensor, size: int) -> torch.Tensor:
    """``x`` (B, ...) with its last entry repeated up to ``size`` entries (valid values: a padded
    row computes what a real one would, then is dropped)."""
    pad = size - x.size(0)
    return x if pad == 0 else torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])


class DecodeGraphs:
    """``decode(inputs, rows) -> outputs``: ``inputs`` a tensor or a tuple of tensors, each with the
    batch first; ``outputs`` likewise (batch first). ``pad_row``: the cache row that padding and
    captures write (None: no padding, no capture). ``capture`` / ``buckets`` default to the device
    being CUDA. A capture that fails (e.g. a quantised layer that syncs with the host) warns once
    and the steps go on eagerly and exact. ``ring_context``: the cache is a ring (see above)."""

    def __init__(self, decode: Callable[[Inputs, Rows], Outputs], *, pad_row: int | None, max_len: int,
                 device, capture: bool | None = None, buckets: bool | None = None,
                 min_width: int = 256, ring_context: int | None = None) -> None:
        cuda = torch.device(device).type == "cuda"
        self.decode, self.pad_row, self.max_len = decode, pad_row, max_len
        self.ring_context = ring_context
        self.device, self.min_width = torch.device(device), min_width
        self.capture = cuda if capture is None else capture
        self.buckets = self.capture if buckets is None else buckets or self.capture
        if self.capture and not cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        if self.buckets and pad_row is None:
            raise ValueError("padding and captures need a pad row (a cache with a scratch row)")
        self.graphs: dict[tuple[int, int], tuple] = {}

    @property
    def enabled(self) -> bool:
        """Whether steps replay CUDA graphs (False on CPU, or after a failed capture)."""
        return self.capture

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Exact eager steps inside the block (benchmarks compare them with the replays)."""
        saved = self.capture, self.buckets
        self.capture = self.buckets = False
        try:
            yield
        finally:
            self.capture, self.buckets = saved

    def shape(self, batch: int, starts: Sequence[int]) -> tuple[int, int]:
        """(rows, attention width) a step of ``batch`` rows at ``starts`` runs with."""
        needed = min(self.max_len, max(starts) + 1)  # a ring reads at most its slots; other caches never pass max_len
        if not self.buckets:
            return batch, needed
        return batch_bucket(batch), bucket_width(needed, self.max_len, self.min_width)

    def __call__(self, inputs: Inputs, rows: Sequence[int], starts: Sequence[int]) -> Outputs:
        """One new token for each of ``rows``, the token of row i going to position ``starts[i]``;
        the caller advances its lengths afterwards."""
        batch = len(rows)
        if self.ring_context is None and max(starts) >= self.max_len:
            raise ValueError(f"a row is at the context limit ({self.max_len} positions)")
        if not self.buckets:
            return self.decode(inputs, self._rows(rows, starts, None))
        size, width = self.shape(batch, starts)
        padded = _like(inputs, [_padded(x, size) for x in _as_tuple(inputs)])
        pad = size - batch
        live = self._rows([*rows, *[self.pad_row] * pad], [*starts, *[0] * pad], width)
        if self.capture:
            outputs = self._replay(padded, live, size, width)
        else:
            outputs = self.decode(padded, live)
        if pad == 0:
            return outputs
        return _like(outputs, [x[:batch] for x in _as_tuple(outputs)])

    def _rows(self, rows: Sequence[int], starts: Sequence[int], width: int | None) -> Rows:
        """One token per row; ``width`` None: the exact width (no bucket, no padding)."""
        if self.ring_context is not None:
            return Rows.ring(rows, starts, 1, self.max_len, self.ring_context, self.device, width=width)
        return Rows.make(rows, starts, 1, self.device, width=width, masked=width is not None)

    def _replay(self, inputs: Inputs, rows: Rows, size: int, width: int) -> Outputs:
        key = (size, width)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(inputs, size, width)
            except RuntimeError as err:
                warnings.warn(f"CUDA graph capture failed ({err}); decoding without graphs", stacklevel=3)
                self.capture = self.buckets = False
                return self.decode(inputs, rows)
        graph, static_inputs, static_rows, outputs = self.graphs[key]
        for static, live in zip(static_inputs, _as_tuple(inputs)):
            static.copy_(live)
        for static, live in ((static_rows.index, rows.index), (static_rows.positions, rows.positions),
                             (static_rows.mask, rows.mask), (static_rows.absolute, rows.absolute)):
            if static is not None:
                static.copy_(live)
        graph.replay()
        # the next replay overwrites the static outputs
        return _like(outputs, [x.clone() for x in _as_tuple(outputs)])

    def _capture(self, inputs: Inputs, size: int, width: int) -> tuple:
        static_inputs = tuple(torch.zeros_like(x) for x in _as_tuple(inputs))
        static = _like(inputs, static_inputs)
        static_rows = Rows.placeholder(size, width, self.pad_row, self.device, ring=self.ring_context is not None)
        graph, outputs = _capture(lambda: self.decode(static, static_rows))
        return graph, static_inputs, static_rows, outputs


def _capture(run: Callable[[], Outputs]) -> tuple[torch.cuda.CUDAGraph, Outputs]:
    """``run`` (reading only static buffers) captured as a CUDA graph -> (graph, its static outputs).
    It runs once on a side stream first, so that allocations and lazy initialisations (cuBLAS
    handles, autotuning) happen outside the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread-local: another thread's work meanwhile (a server's other scheduler, a concurrent
    # reply's decoder) goes on instead of failing as an unsafe call during a global capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        outputs = run()
    return graph, outputs


class ShapeGraphs:
    """``fn(*tensors) -> outputs`` (tensor operations only; every shape inside follows from the
    inputs' shapes) captured as one CUDA graph per distinct input signature and replayed: for a
    network of many small kernels (GLM-4-Voice's flow decoder: an encoder, then ten estimator
    passes) the host's launches cost more than the GPU's work. A signature is captured the second
    time it is seen (a capture costs about two plain calls: a shape seen once, such as a reply's
    last partial block, never pays it), and the ``keep`` most recently used graphs are kept (each
    holds its own buffers). ``capture`` defaults to the device being CUDA; off, it is ``fn``
    itself. A capture that fails warns once and calls run eagerly from then on. Calls from several
    threads (one decoder shared by concurrent replies) take turns: a graph's buffers are shared."""

    def __init__(self, fn: Callable[..., Outputs], *, device, capture: bool | None = None, keep: int = 16) -> None:
        cuda = torch.device(device).type == "cuda"
        self.fn, self.keep = fn, keep
        self.capture = cuda if capture is None else capture
        if self.capture and not cuda:
            raise ValueError("CUDA graphs need a CUDA device")
        self.graphs: dict[tuple, tuple] = {}  # least recently used first
        self.seen: dict[tuple, None] = {}  # signatures seen once, oldest first
        self._turn = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capture

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Plain calls inside the block (benchmarks compare them with the replays)."""
        saved, self.capture = self.capture, False
        try:
            yield
        finally:
            self.capture = saved

    def __call__(self, *inputs: torch.Tensor, **static) -> Outputs:
        """``fn(*inputs, **static)``: ``static`` (hashable settings that shape the computation,
        not tensors) is part of a graph's signature with the inputs' shapes and dtypes."""
        if not self.capture:
            return self.fn(*inputs, **static)
        with self._turn:
            return self._run(inputs, static)

    def _run(self, inputs: tuple[torch.Tensor, ...], static: dict) -> Outputs:
        key = (tuple((x.shape, x.dtype) for x in inputs), tuple(sorted(static.items())))
        entry = self.graphs.pop(key, None)
        if entry is None and key not in self.seen:
            self.seen[key] = None
            while len(self.seen) > 16 * self.keep:
                del self.seen[next(iter(self.seen))]
            return self.fn(*inputs, **static)
        if entry is None:
            del self.seen[key]
            static_inputs = tuple(x.clone() for x in inputs)
            try:
                entry = (*self._capture(lambda: self.fn(*static_inputs, **static)), static_inputs)
            except RuntimeError as err:
                warnings.warn(f"CUDA graph capture failed ({err}); running without graphs", stacklevel=2)
                self.capture = False
                self.graphs.clear()
                return self.fn(*inputs, **static)
            while len(self.graphs) >= self.keep:
                del self.graphs[next(iter(self.graphs))]
        self.graphs[key] = entry
        graph, outputs, static_inputs = entry
        for buffer, live in zip(static_inputs, inputs):
            buffer.copy_(live)
        graph.replay()
        return _like(outputs, [x.clone() for x in _as_tuple(outputs)])  # the next replay overwrites them

    @staticmethod
    def _capture(run: Callable[[], Outputs]) -> tuple[torch.cuda.CUDAGraph, Outputs]:
        return _capture(run)  # a method so that CPU tests can stand in for the CUDA capture
