"""LeNet-5 with batch normalisation: the classifier that DiagQL's built-in demo diagnoses.

Each block is a named attribute so that ``conv1``, ``conv2``, ``fc1`` and ``fc2`` expose
post-activation outputs and ``fc3`` the logits, which are the layers queries refer to.
"""

from pathlib import Path

import torch
from torch import nn

WEIGHTS_PATH = Path(__file__).with_name("lenet5_mnist5k.pt")


class LeNet5(nn.Module):
    # Channels and widths of the blocks: conv1, conv2, fc1, fc2.
    WIDTHS = (6, 16, 120, 84)

    def __init__(self):
        super().__init__()
        c1, c2, f1, f2 = self.WIDTHS
        self.conv1 = nn.Sequential(nn.Conv2d(1, c1, 5, padding=2), nn.BatchNorm2d(c1), nn.ReLU())
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Sequential(nn.Conv2d(c1, c2, 5), nn.BatchNorm2d(c2), nn.ReLU())
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Sequential(nn.Linear(c2 * 25, f1), nn.BatchNorm1d(f1), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(f1, f2), nn.BatchNorm1d(f2), nn.ReLU())
        self.fc3 = nn.Linear(f2, 10)

    def forward(self, x):
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.flatten(x)
        x = self.fc2(self.fc1(x))
        return self.fc3(x)


class WideLeNet5(LeNet5):
    """The same blocks, twice as wide: a second architecture to compare with the first
    (``SIMILARITY base.fc2, wide.fc2``); its weights are trained, not shipped
    (``python -m diagql.mnist_demo.train --arch wide``)."""

    WIDTHS = (12, 32, 240, 168)


ARCHITECTURES = {"lenet5": LeNet5, "wide": WideLeNet5}


def load_model(weights_path=None) -> LeNet5:
    """Build LeNet5 with the shipped (or given) weights, in eval mode."""
    path = Path(weights_path) if weights_path is not None else WEIGHTS_PATH
    if not path.is_file():
        raise RuntimeError(
            f"demo weights not found at {path}; create them with "
            "`python -m diagql.mnist_demo.train`"
        )
    model = LeNet5()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
