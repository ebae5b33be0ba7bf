"""Token sampling shared by every model: top-k, then temperature, then top-p, then a draw, in the
order litgpt (and so Mini-Omni) applies them. A temperature below MIN_TEMPERATURE, or top_k == 1,
is greedy argmax.

``sample_rows`` draws a whole step's batch at once, each row (a session's token, or one of its
codebooks) with its own settings and generator, on the logits' device: one read back to the
host per step, not one per session. It says which rows' logits were unusable (NaN, +inf)
instead of raising for the whole batch, so that session alone ends (UnusableLogits)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .devices import to_device

# Temperatures below this mean "deterministic": dividing logits by them overflows float32 to inf
# (1e-39 is a valid JSON number) and the softmax becomes NaN, while the draw would be the argmax
# anyway. Every temperature a model has (token, mixture component, noise) uses this one bound.
MIN_TEMPERATURE = 1e-5


def is_zero_temperature(temperature: float) -> bool:
    return temperature < MIN_TEMPERATURE


class UnusableLogits(FloatingPointError):
    """A session's logits held NaN or +inf: no token can be drawn from them (the model failed for
    that session; ``sample_rows`` reports it per row, and the engine ends that session alone)."""

    def __init__(self) -> None:
        super().__init__("the model's logits were not finite (NaN or inf) for this session")


class Sampling(NamedTuple):
    """How one session draws: its temperature, top-k, top-p and its own generator (never the
    global RNG). Greedy below MIN_TEMPERATURE or at top_k 1."""

    temperature: float
    top_k: int | None
    top_p: float
    generator: torch.Generator | None

    @classmethod
    def of(cls, options, generator: torch.Generator | None) -> Sampling:
        """From a zoo.core.types.Options (temperature, top_k, top_p)."""
        return cls(options.temperature, options.top_k, options.top_p, generator)

    @property
    def greedy(self) -> bool:
        return is_zero_temperature(self.temperature) or self.top_k == 1


def sample_rows(logits: torch.Tensor, sessions: Sequence[Sampling]) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, vocab), or (B, rows, vocab) for sessions that draw several tokens at once (a
    model's codebooks) -> (token ids (B,) or (B, rows), unusable (B,) bool). Session i draws with
    ``sessions[i]`` (the references' choice; their ``torch.multinomial`` draws other random
    numbers). ``unusable`` marks the sessions whose logits held NaN or +inf (their tokens mean
    nothing): read it with the tokens, in the step's one host sync (UnusableLogits).

    The draw is the exponential race: with E ~ Exp(1) per candidate token, argmax p / E is token
    j with probability p_j. The candidates are each session's top-k (the batch's widest k; the
    whole vocabulary, unsorted, when no drawing session narrows it by top-k or top-p). A
    session's E is drawn on the logits' device by its own generator, or, when that lives on the
    host, by one seeded from it: a session's draw never depends on its batch companions, no noise
    crosses from the host and no draw waits for the device. Its three parts (``Plan.of``,
    ``draw_noise``, ``race``) serve a caller that draws the noise of several draws at once and
    races them inside a captured CUDA graph (Moshi's codebooks)."""
    B, vocab = len(sessions), logits.size(-1)
    per = logits[..., 0].numel() // B  # rows of each session
    if all(s.greedy for s in sessions):
        return logits.argmax(dim=-1), unusable_rows(logits.reshape(B, per, vocab))
    plan = Plan.of(sessions, vocab, per, logits.device)
    return race(logits, plan.settings, draw_noise(sessions, per, plan.width, logits.device), narrow=plan.narrow)


class Plan(NamedTuple):
    """A batch's draw as the host decides it: every row's settings on the device (temperature, k,
    top-p, greedy: (B * rows, 4), uploaded in one pinned copy, since a plain copy from the host
    would wait for the forward still queued on the device), the candidates' width and whether
    they are narrowed (sorted by top-k / top-p) at all."""

    settings: torch.Tensor
    width: int
    narrow: bool

    @classmethod
    def of(cls, sessions: Sequence[Sampling], vocab: int, per: int, device) -> Plan:
        drawing = [s for s in sessions if not s.greedy]
        width = max((vocab if s.top_k is None else min(s.top_k, vocab) for s in drawing), default=1)
        narrow = width < vocab or any(s.top_p < 1.0 for s in drawing)
        settings = torch.tensor([[max(s.temperature, MIN_TEMPERATURE), vocab if s.top_k is None else min(s.top_k, vocab),
                                  s.top_p, s.greedy] for s in sessions for _ in range(per)])  # k exact below 2**24
        return cls(to_device(settings, device), width, narrow)


def draw_noise(sessions: Sequence[Sampling], per: int, width: int, device) -> torch.Tensor:
    """(B, per, width) Exp(1) noise, each session's from its own generator (ones for greedy ones):
    one call per session however many rows it draws."""
    noise = torch.ones(len(sessions), per, width, device=device)
    source = None  # a generator on the device, for sessions whose own lives elsewhere
    for i, session in enumerate(sessions):
        if session.greedy:
            continue
        generator = session.generator
        if generator is not None and generator.device != noise.device:
            if source is None:
                source = torch.Generator(device=device)  # this call's own: other threads have theirs
            source.manual_seed(int(torch.randint(2**62, (), generator=generator)))  # a host draw: no sync
            generator = source
        noise[i].exponential_(generator=generator)
    return noise


def unusable_rows(logits: torch.Tensor) -> torch.Tensor:
    """(B, rows, vocab) -> (B,): the sessions with a NaN or +inf among their logits."""
    return (logits.isnan() | (logits == float("inf"))).flatten(1).any(dim=-1)


def race(logits: torch.Tensor, settings: torch.Tensor, noise: torch.Tensor, *, narrow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_rows`` given its ``Plan``'s settings and ``noise`` (B, rows, width): tensor
    operations only (no host reads: a CUDA graph can capture it) -> (ids, unusable (B,))."""
    shape, vocab, device = logits.shape[:-1], logits.size(-1), logits.device
    B, per, width = noise.shape
    logits = logits.float().reshape(-1, vocab)
    unusable = unusable_rows(logits.view(B, per, vocab))
    best = logits.argmax(dim=-1)
    temperature, k, top_p, greedy = (column[:, None] for column in settings.unbind(dim=1))
    if not narrow:  # every token a candidate: no sort
        candidates, probs = None, (logits / temperature).softmax(dim=-1)
    else:
        values, candidates = logits.topk(width, dim=-1)  # descending
        outside_k = torch.arange(width, device=device) >= k
        probs = (values.masked_fill(outside_k, float("-inf")) / temperature).softmax(dim=-1)
        # top-p as litgpt's: drop the tokens whose ascending cumulative probability stays within
        # 1 - top_p (in descending order that is the sum from the token to the end), never the first
        from_here = probs.flip(-1).cumsum(-1).flip(-1)
        outside_p = from_here <= 1.0 - top_p
        outside_p[:, 0] = False
        probs = probs.masked_fill(outside_p, 0.0)
    drawn = (probs / noise.view(B * per, width)).argmax(dim=-1)
    if candidates is not None:
        drawn = candidates.gather(-1, drawn[:, None]).squeeze(-1)
    return torch.where(greedy[:, 0] > 0, best, drawn).view(shape), unusable
