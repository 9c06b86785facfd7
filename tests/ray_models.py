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
