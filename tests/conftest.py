"""Shared fixtures: scikit-learn's digits and small models trained on them (see tests/models.py).

Every data and model fixture is session-scoped: the data loads once and each model trains once (in well under
a second, with a fixed seed), however many test files use them.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tests import models


@pytest.fixture(scope="session", autouse=True)
def isolated_cache_dir(tmp_path_factory):
    """Connections and the CLI subprocesses (which inherit the environment) cache in a fresh
    directory, never in the user's own cache."""
    before = os.environ.get("DIAGQL_CACHE_DIR")
    os.environ["DIAGQL_CACHE_DIR"] = str(tmp_path_factory.mktemp("diagql-cache"))
    yield os.environ["DIAGQL_CACHE_DIR"]
    if before is None:
        del os.environ["DIAGQL_CACHE_DIR"]
    else:
        os.environ["DIAGQL_CACHE_DIR"] = before


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is faster than two fighting over a small machine. On a
    busy 2-core machine two OpenMP threads spin waiting for each other over tiny ops:
    tests/test_sequences.py cost 51 s of CPU with two, 10-12 s with one. Every test runs on one
    (a module's ``pytest.mark.usefixtures("one_thread")`` still names it); the CLI and REPL
    subprocesses keep torch's default."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def plots_and_refuses_a_bad_target(tmp_path):
    """A check that a statement with PLOT '{target}' writes its figure there, and that an
    unwritable target (a missing directory) is refused before any forward pass."""
    pytest.importorskip("matplotlib")
    from diagql.errors import BindError

    def check(db, statement: str):
        target = tmp_path / "plot.png"
        result = db.query(statement.format(target=target))
        assert target.stat().st_size > 1000 and f"plot written to {target}" in result.notes
        passes = db.counters["passes"]
        with pytest.raises(BindError, match="cannot plot to"):
            db.query(statement.format(target=tmp_path / "missing" / "plot.png"))
        with pytest.raises(BindError, match="plot.png' is a file, not a directory"):
            db.query(statement.format(target=target / "plot.png"))
        (tmp_path / "folder.png").mkdir()  # had failed only as it was written, status 0
        with pytest.raises(BindError, match="folder.png': it is a directory; name a file"):
            db.query(statement.format(target=tmp_path / "folder.png"))
        assert db.counters["passes"] == passes
        # A file that fails only as it is written (/proc takes none): the answer is kept.
        result = db.query(statement.format(target="/proc/diagql-plot.png"))
        assert any(note.startswith("no plot: cannot write the plot") for note in result.notes)

    return check


@pytest.fixture(scope="session", autouse=True)
def cache_writes_everything():
    """The disk cache skips an entry that is cheaper to compute than to read back (a random
    draw over 1,797 items takes 0.1-0.3 ms, a read 0.3 ms): which side of that line a tiny
    test entry falls on depends on the machine's load. Tests of caching need every entry
    written, so reading back costs nothing here; tests of the cost model set their own costs
    (tests/test_cache.py, ``read_costs``)."""
    from diagql.storage import store

    before = store.READ_FIXED, store.READ_RATE
    store.READ_FIXED, store.READ_RATE = 0.0, float("inf")
    yield
    store.READ_FIXED, store.READ_RATE = before


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """X float32 (1797, 1, 8, 8) in [0, 1]; y int64 (1797,)."""
    X, y = models.digits()
    assert X.dtype == torch.float32 and tuple(X.shape) == (1797, 1, 8, 8)
    assert y.dtype == torch.int64 and float(X.max()) <= 1.0
    return X, y


def _check_decent_not_perfect(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
    """Queries about `correct` and `incorrect` need both, in several classes."""
    with torch.no_grad():
        correct = (model(X).argmax(dim=1) == y).numpy()
    labels = y.numpy()
    assert 0.8 < correct.mean() < 1.0
    assert len(np.unique(labels[correct])) == 10
    assert len(np.unique(labels[~correct])) >= 5


@pytest.fixture(scope="session")
def cnn(digits) -> torch.nn.Sequential:
    """A plain nn.Sequential (layers "0".."8") with ReLU(inplace=True) after its conv and linear layers."""
    model = models.trained_cnn()
    _check_decent_not_perfect(model, *digits)
    return model


@pytest.fixture(scope="session")
def mlp(digits) -> torch.nn.Module:
    """Nested names: encoder, encoder.0 (Flatten), encoder.1, encoder.3 (Linear), encoder.2/4 (ReLU), head."""
    model = models.trained_mlp()
    _check_decent_not_perfect(model, *digits)
    return model


@pytest.fixture(scope="session")
def bn_cnn(digits) -> torch.nn.Sequential:
    """BatchNorm and Dropout: wrong answers and changed statistics if run in training mode."""
    model = models.trained_bn_cnn()
    _check_decent_not_perfect(model, *digits)
    return model
