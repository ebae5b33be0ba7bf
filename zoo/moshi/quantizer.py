"""Mimi's split residual vector quantizer: one semantic codebook (``rvq_first``, distilled from
WavLM in training) and the acoustic ones (``rvq_rest``), each with its own 1x1 input and output
projections; codes are [semantic, acoustic...]. Moshi uses 8 of the published 32 codebooks.

Codebooks are the published EMA buffers (``vq.layers.N._codebook.embedding_sum``,
``cluster_usage``, ``_initialized``): a centroid is embedding_sum / max(cluster_usage, 1e-5).
The reference's older spellings (``embed_sum``/``embed_avg``, ``cluster_size``, ``inited``) are
accepted at load time (``legacy_codebook_names``)."""
from __future__ import annotations

import torch
from torch import nn

EPSILON = 1e-5
LEGACY = {"inited": "_initialized", "cluster_size": "cluster_usage", "embed_avg": "embedding_sum",
          "embed_sum": "embedding_sum"}


class Codebook(nn.Module):
    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self.register_buffer("_initialized", torch.ones(1))
        self.register_buffer("cluster_usage", torch.ones(bins))
        self.register_buffer("embedding_sum", torch.zeros(bins, dim))

    def centroids(self) -> torch.Tensor:
        return self.embedding_sum / self.cluster_usage.clamp(min=EPSILON)[:, None]


class _Layer(nn.Module):
    def __init__(self, dim: int, bins: int) -> None:
        super().__init__()
        self._codebook = Codebook(dim, bins)


class _Layers(nn.Module):
    def __init__(self, dim: int, bins: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(dim, bins) for _ in range(n))


class ResidualVQ(nn.Module):
    """``input_proj`` / ``output_proj`` (Conv1d, kernel 1, no bias) around ``vq.layers``."""

    def __init__(self, dimension: int, io_dimension: int, bins: int, n_q: int) -> None:
        super().__init__()
        self.input_proj = nn.Conv1d(io_dimension, dimension, 1, bias=False)
        self.output_proj = nn.Conv1d(dimension, io_dimension, 1, bias=False)
        self.vq = _Layers(dimension, bins, n_q)

    def encode(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        """x (B, C, T) -> codes (B, n_q, T): each level quantizes what the previous left."""
        residual = self.input_proj(x).transpose(1, 2)  # (B, T, D)
        codes = []
        for layer in self.vq.layers[:n_q]:
            centroids = layer._codebook.centroids()
            flat = residual.reshape(-1, residual.size(-1))
            # torch.cdist as the reference (its argmin, ties included)
            index = torch.cdist(flat[None], centroids[None], p=2)[0].argmin(dim=-1).view(residual.shape[:-1])
            residual = residual - centroids[index]
            codes.append(index)
        return torch.stack(codes, dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, K, T) -> (B, C, T)."""
        total = 0
        for k in range(codes.size(1)):
            total = total + self.vq.layers[k]._codebook.centroids()[codes[:, k]]
        return self.output_proj(total.transpose(1, 2))


class SplitResidualVQ(nn.Module):
    def __init__(self, dimension: int, io_dimension: int, bins: int, n_q: int, n_q_semantic: int = 1) -> None:
        super().__init__()
        self.n_q_semantic = n_q_semantic
        self.bins = bins
        self.rvq_first = ResidualVQ(dimension, io_dimension, bins, n_q_semantic)
        self.rvq_rest = ResidualVQ(dimension, io_dimension, bins, n_q - n_q_semantic)

    def encode(self, x: torch.Tensor, n_q: int) -> torch.Tensor:
        first = self.rvq_first.encode(x, self.n_q_semantic)
        if n_q <= self.n_q_semantic:
            return first
        return torch.cat([first, self.rvq_rest.encode(x, n_q - self.n_q_semantic)], dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        out = self.rvq_first.decode(codes[:, : self.n_q_semantic])
        if codes.size(1) > self.n_q_semantic:
            out = out + self.rvq_rest.decode(codes[:, self.n_q_semantic:])
        return out


def legacy_codebook_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference's load-time renames of older codebook buffer names."""
    out = {}
    for key, value in state.items():
        head, _, last = key.rpartition(".")
        if head.endswith("._codebook") and last in LEGACY:
            key = f"{head}.{LEGACY[last]}"
        out[key] = value
    return out
