"""A model trained, or data written, in place while a connection is open (session/changes.py):
the next statement answers for the new weights and data, and says it derived them again.
Truth: plain torch on the model and data as they are now."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import diagql
from diagql.errors import DiagQLWarning


def _world(seed: int = 0, width: int = 16):
    torch.manual_seed(seed)
    X, y = torch.randn(400, 10), torch.randint(0, 4, (400,))
    model = nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, 4)).eval()
    return model, X, y


def _train_a_little(model, X, y) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    model.eval()


def _truth(model, X, y):
    with torch.no_grad():
        hidden = model[1](model[0](X)).double()
        predicted = model(X).argmax(1)
    return hidden, predicted != y


def test_training_in_place_is_seen_by_every_kind_of_answer(tmp_path):
    model, X, y = _world()
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    before = db.query("AVG NEURONS IN 1")  # the latent: answered from the profile
    db.query("ARGMAX NEURONS IN 0")
    sampled = db.query("AVG NEURONS IN 0 USING SAMPLE random(0.1, random_state=0)")
    _train_a_little(model, X, y)
    hidden, incorrect = _truth(model, X, y)
    with pytest.warns(DiagQLWarning, match="the model changed \\(its weights, modules or the "
                                           "values its code reads\\) since "
                                           "DiagQL last read it"):
        after = db.query("AVG NEURONS IN 1")
    assert not np.allclose(before.values, after.values)
    np.testing.assert_allclose(after.values, hidden.mean(0).numpy(), rtol=1e-6, atol=1e-7)
    wrong = db.query("AVG NEURONS IN 1 WHERE incorrect")
    assert wrong.n_items == int(incorrect.sum())
    np.testing.assert_allclose(wrong.values, hidden[incorrect].mean(0).numpy(), rtol=1e-6,
                               atol=1e-7)
    with torch.no_grad():
        first = model[0](X).double()
    winners = np.bincount(first.argmax(1).numpy(), minlength=16) / len(X)
    np.testing.assert_allclose(db.query("ARGMAX NEURONS IN 0").values, winners, atol=1e-12)
    # The sample side reads the new weights too (the same items: the sample is drawn again
    # from the new profile, whose latent changed, but random's draw depends on the seed only).
    again = db.query("AVG NEURONS IN 0 USING SAMPLE random(0.1, random_state=0) "
                     "WITH BASELINE")
    items = db.sample("random(0.1, random_state=0)")
    assert not np.allclose(again.values, sampled.values)
    np.testing.assert_allclose(again.baseline.values, first.mean(0).numpy(), rtol=1e-6,
                               atol=1e-7)
    assert again.estimate is not None and len(items) == 40


def test_a_state_dict_loaded_into_the_model_is_seen(tmp_path):
    model, X, y = _world()
    other, _, _ = _world(seed=1)
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    db.query("AVG NEURONS IN 2")
    model.load_state_dict(other.state_dict())
    with pytest.warns(DiagQLWarning, match="the model changed"):
        answer = db.query("AVG NEURONS IN 2")
    with torch.no_grad():
        np.testing.assert_allclose(answer.values, other(X).double().mean(0).numpy(), rtol=1e-6,
                                   atol=1e-7)


def test_data_written_in_place_is_seen(tmp_path):
    model, X, y = _world()
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    db.query("AVG NEURONS IN 1 WHERE incorrect")
    X.mul_(0.5)
    y[:100] = (y[:100] + 1) % 4
    hidden, incorrect = _truth(model, X, y)
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query("AVG NEURONS IN 1 WHERE incorrect")
    assert answer.n_items == int(incorrect.sum())
    np.testing.assert_allclose(answer.values, hidden[incorrect].mean(0).numpy(), rtol=1e-6,
                               atol=1e-7)


def test_nothing_changed_keeps_everything_derived_without_a_word(tmp_path):
    model, X, y = _world()
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    db.query("AVG NEURONS IN 0 USING SAMPLE random(0.1, random_state=0)")
    profile = db.profile
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        db.query("TOPK 3 NEURONS IN 0 USING SAMPLE random(0.1, random_state=0)")
        db.query("AVG NEURONS IN 0")
    assert db.profile is profile


@pytest.mark.parametrize("wrap", ["spectral_norm", "weight_norm", "prune"])
def test_torchs_old_weight_hooks_are_no_change_and_their_weights_changes_are(wrap):
    """The old spectral_norm keeps the raw weight as ``module.weight`` until its pre-hook
    first runs, and after a training step each keeps the weight from before it: reading the
    layers, then querying, warned that the model changed (and probed it again). Its sources
    (weight_orig, weight_g/weight_v, a pruning mask) are still read."""
    model, X, y = _world()
    hidden = nn.Sequential(model[0], nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), model[2]).eval()
    if wrap == "prune":
        from torch.nn.utils import prune

        prune.l1_unstructured(hidden[2], "weight", amount=0.5)
    else:
        getattr(torch.nn.utils, wrap)(hidden[2])
    # Trained as people do: after the last step, ``weight`` holds the value before it.
    _train_a_little(hidden, X, y)
    db = diagql.connect(hidden, (X, y), progress=False, cache_dir=False)
    assert db.layers[:3] == ["0", "1", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        first = db.query("AVG NEURONS IN 2")
        db.query("AVG NEURONS IN 3 USING SAMPLE random(0.2, random_state=0)")
    with torch.no_grad():
        np.testing.assert_allclose(first.values, hidden[:3](X).double().mean(0).numpy(),
                                   rtol=1e-6, atol=1e-7)
        source = {"spectral_norm": "weight_orig", "weight_norm": "weight_v",
                  "prune": "weight_orig"}[wrap]
        getattr(hidden[2], source).mul_(0.5)
    with pytest.warns(DiagQLWarning, match="the model changed"):
        after = db.query("AVG NEURONS IN 2")
    with torch.no_grad():
        np.testing.assert_allclose(after.values, hidden[:3](X).double().mean(0).numpy(),
                                   rtol=1e-6, atol=1e-7)


def test_a_change_before_the_first_statement_is_not_warned_of():
    model, X, y = _world()
    db = diagql.connect(model, (X, y), progress=False)
    _train_a_little(model, X, y)
    hidden, _ = _truth(model, X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        answer = db.query("AVG NEURONS IN 1")
    np.testing.assert_allclose(answer.values, hidden.mean(0).numpy(), rtol=1e-6, atol=1e-7)


def _cnn(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3)).eval()


def _images():
    torch.manual_seed(1)
    return torch.randn(200, 1, 8, 8), torch.randint(0, 3, (200,))


def _through(model, X, upto: int) -> np.ndarray:
    with torch.no_grad():
        return model[:upto + 1](X).flatten(1).double().mean(0).numpy()


def _zero_weight(model):
    model[0].weight.data[1] = 0  # through .data: no version counter moves


def _bn_eps(model):
    model[1].eps = 5.0


def _swap(model):
    model[2] = nn.Tanh()


@pytest.mark.parametrize("change", [_zero_weight, _bn_eps, _swap],
                         ids=["write through .data", "attribute", "swapped module"])
def test_changes_no_version_counter_sees_are_seen_and_never_cached_for_the_original(
        tmp_path, change):
    """A small model is fingerprinted before each statement; the rows of the changed model
    must not be stored under the original's key, which a new process would read."""
    model, (X, y) = _cnn(), _images()
    original = _cnn()
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    db.query("AVG NEURONS IN 2")
    change(model)
    with pytest.warns(DiagQLWarning, match="the model changed .* derived again"):
        answer = db.query("AVG NEURONS IN 2 USING SAMPLE random(0.5, random_state=0) WITH BASELINE")
    np.testing.assert_allclose(answer.baseline.values, _through(model, X, 2), rtol=1e-6,
                               atol=1e-7)
    db.close()
    fresh = diagql.connect(original, (X, y), progress=False, cache_dir=tmp_path)
    fresh.query("SET estimator = plain")  # the sample's own mean, to check its rows
    again = fresh.query("AVG NEURONS IN 2 USING SAMPLE random(0.5, random_state=0) WITH BASELINE")
    np.testing.assert_allclose(again.baseline.values, _through(original, X, 2), rtol=1e-6,
                               atol=1e-7)
    items = fresh.sample("random(0.5, random_state=0)")
    with torch.no_grad():
        sampled = original[:3](X[items]).flatten(1).double().mean(0).numpy()
    np.testing.assert_allclose(again.values, sampled, rtol=1e-6, atol=1e-7)


PICKED = {"column": 1}  # the class scores' column the scores= function below reads


def _picked(out):
    return out[:, PICKED["column"]]


def test_what_a_scores_function_reads_changed_is_seen():
    """scores= reading a column from a dict that changes between statements: the profile's
    predictions had stayed the old column's (sweep SS9: 181 incorrect items where the new
    column gave 226), silently."""
    torch.manual_seed(0)
    X = torch.randn(200, 6)
    y = (X[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    with torch.no_grad():
        out = model(X)
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False, scores=_picked)
    for column, warned in ((1, False), (2, True)):
        PICKED["column"] = column
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            answer = conn.query("AVG NEURONS IN 1 WHERE incorrect")
        assert answer.n_items == int(((out[:, column] > 0).long() != y).sum())
        assert any("scores= function reads" in str(w.message) for w in caught) == warned
    PICKED["column"] = 1


# What _Gained's forward scales by, as a notebook changes them between statements: a number,
# a config dict's entry and a numpy vector, each read as a global.
GAIN = 1.0
SETTINGS = {"gain": 1.0}
SCALES = np.ones(8)


class _Gained(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.fc(x) * GAIN * SETTINGS["gain"] * torch.from_numpy(SCALES).float())


def _edit(kind: str, undo: bool = False) -> None:
    global GAIN
    if kind == "number":
        GAIN = 1.0 if undo else 2.0
    elif kind == "dict":
        SETTINGS["gain"] = 1.0 if undo else 3.0
    else:
        SCALES[:] = 1.0
        if not undo:
            SCALES[2:5] = -2.0


@pytest.mark.parametrize("edit", ["number", "dict", "array"])
def test_what_the_models_code_reads_changed_is_seen_and_never_cached_for_the_original(
        tmp_path, edit):
    """GAIN = 2.0 between statements had gone unseen: a sample's rows of both gains were
    mixed in one answer and stored under the original's key, which a new process read. So
    had a global dict or array edited in place, after that (the stamp walked numbers and
    strings only)."""
    model, fresh = _Gained(), _Gained()
    torch.manual_seed(3)
    X, y = torch.randn(200, 6), torch.randint(0, 3, (200,))
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    db.query("SET estimator = plain")
    sample = "random(0.5, random_state=0)"
    db.query(f"AVG NEURONS IN head USING SAMPLE {sample}")
    tolerance = {"rtol": 1e-6, "atol": 1e-7 if edit == "number" else 1e-6}
    try:
        _edit(edit)
        with pytest.warns(DiagQLWarning, match="the values its code reads"):
            answer = db.query(f"AVG NEURONS IN head USING SAMPLE {sample}")
        with torch.no_grad():
            np.testing.assert_allclose(answer.values,
                                       model(X[db.sample(sample)]).double().mean(0).numpy(),
                                       **tolerance)
        db.close()
    finally:
        _edit(edit, undo=True)
    again = diagql.connect(fresh, (X, y), progress=False, cache_dir=tmp_path)
    again.query("SET estimator = plain")
    with torch.no_grad():
        np.testing.assert_allclose(
            again.query(f"AVG NEURONS IN head USING SAMPLE {sample}").values,
            fresh(X[again.sample(sample)]).double().mean(0).numpy(), **tolerance)


NORM = 1.0  # what _normalised's batches are scaled by: a global a notebook changes


def _normalised(batch):
    xs, ys = zip(*batch)
    return torch.stack(xs) * NORM, torch.stack(ys)


def test_a_number_a_collate_fn_reads_changed_is_seen():
    """A DataLoader's collate_fn scaling by a global, changed between statements, had been
    unseen: the profile's predictions were the old data's beside the new rows."""
    global NORM
    model = _Gained()
    torch.manual_seed(4)
    X, y = torch.randn(120, 6), torch.randint(0, 3, (120,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32,
                                         collate_fn=_normalised)
    db = diagql.connect(model, loader, progress=False)
    db.query("AVG NEURONS IN head WHERE predicted = 1")
    try:
        NORM = 3.0
        with pytest.warns(DiagQLWarning, match="the data changed"):
            answer = db.query("AVG NEURONS IN head WHERE predicted = 1")
        with torch.no_grad():
            out = model(X * 3.0).double()
        np.testing.assert_allclose(answer.values, out[out.argmax(1) == 1].mean(0).numpy(),
                                   rtol=1e-6, atol=1e-6)
    finally:
        NORM = 1.0


def test_numpy_data_written_in_place_is_seen(tmp_path):
    model, (X, y) = _cnn(), _images()
    arrays = X.numpy().copy(), y.numpy().copy()
    db = diagql.connect(model, arrays, progress=False, cache_dir=tmp_path)
    db.query("AVG NEURONS IN 4")
    arrays[0][:50] *= -1
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query("AVG NEURONS IN 4")
    np.testing.assert_allclose(answer.values, _through(model, torch.from_numpy(arrays[0]), 4),
                               rtol=1e-6, atol=1e-7)
    profile = db.profile
    with warnings.catch_warnings():  # read again once, not at every statement after
        warnings.simplefilter("error", DiagQLWarning)
        db.query("AVG NEURONS IN 4 WHERE correct")
    assert db.profile is profile


def test_a_checkpoint_saved_again_is_read_again(tmp_path):
    model, (X, y) = _cnn(), _images()
    path = tmp_path / "e1.pt"
    torch.save(_cnn(seed=1).state_dict(), path)
    db = diagql.connect(model, (X, y), checkpoints={"e1": str(path)}, progress=False,
                        cache_dir=tmp_path / "cache")
    db.query("AVG NEURONS IN e1.4 WHERE incorrect")
    newer = _cnn(seed=2)
    torch.save(newer.state_dict(), path)
    import os
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10 ** 9))
    with pytest.warns(DiagQLWarning, match="model 'e1' changed \\(its checkpoint file\\)"):
        _incorrect_of(db.query("AVG NEURONS IN e1.4 WHERE incorrect"), newer, X, y)


def _incorrect_of(answer, model, X, y) -> None:
    """``answer`` (AVG NEURONS IN <checkpoint>.4 WHERE incorrect) is ``model``'s, by torch."""
    with torch.no_grad():
        logits = model(X).double()
    wrong = (logits.argmax(1) != y).numpy()
    assert answer.n_items == int(wrong.sum())
    np.testing.assert_allclose(answer.values, logits[wrong].mean(0).numpy(), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("given, change", [("module", "trained"), ("state_dict", "trained"),
                                           ("module", "assigned"), ("module", "replaced")])
def test_a_checkpoint_given_in_memory_and_changed_is_read_again(given, change):
    """A checkpoint given as a module or a state_dict had no stamp: after training it 20
    steps further, WHERE incorrect kept 990 items where the truth was 27 (FF1); a module's
    state_dict, taken at connect, missed weights loaded with assign=True or a layer
    replaced (GG2)."""
    model, (X, y) = _cnn(), _images()
    older = _cnn(seed=1)
    db = diagql.connect(model, (X, y), progress=False, cache_dir=False,
                        checkpoints={"e1": older if given == "module" else older.state_dict()})
    db.query("AVG NEURONS IN e1.4 WHERE incorrect")
    if change == "trained":
        _train_a_little(older, X, y)
    elif change == "assigned":
        older.load_state_dict(_cnn(seed=3).state_dict(), assign=True)
    else:
        older[4] = _cnn(seed=4)[4]
    with pytest.warns(DiagQLWarning, match="model 'e1' changed \\(its weights\\)"):
        _incorrect_of(db.query("AVG NEURONS IN e1.4 WHERE incorrect"), older, X, y)


class _Counting(nn.Module):
    """Counts its calls in a buffer, as some models keep caches: its own writes are no change."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(10, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.fc(x)


def test_a_model_that_writes_its_own_buffers_is_not_taken_as_changed(tmp_path):
    _, X, y = _world()
    model = _Counting().eval()
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        db.query("AVG NEURONS IN fc")
        profile = db.profile
        db.query("AVG NEURONS IN fc USING SAMPLE random(0.2, random_state=0)")
        db.execute("AVG NEURONS IN fc WHERE class = 1; TOPK 2 NEURONS IN fc")
        db.plan("AVG NEURONS IN fc USING SAMPLE random(0.3, random_state=1)")
        db.query("AVG NEURONS IN fc")
    # Its own writes are put back after each pass (model/hooks.py, evaluation), unwarned:
    # nothing the model outputs reads the counter.
    assert db.profile is profile and int(model.calls) == 0


def test_a_model_converted_to_float64_between_statements_is_read_so():
    model, X, y = _world()
    db = diagql.connect(model, (X, y), progress=False, cache_dir=False)
    db.query("AVG NEURONS IN 0")
    model.double()
    with pytest.warns(DiagQLWarning, match="the model changed"):
        answer = db.query("AVG NEURONS IN 0")
    with torch.no_grad():
        np.testing.assert_allclose(answer.values, model[0](X.double()).mean(0).numpy(),
                                   rtol=1e-12)


def test_a_model_with_a_sparse_buffer_is_stamped():
    model, X, y = _world()
    model.register_buffer("mask", torch.eye(4).to_sparse())
    db = diagql.connect(model, (X, y), progress=False, cache_dir=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        first = db.query("AVG NEURONS IN 2")
        assert np.array_equal(db.query("AVG NEURONS IN 2").values, first.values)


def test_inference_tensors_are_stamped():
    """Made under torch.inference_mode (features computed beforehand, a model loaded there),
    they keep no version counter."""
    with torch.inference_mode():
        model, X, y = _world()
        X = X * 1.0
    db = diagql.connect(model, (X, y), progress=False, cache_dir=False)
    first = db.query("AVG NEURONS IN 2")
    assert np.array_equal(db.query("AVG NEURONS IN 2").values, first.values)
    with torch.no_grad():
        np.testing.assert_allclose(first.values, model(X).double().mean(0).numpy(), rtol=1e-6)


def _ablate_neuron_3(module, inputs, output):
    output[:, 3] = 0  # in place, returning nothing: an ablation all the same


def test_an_ablation_hook_is_seen_in_session_and_keys_its_own_cache_entries(tmp_path):
    """A hook that changes outputs is part of the model: added or removed between statements
    it is seen like a weight written, and a connection of the hooked model never reads the
    clean model's cached rows (nor the other way round)."""
    model, X, y = _world()
    with torch.no_grad():
        clean = model[0](X).double()
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    db.query("AVG NEURONS IN 0 USING SAMPLE random(0.5, random_state=0)")
    np.testing.assert_allclose(db.query("AVG NEURONS IN 1").values,
                               clean.relu().mean(0).numpy(), rtol=1e-6, atol=1e-7)
    handle = model[0].register_forward_hook(_ablate_neuron_3)
    with torch.no_grad():
        ablated = model[0](X).double()  # the hook runs: plain torch's truth
        predicted = model(X).argmax(1)
    assert (ablated[:, 3] == 0).all() and not (clean[:, 3] == 0).all()
    with pytest.warns(DiagQLWarning, match=r"the model changed \(its hooks\)"):
        latent = db.query("AVG NEURONS IN 1")  # held by the profile, derived again
    np.testing.assert_allclose(latent.values, ablated.relu().mean(0).numpy(), rtol=1e-6,
                               atol=1e-7)
    wrong = db.query("AVG NEURONS IN 0 WHERE incorrect")
    assert wrong.n_items == int((predicted != y).sum())
    np.testing.assert_allclose(wrong.values, ablated[predicted != y].mean(0).numpy(),
                               rtol=1e-6, atol=1e-7)
    db.close()

    # A new connection of the hooked model, and one of the clean model, on the same cache:
    # each sample's own mean is its own model's rows, none read from the other's entries.
    def sampled_rows_are(rows) -> None:
        db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
        db.query("SET estimator = plain")
        sampled = db.query("AVG NEURONS IN 0 USING SAMPLE random(0.5, random_state=0)")
        items = db.sample("random(0.5, random_state=0)")
        np.testing.assert_allclose(sampled.values, rows[items].mean(0).numpy(), rtol=1e-6,
                                   atol=1e-7)
        db.close()

    sampled_rows_are(ablated)
    handle.remove()
    sampled_rows_are(clean)


def test_a_hook_that_counts_or_records_is_not_a_change(tmp_path):
    # Layer 0 wider than its block's 64 directions, which would rebuild its rows with no pass.
    model, X, y = _world(width=80)
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    db.query("AVG NEURONS IN 0")
    profile = db.profile
    calls, kept = [0], []

    def record(module, inputs, output):
        kept.append(output.detach())

    model[0].register_forward_hook(record)
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        db.query("AVG NEURONS IN 0 USING SAMPLE random(0.1, random_state=0)")
    assert db.profile is profile and calls[0] >= 1 and kept
    db.close()
    calls[0] = 0
    again = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    again.profile  # noqa: B018 - read from the disk cache: no pass
    assert calls[0] == 0


def test_a_change_is_warned_of_at_the_users_line():
    """The warning had named contextlib.py (and a script DiagQL's own lines), not the
    statement that noticed the change."""
    torch.manual_seed(15)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    conn = diagql.connect(model, (torch.randn(30, 4), torch.randint(0, 3, (30,))),
                          cache_dir=False, progress=False)
    conn.query("AVG NEURONS IN 1")
    with torch.no_grad():
        model[0].bias.add_(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conn.query("AVG NEURONS IN 1")
    told = [w for w in caught if "the model changed" in str(w.message)]
    assert len(told) == 1 and told[0].filename == __file__


def _wide(columns: int):
    """500 items of ``columns`` float32 inputs (40 MB at 20,000) and an MLP over them."""
    rs = np.random.RandomState(0)
    X, y = rs.randn(500, columns).astype(np.float32), rs.randint(0, 4, 500)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(columns, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    return model, X, y


def _plain_mean(model, X: np.ndarray, items=None) -> np.ndarray:
    with torch.no_grad():
        hidden = model[1](model[0](torch.from_numpy(X))).double().numpy()
    return hidden.mean(0) if items is None else hidden[items].mean(0)


def test_data_over_32_mb_scaled_in_place_is_seen_and_never_cached_for_the_original(tmp_path):
    """40 MB of numpy data, over the size fingerprinted whole before each statement: a write
    through numpy moves no version counter. It was not noticed: stale rows answered, and the
    edited data's rows were stored under the original's key, which a new process with the
    original data then read. Truth: plain torch on the arrays as they are."""
    from diagql.session import changes

    model, X, y = _wide(20_000)
    assert X.nbytes > changes.FULL_BYTES
    original = X.copy()
    query = "AVG NEURONS IN 1 USING SAMPLE random(0.2, random_state=0)"
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    db.query("SET estimator = plain")  # the sample's own mean, to check its rows
    db.query(query)
    X *= -3.0
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query(query)
    items = db.sample("random(0.2, random_state=0)")
    np.testing.assert_allclose(answer.values, _plain_mean(model, X, items), rtol=1e-5, atol=1e-6)
    db.close()
    fresh = diagql.connect(model, (original, y), progress=False, cache_dir=tmp_path)
    fresh.query("SET estimator = plain")
    again = fresh.query(query)
    items = fresh.sample("random(0.2, random_state=0)")
    np.testing.assert_allclose(again.values, _plain_mean(model, original, items), rtol=1e-5,
                               atol=1e-6)


def _scale(X, Xt):
    X *= 0.5


def _shuffle(X, Xt):
    X[:] = X[np.random.RandomState(1).permutation(len(X))]


def _normalise_column(X, Xt):
    X[:, 1234] = (X[:, 1234] - X[:, 1234].mean()) / 10.0  # one column of every row


def _through_data(X, Xt):
    Xt.data.mul_(-2)  # no version counter moves


@pytest.mark.parametrize("edit", [_scale, _shuffle, _normalise_column, _through_data],
                         ids=["scaled", "rows shuffled", "one column normalised", ".data"])
@pytest.mark.parametrize("form", ["numpy pair", "tensor pair", "columns"])
def test_large_data_edited_wholesale_in_place_is_seen(monkeypatch, edit, form):
    """Data over FULL_BYTES (made 1 MB here, the data 8 MB) is stamped by a sampled digest
    (storage/sampled.py): edits that touch the whole array are seen."""
    from diagql.session import changes

    monkeypatch.setattr(changes, "FULL_BYTES", 1024 ** 2)
    model, X, y = _wide(4_000)
    Xt = torch.from_numpy(X)
    data = {"numpy pair": (X, y), "tensor pair": (Xt, torch.from_numpy(y)),
            "columns": ({"input": X}, y)}[form]
    if form == "columns":
        wrapped = nn.Module()
        wrapped.net = model
        wrapped.forward = lambda input: model(input)  # noqa: A002 - the column's name
        layer = "net.1"
    else:
        wrapped, layer = model, "1"
    db = diagql.connect(wrapped, data, progress=False, cache_dir=False)
    db.query(f"AVG NEURONS IN {layer}")
    edit(X, Xt)
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query(f"AVG NEURONS IN {layer}")
    np.testing.assert_allclose(answer.values, _plain_mean(model, X), rtol=1e-5, atol=1e-6)


def test_labels_given_as_a_column_beside_the_inputs_written_in_place_are_seen():
    """Columns' labels are copied when read: the digest of the columns as read missed a write
    into the user's own label array."""
    model, X, y = _world()
    wrapped = nn.Module()
    wrapped.net = model
    wrapped.forward = lambda x: model(x)
    labels = y.numpy().copy()
    db = diagql.connect(wrapped, {"x": X.numpy(), "labels": labels}, progress=False,
                        cache_dir=False)
    db.query("AVG NEURONS IN net.1 WHERE class = 2")
    labels[:200] = 2
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query("AVG NEURONS IN net.1 WHERE class = 2")
    assert answer.n_items == int((labels == 2).sum())


def test_a_list_of_items_appended_to_or_cut_is_read_again():
    """Its length is stamped: 50 items appended were left out of every answer, and cutting
    the list made reading the data raise IndexError."""
    model, X, y = _world()
    items = [(X[i], int(y[i])) for i in range(300)]
    db = diagql.connect(model, items, progress=False, cache_dir=False)
    assert db.query("AVG NEURONS IN 1 WHERE class = 2").n_items == int((y[:300] == 2).sum())
    items.extend((X[i], int(y[i])) for i in range(300, 350))
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query("AVG NEURONS IN 1 WHERE class = 2")
    hidden, _ = _truth(model, X[:350], y[:350])
    chosen = (y[:350] == 2).numpy()
    assert answer.n_items == int(chosen.sum())
    np.testing.assert_allclose(answer.values, hidden[chosen].mean(0).numpy(), rtol=1e-6,
                               atol=1e-7)
    del items[100:]
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query("AVG NEURONS IN 1 WHERE class = 2")
    assert answer.n_items == int((y[:100] == 2).sum())


@pytest.mark.parametrize("first", ["list", "array"])
def test_list_items_written_in_place_after_a_first_item_of_another_form_are_seen(first):
    """The first item's input a Python list or a numpy array, the others tensors: the column
    was stamped by the first's kind, by identity alone, and the tensors' writes unseen (HH1)."""
    model, X, y = _world()
    items = [(X[i].clone(), int(y[i])) for i in range(200)]
    items[0] = (X[0].tolist() if first == "list" else X[0].numpy().copy(), int(y[0]))
    db = diagql.connect(model, items, progress=False, cache_dir=False)
    db.query("AVG NEURONS IN 1 WHERE incorrect")
    for i in range(5, 200, 2):
        items[i][0].mul_(-10.0)
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query("AVG NEURONS IN 1 WHERE incorrect")
    now = torch.stack([torch.as_tensor(x, dtype=torch.float32) for x, _ in items])
    hidden, wrong = _truth(model, now, y[:200])
    np.testing.assert_allclose(answer.values, hidden[wrong.numpy()].mean(0).numpy(),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("edit", ["in place", "replaced", "label", "nested"])
def test_a_list_of_items_edited_without_a_change_of_length_is_read_again(edit):
    """Only its length had been stamped: after x.mul_(5) on 100 items, the profile, the
    inputs index and the samples stayed the old data's while a pass read the new (FF1)."""
    model, X, y = _world()
    nested = edit == "nested"
    items = [(((X[i].clone(),),) if nested else X[i].clone(), int(y[i])) for i in range(300)]
    if nested:
        model = _FirstOfTuple(model)
    at = "inner." if nested else ""
    db = diagql.connect(model, items, progress=False, cache_dir=False)
    db.query(f"TOPK 3 INPUTS FOR {at}0[0]")
    db.query(f"AVG NEURONS IN {at}1 WHERE incorrect USING SAMPLE random(0.2)")
    for i in range(100):
        x, label = items[i]
        if edit == "in place":
            x.mul_(5)
        elif edit == "replaced":
            items[i] = (x * 5, label)
        elif edit == "label":
            items[i] = (x, 3 - label)
        else:
            x[0][0].mul_(5)
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query(f"AVG NEURONS IN {at}1 WHERE incorrect")
    now = torch.stack([item[0][0][0] if nested else item[0] for item in items])
    labels = torch.tensor([item[1] for item in items])
    hidden, wrong = _truth(model.inner if nested else model, now, labels)
    assert answer.n_items == int(wrong.sum())
    np.testing.assert_allclose(answer.values, hidden[wrong.numpy()].mean(0).numpy(),
                               rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        first = (model.inner if nested else model)[0](now)[:, 0]
    assert db.query(f"TOPK 3 INPUTS FOR {at}0[0]").items.tolist() == \
        first.argsort(descending=True, stable=True)[:3].tolist()


def test_reading_the_profile_notices_a_change_and_never_caches_it_for_the_original(tmp_path):
    """db.profile, read with no statement since a change in place, gave the old model's
    predictions; or, computed then, was stored under the original weights' cache key, and a
    later connection on the original weights read 1,833 wrong predictions of 2,000 (FF1)."""
    model, X, y = _world()
    original = {key: value.clone() for key, value in model.state_dict().items()}
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    db.query("DESCRIBE 1")  # the cache key's fingerprint taken, the profile not computed
    with torch.no_grad():
        model[2].bias.add_(torch.tensor([5.0, 0.0, 0.0, 0.0]))
    with torch.no_grad():
        assert db.profile.predictions.tolist() == model(X).argmax(1).tolist()
    with torch.no_grad():
        model[2].bias.sub_(torch.tensor([0.0, 5.0, 0.0, 0.0]))
        changed = model(X).argmax(1).tolist()
    # Held, it is read as last derived (a loop of reads stamps nothing); a statement
    # notices the change, and the next read is the changed model's.
    with pytest.warns(DiagQLWarning, match="the model changed"):
        db.query("DESCRIBE 1")
    assert db.profile.predictions.tolist() == changed
    model.load_state_dict(original)
    again = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)
    with torch.no_grad():
        assert again.profile.predictions.tolist() == model(X).argmax(1).tolist()
    assert db.layers == again.layers and db.n_classes == 4


def test_a_collate_that_writes_a_lists_items_in_place_is_no_change_of_the_users():
    """A collate_fn clamping each item's tensor in place bumped its version in every pass, so
    each statement said the data changed and derived the profile again (GG2)."""
    from torch.utils.data import DataLoader, default_collate

    model, X, y = _world()
    items = [(X[i].clone(), int(y[i])) for i in range(200)]

    def clamping(batch):
        for x, _ in batch:
            x.clamp_(-1.5, 1.5)
        return default_collate(batch)

    db = diagql.connect(model, DataLoader(items, batch_size=50, collate_fn=clamping),
                        progress=False, cache_dir=False)
    db.query("AVG NEURONS IN 1 WHERE incorrect")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        answer = db.query("AVG NEURONS IN 1 WHERE incorrect")
        db.query("AVG NEURONS IN 1 WHERE incorrect USING SAMPLE random(0.5)")
    hidden, wrong = _truth(model, X[:200].clamp(-1.5, 1.5), y[:200])
    np.testing.assert_allclose(answer.values, hidden[wrong.numpy()].mean(0).numpy(),
                               rtol=1e-6, atol=1e-7)


class _FirstOfTuple(nn.Module):
    """A model of nested inputs, ((x,),): the list's items are (((x,),), label)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, pair):
        return self.inner(pair[0])


def test_a_loaders_sampler_given_other_indices_of_one_length_is_read_again():
    """Only lengths had been stamped: a SubsetRandomSampler's indices replaced by as many
    others left every answer on the old split (FF1)."""
    from torch.utils.data import DataLoader, SubsetRandomSampler, TensorDataset

    model, X, y = _world()
    sampler = SubsetRandomSampler(list(range(0, 400, 2)))
    db = diagql.connect(model, DataLoader(TensorDataset(X, y), batch_size=50, sampler=sampler),
                        progress=False, cache_dir=False)
    db.query("AVG NEURONS IN 1 WHERE incorrect")
    sampler.indices = list(range(1, 400, 2))
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query("AVG NEURONS IN 1 WHERE incorrect")
    hidden, wrong = _truth(model, X[1::2], y[1::2])
    assert answer.n_items == int(wrong.sum())
    np.testing.assert_allclose(answer.values, hidden[wrong.numpy()].mean(0).numpy(),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("how", ["in place", "replaced", "under a loader"])
def test_a_subsets_indices_changed_are_read_again(how):
    """A Subset's indices edited in place or replaced by as many others had left the old
    items' labels beside the new items' rows, 0.17 off, unwarned (SW5)."""
    from torch.utils.data import DataLoader, Subset, TensorDataset

    model, X, y = _world()
    indices = list(range(0, 400, 2))
    subset = Subset(TensorDataset(X, y), indices)
    data = DataLoader(subset, batch_size=50) if how == "under a loader" else subset
    db = diagql.connect(model, data, progress=False, cache_dir=False)
    db.query("AVG NEURONS IN 1 WHERE incorrect")
    if how == "replaced":
        subset.indices = list(range(1, 400, 2))
    else:
        indices[:] = range(1, 400, 2)
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query("AVG NEURONS IN 1 WHERE incorrect")
    hidden, wrong = _truth(model, X[1::2], y[1::2])
    assert answer.n_items == int(wrong.sum())
    np.testing.assert_allclose(answer.values, hidden[wrong.numpy()].mean(0).numpy(),
                               rtol=1e-6, atol=1e-7)


class _Growing(torch.utils.data.Dataset):
    def __init__(self, X, y, n):
        self.X, self.y, self.n = X, y, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def test_a_datasets_length_changed_behind_a_dataloader_is_read_again():
    model, X, y = _world()
    dataset = _Growing(X, y, 200)
    db = diagql.connect(model, torch.utils.data.DataLoader(dataset, batch_size=32),
                        progress=False, cache_dir=False)
    db.query("AVG NEURONS IN 1")
    dataset.n = 400
    with pytest.warns(DiagQLWarning, match="the data changed"):
        answer = db.query("AVG NEURONS IN 1")
    hidden, _ = _truth(model, X, y)
    assert answer.n_items == 400
    np.testing.assert_allclose(answer.values, hidden.mean(0).numpy(), rtol=1e-6, atol=1e-7)
