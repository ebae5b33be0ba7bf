"""Token sampling shared by every model: top-k, then temperature, then top-p, then a draw, in the
order litgpt (and so Mini-Omni) applies them. A temperature below MIN_TEMPERATURE, or top_k == 1,
is greedy argmax."""
from __future__ import annotations

import torch

# Temperatures below this mean "deterministic": dividing logits by them overflows float32 to inf
# (1e-39 is a valid JSON number) and the softmax becomes NaN, while the draw would be the argmax
# anyway. Every temperature a model has (token, mixture component, noise) uses this one bound.
MIN_TEMPERATURE = 1e-5


def is_zero_temperature(temperature: float) -> bool:
    return temperature < MIN_TEMPERATURE


def sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits (rows, vocab) -> token ids (rows,). Draws use ``generator`` (never the global RNG)."""
    if is_zero_temperature(temperature) or top_k == 1:
        # top_k == 1 leaves one finite logit: the reference's multinomial draw is this argmax.
        return logits.argmax(dim=-1)
    logits = logits.float()
    if top_k is not None and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, indices, values)
    logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, dim=-1, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1.0 - top_p)
        remove[..., -1] = False  # always keep the most probable token
        logits = logits.masked_fill(remove.scatter(-1, sorted_indices, remove), float("-inf"))
    probs = logits.softmax(dim=-1)
    if probs.device.type != "cpu" and generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
