"""The model of the Ray engine's tests (tests/test_ray_engine.py): the digits CNN built from
saved weights, so that the driver and every worker hold the same one, whose forward ends its
own process once a signal file appears: a worker that dies in the middle of a shard."""
from __future__ import annotations

import os

import torch
from torch import nn

from tests import models


class DiesOnce(nn.Module):
    """``net`` is tests.models.build_cnn; the first process to find ``signal`` (and remove it)
    exits at its next forward call, so the shard it runs has already fed a batch."""

    def __init__(self, signal: str, spare: int):
        super().__init__()
        self.net = models.build_cnn()
        self.signal = signal
        self.spare = spare  # the test's own process, which never dies
        self.armed = False

    def forward(self, x):
        if os.getpid() == self.spare:
            pass
        elif self.armed:
            self.armed = False
            try:
                os.remove(self.signal)
            except FileNotFoundError:
                pass  # another worker took it
            else:
                os._exit(1)
        elif os.path.exists(self.signal):
            self.armed = True
        return self.net(x)


def build(weights: str, signal: str, spare: int) -> DiesOnce:
    model = DiesOnce(signal, spare)
    model.net.load_state_dict(torch.load(weights, weights_only=True))
    return model.eval()


def built_only_in(pid: int) -> nn.Module:
    """The digits CNN in process ``pid``; anywhere else, the error of a node that lacks
    something the model needs."""
    if os.getpid() != pid:
        raise FileNotFoundError("no weights on this node")
    return models.build_cnn()


def split_per_process(X, y, seeded: bool):
    """Two thirds of (X, y) as a TensorDataset, chosen at random per process unless
    ``seeded``: a validation split made with ``random_split`` and no generator."""
    from torch.utils.data import TensorDataset, random_split

    seed = 0 if seeded else os.getpid()
    part, _ = random_split(TensorDataset(X, y), [2 / 3, 1 / 3],
                           generator=torch.Generator().manual_seed(seed))
    return part


# Read by Scaled's forward and Normed's items: a script that sets them at run time changes
# its own process's value, not a Ray worker's, which imports this module afresh.
SCALE = 1.0
NORM = 1.0
SEEN: dict = {}  # a cache Scaled's forward fills: the driver's differs from a fresh worker's


class Scaled(nn.Module):
    """A linear map of its input scaled by the module's global SCALE."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(21)
        self.net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        SEEN[x.shape[0]] = True
        return self.net(x * SCALE)


class Normed(torch.utils.data.Dataset):
    """(x, y) pairs whose inputs are divided by the module's global NORM as they are read."""

    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i] / NORM, self.y[i]


class ExtraCall(nn.Module):
    """``blk`` runs twice per pass, and a third time first, on a side branch whose result no
    output reads, in a batch holding an item whose third feature is above 3.5 (SW1,
    model/call_sites.py): here for the Ray engine's workers, which import it, and the local
    tests alike."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(25)
        self.blk = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        if bool(x[:, 2].max() > 3.5):
            self.side = self.blk(x * 0.1)
        return self.head(torch.tanh(self.blk(torch.tanh(self.blk(x)))))
