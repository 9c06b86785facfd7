"""SIMILARITY between layers of several models (one pass through all of them) and ACROSS
CHECKPOINTS (each checkpoint's layer against the final model's), each value checked against a
Gram-form CKA in numpy of the modules' outputs hooked by the test itself."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import diagql
from diagql.engine.cka import debiased_matrix
from diagql.errors import BindError, ParseError
from tests import models
from tests.test_models import outputs
from tests.test_similarity import gram_cka


@pytest.fixture(scope="module")
def data(digits):
    X, y = digits
    return X[:500], y[:500]


@pytest.fixture(scope="module")
def two(cnn, mlp, data):
    return diagql.connect({"base": cnn, "wide": mlp}, data, cache_dir=False, progress=False)


def test_similarity_of_two_models_layers(two, cnn, mlp, data):
    X, _ = data
    result = two.query("SIMILARITY base.6, wide.encoder.3")
    truth = gram_cka(outputs(cnn, X, "6"), outputs(mlp, X, "encoder.3"))
    assert abs(result.value - truth) <= 1e-10
    assert result.labels == ["base.6", "wide.encoder.3"]
    assert 0.05 < truth < 0.999  # two models: neither unrelated nor the same


def test_a_group_by_holds_rows_where_every_groups_moments_would_be_more(cnn, data):
    """Rows are held once whatever an item's group, moments once a group: ten groups' moments
    of two conv layers (544 features) had been chosen over the rows, and each batch updated
    every group's 544 x 544 moments (a sweep's two 1,152-wide layers: 6.4 s against 1.4 s
    ungrouped, now 0.1 s)."""
    X, y = data
    db = diagql.connect(cnn, data, cache_dir=False, progress=False)
    state = lambda text: dict(db.query(f"EXPLAIN {text}").rows)["measure"]
    assert "from feature-space cross moments" in state("SIMILARITY 0, 2")
    assert "from the items' rows held" in state("SIMILARITY 0, 2 GROUP BY class")
    result = db.query("SIMILARITY 0, 2 GROUP BY class")
    left, right = outputs(cnn, X, "0"), outputs(cnn, X, "2")
    for key, part in result.groups.items():
        mine = (y == key).numpy()
        assert abs(part.value - gram_cka(left[mine], right[mine])) <= 1e-10


def test_two_models_sharing_a_module_are_each_read_in_their_own_forward(data):
    """A frozen encoder shared by two models fires both models' hooks whichever model runs
    it: each model's layers are its own forward's (truth: plain torch), where the second
    model's run had been refused as the shared module running twice."""
    X, y = data
    torch.manual_seed(0)
    shared = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16))
    a = torch.nn.Sequential(shared, torch.nn.ReLU(), torch.nn.Linear(16, 10)).eval()
    b = torch.nn.Sequential(shared, torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                            torch.nn.Linear(8, 10)).eval()
    conn = diagql.connect({"a": a, "b": b}, data, cache_dir=False, progress=False)
    for query, left, right in (("SIMILARITY a.1, b.3", outputs(a, X, "1"), outputs(b, X, "3")),
                               ("SIMILARITY b.1, a.2", outputs(b, X, "1"), outputs(a, X, "2")),
                               ("SIMILARITY a.0, b.0", outputs(a, X, "0"), outputs(b, X, "0"))):
        assert abs(conn.query(query).value - gram_cka(left, right)) <= 1e-10, query


def test_similarity_of_two_models_per_class_with_where(two, cnn, mlp, data):
    X, y = data
    result = two.query("SIMILARITY wide.encoder.1, base.8, wide.head WHERE class != 3 "
                       "GROUP BY class")
    keep = (y != 3).numpy()
    rows = [outputs(mlp, X, "encoder.1"), outputs(cnn, X, "8"), outputs(mlp, X, "head")]
    assert sorted(result.groups) == sorted(set(y[keep].tolist()))
    for key, group in result.groups.items():
        mask = keep & (y == key).numpy()
        for i in range(3):
            for j in range(3):
                truth = 1.0 if i == j else gram_cka(rows[i][mask], rows[j][mask])
                assert abs(group.matrix[i, j] - truth) <= 1e-10


def test_where_predicted_takes_the_class_count_of_the_model_whose_predictions_it_reads(
        mlp, data):
    """A copy of the MLP with 12 outputs predicts classes 10 and 11 for some items; WHERE
    predicted = 10 reads its predictions (the first layer's model's) and had been refused as
    outside the default model's 0..9 (sweep MM3)."""
    X, _ = data
    wide = copy.deepcopy(mlp)
    old = wide.head
    wide.head = torch.nn.Linear(old.in_features, 12)
    with torch.no_grad():
        wide.head.weight[:10], wide.head.bias[:10] = old.weight, old.bias
        wide.head.weight[10:], wide.head.bias[10:] = old.weight[:2], old.bias[:2] + 0.01
        predicted = wide(X).argmax(1).numpy()
    assert (predicted == 10).sum() >= 3
    conn = diagql.connect({"base": mlp, "wide": wide}, data, cache_dir=False, progress=False)
    result = conn.query("SIMILARITY wide.encoder.3, base.encoder.3 WHERE predicted = 10")
    mask = predicted == 10
    truth = gram_cka(outputs(wide, X, "encoder.3")[mask], outputs(mlp, X, "encoder.3")[mask])
    assert result.n_items == mask.sum() and abs(result.value - truth) <= 1e-10


def test_a_sample_drawn_on_another_model_is_read_through_both(two, cnn, mlp, data):
    X, _ = data
    result = two.query("SIMILARITY base.6, wide.encoder.3 "
                       "USING SAMPLE random(0.5, random_state=1, model='wide') WITH BASELINE")
    items = np.sort(result.plan.items)
    assert len(items) == 250 and result.n_items == 250
    assert "model='wide'" in result.plan.sampler_spec
    # The estimator (checked tuple by tuple in test_similarity.py) over plain torch's rows of
    # the sampled items, for the 500 matching items.
    rows = [outputs(cnn, X[items], "6"), outputs(mlp, X[items], "encoder.3")]
    rows = [r - r.mean(axis=0) for r in rows]
    truth = debiased_matrix(rows, population=len(X))[0][0, 1]
    assert abs(result.value - truth) <= 1e-10
    exact = gram_cka(outputs(cnn, X, "6"), outputs(mlp, X, "encoder.3"))
    assert abs(result.baseline.value - exact) <= 1e-10
    assert abs(result.metrics["cka_abs_error"] - abs(truth - exact)) <= 1e-10


@pytest.fixture(scope="module")
def trained(digits):
    """An MLP saved after each of three epochs, then trained on: (final, checkpoint states)."""
    X, y = digits
    model = models.build_mlp(seed=2)
    states = {}
    for epoch in (1, 2, 3):
        models.train(model, X, y, epochs=1, seed=epoch)
        states[f"epoch{epoch}"] = copy.deepcopy(model.state_dict())
    models.train(model, X, y, epochs=2, seed=9)
    return model, states


def loaded(state) -> torch.nn.Module:
    model = models.MLP()
    model.load_state_dict(state)
    return model.eval()


def test_similarity_across_checkpoints_per_class(trained, data, tmp_path):
    X, y = data
    model, states = trained
    db = diagql.connect(model, data, checkpoints=states, cache_dir=False, progress=False)
    plot = tmp_path / "curves.png"
    result = db.query(f"SIMILARITY encoder.3 ACROSS CHECKPOINTS GROUP BY class PLOT '{plot}'")
    assert result.kind == "across" and plot.stat().st_size > 0
    assert [row[0] for row in result.rows] == ["epoch1", "epoch2", "epoch3", "final"]
    classes = sorted(set(y.tolist()))
    assert result.columns == ["checkpoint", *map(str, classes)]
    final = outputs(model, X, "encoder.3")
    for r, name in enumerate(["epoch1", "epoch2", "epoch3", "final"]):
        mine = final if name == "final" else outputs(loaded(states[name]), X, "encoder.3")
        for c, key in enumerate(classes):
            mask = (y == key).numpy()
            truth = 1.0 if name == "final" else gram_cka(mine[mask], final[mask])
            assert abs(result.series[str(key)][r] - truth) <= 1e-10
            assert abs(result.rows[r][1 + c] - truth) <= 1e-10  # whole, for CSV and JSON
            assert f"{truth:.4g}" in str(result)  # the table's 4 digits
    assert np.std([result.series[str(k)][0] for k in classes]) > 0  # the classes differ


def test_a_one_item_groups_undefined_cka_across_checkpoints_is_a_dash_and_a_note(trained, data):
    """The plain answer shows a dash and says why; across checkpoints the cell read 'nan'
    with nothing said."""
    X, y = data
    model, states = trained
    lone = int(y[0])
    keep = (y != lone) | (torch.arange(len(y)) == 0)  # one item of its class
    db = diagql.connect(model, (X[keep], y[keep]), checkpoints=states, cache_dir=False,
                        progress=False)
    result = db.query("SIMILARITY encoder.3 ACROSS CHECKPOINTS GROUP BY class")
    column = result.columns.index(str(lone))
    assert all(math.isnan(row[column]) for row in result.rows)  # JSON's null
    assert all(f"│ {name} " in str(result) and "—" in line for name in result.checkpoints
               for line in str(result).splitlines() if line.startswith(f"│ {name} "))
    assert f"every model: class = {lone}: one matching item: CKA over it is undefined (NaN)" \
        in result.notes
    assert "nan" not in str(result)


def test_a_sampled_statement_across_checkpoints_says_its_sample_and_estimates(trained, data):
    """Across checkpoints a sample's answers read as exact ones: no sample, no interval, and
    a non-uniform sampler's missing interval unexplained."""
    X, y = data
    model, states = trained
    db = diagql.connect(model, data, checkpoints=states, cache_dir=False, progress=False)
    result = db.query("SIMILARITY encoder.3 ACROSS CHECKPOINTS GROUP BY class "
                      "USING SAMPLE random(0.3, random_state=1)")
    assert "each answer from the sample random(0.3, random_state=1): 150 of 500 items" \
        in result.notes
    assert any(note.startswith("every model: CKA of the matching items estimated from the "
                               "sample") for note in result.notes)
    items = db.sample("random(0.3, random_state=1)")
    final = outputs(model, X, "encoder.3")
    for r, name in enumerate(["epoch1", "epoch2", "epoch3"]):
        mine = outputs(loaded(states[name]), X, "encoder.3")
        answer = result.checkpoints[name]
        low, high = answer.columns.index("ci_low"), answer.columns.index("ci_high")
        for c, row in enumerate(answer.rows):  # the interval holds the sample's value
            assert row[low] < row[1] < row[high]
            assert f"[{row[low]:.3g}, {row[high]:.3g}]" in result.rows[r][1 + c]  # the cell too
        sampled = items[(y[items] == answer.rows[0][0]).numpy()]
        cell = result.rows[r][1]
        assert abs(float(cell.split()[0]) - gram_cka(mine[sampled], final[sampled])) < 0.3
    assert result.series[str(answer.rows[0][0])][0] == result.checkpoints["epoch1"].rows[0][1]
    # CSV and pandas: each model's numbers whole (the table's cells had been their text,
    # "cka=0.47 [0.39, 0.56]": sweep OO3), its CKA beside its own interval
    frame = result.to_pandas()
    assert all(frame[column].dtype == np.float64 for column in ("cka", "ci_low", "ci_high"))
    for name, answer in result.checkpoints.items():
        mine = frame[frame["checkpoint"] == name]
        assert mine[["class", "cka", "ci_low", "ci_high"]].values.tolist() == \
            [[row[answer.columns.index(c)] for c in ("class", "cka", "ci_low", "ci_high")]
             for row in answer.rows]
    # a group with too few sampled items: a dash, in a cell of one number as in one of text
    few = db.query("SIMILARITY encoder.3 ACROSS CHECKPOINTS GROUP BY class "
                   "USING SAMPLE random(0.08, random_state=1)")
    assert any("[" in str(cell) for cell in few.rows[0][1:])  # a group with an interval
    assert "nan" not in str(few).lower() and "—" in str(few)  # others 'nan' (review PP1)
    vas = db.query("SIMILARITY encoder.3 ACROSS CHECKPOINTS USING SAMPLE vas(0.3)")
    assert any(note.startswith("every model: no interval: vas does not draw every item with "
                               "the same probability") for note in vas.notes)
    assert all(isinstance(row[1], float) for row in vas.rows)  # no interval to show
    avg = db.query("AVG NEURONS IN encoder.2 USING SAMPLE random(0.3, random_state=1) "
                   "ACROSS CHECKPOINTS")
    for name in ("epoch1", "epoch2", "epoch3", "final"):
        line = f"estimated from the sample: expected cosine distance " \
               f"{avg.checkpoints[name].estimate.expected:.3f}"
        assert any(note.partition(": ")[2].startswith(line) and (
            name in note.partition(": ")[0] or note.startswith("every model"))
            for note in avg.notes)
        assert not any("estimated from the sample" in n for n in avg.checkpoints[name].notes)


def test_across_notes_say_which_models_were_sampled_and_how_each_was_got(trained, data):
    """An UNTIL across checkpoints answered some models exactly ('exact cheaper'), yet the
    note said each answer came from the sample, and no growth or AUTO choice was said."""
    from diagql.results.across import across_result

    model, states = trained
    db = diagql.connect(model, data, checkpoints=states, cache_dir=False, progress=False)
    auto = db.query("AVG NEURONS IN encoder.3 USING AUTO ACROSS CHECKPOINTS")
    choice = auto.checkpoints["final"].provenance.choice
    assert choice and any(note.endswith(choice) for note in auto.notes)
    sampled = db.query("AVG NEURONS IN encoder.3 USING SAMPLE random(0.2, random_state=0)")
    exact = db.query("AVG NEURONS IN encoder.3 USING FULL")
    mixed = across_result("AVG NEURONS IN encoder.3", {"early": sampled, "final": exact}, "x")
    assert "early from the sample random(0.2, random_state=0): 100 of 500 items" in mixed.notes
    assert not any(note.startswith("each answer") for note in mixed.notes)
    grown = db.query("AVG NEURONS IN encoder.3 USING SAMPLE random(60) UNTIL cosine <= 0.5 "
                     "ACROSS CHECKPOINTS")
    for name, answer in grown.checkpoints.items():
        said = answer.provenance.growth.text()
        assert any(note.endswith(said) and (name in note.split(": ")[0] or
                                            note.startswith("every model")) for note in grown.notes)


def test_similarity_across_checkpoints_whole(trained, data):
    X, _ = data
    model, states = trained
    db = diagql.connect(model, data, checkpoints=states, cache_dir=False, progress=False)
    result = db.query("SIMILARITY head ACROSS CHECKPOINTS WHERE class < 5")
    keep = (data[1] < 5).numpy()
    final = outputs(model, X, "head")[keep]
    for r, name in enumerate(["epoch1", "epoch2", "epoch3"]):
        truth = gram_cka(outputs(loaded(states[name]), X, "head")[keep], final)
        assert abs(result.series["head"][r] - truth) <= 1e-10
        # Each checkpoint's own Result reads as a SIMILARITY's does (it had no value).
        assert abs(result.checkpoints[name].value - truth) <= 1e-10
    assert result.series["head"][3] == 1.0 == result.checkpoints["final"].value


def test_similarity_of_checkpoints_with_a_checkpoint_as_the_default_model(trained, data):
    """After SET model = epoch2, the default model's own runner loaded epoch2's weights into
    the copy that the pass's first checkpoint held: every row read epoch2's layer."""
    X, _ = data
    model, states = trained
    db = diagql.connect(model, data, checkpoints=states, cache_dir=False, progress=False)
    db.query("SET model = epoch2")
    final = outputs(model, X, "head")
    mine = {name: outputs(loaded(state), X, "head") for name, state in states.items()}
    result = db.query("SIMILARITY final.head ACROSS CHECKPOINTS")
    for name in ("epoch1", "epoch2", "epoch3"):
        assert abs(result.checkpoints[name].value - gram_cka(mine[name], final)) <= 1e-10
    pair = db.query("SIMILARITY epoch3.head, epoch1.head").value
    assert abs(pair - gram_cka(mine["epoch3"], mine["epoch1"])) <= 1e-10


def test_similarity_across_checkpoints_on_a_sample_keeps_its_baseline(trained, data):
    """WITH BASELINE on a sample ACROSS CHECKPOINTS: each checkpoint's exact CKA (plain
    torch) beside its sampled one, and the error and speed-up rows; before, the clause was
    dropped without a word."""
    X, _ = data
    model, states = trained
    db = diagql.connect(model, data, checkpoints=states, cache_dir=False, progress=False)
    result = db.query("SIMILARITY encoder.3 ACROSS CHECKPOINTS USING SAMPLE random(0.3) "
                      "WITH BASELINE")
    final = outputs(model, X, "encoder.3")
    assert result.columns == ["checkpoint", "encoder.3", "cka_abs_error vs exact", "speedup"]
    for r, name in enumerate(["epoch1", "epoch2", "epoch3"]):
        answer = result.checkpoints[name]
        truth = gram_cka(outputs(loaded(states[name]), X, "encoder.3"), final)
        assert abs(answer.baseline.value - truth) <= 1e-10
        assert answer.estimate is not None and answer.estimate.n == 150
        assert answer.metrics["cka_abs_error"] == pytest.approx(abs(answer.value - truth))
        assert f"exact={truth:.4g}" in result.rows[r][1]


def test_a_checkpoint_given_as_a_model_is_its_weights(trained, data):
    X, _ = data
    model, states = trained
    db = diagql.connect(model, data, checkpoints={"epoch1": loaded(states["epoch1"])},
                        cache_dir=False, progress=False)
    result = db.query("SIMILARITY head ACROSS CHECKPOINTS")
    truth = gram_cka(outputs(loaded(states["epoch1"]), X, "head"), outputs(model, X, "head"))
    assert abs(result.checkpoints["epoch1"].value - truth) <= 1e-10


def test_a_narrow_across_table_keeps_its_title_on_one_line(trained, data):
    model, states = trained
    db = diagql.connect(model, data, checkpoints=states, cache_dir=False, progress=False)
    result = db.query("SIMILARITY head ACROSS CHECKPOINTS")
    assert result.title in str(result).splitlines()[0]


def test_similarity_refusals(two, mlp, data):
    with pytest.raises(ParseError, match="one layer"):
        two.query("SIMILARITY base.6, wide.head ACROSS CHECKPOINTS")
    with pytest.raises(ParseError, match="two or more layers"):
        two.query("SIMILARITY base.6")
    with pytest.raises(BindError, match="checkpoints"):
        two.query("SIMILARITY base.6 ACROSS CHECKPOINTS")
    with pytest.raises(BindError, match="unknown layer"):
        two.query("SIMILARITY base.6, wide.nope")


def test_top_inputs_for_another_models_neuron(two, mlp, data):
    X, y = data
    result = two.query("TOPK 7 INPUTS FOR wide.encoder.3[5] WHERE class = 4")
    values = outputs(mlp, X, "encoder.3")[:, 5]
    pool = np.flatnonzero((y == 4).numpy())
    order = np.lexsort((pool, -values[pool]))[:7]
    assert result.items.tolist() == pool[order].tolist()
    assert np.allclose(result.values, values[pool[order]], rtol=0, atol=1e-6)
    assert result.layer == "wide.encoder.3" and result.labels == ["wide.encoder.3[5]"]
    with torch.no_grad():  # the rows' predictions are wide's, not base's
        predicted = mlp(X[pool[order]]).argmax(1).numpy()
    assert result.ranked.predictions.tolist() == predicted.tolist()


def test_explain_similarity_across_checkpoints(trained, data):
    model, states = trained
    db = diagql.connect(model, data, checkpoints=states, cache_dir=False, progress=False)
    rows = dict(db.query("EXPLAIN SIMILARITY head ACROSS CHECKPOINTS").rows)
    assert rows["across"].startswith("once per model of epoch1, epoch2, epoch3, final")
    assert "WHERE" not in rows["across"]
    # A WHERE is each model's own (sweep SY4: the filter row counts the last one's items).
    rows = dict(db.query("EXPLAIN SIMILARITY head ACROSS CHECKPOINTS WHERE incorrect").rows)
    assert rows["across"].endswith("each reads its WHERE on its own profile (its own "
                                   "predictions), the filter above counting final's items")
    rows = dict(db.query("EXPLAIN AVG NEURONS IN head WHERE incorrect ACROSS CHECKPOINTS").rows)
    assert rows["across"].endswith("the filter above counting final's items")
    # The filter row counts the model the plan is made on: the default one (review SY13).
    db.query("SET model = epoch1")
    rows = dict(db.query("EXPLAIN AVG NEURONS IN head WHERE incorrect ACROSS CHECKPOINTS").rows)
    assert rows["across"].endswith("the filter above counting epoch1's items")
    db.query("SET model = final")
    # Two models' layers of one name are told apart in the hooks.
    rows = dict(db.query("EXPLAIN SIMILARITY epoch1.head, head").rows)
    assert "hooks on epoch1.head (" in rows["forward"] and ", final.head (" in rows["forward"]


def test_a_layer_and_its_permutations_are_at_most_one_apart():
    """CKA is a cosine: a layer against a copy with its units permuted is 1, and its rounding
    had printed 1.0000000000000027 (sweep MM3); exact answers are at most 1, as samples are.
    Over fewer items than the layer's width (the Gram form) and more (the moments')."""
    torch.manual_seed(3)
    base = torch.nn.Sequential(torch.nn.Linear(12, 256), torch.nn.Linear(256, 3)).eval()
    models_ = {"base": base}
    for k in range(6):
        rotation = torch.eye(256)[torch.randperm(256)]
        turned = copy.deepcopy(base)
        with torch.no_grad():
            turned[0].weight.copy_(rotation @ base[0].weight)
            turned[0].bias.copy_(rotation @ base[0].bias)
            turned[1].weight.copy_(base[1].weight @ rotation.T)
        models_[f"r{k}"] = turned
    layers = ", ".join(["base.0"] + [f"r{k}.0" for k in range(6)])
    for n in (120, 600):
        X, y = torch.randn(n, 12), torch.arange(n) % 3
        conn = diagql.connect(models_, (X, y), cache_dir=False, progress=False)
        matrix = conn.query(f"SIMILARITY {layers}").matrix
        assert np.all(matrix <= 1.0) and np.all(matrix > 1.0 - 1e-9), matrix


def test_a_reduced_sequence_layer_across_checkpoints_is_named_with_its_reduction():
    """SIMILARITY embed TOKEN 0 ACROSS CHECKPOINTS labelled its column "embed", as if it were
    the mean over tokens (sweep MM2); its values are the first token's CKA (numpy)."""
    from tests.test_top_inputs import Tagger

    ids = torch.randint(0, 20, (80, 4), generator=torch.Generator().manual_seed(1))
    model = Tagger().eval()
    earlier = copy.deepcopy(model.state_dict())
    earlier["embed.weight"] = earlier["embed.weight"] + 0.5 * torch.randn(20, 5)
    db = diagql.connect(model, (ids, torch.arange(80) % 3), checkpoints={"early": earlier},
                        cache_dir=False, progress=False)
    result = db.query("SIMILARITY embed TOKEN 0 ACROSS CHECKPOINTS")
    assert list(result.series) == ["embed TOKEN 0"]
    first = earlier["embed.weight"][ids[:, 0]].double().numpy()
    final = model.embed.weight[ids[:, 0]].detach().double().numpy()
    assert abs(result.series["embed TOKEN 0"][0] - gram_cka(first, final)) <= 1e-10
