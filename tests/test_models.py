"""Several models over one data set: model.layer names, SET model, SHOW MODELS, samplers'
model=, and passes over several models, each checked against plain torch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import diagql
from diagql.engine.executor import Collector, run_together
from diagql.errors import BindError, ExecutionError
from diagql.language import ast
from diagql.language.binder import bind_layer, bind_view
from tests import models


def outputs(model, X, module_name: str) -> np.ndarray:
    """The module's output for every item, by a forward hook of the test's own."""
    seen = []
    module = dict(model.named_modules())[module_name]
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model(X)
    finally:
        handle.remove()
    return torch.cat(seen).reshape(len(X), -1).double().numpy()


@pytest.fixture(scope="module")
def two(cnn, mlp, digits):
    X, y = digits
    return diagql.connect({"base": cnn, "wide": mlp}, (X, y), cache_dir=False, progress=False)


def test_qualified_names_read_each_models_layer(two, cnn, mlp, digits):
    X, y = digits
    mask = (y == 3).numpy()
    base = two.query("AVG NEURONS IN 8 WHERE class = 3")  # unqualified: the default model's
    wide = two.query("AVG NEURONS IN wide.encoder.3 WHERE class = 3")
    np.testing.assert_allclose(base.values, outputs(cnn, X, "8")[mask].mean(0), atol=1e-5)
    np.testing.assert_allclose(wide.values, outputs(mlp, X, "encoder.3")[mask].mean(0), atol=1e-5)
    assert wide.layer == "wide.encoder.3" and wide.labels[0] == "wide.encoder.3[0]"
    assert base.layer == "base.8"


def test_set_model_changes_the_default_and_suggests_on_a_typo(cnn, mlp, digits):
    X, y = digits
    db = diagql.connect({"base": cnn, "wide": mlp}, (X, y), cache_dir=False, progress=False)
    db.query("SET model = wide")
    assert db.model is mlp and db.settings.model == "wide"
    result = db.query("AVG NEURONS IN head WHERE predicted = 2")
    predicted = mlp(X).argmax(1).numpy() == 2
    np.testing.assert_allclose(result.values, outputs(mlp, X, "head")[predicted].mean(0),
                               atol=1e-5)
    with pytest.raises(BindError, match="unknown model 'wid'; did you mean 'wide'"):
        db.query("SET model = wid")
    with pytest.raises(BindError, match="the default model 'wide' has no layer '8'; model "
                                        "'base' has one: base.8"):
        db.query("AVG NEURONS IN 8")  # the default is wide now, which has no layer 8


def test_show_models_lists_accuracy_on_the_data(two, cnn, mlp, digits):
    X, y = digits
    rows = {row[0]: row for row in two.query("SHOW MODELS").rows}
    for name, model in (("base", cnn), ("wide", mlp)):
        accuracy = float((model(X).argmax(1) == y).double().mean())
        # Numbers (JSON and CSV carry them whole), shown in tables as 97.0% and 62,158.
        assert rows[name][4] == pytest.approx(accuracy)
        assert rows[name][2] == sum(p.numel() for p in model.parameters())
    assert rows["base"][5] == "*" and rows["wide"][5] == ""


def test_a_sample_is_drawn_on_the_default_models_profile_unless_model_is_given(two, cnn, mlp,
                                                                              digits):
    X, y = digits
    base_cells = set(zip(y.tolist(), cnn(X).argmax(1).tolist()))
    wide_cells = set(zip(y.tolist(), mlp(X).argmax(1).tolist()))
    assert base_cells != wide_cells
    # stratified takes at least one item of every (class, prediction) cell of its profile.
    for spec, cells, model in (("stratified(0.05)", base_cells, cnn),
                               ("stratified(0.05, model='wide')", wide_cells, mlp)):
        items = two.sample(spec)
        predictions = model(X[items]).argmax(1).tolist()
        assert set(zip(y[items].tolist(), predictions)) == cells
    two.execute("SET estimator = plain")  # the answer compared here is the sample mean
    result = two.query("AVG NEURONS IN wide.head USING SAMPLE stratified(0.05, model='wide')")
    two.execute("SET estimator = assisted")
    items = two.sample("stratified(0.05, model='wide')")
    np.testing.assert_allclose(result.values, outputs(mlp, X, "head")[items].mean(0), atol=1e-5)
    assert "model='wide'" in result.source


def test_another_models_layer_under_an_uneven_sample_has_its_answer_and_no_estimate(two):
    """A fit on base's latent extrapolating wide's layer is checked by nothing the profile
    holds: under gmm, weighted and ebtree a sweep's intervals covered 0.69-0.78. The answer
    stays; the estimate says why it is not given and how to get one."""
    uneven = two.query("AVG NEURONS IN wide.encoder.1 USING SAMPLE gmm(0.1, random_state=0)")
    assert not uneven.estimate.reliable and uneven.values is not None
    assert uneven.estimate.reason == (
        "gmm draws unevenly, on base's profile, and a fit on base's latent cannot be checked "
        "on wide's layers; draw the sample on wide for an estimate (gmm(..., model=wide))")
    assert "no accuracy estimate: gmm draws unevenly, on base's profile" in str(uneven)
    for statement in ("AVG NEURONS IN wide.encoder.1 USING SAMPLE random(0.1)",
                      "AVG NEURONS IN wide.encoder.1 USING SAMPLE gmm(0.1, model='wide')",
                      "TOPK 3 NEURONS IN 6 USING SAMPLE gmm(0.1)"):  # base's own
        assert two.query(statement).estimate.reliable, statement
    # UNTIL would grow it, never told the target met, until exact was cheaper: refused.
    with pytest.raises(BindError, match="UNTIL js <= 0.1 grows the sample until its estimate "
                                        "meets the target, and here there is none: weighted "
                                        "draws unevenly") as refused:
        two.query("ARGMAX NEURONS IN wide.encoder.1 USING SAMPLE weighted UNTIL js <= 0.1")
    assert refused.value.column == 56  # under UNTIL
    assert two.query("AVG NEURONS IN wide.encoder.1 USING SAMPLE weighted WITHIN 0.5 SECONDS")


def test_top_inputs_draw_their_sample_where_a_query_would(two, cnn, mlp, digits):
    """TOPK k INPUTS had refused a sampler's model= ('no parameter model') and drew its sample
    on the neuron's model's profile; it now draws it as a query does: on the default model's
    profile, or on model='...''s, and its top items are plain torch's within that sample."""
    X, y = digits
    activation = outputs(mlp, X, "head")[:, 2]
    for spec in ("stratified(0.05)", "stratified(0.05, model='wide')",
                 "stratified(0.05, model='base')"):
        result = two.query(f"TOPK 4 INPUTS FOR wide.head[2] WHERE class = 3 USING SAMPLE {spec}")
        items = two.sample(spec)
        items = items[(y[items] == 3).numpy()]
        truth = items[np.argsort(-activation[items], kind="stable")[:4]]
        assert result.items.tolist() == truth.tolist()
        np.testing.assert_allclose(result.values, activation[truth], atol=1e-5)
        assert result.provenance.sampler == two.query(
            f"AVG NEURONS IN wide.head USING SAMPLE {spec}").provenance.sampler
    assert set(two.sample("stratified(0.05)").tolist()) != \
        set(two.sample("stratified(0.05, model='wide')").tolist())


def test_a_models_layer_is_named_with_its_model_in_answers_and_mistakes(two):
    """With several models, `TOPK 3 INPUTS FOR wide.head[2]` had said "the 3 items of highest
    head[2]" and "index 99 is past the 10 entries of layer 'head'", as if of the default
    model's layer."""
    result = two.query("TOPK 3 INPUTS FOR wide.head[2]")
    assert result.ranked.neuron == "wide.head[2]" == result.labels[0]
    assert "inputs index of wide.head" in result.ranked.how
    with pytest.raises(BindError) as caught:
        two.query("TOPK 3 INPUTS FOR wide.head[99]")
    assert caught.value.message.startswith("model 'wide': index 99 is past the 10 entries")
    with pytest.raises(BindError) as caught:
        two.query("AVG NEURONS IN wide.head TOKEN 3")
    assert caught.value.message.startswith("model 'wide': ")


def test_a_default_model_that_does_not_fit_the_labels_leaves_the_others_answering(cnn, digits):
    """The default model scores 3 classes of the digits' 10: its profile fails. Exact queries
    on another model's layers had failed with its error (they plan on the default's profile
    when they read no prediction); they now read their own model's profile instead."""
    X, y = digits
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(X[0].numel(), 3))
    db = diagql.connect({"small": small, "base": cnn}, (X, y), cache_dir=False,
                        progress=False)
    mask = (y == 3).numpy()
    result = db.query("AVG NEURONS IN base.8 WHERE class = 3")
    np.testing.assert_allclose(result.values, outputs(cnn, X, "8")[mask].mean(0), atol=1e-5)
    assert db.query("SIMILARITY base.7, base.8").value == pytest.approx(
        cka(outputs(cnn, X, "7"), outputs(cnn, X, "8")), abs=1e-9)
    with pytest.raises(diagql.DiagQLError, match="model 'small': label .* outside"):
        db.query("AVG NEURONS IN small.1")


def test_a_models_warning_names_the_model():
    """The 'scores lie in [0, 1]' notice did not say which of several models it was about."""
    X, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    a = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    b = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3),
                            torch.nn.Sigmoid())
    db = diagql.connect({"a": a, "b": b}, (X, y), cache_dir=False, progress=False)
    with pytest.warns(diagql.DiagQLWarning, match=r"^model 'b': the model's 3 scores"):
        db.query("AVG NEURONS IN b.0 WHERE correct")


def test_one_module_given_under_two_names_is_refused_at_connect(cnn, digits):
    """It was accepted, then SIMILARITY a.8, b.8 failed with an internal message."""
    with pytest.raises(diagql.DiagQLError, match="models 'a' and 'b' are one module"):
        diagql.connect({"a": cnn, "b": cnn}, digits, cache_dir=False, progress=False)


def cka(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(axis=0), y - y.mean(axis=0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def test_two_models_of_one_architecture_never_share_activation_rows(digits):
    X, y = digits
    a, b = models.trained_cnn(), models.build_cnn(seed=3)  # same layer names, other weights
    db = diagql.connect({"a": a, "b": b}, (X, y), cache_dir=False, progress=False)
    db.execute("SET estimator = plain")  # the answers compared here are the sample means
    items = db.sample("random(0.3)")
    first = db.query("AVG NEURONS IN a.8 USING SAMPLE random(0.3)")  # keeps a's rows
    second = db.query("AVG NEURONS IN b.8 USING SAMPLE random(0.3)")
    np.testing.assert_allclose(first.values, outputs(a, X, "8")[items].mean(0), atol=1e-5)
    np.testing.assert_allclose(second.values, outputs(b, X, "8")[items].mean(0), atol=1e-5)
    # A script's queries on both models: one pass per model, each its own answer.
    r1, r2 = db.execute("TOPK 3 NEURONS IN b.8 WHERE class = 1; TOPK 3 NEURONS IN a.8 WHERE "
                        "class = 1")
    mask = (y == 1).numpy()
    for result, model in ((r1, b), (r2, a)):
        truth = outputs(model, X, "8")[mask].mean(0)
        assert result.neurons.tolist() == np.argsort(-truth)[:3].tolist()


@pytest.mark.parametrize("text,model,column", [("AVG NEURONS IN wide", "wide", 16),
                                               ("DESCRIBE base", "base", 10),
                                               ("SIMILARITY wide, base.8", "wide", 12),
                                               ("TOPK 2 INPUTS FOR wide[0]", "wide", 19)])
def test_a_model_named_where_a_layer_goes_is_told_so(two, text, model, column):
    """It was 'unknown layer 'wide'', listing the default model's layers."""
    with pytest.raises(BindError) as caught:
        two.query(text)
    err = caught.value
    assert err.message.startswith(f"{model!r} is a model, not a layer: name one of its layers, "
                                  f"{model}.")
    assert err.column == column and err.hint.startswith(f"{model}'s layers are ")


def test_a_name_that_reads_both_ways_is_refused_with_both_spellings(cnn, mlp, digits):
    X, y = digits
    # The default model (an MLP) has a module "encoder.1"; the model "encoder" has a layer "1".
    db = diagql.connect({"base": mlp, "encoder": cnn}, (X, y), cache_dir=False, progress=False)
    with pytest.raises(BindError, match="ambiguous") as caught:
        db.query("AVG NEURONS IN encoder.1")
    assert "base.encoder.1" in caught.value.hint
    mine = outputs(mlp, X, "encoder.1").mean(0)
    for text in ("AVG NEURONS IN base.encoder.1", "AVG NEURONS IN 'encoder.1'"):
        np.testing.assert_allclose(db.query(text).values, mine, atol=1e-5)
    # No doubt where only one reading exists: the default MLP has no encoder.8.
    np.testing.assert_allclose(db.query("AVG NEURONS IN encoder.8").values,
                               outputs(cnn, X, "8").mean(0), atol=1e-5)


def test_a_single_model_is_named_model_and_its_names_stay_bare(cnn, digits):
    X, y = digits
    db = diagql.connect(cnn, (X, y), cache_dir=False, progress=False)
    assert list(db.models) == ["model"]
    assert db.query("TOPK 2 NEURONS IN 8").layer == "8"
    with pytest.raises(BindError, match="unknown layer 'model.8'"):
        db.query("TOPK 2 NEURONS IN model.8")  # no model prefix with one model


def test_one_pass_feeds_two_models_the_same_batches(two, cnn, mlp, digits):
    X, _ = digits
    items = np.arange(5, 700, 3)
    collected, batches = [], []
    for entry, name in ((two.models["base"], "8"), (two.models["wide"], "head")):
        layer = bind_layer(ast.LayerRef(name), entry.catalog)
        view = bind_view(ast.Query("avg", "neurons", ast.LayerRef(name)), layer)
        collected.append((entry, Collector(view, items, np.dtype(np.float64))))
    run_together([(entry.runner(), [c]) for entry, c in collected], "both",
                 after_batch=lambda idx: batches.append(idx.copy()))
    np.testing.assert_array_equal(np.concatenate(batches), items)  # in order, each item once
    rows = [np.concatenate([chunk for _, chunk in c.chunks]) for _, c in collected]
    np.testing.assert_allclose(rows[0], outputs(cnn, X[items], "8"), atol=1e-5)
    np.testing.assert_allclose(rows[1], outputs(mlp, X[items], "head"), atol=1e-5)
    runner = two.models["base"].runner()
    with pytest.raises(ExecutionError, match="one module"):
        run_together([(runner, [collected[0][1]]), (runner, [collected[0][1]])], "twice")


def test_a_layer_the_profile_holds_is_read_from_its_own_models_profile_only(digits):
    """Layer 7 is the CNN's latent and 8 its logits, which the profile holds: a query on b's
    that reads no prediction is planned on a's profile, whose rows are a's, not b's."""
    X, y = digits
    a, b = models.trained_cnn(), models.build_cnn(seed=3)
    db = diagql.connect({"a": a, "b": b}, (X, y), cache_dir=False, progress=False)
    for layer in ("7", "8"):
        for name, model in (("a", a), ("b", b)):
            result = db.query(f"AVG NEURONS IN {name}.{layer} WHERE class = 2")
            truth = outputs(model, X, layer)[(y == 2).numpy()].mean(0)
            np.testing.assert_allclose(result.values, truth, atol=1e-5)


def test_one_model_whose_classes_do_not_fit_the_labels_is_named_and_the_others_stand():
    """A binary model beside a 4-class one over 4-class labels: SHOW MODELS failed for every
    model with an error that named none."""
    torch.manual_seed(0)
    X, y = torch.randn(60, 5), torch.arange(60) % 4
    four = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    binary = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    db = diagql.connect({"a": four, "c": binary}, (X, y), cache_dir=False, progress=False)
    shown = db.query("SHOW MODELS")
    accuracy = {row[0]: row[shown.columns.index("accuracy")] for row in shown.rows}
    with torch.no_grad():
        truth = (four(X).argmax(1) == y).double().mean().item()
    assert accuracy == {"a": pytest.approx(truth), "c": "—"}
    assert len(shown.notes) == 1 and shown.notes[0].startswith(
        "model 'c': label 2 of item 2 is outside the model's classes 0..1")
    with pytest.raises(diagql.DiagQLError, match="^model 'c': label 2"):
        db.query("AVG NEURONS IN c.0 WHERE correct")


def test_describe_of_a_one_neuron_layer_names_it_once():
    """Its labels read "head[0] … head[0]"."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    X = torch.randn(20, 4)
    db = diagql.connect(model.eval(), (X, (X[:, 0] > 0).long()), cache_dir=False,
                        progress=False)
    assert dict(db.query("DESCRIBE 2").rows)["labels"] == "2[0]"
    assert dict(db.query("DESCRIBE 0").rows)["labels"] == "0[0] … 0[2]"
