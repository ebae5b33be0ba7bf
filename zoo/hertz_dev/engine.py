"""The per-frame step of Hertz-dev over a batch of session slots.

``Engine`` owns the KV caches of the main model and the resynthesizer for ``max_slots`` slots
(one row each; the resynthesizer's upper layers one row per output channel), a bounded history
of each slot's input latents, and each slot's sampling state (options, its own
torch.Generator seeded from ``Options.seed``; the global RNG is never used).

``advance(slots, latents)`` takes each slot's next input latent(s) (the 32- or 64-wide continuous
latents, as the reference feeds them), runs the main model (logits over the next FSQ index),
samples the token(s), runs the resynthesizer conditioned on them and samples the next latent of
every output channel. A slot with ``T > 1`` latents is a prefill (alone in its call, as the
reference's first ``next_latent`` on a prompt), or the last part of one: ``extend`` takes the
parts before it (chunked prefill), filling the caches without drawing anything. Contexts slide:
when a slot's main (or resynthesizer) cache is full, its oldest positions are evicted and the
cache is rebuilt by a prefill over the last ``keep`` input latents at positions 0.. (the
reference's own prefill semantics), so a session can run for unbounded time in bounded memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.devices import to_device
from ..core.errors import AudioTooLong
from ..core.graphs import DecodeGraphs
from ..core.isolation import isolate
from ..core.sampling import Sampling, UnusableLogits, is_zero_temperature, sample_rows
from ..core.types import Options
from .quantizer import LatentQuantizer
from .transformer import MAIN_CONTEXT, RESYNTH_CONTEXT, HertzLM, Resynthesizer, Rows, rope_tables


def is_deterministic(options: Options) -> bool:
    return is_zero_temperature(options.temperature)


@dataclass
class Slot:
    row: int
    options: Options
    generator: torch.Generator
    history: torch.Tensor  # (capacity, width) ring of input latents
    seen: int = 0  # latents ever pushed to the history
    main_len: int = 0  # positions in the main cache
    resynth_len: int = 0
    slides: int = 0  # how many times a context was rebuilt
    started: bool = False  # it has drawn a latent: its prompt is complete
    tokens: list[list[int]] = field(default_factory=list)  # sampled FSQ indices per step (bounded)
    # its session failed in its own work (zoo.core.isolation.isolate); its owner closes it
    error: Exception | None = None
    done: bool = False

    @property
    def deterministic(self) -> bool:
        return is_deterministic(self.options)

    def push(self, latents: torch.Tensor) -> None:
        capacity = self.history.size(0)
        for x in latents[-capacity:]:
            self.history[self.seen % capacity] = x
            self.seen += 1

    def last(self, n: int) -> torch.Tensor:
        capacity = self.history.size(0)
        n = min(n, self.seen, capacity)
        index = torch.arange(self.seen - n, self.seen, device=self.history.device) % capacity
        return self.history[index]


class Engine:
    def __init__(
        self,
        main: HertzLM,
        resynth: Resynthesizer,
        quantizer: LatentQuantizer,
        max_slots: int,
        *,
        main_context: int = MAIN_CONTEXT,
        resynth_context: int = RESYNTH_CONTEXT,
        out_channels: tuple[int, ...] = (0,),
        keep: float = 0.75,
        record_tokens: int = 0,
        graphs: bool | None = None,
        buckets: bool | None = None,
    ) -> None:
        if main.config.split != resynth.config.split:
            raise ValueError("main model and resynthesizer must both be mono or both split")
        if not 2 <= main_context <= MAIN_CONTEXT or not 2 <= resynth_context <= RESYNTH_CONTEXT:
            raise ValueError(f"contexts must be in [2, {MAIN_CONTEXT}] (main) and "
                             f"[2, {RESYNTH_CONTEXT}] (resynthesizer)")
        if not 0.0 < keep < 1.0:
            raise ValueError(f"keep must be in (0, 1), got {keep}")
        self.main, self.resynth, self.quantizer = main, resynth, quantizer
        weight = main.input.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.channels = main.config.channels
        self.width = main.config.latent_dim * self.channels
        self.out_channels = tuple(out_channels)
        self.main_context, self.resynth_context = main_context, resynth_context
        self.keep_main = max(1, int(main_context * keep))
        self.keep_resynth = max(1, int(resynth_context * keep))
        # one-token steps of both transformers go through zoo.core.graphs (CUDA graphs per batch
        # bucket on a GPU); the scratch rows take the padding
        padded = self.device.type == "cuda" if graphs is None and buckets is None else bool(graphs or buckets)
        self.main_cache = main.new_cache(max_slots, main_context, scratch=padded)
        self.resynth_caches = resynth.new_caches(max_slots, resynth_context, len(self.out_channels), scratch=padded)
        common = dict(pad_row=self.main_cache.scratch, device=self.device, capture=graphs, buckets=buckets,
                      min_width=64)
        self.main_graphs = DecodeGraphs(self._main_decode, max_len=main_context, **common)
        self.resynth_graphs = DecodeGraphs(self._resynth_decode, max_len=resynth_context, **common)
        self.main_rope = rope_tables(main.config.head_dim, main_context, self.device)
        self.resynth_rope = rope_tables(resynth.config.head_dim, resynth_context, self.device)
        self.capacity = max(main_context, resynth_context)
        self.record_tokens = record_tokens

    def nbytes(self) -> int:
        return self.main_cache.nbytes() + sum(c.nbytes() for c in self.resynth_caches)

    # -- slots: a slot owns the same row of every cache (the main cache keeps the books) ------
    @property
    def free_rows(self) -> list[int]:
        return self.main_cache.free_rows

    def open(self, options: Options) -> Slot:
        generator = torch.Generator(device=self.device).manual_seed(int(options.seed))
        history = torch.zeros(self.capacity, self.width, dtype=self.dtype, device=self.device)
        (row,) = self.main_cache.allocate()  # the lowest free row: a freed slot is reused first
        return Slot(row, options, generator, history)

    def close(self, slot: Slot) -> None:
        if slot.row >= 0:
            self.main_cache.release([slot.row])
            slot.row = -1

    def check_prompt(self, frames: int) -> None:
        """Refuses a prompt of ``frames`` latents that does not fit both contexts (AudioTooLong)."""
        room = min(self.main_context, self.resynth_context)
        if frames > room:
            raise AudioTooLong(f"the prompt is {frames} frames long; the context holds {room}")

    # -- one step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def advance(self, slots: list[Slot], latents: torch.Tensor) -> torch.Tensor:
        """latents (B, T, width) -> next latents (B, len(out_channels), 32). T > 1: the slots' prompts
        (or their last parts, after ``extend``), prefilled together."""
        B, T, _ = latents.shape
        if T > 1:
            self._check_part(slots, T)
        latents = latents.to(self.device, self.dtype)
        for slot, x in zip(slots, latents):
            slot.push(x)
        tokens, unusable = self.main_step(slots, latents)
        out = self.resynth_step(slots, latents, tokens)
        for slot in slots:
            slot.started = True
        # read back only now, with the resynthesizer's work already queued behind it
        for slot, bad in zip(slots, unusable.tolist()):
            if bad:  # that slot alone fails; its row kept the batch's shape
                with isolate(slot):
                    raise UnusableLogits()
        if self.record_tokens:
            for slot, t in zip(slots, tokens.tolist()):
                slot.tokens.append(t)
                del slot.tokens[: -self.record_tokens]
        return out

    def _check_part(self, slots: list[Slot], T: int) -> None:
        """A prompt (or its next part) of T latents: it must fit the context after what the slot
        holds (AudioTooLong), in a slot whose prompt is still being prefilled."""
        for slot in slots:
            if slot.started or slot.main_len != slot.resynth_len:
                raise ValueError("a prompt's parts go into a slot that has not started generating")
            self.check_prompt(slot.main_len + T)

    def _plan(self, slots, T, lengths, context, keep):
        """(incremental slot indices, [(slot index, input length, first position, from latents)] to
        prefill: a prompt or its last part (from ``latents``, after what the slot holds) or a
        context rebuilt from position 0 (from the slot's history))."""
        steps, prefills = [], []
        for i, slot in enumerate(slots):
            length = lengths(slot)
            if T == 1 and length < context:
                steps.append(i)
            elif T > 1:
                prefills.append((i, T, length, True))
            else:  # full: evict, rebuild from the last ``keep`` latents (this one included)
                slot.slides += 1
                prefills.append((i, keep, 0, False))
        return steps, prefills

    @staticmethod
    def _prefill_groups(slots: list[Slot], prefills: list[tuple[int, int, int, bool]],
                        latents: torch.Tensor) -> list[tuple[list[int], list[int], torch.Tensor]]:
        """The slots to (re)prefill grouped by input length, each group's slot indices, first
        positions and inputs (G, n, width) for one forward: a burst of sessions opening with
        prompts, or several contexts sliding at the same step, costs one forward per length, not
        one per slot."""
        groups: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        for i, n, start, from_latents in prefills:
            x = latents[i] if from_latents else slots[i].last(n)
            groups.setdefault(x.size(0), []).append((i, start, x))
        return [([i for i, _, _ in group], [start for _, start, _ in group], torch.stack([x for _, _, x in group]))
                for group in groups.values()]

    @torch.inference_mode()
    def extend(self, slot: Slot, latents: torch.Tensor, lookahead: torch.Tensor) -> None:
        """A part of ``slot``'s prompt that is not its last (chunked prefill): latents (1, n, width)
        written into both caches after what the slot holds; nothing is drawn. ``lookahead`` (1, 1,
        width) is the prompt's next latent: the resynthesizer tells each position the latent that
        follows it, so the part runs with it appended, and the position it takes is written again
        by the next part. ``advance`` then takes the last part, as it takes a whole prompt."""
        n = latents.size(1)
        self._check_part([slot], n + 1)  # the lookahead is a position of the next part
        latents = latents.to(self.device, self.dtype)
        slot.push(latents[0])
        start = slot.main_len
        self.main(latents, self.main_cache, Rows.make([slot.row], [start], n, self.device), self.main_rope,
                  self.out_channels)
        extended = torch.cat([latents, lookahead.to(self.device, self.dtype)], dim=1)
        untold = torch.zeros(1, len(self.out_channels), dtype=torch.long, device=self.device)  # the lookahead's own
        self.resynth(extended, untold, self.quantizer, self.resynth_caches,
                     Rows.make([slot.row], [start], n + 1, self.device), self.resynth_rope, self.out_channels)
        slot.main_len = slot.resynth_len = start + n

    def main_step(self, slots: list[Slot], latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Main model over the slots' new latents -> (next FSQ indices (B, out channels), which
        slots' logits were unusable (B,), on the device). The indices are drawn as the reference's
        next_latent draws them, softmax(logits / temperature), every slot with its own generator in
        one pass (zoo.core.sampling.sample_rows; argmax at temperature 0; top-k / top-p when set,
        which the reference has none of)."""
        B, T, _ = latents.shape
        steps, prefills = self._plan(slots, T, lambda s: s.main_len, self.main_context, self.keep_main)
        logits: list[torch.Tensor | None] = [None] * B
        if steps:
            x = latents if len(steps) == B else latents[steps]
            out = self.main_graphs(x, [slots[i].row for i in steps], [slots[i].main_len for i in steps])
            for k, i in enumerate(steps):
                logits[i] = out[k]
                slots[i].main_len += 1
        for group, starts, x in self._prefill_groups(slots, prefills, latents):
            rows = Rows.make([slots[i].row for i in group], starts, x.size(1), self.device)
            out = self.main(x, self.main_cache, rows, self.main_rope, self.out_channels)
            for k, (i, start) in enumerate(zip(group, starts)):
                logits[i] = torch.stack([o[k] for o in out])
                slots[i].main_len = start + x.size(1)
        return sample_rows(torch.stack(logits), [Sampling.of(slot.options, slot.generator) for slot in slots])

    def resynth_step(self, slots: list[Slot], latents: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Resynthesizer told the next tokens -> sampled next latents (B, out channels, 32)."""
        B, T, _ = latents.shape
        steps, prefills = self._plan(slots, T, lambda s: s.resynth_len, self.resynth_context, self.keep_resynth)
        mixtures: list[tuple | None] = [None] * B
        if steps:
            x, t = (latents, tokens) if len(steps) == B else (latents[steps], tokens[steps])
            locs, scales, weights = self.resynth_graphs((x, t), [slots[i].row for i in steps],
                                                        [slots[i].resynth_len for i in steps])
            for k, i in enumerate(steps):
                mixtures[i] = (locs[k], scales[k], weights[k])
                slots[i].resynth_len += 1
        for group, starts, x in self._prefill_groups(slots, prefills, latents):
            rows = Rows.make([slots[i].row for i in group], starts, x.size(1), self.device)
            locs, scales, weights = self.resynth(x, tokens[group], self.quantizer, self.resynth_caches, rows,
                                                 self.resynth_rope, self.out_channels)
            for k, (i, start) in enumerate(zip(group, starts)):
                mixtures[i] = (locs[:, k], scales[:, k], weights[:, k])
                slots[i].resynth_len = start + x.size(1)
        return self._latents(slots, *(torch.stack(m) for m in zip(*mixtures)))

    def _main_decode(self, latents: torch.Tensor, rows: Rows) -> torch.Tensor:
        """One latent per row -> logits (B, out channels, vocab): tensor operations only."""
        return torch.stack(self.main(latents, self.main_cache, rows, self.main_rope, self.out_channels), dim=1)

    def _resynth_decode(self, inputs: tuple[torch.Tensor, torch.Tensor], rows: Rows) -> tuple[torch.Tensor, ...]:
        """(latents, next tokens) per row -> the mixture (locs, scales, weights), batch first."""
        latents, tokens = inputs
        out = self.resynth(latents, tokens, self.quantizer, self.resynth_caches, rows, self.resynth_rope,
                           self.out_channels)
        return tuple(o.transpose(0, 1) for o in out)

    # -- sampling (the reference's next_latent / temp_sample, with a per-slot generator) ------
    @staticmethod
    def _latents(slots: list[Slot], locs, scales, weights) -> torch.Tensor:
        """Mixtures (B, channels, K, Z), (B, channels, K, Z), (B, channels, K) -> (B, channels, Z):
        per slot, a component by Gumbel-max on weights / categorical_temp, then loc + scale *
        gaussian_temp * N(0, 1); deterministic (temperature 0, or a zero temperature of its own):
        the most probable component, its mean. Each slot's noise comes from its own generator in
        the order the reference draws it (Gumbel, then Gaussian); the arithmetic is one batched
        pass. Nothing here can fail for one slot alone: its temperatures were validated on entry."""
        cat_t, gauss_t, gumbels, eps = [], [], torch.zeros_like(weights), torch.zeros_like(locs[:, :, 0])
        for i, slot in enumerate(slots):
            o = slot.options
            cat, gauss = getattr(o, "categorical_temp", 0.4), getattr(o, "gaussian_temp", 0.1)
            drawn_cat = not (slot.deterministic or is_zero_temperature(cat))
            drawn_gauss = not (slot.deterministic or is_zero_temperature(gauss))
            if drawn_cat:
                gumbels[i] = -torch.empty_like(weights[i]).exponential_(generator=slot.generator).log()
            if drawn_gauss:
                eps[i] = torch.randn(eps[i].shape, generator=slot.generator, device=eps.device, dtype=eps.dtype)
            cat_t.append(cat if drawn_cat else 1.0)  # (weights / 1 + 0).argmax: the most probable
            gauss_t.append(gauss if drawn_gauss else 0.0)
        cat_t, gauss_t = to_device([cat_t, gauss_t], locs.device, locs.dtype)[:, :, None, None]
        k = (weights / cat_t + gumbels).argmax(dim=-1)  # (B, channels)
        pick = k[..., None, None].expand(*k.shape, 1, locs.size(-1))
        loc, scale = locs.gather(2, pick).squeeze(2), scales.gather(2, pick).squeeze(2)
        return torch.where(gauss_t > 0, loc + scale * gauss_t * eps, loc)
