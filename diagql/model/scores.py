"""What a model's class scores mean: how many classes an output of a given shape scores, and
each class's probability (softmax, or a sigmoid for one logit: a binary classifier)."""
from __future__ import annotations

import torch

from diagql.errors import DiagQLError


def classes_of(shape: tuple[int, ...]) -> int:
    """How many classes a model output of per-item ``shape`` scores: C scores score C
    classes; one logit (shape (1,), or () once squeezed) is a binary classifier's log-odds of
    class 1, as BCEWithLogitsLoss trains it, so it scores 2."""
    if len(shape) > 1:
        raise DiagQLError(f"the model's output has per-item shape {shape}; DiagQL needs one "
                          f"score per class")
    return 2 if shape in ((), (1,)) else shape[0]


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Each class's probability, float64: the softmax of the scores, or for one logit
    (a binary classifier) the sigmoid's (1 - p, p), so class 1 wins where the logit is > 0."""
    logits = logits.to(torch.float64)
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)
