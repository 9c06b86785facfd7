"""LeNet-5 with batch normalisation: the classifier that DiagQL's built-in demo diagnoses.

Each block is a named attribute so that ``conv1``, ``conv2``, ``fc1`` and ``fc2`` expose
post-activation outputs and ``fc3`` the logits, which are the layers queries refer to.
"""

from pathlib import Path

import torch
from torch import nn

WEIGHTS_PATH = Path(__file__).with_name("lenet5_mnist5k.pt")


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(1, 6, 5, padding=2), nn.BatchNorm2d(6), nn.ReLU())
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Sequential(nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.ReLU())
        self.pool2 = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Sequential(nn.Linear(400, 120), nn.BatchNorm1d(120), nn.ReLU())
        self.fc2 = nn.Sequential(nn.Linear(120, 84), nn.BatchNorm1d(84), nn.ReLU())
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool1(self.conv1(x))
        x = self.pool2(self.conv2(x))
        x = self.flatten(x)
        x = self.fc2(self.fc1(x))
        return self.fc3(x)


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
