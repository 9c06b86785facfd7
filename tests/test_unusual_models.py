"""Models and data of forms the other tests do not use (found by sweeping unusual models over
every layer and statement): each answer is checked against plain torch, each refusal is one
DiagQLError naming the problem."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

import diagql
from diagql.errors import DiagQLError


def _mlp(out: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, out))


def _hooked(model: nn.Module, name: str, *inputs) -> torch.Tensor:
    """The module's output for the whole batch, by a hook of the test's own, in float64."""
    seen = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    finally:
        handle.remove()
    (out,) = seen
    return out


class _NoLength(Dataset):
    def __getitem__(self, i):
        return torch.zeros(6), 0


@pytest.mark.parametrize("data, message", [
    ((torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64)), r"the data \(a tuple of 2\) has no items"),
    ((torch.zeros(0, 6), None), "has no items"),
    ([], r"the data \(a list of 0\) has no items"),
    ({}, "the data is an empty mapping"),
    (_NoLength(), "has no length; DiagQL reads items by index, so a Dataset must define __len__"),
])
def test_data_without_items_or_length_is_refused_at_connect(data, message):
    with pytest.raises(DiagQLError, match=message):
        diagql.connect(_mlp(), data, cache_dir=False, progress=False)
