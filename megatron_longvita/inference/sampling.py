"""Next-token choice: greedy (the paper's evaluation) or temperature / top-k / top-p sampling."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 1234

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1; got "
                f"{self.temperature}, {self.top_k}, {self.top_p}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Draws from a seeded CPU generator: every rank seeded alike draws the same tokens."""

    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed)

    def __call__(self, logits: Tensor) -> Tensor:
        """logits [b, V] -> token ids [b] (int64, on logits' device)."""
        if self.config.greedy:
            return logits.argmax(-1)
        scores = logits.float().cpu() / self.config.temperature
        if self.config.top_k:
            kth = scores.topk(min(self.config.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, -torch.inf)
        if self.config.top_p < 1:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(-1)
            # drop a token when the tokens ranked above it already reach top_p (the first always stays)
            drop = probs.cumsum(-1) - probs >= self.config.top_p
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, -torch.inf))
        choice = torch.multinomial(scores.softmax(-1), 1, generator=self.generator).squeeze(1)
        return choice.to(logits.device)
