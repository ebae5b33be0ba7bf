"""Token sampling shared by every model: top-k, then temperature, then top-p, then a draw, in the
order litgpt (and so Mini-Omni) applies them. A temperature below MIN_TEMPERATURE, or top_k == 1,
is greedy argmax.

``sample_rows`` draws a whole step's batch at once, each row (a session's token, or one of its
codebooks) with its own settings and generator, on the logits' device: one read back to the
host per step, not one per session. It says which rows' logits were unusable (NaN, +inf)
instead of raising for the whole batch, so that session alone ends (UnusableLogits)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

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


def sample_rows(
    logits: torch.Tensor,
    temperatures: Sequence[float],
    top_ks: Sequence[int | None],
    top_ps: Sequence[float],
    generators: Sequence[torch.Generator | None],
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (rows, vocab) -> (token ids (rows,), unusable (rows,) bool); row i with its own
    temperature, top-k, top-p and generator (the references' choice; their ``torch.multinomial``
    draws other random numbers). ``unusable`` marks the rows whose logits held NaN or +inf (their token means
    nothing): read it with the tokens, in the step's one host sync (UnusableLogits).

    The draw is the exponential race: with E ~ Exp(1) per candidate token, argmax p / E is token
    j with probability p_j. The candidates are each row's top-k (the batch's widest k; the whole
    vocabulary, unsorted, when no drawing row narrows it by top-k or top-p). A row's E is drawn
    on the logits' device by its own generator, or, when that lives on the host, by one seeded
    from it: a row's draw never depends on its batch companions, no noise crosses from the host
    and no draw waits for the device."""
    rows, vocab = logits.shape
    device = logits.device
    logits = logits.float()
    unusable = (logits.isnan() | (logits == float("inf"))).any(dim=-1)
    best = logits.argmax(dim=-1)
    greedy = [is_zero_temperature(t) or k == 1 for t, k in zip(temperatures, top_ks, strict=True)]
    if all(greedy):
        return best, unusable
    ks = [vocab if k is None else min(k, vocab) for k in top_ks]
    width = max(k for k, g in zip(ks, greedy) if not g)
    temperature = torch.tensor([max(t, MIN_TEMPERATURE) for t in temperatures], device=device)[:, None]
    drawing = [i for i, g in enumerate(greedy) if not g]
    if all(ks[i] == vocab and top_ps[i] >= 1.0 for i in drawing):  # every token a candidate: no sort
        candidates, probs = None, (logits / temperature).softmax(dim=-1)
    else:
        values, candidates = logits.topk(width, dim=-1)  # descending
        outside_k = torch.arange(width, device=device) >= torch.tensor(ks, device=device)[:, None]
        probs = (values.masked_fill(outside_k, float("-inf")) / temperature).softmax(dim=-1)
        # top-p as litgpt's: drop the tokens whose ascending cumulative probability stays within
        # 1 - top_p (in descending order that is the sum from the token to the end), never the first
        from_here = probs.flip(-1).cumsum(-1).flip(-1)
        outside_p = from_here <= 1.0 - torch.tensor(top_ps, device=device, dtype=probs.dtype)[:, None]
        outside_p[:, 0] = False
        probs = probs.masked_fill(outside_p, 0.0)
    noise = torch.ones(rows, width, device=device)
    source = None  # a generator on the logits' device, for rows whose own lives elsewhere
    for i, (g, generator) in enumerate(zip(greedy, generators, strict=True)):
        if g:
            continue
        if generator is not None and generator.device != noise.device:
            if source is None:
                source = torch.Generator(device=device)  # this call's own: other threads have theirs
            source.manual_seed(int(torch.randint(2**62, (), generator=generator)))  # a host draw: no sync
            generator = source
        noise[i].exponential_(generator=generator)
    drawn = (probs / noise).argmax(dim=-1)
    if candidates is not None:
        drawn = candidates.gather(-1, drawn[:, None]).squeeze(-1)
    return torch.where(torch.tensor(greedy, device=device), best, drawn), unusable
