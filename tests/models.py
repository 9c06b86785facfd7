"""Small, deterministic models on scikit-learn's digits, shared by the test suite and the CLI tests.

    diagql --model tests.models:trained_cnn --data tests.models:digits ...

``build_cnn`` is a plain ``nn.Sequential`` (layer names "0", "1", ...) with in-place ReLUs;
``build_mlp`` nests its layers (``encoder.1``, ``encoder.3``, ``head``). Both are trained
briefly with a fixed seed, so they are decent but make mistakes.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn


@functools.lru_cache(maxsize=None)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    table = _digits_table()
    X = (table[:, :-1].astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = table[:, -1].astype(np.int64)
    return X, y


def _digits_table() -> np.ndarray:
    """load_digits' own CSV (pixels then label per row), read without importing scikit-learn:
    that import costs over a second in every CLI subprocess the tests start."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if path.is_file():
        return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.column_stack([bunch.data, bunch.target])


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 1,797 digits: X float32 (N, 1, 8, 8) scaled to [0, 1], y int64 (N,)."""
    X, y = _digits_arrays()
    return torch.from_numpy(X.copy()), torch.from_numpy(y.copy())


def build_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 0: 4×8×8
        nn.ReLU(inplace=True),          # 1
        nn.Conv2d(4, 8, 3),             # 2: 8×6×6
        nn.ReLU(inplace=True),          # 3
        nn.MaxPool2d(2),                # 4: 8×3×3
        nn.Flatten(),                   # 5: 72
        nn.Linear(72, 32),              # 6: 32
        nn.ReLU(inplace=True),          # 7
        nn.Linear(32, 10),              # 8: 10
    )


class MLP(nn.Module):
    """Nested names: encoder.0 (Flatten), encoder.1, encoder.3 (Linear), head."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16),
                                     nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.encoder(x))


def build_bn_cnn(seed: int = 0) -> nn.Sequential:
    """A Sequential with BatchNorm and Dropout: wrong answers (and changed running statistics)
    if anything runs it in training mode."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),  # 0: 4×8×8
        nn.BatchNorm2d(4),              # 1
        nn.ReLU(inplace=True),          # 2
        nn.Dropout(0.5),                # 3
        nn.Flatten(),                   # 4: 256
        nn.Linear(256, 10),             # 5
    )


def build_mlp(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def train(model: nn.Module, X: torch.Tensor, y: torch.Tensor, epochs: int, seed: int = 0,
          lr: float = 0.01, batch_size: int = 128) -> nn.Module:
    """Adam on shuffled mini-batches, deterministic for a given seed; leaves the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    threads = torch.get_num_threads()
    # One thread: the same weights on every machine, and no thread-pool overhead on tiny ops.
    torch.set_num_threads(1)
    try:
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(X), generator=generator)
            for start in range(0, len(X), batch_size):
                batch = order[start:start + batch_size]
                optimiser.zero_grad()
                loss_fn(model(X[batch]), y[batch]).backward()
                optimiser.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return model


@functools.lru_cache(maxsize=None)
def trained_cnn() -> nn.Sequential:
    X, y = digits()
    return train(build_cnn(seed=0), X, y, epochs=4, seed=0)


@functools.lru_cache(maxsize=None)
def trained_mlp() -> MLP:
    X, y = digits()
    return train(build_mlp(seed=0), X, y, epochs=5, seed=0)


@functools.lru_cache(maxsize=None)
def trained_bn_cnn() -> nn.Sequential:
    X, y = digits()
    return train(build_bn_cnn(seed=0), X, y, epochs=2, seed=0)


def tabular(n: int, seed: int = 8) -> tuple[torch.Tensor, torch.Tensor, nn.Sequential, np.ndarray]:
    """A small untrained 5-6-3 ReLU classifier over ``n`` Gaussian items labelled 0, 1, 2 in
    turn: (X, y, model, its hidden layer "1" per item in float64, by plain torch)."""
    g = torch.Generator().manual_seed(seed)
    X, y = torch.randn(n, 5, generator=g), torch.arange(n) % 3
    torch.manual_seed(seed + 1)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        hidden = model[1](model[0](X)).double().numpy()
    return X, y, model, hidden


class CountedItems(torch.utils.data.Dataset):
    """(x, y) items one by one, counting the reads made in this process (a loader's workers
    count in their own copies)."""

    def __init__(self, X, y):
        self.X, self.y, self.reads = X, y, 0

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        self.reads += 1
        return self.X[i], self.y[i]

