"""The trained MLP of tests.models, slowed down so a full-data pass takes seconds (for Ctrl-C tests).

    diagql --model tests.slow_model:slow_mlp --data tests.models:digits --batch-size 8
"""
from __future__ import annotations

import time

from torch import nn

from .models import trained_mlp

SECONDS_PER_BATCH = 0.05


class Slow(nn.Module):
    """Delegates to the MLP's own modules (same layer names: encoder.1, head, ...), sleeping
    per forward call when the batch has more than one item."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.encoder = inner.encoder
        self.head = inner.head

    def forward(self, x):
        if len(x) > 1:
            time.sleep(SECONDS_PER_BATCH)
        return self.head(self.encoder(x))


def slow_mlp() -> Slow:
    return Slow(trained_mlp()).eval()
