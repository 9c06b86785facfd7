"""Whether the data gives an item the same inputs on every read: the profile, a sample's
activations and each query's pass read the items anew, so a random transform (a training
augmentation) would have them answer about different inputs (docs/ARCHITECTURE.md, "Data
model")."""
from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch

from diagql.errors import DiagQLWarning


def check_repeatable(first, again) -> None:
    """Warn when the same items read twice give different inputs (a random transform, such as
    a training augmentation): the profile, a sample's activations and a query's pass each read
    the data again, so their answers would not be of the same inputs."""
    if not same_inputs(first, again):
        warnings.warn("the data gives the same item different inputs on two reads (a random "
                      "transform, such as a training augmentation?): the profile, samples and "
                      "each query read the items anew, so their answers will not agree; "
                      "diagnose with deterministic (evaluation) transforms",
                      DiagQLWarning, stacklevel=3)


def same_inputs(a, b) -> bool:
    """Whether two reads of a batch's inputs are equal (NaN equal to NaN); True for what
    cannot be compared."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or \
                a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_nested or b.is_nested:
            return True
        return bool(torch.equal(a, b)) or (a.is_floating_point() and bool(
            ((a == b) | (torch.isnan(a) & torch.isnan(b))).all()))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind in "fc")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same_inputs(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_inputs(u, v) for u, v in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - what cannot be compared is not reported
        return True
