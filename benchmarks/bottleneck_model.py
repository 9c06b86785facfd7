"""An untrained MLP with a 3-wide bottleneck, for the estimate benchmarks: its latent (the last
hidden layer) is a nonlinear function of three numbers, with outliers, so a few rows carry
high leverage in the assisted fit (engine/leverage.py).

    python benchmarks/calibration.py --model bottleneck --samplers random --sizes 0.3 --seeds 3

24 Gaussian features around 5 class centres, 3,000 items diagnosed; widths 32, 3, 64, 48
(seeded); the layers the benchmarks query are body.0 ... body.6.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

LAYERS = [f"body.{i}" for i in range(7)]


def connect(**options):
    import diagql

    torch.manual_seed(5)
    rng = np.random.default_rng(5)
    classes, features, n = 5, 24, 6000
    centres = rng.normal(size=(classes, features)) * 1.2
    labels = rng.integers(0, classes, n)
    x = (centres[labels] + rng.normal(size=(n, features))).astype(np.float32)
    widths = [int(v) for v in rng.choice([32, 48, 64], 3)]
    bottleneck = int(rng.choice([3, 4, 6]))
    model = nn.Sequential()
    model.body = nn.Sequential(
        nn.Linear(features, widths[0]), nn.ReLU(), nn.Linear(widths[0], bottleneck), nn.ReLU(),
        nn.Linear(bottleneck, widths[1]), nn.ReLU(), nn.Linear(widths[1], widths[2]), nn.ReLU())
    model.head = nn.Linear(widths[2], classes)
    model.eval()
    data = torch.utils.data.TensorDataset(torch.from_numpy(x[3000:]),
                                          torch.from_numpy(labels[3000:]))
    return diagql.connect(model, data, **options)
