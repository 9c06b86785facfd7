"""Bad models and data: each gets one clear DiagQLError, and the model is handed back as it came."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import diagql
from diagql.errors import BindError, DiagQLError, ExecutionError
from tests import bad_models, cli_in_process


def connect(model, data, **kwargs):
    return diagql.connect(model, data, batch_size=kwargs.pop("batch_size", 16), cache_dir=False,
                          **kwargs)


# --- the model's state -------------------------------------------------------------------------

def state_of(model: torch.nn.Module) -> dict:
    """Everything a statement must leave as it was: tensors, training flags and hooks."""
    return {"tensors": {name: t.clone() for name, t in model.state_dict().items()},
            "training": [m.training for m in model.modules()],
            "hooks": [(dict(m._forward_hooks), dict(m._forward_pre_hooks)) for m in model.modules()]}


def assert_same_state(model: torch.nn.Module, before: dict) -> None:
    after = state_of(model)
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][name], tensor), f"{name} changed"
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]


def trained_net(**kwargs) -> bad_models.Net:
    """In training mode, with non-trivial BatchNorm statistics and a hook of the user's own."""
    model = bad_models.Net(**kwargs)
    model.train()
    X, _ = bad_models.data()
    with torch.no_grad():
        model(X)  # BatchNorm's running statistics move away from their defaults
    model.calls = 0
    model.fc2.eval()  # one submodule in another mode
    model.fc1.register_forward_hook(lambda module, inputs, output: None)
    model.bn.register_forward_pre_hook(lambda module, inputs: None)
    return model


def test_state_is_kept_after_a_successful_statement():
    model = trained_net()
    before = state_of(model)
    db = connect(model, bad_models.data())
    for text in ("SHOW LAYERS", "AVG NEURONS IN bn WHERE class = 1",
                 "TOPK 2 NEURONS IN fc1 USING SAMPLE stratified(0.5) WITH BASELINE"):
        db.query(text)
        assert_same_state(model, before)


def test_state_is_kept_when_forward_raises_midway():
    model = trained_net()
    before = state_of(model)
    db = connect(model, bad_models.data())
    db.profile  # noqa: B018 - 1 probe call + 3 batches of 16
    model.fail_on = model.calls + 2  # the query's 2nd batch
    with pytest.raises(ExecutionError, match="the model's forward raised ValueError: forward "
                                             "failed on purpose"):
        db.query("AVG NEURONS IN bn")
    assert_same_state(model, before)


def test_state_is_kept_after_keyboard_interrupt_on_the_second_batch():
    model = trained_net()
    before = state_of(model)
    db = connect(model, bad_models.data())
    db.profile  # noqa: B018
    model.fail_on, model.fail_with = model.calls + 2, KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        db.query("AVG NEURONS IN fc1 GROUP BY class")
    assert_same_state(model, before)
    # ...and in the profile pass, on a fresh connection.
    model.calls, model.fail_on = 0, 3  # probe, 1st batch, then the 2nd batch raises
    with pytest.raises(KeyboardInterrupt):
        connect(model, bad_models.data()).query("AVG NEURONS IN fc1")
    assert_same_state(model, before)
    model.fail_on = 0
    db.query("AVG NEURONS IN fc1")  # the connection still works
    assert_same_state(model, before)


# --- bad models ----------------------------------------------------------------------------------

def test_forward_that_raises_is_named():
    db = connect(bad_models.raising(), bad_models.data())
    with pytest.raises(ExecutionError) as info:
        db.query("AVG NEURONS IN fc1")
    assert info.value.message == "the model's forward raised ValueError: forward failed on purpose"


def test_layer_that_never_runs():
    db = connect(bad_models.net(), bad_models.data())
    with pytest.raises(BindError, match="layer 'unused' does not run in the model's forward pass"):
        db.query("AVG NEURONS IN unused")


class _Attending(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0].mean(dim=1))


def test_multihead_attentions_out_proj_points_at_the_attention():
    """nn.MultiheadAttention applies out_proj's weights without calling it: the refusal had
    spoken of branches and routed experts (sweep SS7)."""
    torch.manual_seed(0)
    db = connect(_Attending().eval(), (torch.randn(12, 3, 4), torch.arange(12) % 2))
    with pytest.raises(BindError, match="nn.MultiheadAttention 'attn' uses its weights without "
                                        "calling it; query 'attn'"):
        db.query("AVG NEURONS IN attn.out_proj")


def test_module_that_runs_twice():
    db = connect(bad_models.net(), bad_models.data())
    with pytest.raises(BindError, match=r"layer 'shared' runs 2 times per forward pass; name one "
                                        r"call: shared#1 or shared#2"):
        db.query("AVG NEURONS IN shared")


def test_nan_activations_are_reported_not_averaged():
    db = connect(bad_models.nan_net(), bad_models.nan_data())
    with pytest.raises(ExecutionError) as info:
        db.query("AVG NEURONS IN bn")
    assert info.value.message == ("layer 'bn' has NaN or infinite activations for 3 of 40 items "
                                  "(the first is item 3); DiagQL does not average over them")
    with pytest.raises(ExecutionError, match="for 2 of 14 items"):  # class = 0: items 3 and 30
        db.query("TOPK 2 NEURONS IN bn WHERE class = 0")
    with pytest.raises(ExecutionError, match="DiagQL does not count their most active neuron"):
        db.query("ARGMAX NEURONS IN bn WHERE class = 0 USING FULL")
    for text in ("AVG NEURONS IN bn WHERE class = 2",  # items 3k+2: none marked
                 "AVG NEURONS IN fc1"):  # the NaN comes after fc1
        assert np.all(np.isfinite(db.query(text).values)), text


def test_infinite_activations_are_reported():
    X, y = bad_models.data()
    X[10] = float("inf")
    db = connect(bad_models.net(), (X, y))
    with pytest.raises(ExecutionError, match=r"layer 'fc1' has NaN or infinite activations for 1 "
                                             r"of 40 items \(the first is item 10\)"):
        db.query("ARGMAX NEURONS IN fc1")


def test_a_sample_is_refused_where_the_profile_saw_nan_activations():
    """A sample that misses the NaN items would answer for a mean that holds them: the profile
    pass marked them (model/winners.py), so it is refused as the exact pass is; a WHERE that
    leaves them out answers, equal to plain torch."""
    model, (X, y) = bad_models.nan_net(), bad_models.nan_data()
    rows = []
    handle = model.bn.register_forward_hook(lambda m, i, out: rows.append(out.detach().clone()))
    with torch.no_grad():
        model.eval()(X)
    handle.remove()
    bad = np.flatnonzero(~torch.isfinite(rows[0]).all(dim=1).numpy())
    assert bad.tolist() == [3, 7, 30]
    db = connect(model, (X, y))
    for seed in range(20):  # a sample that holds none of them
        if not np.isin(bad, db.sample(f"random(0.25, random_state={seed})")).any():
            break
    else:
        raise AssertionError("every sample held a NaN item")
    for text, refused in [("AVG NEURONS IN bn", "average over them"),
                          ("TOPK 2 NEURONS IN bn WHERE class = 0", "rank neurons over them"),
                          ("AVG NEURONS IN bn GROUP BY class", "average over them")]:
        with pytest.raises(ExecutionError) as info:
            db.query(f"{text} USING SAMPLE random(0.25, random_state={seed})")
        total = 14 if "class = 0" in text else 40
        count = 2 if "class = 0" in text else 3
        assert info.value.message == (
            f"layer 'bn' has NaN or infinite activations for {count} of {total} items (the "
            f"first is item 3); DiagQL does not {refused}, nor estimate from a sample what "
            f"takes them in")
    result = db.query(f"AVG NEURONS IN bn WHERE class = 2 USING SAMPLE "
                      f"random(0.25, random_state={seed}) WITH BASELINE")
    matching = np.flatnonzero(y.numpy() == 2)
    np.testing.assert_allclose(result.baseline.values, rows[0][matching].mean(dim=0).numpy(),
                               atol=1e-6)


# --- bad data ------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [bad_models.unlabelled, bad_models.BareX],
                         ids=["pair-with-None", "bare-x-dataset"])
def test_data_without_labels_answers_what_needs_none(data):
    db = connect(bad_models.net(), data())
    labelled = connect(bad_models.net(), bad_models.data())
    for text in ("AVG NEURONS IN fc1", "TOPK 3 NEURONS IN bn", "ARGMAX NEURONS IN fc1",
                 "AVG NEURONS IN fc1 WHERE predicted = 1 AND confidence > 0.2",
                 "AVG NEURONS IN fc1 GROUP BY predicted",
                 "AVG NEURONS IN fc1 USING SAMPLE random(0.5)"):
        result, truth = db.query(text), labelled.query(text)
        assert result.n_items == truth.n_items, text
        if result.groups is None:
            assert np.allclose(result.values, truth.values), text
    assert not db.profile.has_labels and np.all(db.profile.labels == -1)


@pytest.mark.parametrize("text, message", [
    ("AVG NEURONS IN fc1 WHERE class = 1",
     "WHERE class = 1 needs the true labels, but the data has none (its items are bare x, or y "
     "is None, or no key of its mappings holds labels: name it with label_key=... / "
     "--label-key; or every label is -1, as a test split's); filter on predicted or "
     "confidence instead"),
    ("AVG NEURONS IN fc1 WHERE predicted = 0 AND NOT incorrect",
     "WHERE incorrect needs the true labels"),
    ("TOPK 2 NEURONS IN fc1 WHERE correct", "WHERE correct needs the true labels"),
    ("AVG NEURONS IN fc1 GROUP BY class",
     "GROUP BY class needs the true labels, but the data has none (its items are bare x, or y "
     "is None, or no key of its mappings holds labels: name it with label_key=... / "
     "--label-key; or every label is -1, as a test split's); GROUP BY predicted works"),
    ("AVG NEURONS IN fc1 GROUP BY correct", "GROUP BY correct needs the true labels"),
    ("AVG NEURONS IN fc1 USING SAMPLE stratified(0.5)",
     "sampler 'stratified' draws by the true labels, but the data has none (its items are bare "
     "x, or y is None, or no key of its mappings holds labels: name it with label_key=... / "
     "--label-key; or every label is -1, as a test split's); use one that does not, such as "
     "random"),
    ("AVG NEURONS IN fc1 USING SAMPLE maxmargin(0.5)", "sampler 'maxmargin' draws by the true"),
])
def test_data_without_labels_refuses_what_needs_them(text, message):
    db = connect(bad_models.net(), bad_models.unlabelled())
    with pytest.raises(BindError) as info:
        db.query(text)
    assert info.value.message.startswith(message)
    if "WHERE" in message or "sampler" in message:
        assert info.value.column is not None  # underlined in the query
    if "GROUP BY" in message:  # under the clause (it had no place: sweep SX11)
        assert info.value.column == text.index("GROUP BY") + 1


@pytest.mark.parametrize("data", [bad_models.unlabelled, bad_models.BareX],
                         ids=["pair-with-None", "bare-x-dataset"])
@pytest.mark.parametrize("text, message", [
    (f"AVG NEURONS IN fc1 WHERE class = {bad_models.N_CLASSES + 1}", "WHERE class = "),
    ("AVG NEURONS IN fc1 WHERE class IN (1, 99)", "WHERE class IN (1, 99) needs"),
    ("SIMILARITY fc1, fc2 WHERE class = 99", "WHERE class = 99 needs"),
    ("TOPK 2 INPUTS FOR fc1[0] WHERE class = 99", "WHERE class = 99 needs"),
])
def test_data_without_labels_says_so_before_a_class_outside_the_label_set(data, text, message):
    """Missing labels are the first thing wrong: 'outside the label set' would send the user
    looking for the right class number, which no class number would fix."""
    db = connect(bad_models.net(), data())
    with pytest.raises(BindError) as info:
        db.query(text)
    assert info.value.message.startswith(message) and "needs the true labels" in \
        info.value.message


class _OneHot(torch.utils.data.Dataset):
    """(x, one-hot y) items, collated into (batch, classes) label rows."""

    def __init__(self, X, y):
        self.X, self.y = X, torch.nn.functional.one_hot(y, bad_models.N_CLASSES).float()

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def test_one_hot_labels_are_class_indices_and_other_rows_are_refused():
    X, y = bad_models.data()
    model = bad_models.net()
    with torch.no_grad():
        correct = (model.eval()(X).argmax(1) == y).numpy()
    for data in ((X, torch.nn.functional.one_hot(y)), _OneHot(X, y)):
        db = connect(model, data)
        assert np.array_equal(db.profile.labels, y.numpy())
        assert np.array_equal(db.profile.correct, correct)
    multi_hot = torch.nn.functional.one_hot(y).clone()
    multi_hot[0, (int(y[0]) + 1) % bad_models.N_CLASSES] = 1
    soft = torch.nn.functional.one_hot(y) * 0.9 + 0.1 / bad_models.N_CLASSES
    for labels in (multi_hot, soft):
        with pytest.raises(DiagQLError, match="3 values per item .* that are not one-hot"):
            connect(model, (X, labels))


def test_a_list_of_batches_is_told_to_be_given_as_its_loader():
    X, y = bad_models.data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=8)
    with pytest.raises(DiagQLError, match=r"each item of the data has 8 labels beside inputs of "
                                          r"shape \(8, .*list of batches \(list\(loader\)\), "
                                          r"pass the DataLoader"):
        connect(bad_models.net(), list(loader)).query("AVG NEURONS IN fc1")


def test_data_without_labels_in_sample_and_show_profile():
    db = connect(bad_models.net(), bad_models.unlabelled())
    with pytest.raises(BindError, match="sampler 'stratified' draws by the true labels"):
        db.sample("stratified(0.5)")
    assert len(db.sample("random(0.5)")) == 20
    # No confusion matrix, but the classes the model predicts (plain torch), commonest first.
    shown = db.query("SHOW PROFILE")
    assert "without labels" in shown.title
    with torch.no_grad():
        X, _ = bad_models.unlabelled()
        predicted = bad_models.net().eval()(X).argmax(dim=1).numpy()
    classes, counts = np.unique(predicted, return_counts=True)
    assert {row[0]: row[1] for row in shown.rows} == dict(zip(classes.tolist(), counts.tolist()))
    assert [row[1] for row in shown.rows] == sorted(counts.tolist(), reverse=True)
    # Its mean confidence is a number in JSON and CSV, shown to 3 places (it had been text:
    # sweep SX11).
    from diagql.results.render import to_json
    confidence = [row[-1] for row in json.loads(to_json(shown))["rows"]]
    assert all(type(c) is float for c in confidence) and \
        any(len(repr(c)) > 5 for c in confidence), confidence


def test_data_without_labels_through_the_disk_cache(tmp_path):
    """The flag survives the cache, or is not cached at all; either way it stays right."""
    for _ in range(2):
        db = diagql.connect(bad_models.net(), bad_models.unlabelled(), cache_dir=tmp_path)
        assert not db.profile.has_labels
        with pytest.raises(BindError, match="needs the true labels"):
            db.query("AVG NEURONS IN fc1 WHERE incorrect")
    for _ in range(2):
        db = diagql.connect(bad_models.net(), bad_models.data(), cache_dir=tmp_path)
        assert db.profile.has_labels
        db.query("AVG NEURONS IN fc1 WHERE incorrect")


def test_labels_outside_the_models_classes():
    db = connect(bad_models.net(), bad_models.bad_labels())
    with pytest.raises(DiagQLError) as info:
        db.query("AVG NEURONS IN fc1")
    assert info.value.message == ("label 12 of item 5 is outside the model's classes 0..2 (the "
                                  "model scores 3 classes); 1 of 40 items have such labels: "
                                  "leave those items out, or give the data without its labels")
    X, y = bad_models.data()
    with pytest.raises(DiagQLError, match="label -1 of item 0 is outside the model's classes 0..2"):
        connect(bad_models.net(), (X, y - 1)).query("AVG NEURONS IN fc1")


def test_empty_predicate_result():
    db = connect(bad_models.net(), bad_models.data())
    with pytest.raises(ExecutionError) as info:
        db.query("AVG NEURONS IN fc1 WHERE confidence > 1")
    assert info.value.message == "no items match WHERE confidence > 1 (0 of 40 items)"


def test_sample_larger_than_the_data():
    db = connect(bad_models.net(), bad_models.data())
    with pytest.raises(BindError) as info:
        db.query("AVG NEURONS IN fc1 USING SAMPLE random(41)")
    assert info.value.message == "size 41 is not between 1 and the 40 items of the data set"
    assert info.value.column == 40  # the size is underlined


# --- the CLI: one clear line, exit status 1, no traceback -------------------------------------------

def diagql_cli(*args: str) -> subprocess.CompletedProcess:
    """In-process (tests/cli_in_process.py): the same exit status and output as a subprocess,
    without a new Python importing torch for each case."""
    return cli_in_process.diagql(*args)


@pytest.mark.parametrize("model, data, statement, message", [
    ("raising", "data", "AVG NEURONS IN fc1",
     "error: the model's forward raised ValueError: forward failed on purpose"),
    ("net", "unlabelled", "AVG NEURONS IN fc1 WHERE class = 1",
     "WHERE class = 1 needs the true labels"),
    ("net", "bad_labels", "AVG NEURONS IN fc1",
     "error: label 12 of item 5 is outside the model's classes 0..2"),
    ("nan_net", "nan_data", "AVG NEURONS IN bn",
     "error: layer 'bn' has NaN or infinite activations for 3 of 40 items"),
])
def test_cli_reports_bad_models_and_data_in_one_line(model, data, statement, message):
    done = diagql_cli("--model", f"tests.bad_models:{model}", "--data", f"tests.bad_models:{data}",
                      "-e", statement)
    assert done.returncode == 1, done.stdout
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_model_whose_output_changes_width_for_one_batch_is_named_so():
    """Scores 3 wide, then 2 for the batch holding item 25: an error naming the items and
    both widths, where numpy's broadcast error had escaped as an internal one."""
    done = diagql_cli("--model", "tests.bad_models:narrowing", "--data",
                      "tests.bad_models:marked_data", "--batch-size", "16", "-e",
                      "AVG NEURONS IN fc1")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert ("error: the model gave 2 class scores per item for items 16..31, "
            "where it gave 3 for the first items") in " ".join(done.stderr.split())


def test_a_forward_that_raises_on_some_items_names_their_batch():
    done = diagql_cli("--model", "tests.bad_models:raising_on_marked", "--data",
                      "tests.bad_models:marked_data", "--batch-size", "16", "-e",
                      "AVG NEURONS IN fc1")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "the model's forward raised ValueError on items 16..31: a marked item" in done.stderr


def test_cli_answers_a_query_on_data_without_labels():
    done = diagql_cli("--model", "tests.bad_models:net", "--data", "tests.bad_models:unlabelled",
                      "-e", "TOPK 2 NEURONS IN fc1")
    assert done.returncode == 0, done.stderr
    assert "fc1[" in done.stdout


def test_cli_reports_corrupt_weights(tmp_path):
    path = tmp_path / "corrupt.pt"
    path.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    done = diagql_cli("--model", "tests.bad_models:net", "--weights", str(path), "--data",
                      "tests.bad_models:data", "-e", "SHOW LAYERS")
    assert done.returncode == 1
    assert "is not a readable torch checkpoint" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_gpu_requested_where_none_exists():
    from tests import bad_models

    with pytest.raises(diagql.DiagQLError, match="no CUDA GPU"):
        diagql.connect(bad_models.net(), bad_models.data(), device="cuda")
    done = diagql_cli("--model", "tests.bad_models:net", "--data", "tests.bad_models:data",
                      "--device", "cuda", "-e", "SHOW LAYERS")
    assert done.returncode == 1
    assert "no CUDA GPU" in done.stderr and "Traceback" not in done.stderr
    assert "(--device cpu)" in done.stderr
    with pytest.raises(diagql.DiagQLError, match="unknown device 'gpu'; devices are named cpu, "
                                                 "cuda"):
        diagql.connect(bad_models.net(), bad_models.data(), device="gpu")


# --- no model connected -------------------------------------------------------------------------

NEEDS_A_MODEL = ["EVALUATE SAMPLERS random", "EVALUATE SAMPLERS random AT 0.1 SEEDS 1",
                 "AVG NEURONS IN fc1", "TOPK 2 NEURONS IN fc1 USING SAMPLE random(0.1)",
                 "EXPLAIN AVG NEURONS IN fc1", "DESCRIBE fc1", "SHOW LAYERS", "SHOW PROFILE"]


@pytest.mark.parametrize("statement", NEEDS_A_MODEL)
def test_a_statement_that_needs_a_model_says_so_without_one(statement):
    conn = diagql.Connection.detached(cache_dir=False)
    with pytest.raises(BindError, match="^no model is connected"):
        conn.query(statement)
    with pytest.raises(BindError, match="^no model is connected"):
        conn.sample("random(0.1)")
    with pytest.raises(BindError, match="^no model is connected"):
        conn.plan("AVG NEURONS IN fc1")


def test_statements_that_need_no_model_run_without_one():
    conn = diagql.Connection.detached(cache_dir=False)
    for statement in ("SHOW SAMPLERS", "SHOW SETTINGS", "SHOW CACHE", "SET seed = 4",
                      "CLEAR CACHE"):
        assert conn.query(statement).rows is not None


def test_cli_without_a_model_refuses_evaluate_in_one_line():
    done = diagql_cli("--no-cache", "-e", "EVALUATE SAMPLERS random")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "<-e>: error: no model is connected: start diagql with --demo, or with --model "
        "MODULE:CALLABLE --data MODULE:CALLABLE (in Python: diagql.connect(model, data))"]
    assert "internal error" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("method", ["query", "execute", "plan"])
@pytest.mark.parametrize("text,shown", [(None, "NoneType"), (b"SHOW SETTINGS", "bytes"),
                                        (3, "int")])
def test_a_statement_that_is_not_text_is_one_clear_error(method, text, shown):
    """query(None) was a TypeError from inside the statement splitter's regex."""
    conn = diagql.Connection.detached(cache_dir=False)
    with pytest.raises(DiagQLError) as info:
        getattr(conn, method)(text)
    assert shown in info.value.message or repr(text) in info.value.message
    assert ("decode it first" in info.value.message) == (method != "plan" and shown == "bytes")


def test_an_unknown_latent_given_to_connect_says_it_is_the_latent(mlp, digits):
    """No statement names it: the error named only 'unknown layer', and the CLI put it on the
    -e statement that happened to need the profile first. It is refused by connect, as SET
    latent refuses it (the CLI had run `SHOW LAYERS` with --latent nope and exited 0)."""
    with pytest.raises(BindError) as caught:
        diagql.connect(mlp, digits, latent="encoder.9", cache_dir=False, progress=False)
    assert caught.value.message.startswith("the latent layer (connect(latent=...), --latent or "
                                           "SET latent): unknown layer 'encoder.9'")
    assert "layers are" in caught.value.hint


class WithSpareHead(torch.nn.Module):
    """An MLP that defines a Linear after its head and never calls it (an auxiliary head kept
    for training): the default latent had been that Linear's input, and every query failed
    with "layer 'spare' did not run"."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.spare = torch.nn.Linear(10, 10)

    def forward(self, x):
        return self.mlp(x)


def test_the_default_latent_is_the_last_linear_that_runs(mlp, digits):
    model = WithSpareHead(mlp)
    conn = diagql.connect(model, digits, cache_dir=False, progress=False)
    result = conn.query("AVG NEURONS IN mlp.encoder.3 WHERE class = 2")
    assert conn.profile.latent_layer == "input of mlp.head"
    X, y = digits
    kept = []
    handle = mlp.encoder[3].register_forward_hook(lambda m, i, o: kept.append(o.detach()))
    with torch.no_grad():
        mlp(X[y == 2])
    handle.remove()
    np.testing.assert_allclose(result.values, kept[0].double().mean(dim=0).numpy(), rtol=1e-5,
                               atol=1e-6)


class StepHead(nn.Module):
    """A GRUCell loop whose one Linear scores every step (the scores averaged): no Linear
    runs once per forward pass."""

    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(3, 8)
        self.step_head = nn.Linear(8, 3)

    def forward(self, x):
        h = x.new_zeros(len(x), 8)
        scores = 0
        for step in range(x.shape[1]):
            h = self.cell(x[:, step], h)
            scores = scores + self.step_head(h)
        return scores / x.shape[1]


def test_a_head_that_runs_every_step_gives_the_latent_of_its_last_call():
    """Its input as a whole is no one vector per item: every statement had failed, exact
    ones included ("module 'step_head' runs more than once"). The latent is its last call's
    input, the final hidden state."""
    torch.manual_seed(0)
    model = StepHead().eval()
    with torch.no_grad():
        model.step_head.weight.mul_(8)  # scores that do not look like probabilities
    X = torch.randn(120, 5, 3)
    y = torch.arange(120) % 3
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    result = conn.query("AVG NEURONS IN cell#3 WHERE class = 1")
    assert conn.profile.latent_layer == "input of step_head#5"
    inputs, states = [], []
    handles = [model.step_head.register_forward_pre_hook(lambda m, i: inputs.append(i[0])),
               model.cell.register_forward_hook(lambda m, i, o: states.append(o))]
    with torch.no_grad():
        model(X)
    for handle in handles:
        handle.remove()
    np.testing.assert_allclose(conn.profile.latents, inputs[-1].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result.values, states[2][y == 1].double().mean(dim=0).numpy(),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("content", [b"hello world, not a checkpoint\n", b"\x80\x04garbage", b""])
def test_a_file_that_is_not_a_checkpoint_is_one_error_line(tmp_path, content):
    """A text file or garbage as --weights (or a checkpoint): torch's unpickler raised a bare
    KeyError for the text file, a traceback; every failure to read is now one DiagQLError."""
    from diagql.model.weights import read_state

    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(DiagQLError, match="is not a (readable )?torch checkpoint"):
        read_state(path, "--weights 'weights.pt'")


@pytest.mark.parametrize("as_array", [False, True])
def test_inputs_alone_as_data_are_told_to_come_as_a_pair_with_none(as_array):
    X = torch.randn(10, 4)
    with pytest.raises(DiagQLError, match=r"not (Tensor|ndarray); for inputs without labels, "
                                          r"pass \(X, None\)"):
        diagql.connect(torch.nn.Linear(4, 3), X.numpy() if as_array else X, cache_dir=False,
                       progress=False)


def test_a_data_factory_without_ray_is_told_to_pass_what_it_returns():
    X, y = torch.randn(10, 4), torch.arange(10) % 3
    with pytest.raises(DiagQLError, match=r"not function; a function that makes the data is "
                                          r"taken by engine='ray' alone.*data=make\(\)"):
        diagql.connect(torch.nn.Linear(4, 3), lambda: (X, y), cache_dir=False, progress=False)



class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.fc = torch.nn.Embedding(5, 3), torch.nn.Linear(5, 2)

    def forward(self, cat, numeric):
        return self.fc(torch.cat([self.embed(cat), numeric], dim=1))


def test_one_tensor_for_a_forward_of_several_inputs_says_how_to_give_them():
    """(DataFrame, labels) reached forward(cat, numeric) as one tensor of its columns, and
    only Python's 'missing 1 required positional argument' was said."""
    torch.manual_seed(0)
    cat, numeric, y = torch.randint(0, 5, (30,)), torch.randn(30, 2), torch.randint(0, 2, (30,))
    table = torch.cat([cat[:, None].float(), numeric], dim=1)
    with pytest.raises(ExecutionError, match=r"missing 1 required positional argument.*one "
                                             r"tensor here.*\(\(x1, x2\), y\)"):
        connect(_TwoInputs(), (table, y)).query("AVG NEURONS IN fc")
    answer = connect(_TwoInputs(), [((c, n), int(t)) for c, n, t in zip(cat, numeric, y)])
    with torch.no_grad():
        truth = _TwoInputs()(cat, numeric).double().mean(0).numpy()
    np.testing.assert_allclose(answer.query("AVG NEURONS IN fc").values, truth, rtol=1e-6)


class _TakesAList(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(7, 3)

    def forward(self, parts):
        return self.fc(torch.cat([parts[0], parts[1]], dim=1))


def test_a_list_input_spread_over_forward_says_how_to_pass_it_whole():
    torch.manual_seed(0)
    items = [([torch.randn(4), torch.randn(3)], i % 3) for i in range(12)]
    with pytest.raises(ExecutionError, match=r"a list of inputs is spread over forward's "
                                             r"arguments.*\(\(inputs,\), y\)"):
        connect(_TakesAList(), items).query("AVG NEURONS IN fc")
    whole = [((parts,), y) for parts, y in items]
    answer = connect(_TakesAList(), whole).query("AVG NEURONS IN fc")
    with torch.no_grad():
        truth = torch.stack([_TakesAList().fc(torch.cat([a, b])) for (a, b), _ in items])
    truth = truth.double().mean(0)
    np.testing.assert_allclose(answer.values, truth.numpy(), rtol=1e-6)


@pytest.mark.parametrize("labels, advice", [
    ([-1, 1], r"the labels take 2 values \(-1, 1\): if they are the model's classes numbered "
              r"otherwise, renumber them 0..1"),
    ([1, 2], r"the labels take 2 values \(1, 2\): .* renumber them 0..1 .*y - 1 for 1..2"),
    (list(range(10)), r"the labels take 10 values \(0, 1, 2, 3, …\) where the model scores 2 "
                      r"classes: for a model that is no classifier \(a regression, whose "
                      r"targets WHERE class and incorrect cannot read\), give the data without "
                      r"them, \(X, None\), to query its layers; its outputs are then read as "
                      r"class scores"),
])
def test_labels_in_another_numbering_or_a_regressions_get_their_own_advice(labels, advice):
    torch.manual_seed(0)
    X = torch.randn(40, 4)
    y = torch.tensor(labels).repeat(40)[:40]
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match=advice):
        db.query("AVG NEURONS IN 1")


READ_ONLY = """
import sys
import warnings
import numpy as np, torch, diagql
from torch import nn

warnings.simplefilter("default")
torch.manual_seed(0)
X = np.random.RandomState(0).randn(120, 6).astype(np.float32)
y = np.random.RandomState(1).randint(0, 3, 120)
np.save("X.npy", X)
mapped = np.load("X.npy", mmap_mode="r")  # read-only, as df.values may be too
frozen = X.copy()
frozen.flags.writeable = False
model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
with torch.no_grad():
    truth = model[1](model[0](torch.from_numpy(X))).double().mean(0).numpy()


class Items(torch.utils.data.Dataset):
    def __len__(self):
        return 120

    def __getitem__(self, i):
        return frozen[i], int(y[i])


class ByName(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = model

    def forward(self, x):
        return self.net(x)


data, layer, wrapped = {"pair": ((mapped, y), "1", model),
                        "items": (Items(), "1", model),
                        "columns": ({"x": frozen, "labels": y}, "net.1", ByName())}[sys.argv[1]]
db = diagql.connect(wrapped, data, cache_dir=False, progress=False)
np.testing.assert_allclose(db.query(f"AVG NEURONS IN {layer}").values, truth, rtol=1e-6)
print("ok")
"""


@pytest.mark.parametrize("form", ["pair", "items", "columns"])
def test_read_only_arrays_are_read_without_torchs_not_writable_warning(tmp_path, form):
    """A memory-mapped or read-only array (np.load(mmap_mode='r'), df.values) leaked torch's
    "The given NumPy array is not writable" UserWarning, which DiagQL's reading made and
    which asks nothing of the user: DiagQL only reads the data. torch warns once a process, so
    each form asks a fresh one: a pair's X mapped from its file, a Dataset's read-only items
    (collated), a column."""
    import sys

    done = subprocess.run([sys.executable, "-c", READ_ONLY, form], cwd=tmp_path,
                          capture_output=True,
                          text=True, env={**__import__("os").environ,
                                          "PYTHONPATH": str(cli_in_process.ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    assert "not writable" not in done.stderr, done.stderr


def _labelled_world():
    torch.manual_seed(0)
    X = torch.randn(200, 6)
    y = np.random.RandomState(0).randint(0, 3, 200)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return model, X, y


def test_labels_stored_as_nan_are_missing_labels_not_a_regressions_targets():
    """Float labels with NaN (and pandas' Int64 with NA, which numpy reads so) were refused as
    "a regression model's continuous targets"; they are items without a label."""
    pandas = pytest.importorskip("pandas")
    model, X, y = _labelled_world()
    with_nan = y.astype(float)
    with_nan[[37, 90, 91]] = np.nan
    nullable = pandas.Series(y, dtype="Int64").mask(pandas.Series(np.isnan(with_nan)))
    listed = [None if np.isnan(v) else int(v) for v in with_nan]
    first, count = int(np.flatnonzero(np.isnan(with_nan))[0]), int(np.isnan(with_nan).sum())
    for labels in (with_nan, nullable, listed):
        with pytest.raises(DiagQLError, match=rf"item {first} has no label \((NaN|None); "
                                              rf"{count} of 200 items have none\): .*for none"
                                              r".*\(X, None\).*-1 as every item's label") as err:
            connect(model, (X, labels)).query("AVG NEURONS IN 1")
        assert "regression" not in str(err.value)


class _PerItem(torch.utils.data.Dataset):
    def __init__(self, X, labels):
        self.X, self.labels = X, labels

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i], self.labels[i]


@pytest.mark.parametrize("missing", [None, float("nan")], ids=["None", "NaN"])
def test_an_item_without_a_label_in_a_dataset_is_named(missing):
    """Per-item None labels gave the collate's "Could not infer dtype of NoneType", which
    named no label; the item is named by its index in the data, past the first batch too."""
    model, X, y = _labelled_world()
    labels = [int(v) for v in y] if missing is None else [float(v) for v in y]
    labels[150] = missing
    with pytest.raises(DiagQLError, match=r"^item 150 has no label \((None|NaN)\): "
                                          r".*the inputs alone"):
        connect(model, _PerItem(X, labels)).query("AVG NEURONS IN 1")
    with pytest.raises(DiagQLError, match=r"^item 1 has no label \(None\)"):
        connect(model, _PerItem(X, [0] + [None] * 199)).query("AVG NEURONS IN 1")


def test_a_mapping_item_without_the_label_key_the_others_hold_is_named():
    """The default collate takes a batch's keys from its first item: a first item without
    "label" had dropped every item's label unsaid (SHOW PROFILE counted 80 items without
    labels where 79 had them), and a later one failed with a bare KeyError: 'label'."""
    model, X, y = _labelled_world()
    for lacking in (150, 0):
        items = [{"input": X[i]} if i == lacking else {"input": X[i], "label": int(y[i])}
                 for i in range(len(X))]
        with pytest.raises(DiagQLError, match=rf"^item {lacking} has no label \(no 'label' "
                                              r"key, which other items hold\)"):
            connect(model, items).query("AVG NEURONS IN 1")
    items = [{"label": int(y[i])} | ({} if i == 40 else {"input": X[i]}) for i in range(len(X))]
    with pytest.raises(DiagQLError, match=r"the data's items hold different keys: one lacks "
                                          r"\['input'\], which others hold"):
        connect(model, items).query("AVG NEURONS IN 1")


def test_an_item_without_a_label_is_named_by_its_index_in_the_dataset_under_a_sampler():
    """A loader over some of a dataset's items (a validation split's sampler) had named the
    item by its place among them: 'item 11' for the dataset's item 23."""
    model, X, y = _labelled_world()
    labels = [int(v) for v in y]
    labels[23] = None
    loader = torch.utils.data.DataLoader(
        _PerItem(X, labels), batch_size=8,
        sampler=torch.utils.data.SubsetRandomSampler(list(range(1, 200, 2))))
    with pytest.raises(DiagQLError, match=r"^item 23 has no label \(None\)"):
        connect(model, loader).query("AVG NEURONS IN 1")


class _Denoiser(torch.nn.Module):
    """An input and its noise level, as a diffusion model's denoiser takes them."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.x, self.t = torch.nn.Linear(6, 8), torch.nn.Linear(1, 8)

    def forward(self, x, t):
        return self.x(x) + self.t(t[:, None].float())


def test_items_whose_label_is_none_every_one_are_data_without_labels():
    """A denoiser's items ((x, t), None), every one without a label, had been refused as
    "item 0 has no label: DiagQL needs a label for every item or for none", and its advice,
    the inputs alone, reads t as the label."""
    X, t = torch.randn(200, 6), torch.arange(200)
    model = _Denoiser().eval()
    conn = connect(model, _PerItem(list(zip(X, t)), [None] * 200))
    with torch.no_grad():
        truth = model.x(X).double().mean(0).numpy()
    np.testing.assert_allclose(conn.query("AVG NEURONS IN x").values, truth, rtol=1e-6)
    with pytest.raises(DiagQLError, match="WHERE class = 1 needs the true labels, but the "
                                          "data has none"):
        conn.query("AVG NEURONS IN x WHERE class = 1")


@pytest.mark.parametrize("collate", [torch.utils.data.default_collate,
                                     lambda items: torch.utils.data.default_collate(items)],
                         ids=["default", "the user's own"])
def test_an_item_without_a_label_under_a_dataloaders_collate_is_hinted_at(collate):
    """A DataLoader's collate is its own: its error says what failed, and the hint what an
    item holding None may mean."""
    model, X, y = _labelled_world()
    labels = [int(v) for v in y]
    labels[20] = None
    loader = torch.utils.data.DataLoader(_PerItem(X, labels), batch_size=16, collate_fn=collate)
    if collate is torch.utils.data.default_collate:  # DiagQL's collate reads it: it names it
        with pytest.raises(DiagQLError, match="item 20 has no label \\(None\\)"):
            connect(model, loader).query("AVG NEURONS IN 1")
        return
    with pytest.raises(ExecutionError, match="NoneType.*an item holds None: if it is an item "
                                             "without its label"):
        connect(model, loader).query("AVG NEURONS IN 1")


def test_a_generator_is_told_to_be_given_as_a_list():
    items = ((x, y) for x, y in zip(*bad_models.data()))
    with pytest.raises(DiagQLError, match=r"not generator; an iterator is read once, and DiagQL "
                                          r"reads items by index.*pass list\(\.\.\.\)"):
        connect(bad_models.net(), items)


class _LongerThanItIs(torch.utils.data.Dataset):
    """Says it holds 60 items; holds 40."""

    def __len__(self):
        return 60

    def __getitem__(self, i):
        X, y = bad_models.data()
        return X[i], y[i]


def test_a_dataset_whose_len_is_larger_than_its_items_is_named():
    with pytest.raises(ExecutionError, match=r"reading the data raised IndexError: .*the "
                                             r"Dataset's __len__ says 60 items: if it holds "
                                             r"fewer, its __len__ is wrong"):
        connect(bad_models.net(), _LongerThanItIs()).query("AVG NEURONS IN fc1")


def test_numpy_integers_are_whole_numbers_to_connect_and_set():
    """batch_size=np.int64(16) and classes={np.int64(i): name} (what a training script's
    np.unique gives) had been refused as no whole numbers."""
    torch.manual_seed(0)
    X, y = torch.randn(40, 5), torch.arange(40) % 3
    model = torch.nn.Sequential(torch.nn.Linear(5, 3))
    names = {k: name for k, name in zip(np.unique(y.numpy()), "abc")}
    db = diagql.connect(model, (X, y), batch_size=np.int64(16), classes=names, cache_dir=False,
                        progress=False)
    assert db.settings.batch_size == 16 and type(db.settings.batch_size) is int
    result = db.query("AVG NEURONS IN 0 WHERE class = 'b'")
    with torch.no_grad():
        truth = model(X[y == 1]).double().mean(0).numpy()
    np.testing.assert_allclose(result.values, truth, rtol=1e-6)


def test_a_connection_is_not_copied_and_value_of_reads_only_real_neurons():
    """pickle.dumps(db) had raised Python's own AttributeError, copy.copy shared its caches
    silently; TOPK's value_of(-1) read its last neuron, and a GROUP BY's said None always."""
    import copy
    import pickle

    torch.manual_seed(0)
    X, y = torch.randn(40, 5), torch.arange(40) % 3
    model = torch.nn.Sequential(torch.nn.Linear(5, 4))
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    for copies in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(diagql.DiagQLError, match="not pickled or copied: pickle its Results"):
            copies(db)
    top = db.query("TOPK 2 NEURONS IN 0")
    assert pickle.loads(pickle.dumps(top)).labels == top.labels
    with torch.no_grad():
        means = model(X).double().mean(0).numpy()
    assert top.value_of(3) == pytest.approx(means[3])
    for wrong, message in ((-1, "neurons 0 to 3, not -1"), (4, "not 4"), (1.0, "an int")):
        with pytest.raises(diagql.DiagQLError, match=message):
            top.value_of(wrong)
    avg, argmax = db.query("AVG NEURONS IN 0"), db.query("ARGMAX NEURONS IN 0")
    for result in (avg, argmax):  # each had said None past its layer
        for wrong in (-1, 4):
            with pytest.raises(diagql.DiagQLError, match=f"neurons 0 to 3, not {wrong}"):
                result.value_of(wrong)
    assert avg.value_of(3) == pytest.approx(means[3])
    # A sampled answer pickles too: its plan (closures, the profile's arrays) stays behind.
    sampled = db.query("TOPK 2 NEURONS IN 0 USING SAMPLE random(0.5) WITH BASELINE")
    again = pickle.loads(pickle.dumps(sampled))
    assert again.plan is None and again.labels == sampled.labels
    assert np.array_equal(again.estimate.ci_low, sampled.estimate.ci_low)
    assert np.array_equal(again.baseline.values, sampled.baseline.values)
    grouped = db.query("AVG NEURONS IN 0 GROUP BY class")
    assert grouped and not len(grouped.values)  # an answer, though its rows are its groups'
    with pytest.raises(diagql.DiagQLError, match=r"result.groups\[key\].value_of"):
        grouped.value_of(1)
    assert grouped.groups[1].value_of(2) == pytest.approx(
        model(X[y == 1]).double().mean(0)[2].item())


@pytest.mark.parametrize("target, words", [
    (lambda y, box: (y, box), r"each item's target has 2 parts of shapes \(\), \(4,\) \(a "
                              r"multi-task target\)"),
    (lambda y, box: {"labels": y, "boxes": box}, r"each item's target is a mapping "
                                                 r"\('labels', 'boxes'\)")])
def test_a_multi_task_target_is_refused_in_one_line(target, words):
    """(x, (y, box)) had escaped as numpy's 'inhomogeneous shape' ValueError, a traceback;
    (x, {"labels": y, "boxes": box}) was called 'a single value'."""
    torch.manual_seed(0)
    X, y, box = torch.randn(40, 8), torch.randint(0, 3, (40,)), torch.rand(40, 4)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    db = diagql.connect(model, [(X[i], target(y[i], box[i])) for i in range(40)],
                        cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match=words):
        db.query("AVG NEURONS IN 0 WHERE incorrect")


class TimeFirstHead(nn.Module):
    """A time-first encoder whose head scores the (T, B, H) output before the batch axis
    comes first: the head's input is no row per item."""

    def __init__(self):
        super().__init__()
        self.enc = nn.GRU(3, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.enc(x.transpose(0, 1))[0]).transpose(0, 1)[:, -1]


def test_a_latent_input_of_no_row_per_item_names_the_layer_and_the_way_round():
    torch.manual_seed(0)
    X, y = torch.randn(50, 6, 3), torch.arange(50) % 4
    db = diagql.connect(TimeFirstHead().eval(), (X, y), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match=r"the input of the latent layer 'head' .* not a tensor "
                                          r"of one row per item .*connect\(\.\.\., latent=NAME\)"):
        db.query("AVG NEURONS IN enc WHERE incorrect")


def test_an_error_shows_a_huge_name_by_its_ends_and_no_control_characters():
    """A 200,000-character layer name was repeated whole (200 KB on stderr), and a script's
    ESC bytes reached the terminal raw in the echoed source line."""
    db = connect(bad_models.net(), bad_models.data())
    with pytest.raises(BindError) as info:
        db.query(f"AVG NEURONS IN {'a' * 200_000}")
    shown = info.value.format("long.dql")
    assert len(shown) < 1_000 and f"'{'a' * 60}…{'a' * 20}' (200,000 characters)" in shown
    assert len(info.value.message) > 200_000  # the error itself keeps the name whole
    # Apostrophes inside words quote nothing: the advice between them is kept whole.
    advice = ("the Dataset's items differ in length; " + "pad them " * 20 +
              "with transformers' DataCollatorWithPadding(tokenizer)")
    assert DiagQLError(advice).format() == f"error: {advice}"
    with pytest.raises(BindError) as info:
        db.query('AVG NEURONS IN "\x1b[31mred\x1b[0m"')
    shown = info.value.format()
    assert "\x1b" not in shown and '"?[31mred?[0m"' in shown
    assert shown.splitlines()[2].index("^") == shown.splitlines()[1].index('"')  # in place


def test_the_objects_a_user_inspects_have_short_reprs():
    """A profile's, a plan's and a catalog's reprs had been 5-32 KB dataclass dumps of their
    arrays, or an address."""
    db = connect(bad_models.net(), bad_models.data())
    X, y = bad_models.data()
    accuracy = float((db.profile.predictions == y.numpy()).mean())
    assert repr(db.profile) == (f"<Profile of 40 items: 3 classes, latent "
                                f"{db.profile.latent_layer} ({db.profile.latents.shape[1]} "
                                f"dims), accuracy {accuracy:.3f}>")
    plan = db.plan("AVG NEURONS IN fc1 WHERE class = 1")
    assert repr(plan).startswith("<Plan of AVG NEURONS IN fc1 WHERE class = 1:\n  scan: ")
    assert all(f"{step}: {detail}" in repr(plan) for step, detail in plan.explain())
    assert repr(db.catalog).startswith(f"<LayerCatalog of {len(db.layers)} layers: fc1")
    assert max(map(len, (repr(db.profile), repr(plan), repr(db.catalog)))) < 2_000


def test_an_unlabelled_model_with_one_output_is_told_it_is_read_as_a_binary_logit():
    """A regression given without its targets, as the refusal of continuous labels advises:
    its one output is read as a binary classifier's logit, and SHOW PROFILE says so."""
    torch.manual_seed(0)
    X = torch.randn(60, 8)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    shown = connect(model, (X, None)).query("SHOW PROFILE")
    with torch.no_grad():
        positive = int((model(X)[:, 0] > 0).sum())
    assert {row[0]: row[1] for row in shown.rows if row[1]}.get(1, 0) == positive
    assert any("one output per item is read as a binary classifier's logit" in note
               and "regression" in note for note in shown.notes)
    # Several outputs are class scores as ever: no such note.
    assert not any("one output" in note
                   for note in connect(bad_models.net(), bad_models.unlabelled())
                   .query("SHOW PROFILE").notes)


def test_results_of_inputs_groups_and_undefined_cka_read_as_they_show():
    """SW9: a TOPK INPUTS result's value_of had read its first item's activation; a GROUP
    BY's len() was 0; an all-undefined CKA column came to pandas as objects; plan() of a TOPK
    INPUTS named it no query."""
    pd = pytest.importorskip("pandas")
    torch.manual_seed(0)
    X, y = torch.randn(60, 5), torch.arange(60) % 3
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    inputs = db.query("TOPK 3 INPUTS FOR 0[2]")
    with pytest.raises(diagql.DiagQLError, match=r"result.values\[i\] is item "
                                                 r"result.items\[i\]'s; AVG NEURONS IN 0"):
        inputs.value_of(2)
    assert len(db.query("AVG NEURONS IN 0 GROUP BY class")) == 3
    with pytest.raises(diagql.DiagQLError, match="EXPLAIN shows any statement's plan"):
        db.plan("TOPK 3 INPUTS FOR 0[2]")
    from diagql.results.formats import frame_of

    frame = frame_of(pd, [{"layer_x": "a", "layer_y": "b", "cka": None}])
    assert frame["cka"].dtype == np.float64 and frame["cka"].isna().all()


def test_labels_laid_out_the_other_way_are_told_so():
    """Sweep SX10: y of shape (1, n) or (classes, n) had been refused as labels per token or
    multi-hot labels, not as labels of another length than X's."""
    X, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
    model = torch.nn.Linear(4, 3).eval()
    for turned in (y[None], torch.nn.functional.one_hot(y, 3).T):
        with pytest.raises(diagql.DiagQLError, match=r"X has 30 items but y has \d rows, of "
                                                     r"shape .*transpose it"):
            diagql.connect(model, (X, turned), cache_dir=False, progress=False)


def test_the_python_api_refuses_values_of_the_wrong_kind_in_one_line():
    """Sweep SY8: each had raised a Python error of DiagQL's own code, or been accepted and
    failed later inside a pass."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    X, y = torch.randn(30, 4), torch.arange(30) % 3
    conn = diagql.connect(model, (X, y), latent=np.int64(1), cache_dir=False, progress=False)
    assert conn.settings.latent == "1"  # a Sequential's layer by its index
    with pytest.raises(DiagQLError, match="latent names one layer .* not list"):
        diagql.connect(model, (X, y), latent=["1"], cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="checkpoints= takes a mapping .* not int"):
        diagql.connect(model, (X, y), checkpoints=5, cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match=r"a model is named by its name \(a str: model\), "
                                          r"not int"):
        conn.on(5)
    for name, value, message in (("batch_size", 0, "batch_size must be at least 1"),
                                 ("batch_size", "64", "batch_size must be a whole number"),
                                 ("estimator", "bogus", "estimator must be one of")):
        with pytest.raises(DiagQLError, match=message):
            setattr(conn.settings, name, value)
    with pytest.raises(DiagQLError, match="unknown setting 'batchsze'; did you mean "
                                          "'batch_size'"):
        conn.settings.batchsze = 64
    with pytest.raises(DiagQLError, match="it is a model: connect\\(model, data\\) takes the "
                                          "model first"):
        diagql.connect(model, model, cache_dir=False, progress=False)
    conn.settings.model = "nope"
    with pytest.raises(DiagQLError, match="unknown model 'nope'"):
        conn.query("AVG NEURONS IN 1")
    conn.settings.model = None
    # A config's id2label read from JSON: its indices as text.
    named = diagql.connect(model, (X, y), classes={"0": "a", "1": "b", "2": "c"},
                           cache_dir=False, progress=False)
    assert named.class_names == ["a", "b", "c"]
