"""Small models and data that go wrong in one way each, for tests/test_bad_inputs.py and the CLI.

    diagql --model tests.bad_models:raising --data tests.bad_models:data -e 'AVG NEURONS IN fc1'
"""
from __future__ import annotations

import torch
from torch import nn

N_ITEMS, N_FEATURES, N_CLASSES = 40, 6, 3


def _inputs() -> torch.Tensor:
    return torch.randn(N_ITEMS, N_FEATURES, generator=torch.Generator().manual_seed(0))


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """A pair (X, y) with labels 0..2."""
    return _inputs(), torch.arange(N_ITEMS) % N_CLASSES


def unlabelled() -> tuple[torch.Tensor, None]:
    return _inputs(), None


def bad_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """Label 12 on item 5, for a model with 3 classes."""
    y = torch.arange(N_ITEMS) % N_CLASSES
    y[5] = 12
    return _inputs(), y


class BareX(torch.utils.data.Dataset):
    """A Dataset whose items are bare inputs, without labels."""

    def __init__(self):
        self.X = _inputs()

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i]


class Net(nn.Module):
    """fc1 -> BatchNorm -> ReLU -> fc2; ``unused`` never runs, ``shared`` runs twice; the
    ``fail_on``-th call of forward raises ``fail_with`` (0: never); with ``nan_marked``, items
    whose first feature is 99 get NaN activations from bn on (fc1's output is finite)."""

    def __init__(self, fail_on: int = 0, fail_with: type[BaseException] = ValueError,
                 nan_marked: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(N_FEATURES, 8)
        self.bn = nn.BatchNorm1d(8)
        self.shared = nn.Identity()
        self.unused = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, N_CLASSES)
        self.fail_on, self.fail_with, self.nan_marked = fail_on, fail_with, nan_marked
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on:
            raise self.fail_with("forward failed on purpose")
        h = self.fc1(x)
        if self.nan_marked:
            h = torch.where((x[:, :1] == 99.0), torch.full_like(h, float("nan")), h)
        h = self.shared(torch.relu(self.bn(h)))
        return self.fc2(self.shared(h))


def net() -> Net:
    return Net()


def raising() -> Net:
    """Raises on the 2nd call: the 1st is the layer probe, so the profile pass fails."""
    return Net(fail_on=2)


def nan_data() -> tuple[torch.Tensor, torch.Tensor]:
    X, y = data()
    X[[3, 7, 30], 0] = 99.0
    return X, y


def nan_net() -> Net:
    return Net(nan_marked=True)


class _Narrowing(Net):
    """Net whose class scores lose their last column for a batch holding a marked item (its
    first feature 77): no one width of output per item."""

    def forward(self, x):
        out = super().forward(x)
        return out[:, :2] if bool((x[:, 0] == 77.0).any()) else out


class _RaisingOnMarked(Net):
    """Net whose forward raises for a batch holding a marked item (first feature 77)."""

    def forward(self, x):
        if bool((x[:, 0] == 77.0).any()):
            raise ValueError("a marked item")
        return super().forward(x)


def raising_on_marked() -> Net:
    return _RaisingOnMarked()


def narrowing() -> Net:
    return _Narrowing()


def marked_data() -> tuple[torch.Tensor, torch.Tensor]:
    """data() with item 25 marked for ``narrowing``."""
    X, y = data()
    X[25, 0] = 77.0
    return X, y
