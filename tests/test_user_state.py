"""What DiagQL leaves of the user's process: statements from several threads (session/serial.py,
STATEMENTS) answer as plain torch gives them one at a time and leave the model as it was, and
Python's random stream is not moved."""
from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
from torch import nn

import diagql
from diagql.model.train_mode import say_train_mode

N, D = 600, 12


def _model_and_data():
    torch.manual_seed(0)
    X = torch.randn(N, D)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    model = nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(20):  # trained, and left in train mode, as a training loop leaves it
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    return model, X, y


def test_two_threads_on_one_model_get_exact_answers_and_leave_it_as_it_was():
    """Two connections on one model (left in train mode, with BatchNorm and Dropout), a
    thread each: their passes hooked and switched the same modules, so one thread's rows fed
    the other's hooks, a pass ran in train mode (BatchNorm's statistics moved) and answers
    were off by up to 0.09, or failed naming a layer that "ran more than once"."""
    model, X, y = _model_and_data()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    with torch.no_grad():
        truth = model[1](model[0](X))[y == 1].mean(0).double().numpy()
    model.train()
    connections = [diagql.connect(model, (X, y), batch_size=32, cache_dir=False,
                                  progress=False) for _ in range(2)]
    errors, failures = [], []

    def ask(db):
        for _ in range(12):
            try:
                result = db.query("AVG NEURONS IN 1 WHERE class = 1")
                errors.append(float(np.abs(result.values - truth).max()))
            except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                failures.append(repr(exc))

    threads = [threading.Thread(target=ask, args=(db,)) for db in connections]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(errors) == 24 and max(errors) < 1e-6
    assert model.training and all(m.training for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_the_users_own_forward_in_another_thread_is_left_alone():
    """A thread of the user's running the model (inference) while DiagQL answers: DiagQL's
    hooks had fed its batches into the pass ("module ran more than once") and raised
    DiagQL's errors inside the user's own forward."""
    model, X, y = _model_and_data()
    model.eval()
    with torch.no_grad():
        truth = model[1](model[0](X))[y == 1].mean(0).double().numpy()
        own = model(X[:50])
    db = diagql.connect(model, (X, y), batch_size=32, cache_dir=False, progress=False)
    stop, theirs, failures = threading.Event(), [], []

    def serve():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    theirs.append(float((model(X[:50]) - own).abs().max()))
            except BaseException as exc:  # noqa: BLE001 - any failure is the finding
                failures.append(repr(exc))

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        errors = [float(np.abs(db.query("AVG NEURONS IN 1 WHERE class = 1").values - truth)
                        .max()) for _ in range(15)]
    finally:
        stop.set()
        thread.join()
    assert failures == [] and theirs and max(theirs) == 0.0
    assert max(errors) < 1e-6


def test_a_script_read_halfway_holds_no_other_thread_up():
    """iter_execute stopped after its first answer had kept the statement lock while the
    generator waited, and another thread's query waited with it, until the generator was
    closed."""
    model, X, y = _model_and_data()
    model.eval()
    db = diagql.connect(model, (X, y), batch_size=32, cache_dir=False, progress=False)
    other = diagql.connect(model, (X, y), batch_size=32, cache_dir=False, progress=False)
    steps = db.iter_execute("AVG NEURONS IN 0; AVG NEURONS IN 1; AVG NEURONS IN 4;")
    first = next(steps)
    answered = []
    thread = threading.Thread(target=lambda: answered.append(other.query("AVG NEURONS IN 4")))
    thread.start()
    thread.join(timeout=60)
    assert answered and not thread.is_alive()
    with torch.no_grad():
        np.testing.assert_allclose(first.values, model[0](X).double().mean(0).numpy(),
                                   atol=1e-6)
        truth = model(X).double().mean(0).numpy()
    np.testing.assert_allclose(answered[0].values, truth, atol=1e-6)
    assert [r.layer for r in steps] == ["1", "4"]


def test_pythons_random_stream_is_not_moved():
    """rich draws from Python's global random when first imported, which DiagQL did at its
    first bar or table (an UNTIL query's): a seeded notebook's next draws changed. A fresh
    process, so that rich is not imported yet."""
    script = """
import random, torch, diagql
random.seed(5)
state = random.getstate()
X, y = torch.randn(200, 4), torch.randint(0, 2, (200,))
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
db = diagql.connect(model, (X, y), cache_dir=False)
db.query("AVG NEURONS IN 0 USING SAMPLE random(0.2) UNTIL width <= 0.01 WITHIN 1 SECONDS")
str(db.query("SHOW PROFILE"))
print(random.getstate() == state)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.stdout.strip().splitlines()[-1] == "True", done.stderr


def test_a_model_left_in_train_mode_is_said_to_be_answered_in_eval_mode():
    """Its answers are eval mode's (plain torch's, below); that was said only in the README."""
    import warnings

    model, X, y = _model_and_data()
    with pytest.warns(diagql.DiagQLWarning, match=r"the model is in train mode; DiagQL answers "
                                                  r"it as in eval mode, .*\(Dropout: dropout "
                                                  r"off; BatchNorm1d: running "
                                                  r"statistics\)"):
        db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    # without dropout, the warning does not say dropout is turned off (sweep LL1)
    with pytest.warns(diagql.DiagQLWarning, match=r"\(BatchNorm1d: running statistics\)"):
        diagql.connect(nn.Sequential(nn.Linear(D, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train(),
                       (X, y), cache_dir=False, progress=False)
    result = db.query("AVG NEURONS IN 1")
    assert model.training
    model.eval()
    with torch.no_grad():
        truth = model[1](model[0](X)).double().mean(0).numpy()
    np.testing.assert_allclose(result.values, truth, atol=1e-6)
    # in eval mode with its dropout back in train mode (MC dropout): the module is named
    mc = nn.Sequential(nn.Linear(D, 8), nn.Dropout(0.5), nn.Linear(8, 3)).eval()
    mc[1].train()
    with pytest.warns(diagql.DiagQLWarning, match=r"the model is in eval mode but 1 of its "
                                                  r"modules is in train mode \('1'\); DiagQL "
                                                  r"answers them as in eval mode, as inference "
                                                  r"runs them \(Dropout: dropout off\)"):
        diagql.connect(mc, (X, y), cache_dir=False, progress=False)
    assert mc[1].training and not mc.training
    # dropout inside an attention or between a recurrent net's layers is turned off too
    for net in (nn.MultiheadAttention(D, 1, dropout=0.5), nn.LSTM(D, 4, 2, dropout=0.5)):
        with pytest.warns(diagql.DiagQLWarning, match=rf"\({type(net).__name__}: dropout off\)"):
            say_train_mode(nn.Sequential(net).train(), "the model")
    with warnings.catch_warnings():  # in eval mode, or without modules that differ: no word
        warnings.simplefilter("error", diagql.DiagQLWarning)
        diagql.connect(model, (X, y), cache_dir=False, progress=False)
        diagql.connect(nn.Sequential(nn.Linear(D, 3)).train(), (X, y), cache_dir=False,
                       progress=False)


class _ScalesInPlace(nn.Module):
    """A forward that scales its input in place, as old code writes ``x /= 255.``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(10, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x /= 4.0
        return self.head(torch.relu(self.fc(x)))


@pytest.mark.parametrize("form", ["pair", "columns", "TensorDataset"])
def test_a_model_that_scales_its_input_in_place_leaves_the_users_data_and_answers_alone(form):
    """Each pass had handed the model views of the user's X: the model divided the user's
    tensor again on every pass (by 1,000 after three queries), answers drifted, and the
    probe's checks blamed dropout and augmentation for the model's own writes."""
    import warnings

    torch.manual_seed(0)
    X, y = torch.randn(300, 10) * 4, torch.randint(0, 3, (300,))
    kept = X.clone()
    model = _ScalesInPlace().eval()
    with torch.no_grad():
        truth = model.fc(X / 4.0).double().numpy()
    data = {"pair": (X, y), "columns": {"x": X, "label": y},
            "TensorDataset": torch.utils.data.TensorDataset(X, y)}[form]
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagql.DiagQLWarning)
        db = diagql.connect(model, data, cache_dir=False, progress=False)
        for _ in range(2):
            np.testing.assert_allclose(db.query("AVG NEURONS IN fc USING FULL").values,
                                       truth.mean(axis=0), rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(
                db.query("AVG NEURONS IN fc WHERE class = 1 USING FULL").values,
                truth[y.numpy() == 1].mean(axis=0), rtol=1e-6, atol=1e-7)
    assert torch.equal(X, kept)


class _Stateful(nn.Module):
    """A forward that changes its buffers in eval mode: a call counter rebound to a new tensor
    and a running mean of its hidden layer updated in place, which the output subtracts."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, 8), nn.Linear(8, 3)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("running", torch.zeros(8))

    def forward(self, x):
        h = self.fc(x)
        self.calls = self.calls + 1
        self.running.mul_(0.5).add_(0.5 * h.mean(dim=0))
        return self.head(h - self.running)


def test_buffers_a_forward_changes_are_put_back_after_each_pass():
    """DiagQL's passes had moved the buffers (7 calls counted for 4 statements, the running
    mean left where the last batch put it), and each pass started where the one before had
    left them, so an exact answer was another's on every run. Each pass starts from the
    user's buffers, as a pass by hand over the same batches does, and leaves them so."""
    torch.manual_seed(0)
    model, X = _Stateful().eval(), torch.randn(N, D)
    y = torch.arange(N) % 3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    truth, twin = [], _Stateful().eval()
    twin.load_state_dict(state)
    with torch.no_grad():
        for start in range(0, N, 64):  # the pass by hand: batches of 64, from the start state
            h = twin.fc(X[start:start + 64])
            truth.append(twin.head(h - twin.running.mul_(0.5).add_(0.5 * h.mean(dim=0))))
    truth = torch.cat(truth).double().mean(dim=0).numpy()
    with pytest.warns(diagql.DiagQLWarning, match=r"the model's forward changes its buffers in "
                                                  r"eval mode, and its outputs read them "
                                                  r"\(calls, running: "):
        db = diagql.connect(model, (X, y), batch_size=64, cache_dir=False, progress=False)
        db.profile
    for _ in range(2):
        got = db.query("AVG NEURONS IN head USING FULL").values
        np.testing.assert_allclose(got, truth, atol=1e-5)
        db.query("AVG NEURONS IN fc USING SAMPLE random(0.2)")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_lazy_modules_buffers_made_by_the_first_pass_are_kept():
    """Copying every buffer before a pass had read a LazyBatchNorm's uninitialized buffers
    and failed every statement; the buffers its first call makes stay, as a forward by hand
    leaves them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(8), nn.LazyBatchNorm1d(), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    X, y = torch.randn(100, 5), torch.arange(100) % 3
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    got = db.query("AVG NEURONS IN 1").values
    assert type(model[1].running_mean) is torch.Tensor and model[1].running_mean.shape == (8,)
    with torch.no_grad():
        np.testing.assert_allclose(got, model[1](model[0](X)).double().mean(0).numpy(),
                                   atol=1e-6)


class _RotaryCache(nn.Module):
    """Registers its position table as a buffer on first use (a rotary embedding's cache)."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(D, 8), nn.Linear(8, 3)

    def forward(self, x):
        if not hasattr(self, "table"):
            self.register_buffer("table", torch.arange(8.0) / 8)
        return self.head(torch.relu(self.fc(x)) + self.table)


def test_a_buffer_a_pass_registers_is_taken_out_again():
    """A buffer the forward registers on first use had joined the model's state_dict through
    DiagQL's passes, so a strict load_state_dict into a fresh model failed."""
    torch.manual_seed(0)
    model, X = _RotaryCache().eval(), torch.randn(N, D)
    keys = set(model.state_dict())
    db = diagql.connect(model, (X, torch.arange(N) % 3), cache_dir=False, progress=False)
    got = db.query("AVG NEURONS IN head USING FULL").values
    assert set(model.state_dict()) == keys and not hasattr(model, "table")
    with torch.no_grad():
        np.testing.assert_allclose(got, model(X).double().mean(0).numpy(), atol=1e-6)
