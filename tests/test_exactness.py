"""Exactness: every answer DiagQL gives equals the truth computed here, independently.

The truth uses plain torch and numpy only: no diagql code and no forward hooks. The
activation of layer i of an ``nn.Sequential`` is ``model[:i + 1](X)`` (with
``ReLU(inplace=True)`` at i + 1 that is the pre-ReLU value, which is what layer i must report);
the MLP's activations come from calling its submodules one after the other. Each aggregate is
then its definition (docs/ARCHITECTURE.md, "Data model" and "Plan and execute") written in numpy:

- a neuron is one element of a layer's per-item output, flattened in C order; CHANNELS first
  averages each channel over its spatial positions;
- AVG is the mean per neuron (float64), TOPK ranks by the mean (or the max) per neuron,
  descending, ties to the lower index; ARGMAX is the fraction of the matching items whose
  maximal neuron (the first on ties) each neuron is;
- a sampled query is the same definition on the sampled items that match the predicate, and
  WITH BASELINE compares it with the full answer by top-k precision, cosine distance or
  base-2 Jensen-Shannon distance.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cosine, jensenshannon
from torch.utils.data import DataLoader, Dataset, TensorDataset

import diagql

ATOL = 1e-5
N_ITEMS = 1797


# --- the truth ------------------------------------------------------------------------------

class Truth:
    """Labels, predictions, confidence, latents and activations of every item, by plain torch."""

    def __init__(self, model, X, y, layers: dict, latent):
        assert not model.training, "the truth is the model in eval mode"
        self.X = X
        self.layers = layers  # name -> function X -> that layer's output, no hooks involved
        self.labels = y.numpy()
        with torch.no_grad():
            logits = model(X).to(torch.float64)
            self.latents = latent(X).numpy().copy()
        self.predictions = logits.argmax(dim=1).numpy()
        self.confidence = torch.softmax(logits, dim=1).max(dim=1).values.numpy()
        self.correct = self.predictions == self.labels
        self._activations: dict[str, np.ndarray] = {}

    def activations(self, layer: str) -> np.ndarray:
        """(N, *shape) float64: the layer's output for every item."""
        if layer not in self._activations:
            with torch.no_grad():
                self._activations[layer] = self.layers[layer](self.X).to(torch.float64).numpy()
        return self._activations[layer]


def sequential_layers(model: torch.nn.Sequential) -> dict:
    """Layer "i" of a Sequential outputs model[:i + 1](X): the prefix up to and including it."""
    return {str(i): (lambda X, i=i: model[:i + 1](X)) for i in range(len(model))}


def mlp_layers(model) -> dict:
    """The MLP's submodules called explicitly, in the order its forward calls them."""
    encoder, head = model.encoder, model.head
    layers = {f"encoder.{i}": (lambda X, i=i: encoder[:i + 1](X)) for i in range(len(encoder))}
    layers["encoder"] = lambda X: encoder(X)
    layers["head"] = lambda X: head(encoder(X))
    return layers


def neuron_matrix(A: np.ndarray, unit: str) -> np.ndarray:
    """Items × neurons (C-order flattening), or items × channels (each channel's spatial mean)."""
    if unit == "channels":
        return A.reshape(A.shape[0], A.shape[1], -1).mean(axis=2)
    return A.reshape(A.shape[0], -1)


def mean_per_neuron(V: np.ndarray) -> np.ndarray:
    return V.mean(axis=0)


def max_per_neuron(V: np.ndarray) -> np.ndarray:
    return V.max(axis=0)


def argmax_histogram(V: np.ndarray) -> np.ndarray:
    """Fraction of items whose flattened argmax (first index on ties) is each neuron."""
    return np.bincount(V.argmax(axis=1), minlength=V.shape[1]) / len(V)


def top_k(values: np.ndarray, k: int) -> np.ndarray:
    """Descending value, ties to the lower index."""
    return np.argsort(-values, kind="stable")[:k]


def label(layer: str, shape: tuple, neuron: int, unit: str) -> str:
    """``0[3,1,4]``: the layer, then the neuron's C-order coordinates; ``0[3]`` for a channel."""
    if unit == "channels" or len(shape) == 1:
        return f"{layer}[{neuron}]"
    return f"{layer}[{','.join(str(int(c)) for c in np.unravel_index(neuron, shape))}]"


@dataclass(frozen=True)
class Aggregate:
    """One aggregate as DiagQL writes it and as numpy defines it."""

    template: str  # "TOPK 5 NEURONS IN {layer} BY MAX"
    kind: str  # topk | avg | argmax
    unit: str  # neurons | channels
    order: str = "mean"  # what TOPK ranks by
    k: int = 0

    def __str__(self) -> str:
        return self.template.replace(" IN {layer}", "")

    def query(self, layer: str, where: str | None = None, group_by: str | None = None,
              using: str | None = None, baseline: bool = False) -> str:
        text = self.template.format(layer=layer)
        if where:
            text += f" WHERE {where}"
        if group_by:
            text += f" GROUP BY {group_by}"
        if using:
            text += f" USING {using}"
        if baseline:
            text += " WITH BASELINE"
        return text

    def answer(self, A: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(neurons, values) for the activations A of the items that count."""
        V = neuron_matrix(A, self.unit)
        if self.kind == "avg":
            return np.arange(V.shape[1]), mean_per_neuron(V)
        if self.kind == "argmax":
            return np.arange(V.shape[1]), argmax_histogram(V)
        ranked_by = max_per_neuron(V) if self.order == "max" else mean_per_neuron(V)
        neurons = top_k(ranked_by, self.k)
        return neurons, ranked_by[neurons]


TOPK = Aggregate("TOPK 5 NEURONS IN {layer}", "topk", "neurons", "mean", 5)
TOPK_MEAN = Aggregate("TOPK 5 NEURONS IN {layer} BY MEAN", "topk", "neurons", "mean", 5)
TOPK_MAX = Aggregate("TOPK 5 NEURONS IN {layer} BY MAX", "topk", "neurons", "max", 5)
AVG = Aggregate("AVG NEURONS IN {layer}", "avg", "neurons")
ARGMAX = Aggregate("ARGMAX NEURONS IN {layer}", "argmax", "neurons")
TOPK_CHANNELS = Aggregate("TOPK 3 CHANNELS IN {layer}", "topk", "channels", "mean", 3)
TOPK_CHANNELS_MAX = Aggregate("TOPK 3 CHANNELS IN {layer} BY MAX", "topk", "channels", "max", 3)
AVG_CHANNELS = Aggregate("AVG CHANNELS IN {layer}", "avg", "channels")
ARGMAX_CHANNELS = Aggregate("ARGMAX CHANNELS IN {layer}", "argmax", "channels")

NEURON_AGGREGATES = [TOPK, TOPK_MEAN, TOPK_MAX, AVG, ARGMAX]
CHANNEL_AGGREGATES = [TOPK_CHANNELS, TOPK_CHANNELS_MAX, AVG_CHANNELS, ARGMAX_CHANNELS]

CNN_LAYERS = [str(i) for i in range(9)]
CNN_MAPS = ["0", "1", "2", "3", "4"]  # conv-shaped outputs (C, H, W): CHANNELS applies
MLP_LAYERS = ["encoder", "encoder.0", "encoder.1", "encoder.2", "encoder.3", "encoder.4", "head"]

# Each predicate and its meaning on the truth.
PREDICATES = {
    "class = 3": lambda t: t.labels == 3,
    "class IN (1, 7)": lambda t: np.isin(t.labels, [1, 7]),
    "class NOT IN (0, 1, 2, 3)": lambda t: ~np.isin(t.labels, [0, 1, 2, 3]),
    "predicted = 8": lambda t: t.predictions == 8,
    "correct": lambda t: t.correct,
    "incorrect": lambda t: ~t.correct,
    "confidence < 0.9": lambda t: t.confidence < 0.9,
    "confidence >= 0.5": lambda t: t.confidence >= 0.5,
    "NOT (class = 3 OR predicted = 3)": lambda t: ~((t.labels == 3) | (t.predictions == 3)),
    "(class = 1 OR class = 2) AND incorrect":
        lambda t: ((t.labels == 1) | (t.labels == 2)) & ~t.correct,
    # Precedence: NOT binds tighter than AND, AND tighter than OR.
    "class = 1 OR class = 2 AND incorrect": lambda t: (t.labels == 1) | ((t.labels == 2) & ~t.correct),
    "NOT class = 3 AND correct": lambda t: (t.labels != 3) & t.correct,
    "predicted != 1 AND confidence > 0.99": lambda t: (t.predictions != 1) & (t.confidence > 0.99),
    "class = 5 AND NOT correct": lambda t: (t.labels == 5) & ~t.correct,
    "class <> 3 AND confidence > .5 OR predicted < 2":
        lambda t: ((t.labels != 3) & (t.confidence > 0.5)) | (t.predictions < 2),
    "not Correct and CLASS in (4, 8, 9)": lambda t: ~t.correct & np.isin(t.labels, [4, 8, 9]),
}

GROUP_COLUMNS = {
    "class": lambda t: t.labels,
    "predicted": lambda t: t.predictions,
    "correct": lambda t: t.correct,
}


@dataclass
class Answer:
    neurons: np.ndarray
    values: np.ndarray
    labels: list[str]
    n_items: int


def expected(truth: Truth, agg: Aggregate, layer: str, mask: np.ndarray) -> Answer:
    if not mask.any():  # no matching item: an empty answer
        return Answer(np.empty(0, dtype=np.int64), np.empty(0), [], 0)
    A = truth.activations(layer)[mask]
    neurons, values = agg.answer(A)
    labels = [label(layer, A.shape[1:], int(n), agg.unit) for n in neurons]
    return Answer(neurons, values, labels, int(mask.sum()))


def assert_answer(result, want: Answer) -> None:
    assert result.n_items == want.n_items
    np.testing.assert_array_equal(result.neurons, want.neurons)
    assert list(result.labels) == want.labels
    np.testing.assert_allclose(result.values, want.values, rtol=0, atol=ATOL)


def everything(truth: Truth) -> np.ndarray:
    return np.ones(len(truth.labels), dtype=bool)


def assert_no_hooks(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"a forward hook remains on {name or 'the model'!r}"
        assert not module._forward_pre_hooks, f"a forward pre-hook remains on {name or 'the model'!r}"


# --- fixtures ---------------------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cnn_truth(cnn, digits) -> Truth:
    return Truth(cnn, *digits, sequential_layers(cnn), latent=lambda X: cnn[:8](X))


@pytest.fixture(scope="module")
def mlp_truth(mlp, digits) -> Truth:
    return Truth(mlp, *digits, mlp_layers(mlp), latent=lambda X: mlp.encoder(X))


@pytest.fixture(scope="module")
def worlds(cnn, mlp, digits, cnn_truth, mlp_truth) -> dict:
    """model name -> (connection, truth). Batches of 64 and 100 straddle the 1,797 items unevenly."""
    worlds = {"cnn": (diagql.connect(cnn, digits, batch_size=64), cnn_truth),
              "mlp": (diagql.connect(mlp, digits, batch_size=100), mlp_truth)}
    for db, _ in worlds.values():
        db.execute("SET estimator = plain")  # sample answers here are the sample means
    return worlds


def test_layers_are_the_qualified_module_names(worlds):
    assert worlds["cnn"][0].layers == CNN_LAYERS
    assert worlds["mlp"][0].layers == MLP_LAYERS


def test_the_truth_has_work_for_every_predicate(cnn_truth, mlp_truth):
    """Every predicate selects some items but not all, so no test below is vacuous."""
    for truth in (cnn_truth, mlp_truth):
        for text, predicate in PREDICATES.items():
            assert 0 < predicate(truth).sum() < N_ITEMS, text


# --- every aggregate on every layer -----------------------------------------------------------

EVERY_LAYER = (
    [("cnn", layer, agg) for layer in CNN_LAYERS for agg in NEURON_AGGREGATES]
    + [("cnn", layer, agg) for layer in CNN_MAPS for agg in CHANNEL_AGGREGATES]
    + [("mlp", layer, agg) for layer in MLP_LAYERS for agg in NEURON_AGGREGATES]
)


@pytest.mark.parametrize("model, layer, agg", EVERY_LAYER,
                         ids=[f"{m}-{layer}-{agg}" for m, layer, agg in EVERY_LAYER])
def test_aggregate_over_all_items(worlds, model, layer, agg):
    db, truth = worlds[model]
    result = db.query(agg.query(layer))
    assert (result.kind, result.layer, result.unit, result.source) == (agg.kind, layer, agg.unit, "full")
    assert_answer(result, expected(truth, agg, layer, everything(truth)))


def test_pre_relu_value_survives_an_inplace_relu(worlds):
    """Layer 6 feeds ReLU(inplace=True), which overwrites 6's output tensor: layer 6 still
    reports the values before the ReLU (negative means included), layer 7 those after it."""
    db, truth = worlds["cnn"]
    result = db.query("AVG NEURONS IN 6")
    assert (truth.activations("6") < 0).any() and (result.values < 0).any()
    np.testing.assert_allclose(result.values, truth.activations("6").mean(axis=0), atol=ATOL)
    after_relu = db.query("AVG NEURONS IN 7")
    assert (after_relu.values >= 0).all()


def test_labels_read_layer_then_coordinates(worlds):
    cnn_db, mlp_db = worlds["cnn"][0], worlds["mlp"][0]
    assert cnn_db.query("AVG NEURONS IN 0").labels[3 * 64 + 1 * 8 + 4] == "0[3,1,4]"  # 4×8×8
    assert cnn_db.query("AVG NEURONS IN 2").labels[7 * 36 + 5 * 6 + 2] == "2[7,5,2]"  # 8×6×6
    assert cnn_db.query("AVG CHANNELS IN 0").labels == ["0[0]", "0[1]", "0[2]", "0[3]"]
    assert cnn_db.query("AVG NEURONS IN 5").labels[71] == "5[71]"
    assert mlp_db.query("AVG NEURONS IN encoder.1").labels[5] == "encoder.1[5]"
    assert mlp_db.query("AVG NEURONS IN head").labels == [f"head[{i}]" for i in range(10)]


def test_every_group_and_a_whole_layer_topk_have_their_own_neurons_labels(worlds):
    """A GROUP BY's groups share one list of the layer's labels (made once a plan); a TOPK of
    every neuron, ranked, has its own order's."""
    db = worlds["cnn"][0]
    grouped = db.query("AVG NEURONS IN 2 GROUP BY class")
    want = [f"2[{c},{h},{w}]" for c in range(8) for h in range(6) for w in range(6)]
    assert all(group.labels == want for group in grouped.groups.values())
    ranked = db.query("TOPK 288 NEURONS IN 2")
    assert ranked.labels == [want[i] for i in ranked.neurons]
    assert ranked.labels != want  # ranked by value, not in the layer's order


def test_quoted_layer_names_are_the_same_layer(worlds):
    db, truth = worlds["mlp"]
    for text in ('TOPK 5 NEURONS IN "encoder.1" WHERE incorrect',
                 "TOPK 5 NEURONS IN 'encoder.1' WHERE incorrect"):
        assert_answer(db.query(text), expected(truth, TOPK, "encoder.1", ~truth.correct))


def test_no_matching_item_is_an_error_not_an_empty_answer(worlds):
    db, _ = worlds["cnn"]
    with pytest.raises(diagql.ExecutionError, match="no items match"):
        db.query("AVG NEURONS IN 2 WHERE class = 3 AND NOT class = 3")


def test_using_full_is_the_default(worlds):
    db, truth = worlds["cnn"]
    full = db.query("TOPK 5 NEURONS IN 2 WHERE incorrect USING FULL")
    assert full.source == "full" and not full.approximate
    assert_answer(full, expected(truth, TOPK, "2", ~truth.correct))


# --- complete rankings: ties go to the lower index ---------------------------------------------

RANKINGS = [("cnn", "1"), ("cnn", "3"), ("cnn", "7"), ("mlp", "encoder.2"), ("mlp", "encoder.4")]


@pytest.mark.parametrize("order", ["MEAN", "MAX"])
@pytest.mark.parametrize("model, layer", RANKINGS, ids=[f"{m}-{layer}" for m, layer in RANKINGS])
def test_complete_ranking_of_relu_outputs(worlds, model, layer, order):
    """k = every neuron: the whole order, including the ties among units that never fire."""
    db, truth = worlds[model]
    n = truth.activations(layer)[0].size
    agg = Aggregate(f"TOPK {n} NEURONS IN {{layer}} BY {order}", "topk", "neurons", order.lower(), n)
    mask = np.isin(truth.labels, [0, 4])
    V = neuron_matrix(truth.activations(layer)[mask], "neurons")
    ranked_by = max_per_neuron(V) if order == "MAX" else mean_per_neuron(V)
    assert len(np.unique(ranked_by)) < n  # there are ties to break
    result = db.query(agg.query(layer, where="class IN (0, 4)"))
    assert_answer(result, expected(truth, agg, layer, mask))


# --- predicates ---------------------------------------------------------------------------------

PREDICATE_CASES = [
    ("cnn", "0", TOPK_MEAN), ("cnn", "2", ARGMAX_CHANNELS), ("cnn", "4", AVG),
    ("cnn", "6", TOPK_MAX), ("cnn", "3", TOPK_CHANNELS), ("cnn", "8", ARGMAX),
    ("mlp", "encoder.1", TOPK_MEAN), ("mlp", "encoder.3", AVG), ("mlp", "encoder", ARGMAX),
    ("mlp", "head", TOPK_MAX),
]


@pytest.mark.parametrize("where", list(PREDICATES))
@pytest.mark.parametrize("model, layer, agg", PREDICATE_CASES,
                         ids=[f"{m}-{layer}-{agg}" for m, layer, agg in PREDICATE_CASES])
def test_aggregate_over_matching_items(worlds, model, layer, agg, where):
    db, truth = worlds[model]
    result = db.query(agg.query(layer, where=where))
    assert_answer(result, expected(truth, agg, layer, PREDICATES[where](truth)))


# --- GROUP BY -------------------------------------------------------------------------------------

GROUP_CASES = [("cnn", "2", TOPK_MEAN), ("cnn", "0", ARGMAX_CHANNELS), ("cnn", "6", AVG),
               ("mlp", "encoder.1", TOPK_MAX), ("mlp", "encoder.3", ARGMAX)]


@pytest.mark.parametrize("where", [None, "confidence < 0.9", "NOT (class = 3 OR predicted = 3)",
                                   "incorrect"])
@pytest.mark.parametrize("group_by", list(GROUP_COLUMNS))
@pytest.mark.parametrize("model, layer, agg", GROUP_CASES,
                         ids=[f"{m}-{layer}-{agg}" for m, layer, agg in GROUP_CASES])
def test_group_by(worlds, model, layer, agg, group_by, where):
    """One answer per value of the column among the matching items, in ascending order."""
    db, truth = worlds[model]
    result = db.query(agg.query(layer, where=where, group_by=group_by))
    mask = PREDICATES[where](truth) if where else everything(truth)
    column = GROUP_COLUMNS[group_by](truth)
    keys = np.unique(column[mask]).tolist()  # Python ints, or False/True for correct
    assert list(result.groups) == keys
    assert all(type(key) is (bool if group_by == "correct" else int) for key in result.groups)
    for key in keys:
        assert_answer(result.groups[key], expected(truth, agg, layer, mask & (column == key)))
    assert result.n_items == mask.sum()


# --- the same answers from every form of data and batch size ------------------------------------

def data_forms(X, y):
    return {
        "tensors": (X, y),
        "arrays": (X.numpy(), y.numpy()),
        "TensorDataset": TensorDataset(X, y),
        "DataLoader": DataLoader(TensorDataset(X, y), batch_size=32, shuffle=True),
        "float64 arrays": (X.numpy().astype(np.float64), y.numpy()),
        # inputs made from a gradient and not detached (X + eps * X.grad.sign()): the probe's
        # copy of the first batch had failed on them (deepcopy of a tensor that is no leaf)
        "tensors with autograd history": (X.clone().requires_grad_() * 1.0, y),
    }


FORM_QUERIES = [("0", TOPK_MAX, "class IN (1, 7)", None), ("2", AVG_CHANNELS, None, "correct"),
                ("6", ARGMAX, "incorrect", None), ("3", TOPK_CHANNELS, "confidence >= 0.5", "class")]


@pytest.mark.parametrize("batch_size", [33, 256, N_ITEMS, 4096])
@pytest.mark.parametrize("form", ["tensors", "arrays", "float64 arrays", "TensorDataset",
                                  "DataLoader", "tensors with autograd history"])
def test_data_forms_and_batch_sizes(cnn, digits, cnn_truth, form, batch_size):
    db = diagql.connect(cnn, data_forms(*digits)[form], batch_size=batch_size)
    db.execute("SET estimator = plain")  # sample answers here are the sample means
    for layer, agg, where, group_by in FORM_QUERIES:
        result = db.query(agg.query(layer, where=where, group_by=group_by))
        mask = PREDICATES[where](cnn_truth) if where else everything(cnn_truth)
        if group_by is None:
            assert_answer(result, expected(cnn_truth, agg, layer, mask))
            continue
        column = GROUP_COLUMNS[group_by](cnn_truth)
        assert list(result.groups) == np.unique(column[mask]).tolist()
        for key, group in result.groups.items():
            assert_answer(group, expected(cnn_truth, agg, layer, mask & (column == key)))
    assert_profile(db.profile, cnn_truth)


# --- the profile ----------------------------------------------------------------------------------

def assert_profile(profile, truth: Truth) -> None:
    np.testing.assert_array_equal(profile.labels, truth.labels)
    np.testing.assert_array_equal(profile.predictions, truth.predictions)
    np.testing.assert_array_equal(profile.correct, truth.correct)
    np.testing.assert_allclose(profile.confidence, truth.confidence, rtol=0, atol=ATOL)
    np.testing.assert_allclose(profile.latents, truth.latents, rtol=0, atol=ATOL)
    assert profile.n_classes == 10


@pytest.mark.parametrize("model, final", [("cnn", "8"), ("mlp", "head")])
def test_profile(worlds, model, final):
    """Predictions, softmax confidence, and latents = the input of the final Linear."""
    db, truth = worlds[model]
    assert_profile(db.profile, truth)
    assert db.profile.latent_layer == f"input of {final}"
    assert db.profile.latents.shape == (N_ITEMS, {"cnn": 32, "mlp": 16}[model])


@pytest.mark.parametrize("model, layer", [("cnn", "6"), ("cnn", "4"), ("mlp", "encoder.1")])
def test_profile_with_another_latent_layer(worlds, digits, model, layer):
    """``latent = L``: the latents are L's output flattened, before any later in-place ReLU."""
    db, truth = worlds[model]
    other = diagql.connect(db.model, digits, batch_size=64, latent=layer)
    other.execute("SET estimator = plain")  # sample answers here are the sample means
    activations = truth.activations(layer)
    np.testing.assert_allclose(other.profile.latents, activations.reshape(len(activations), -1),
                               rtol=0, atol=ATOL)
    assert other.profile.latent_layer == layer
    db_set = diagql.connect(db.model, digits, batch_size=100)
    db_set.execute("SET estimator = plain")  # sample answers here are the sample means
    db_set.query(f"SET latent = {layer}")
    np.testing.assert_allclose(db_set.profile.latents, other.profile.latents, rtol=0, atol=ATOL)
    np.testing.assert_array_equal(db_set.profile.predictions, truth.predictions)


# --- the model is left as it was --------------------------------------------------------------------

def snapshot(model: torch.nn.Module) -> dict:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), f"{name} changed"


STATEMENTS = ["SHOW LAYERS", "DESCRIBE 0", "EXPLAIN AVG NEURONS IN 2 WHERE incorrect",
              "TOPK 5 NEURONS IN 2 WHERE class = 3",
              "ARGMAX CHANNELS IN 0 GROUP BY predicted",
              "AVG NEURONS IN 0 USING SAMPLE random(0.1) WITH BASELINE"]


def test_training_flags_and_state_are_restored(bn_cnn, digits):
    """A model in training mode (one submodule in eval) is queried in eval mode and handed back
    as it came: flags per module, weights and BatchNorm running statistics untouched."""
    model = copy.deepcopy(bn_cnn)
    truth = Truth(model, *digits, sequential_layers(model), latent=lambda X: model[:5](X))
    for layer in ("1", "2", "3", "5"):
        truth.activations(layer)  # now, in eval mode
    model.train()
    model[3].eval()  # the Dropout
    flags = [module.training for module in model.modules()]
    before = snapshot(model)
    db = diagql.connect(model, digits, batch_size=64)
    db.execute("SET estimator = plain")  # sample answers here are the sample means
    for statement in STATEMENTS:
        db.query(statement)
        assert [module.training for module in model.modules()] == flags, statement
        assert_unchanged(model, before)
        assert_no_hooks(model)
    # In eval mode BatchNorm uses its running statistics and Dropout is off: the eval truth.
    assert_profile(db.profile, truth)
    for layer in ("1", "3", "5"):
        assert_answer(db.query(AVG.query(layer)), expected(truth, AVG, layer, everything(truth)))
    assert_answer(db.query(TOPK_CHANNELS.query("2", where="incorrect")),
                  expected(truth, TOPK_CHANNELS, "2", ~truth.correct))
    assert [module.training for module in model.modules()] == flags
    assert_unchanged(model, before)


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_no_hooks_remain_and_users_hooks_stay(worlds, model):
    db, truth = worlds[model]
    net = db.model
    assert_no_hooks(net)
    calls = []
    handle = net.register_forward_hook(lambda module, inputs, output: calls.append(len(output)))
    try:
        layer = "2" if model == "cnn" else "encoder.3"
        for text in ("SHOW LAYERS", f"DESCRIBE {layer}", f"EXPLAIN AVG NEURONS IN {layer}",
                     f"TOPK 3 NEURONS IN {layer} WHERE correct GROUP BY class",
                     f"ARGMAX NEURONS IN {layer} USING SAMPLE random(0.1) WITH BASELINE"):
            db.query(text)
        assert list(net._forward_hooks) == [handle.id]
        # DiagQL's passes stop once the queried layer has run (early exit), so the hook on
        # the whole model saw only the full passes (profile, probe); it is still registered
        # and runs on the user's own forward.
        before = len(calls)
        with torch.no_grad():
            net(truth.X[:3])
        assert len(calls) == before + 1 and calls[-1] == 3
    finally:
        handle.remove()
    assert_no_hooks(net)


class Fragile(Dataset):
    """Items of (X, y) until `broken` is set; then reading that item raises."""

    def __init__(self, X, y):
        self.X, self.y, self.broken = X, y, None

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        if i == self.broken:
            raise OSError(f"cannot read item {i}")
        return self.X[i], self.y[i]


def test_hooks_and_modes_restored_when_a_pass_fails(bn_cnn, digits):
    model = copy.deepcopy(bn_cnn).train()
    before = snapshot(model)
    data = Fragile(*digits)
    db = diagql.connect(model, data, batch_size=64)
    db.execute("SET estimator = plain")  # sample answers here are the sample means
    data.broken = 1000  # fails in the profile pass, which hooks the latent layer
    with pytest.raises(Exception, match="cannot read item 1000"):
        db.query("AVG NEURONS IN 1")
    assert model.training and all(module.training for module in model.modules())
    assert_no_hooks(model)
    data.broken = None
    db.profile  # noqa: B018 - the profile pass, now complete
    data.broken = 1500  # fails in the middle of a query's pass
    with pytest.raises(Exception, match="cannot read item 1500"):
        db.query("AVG NEURONS IN 1")
    assert model.training and all(module.training for module in model.modules())
    assert_no_hooks(model)
    assert_unchanged(model, before)


# --- sampling ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, size", [("random(0.1)", 180), ("random(0.25)", 449),
                                        ("random(100)", 100), ("random(0.1, random_state=3)", 180)])
def test_sample_is_sorted_unique_indices_of_the_rounded_size(cnn, digits, spec, size):
    assert round(0.1 * N_ITEMS) == 180 and round(0.25 * N_ITEMS) == 449
    db = diagql.connect(cnn, digits, batch_size=64)
    db.execute("SET estimator = plain")  # sample answers here are the sample means
    indices = db.sample(spec)
    assert len(indices) == size
    assert np.all(np.diff(indices) > 0)  # sorted and unique
    assert 0 <= indices[0] and indices[-1] < N_ITEMS
    np.testing.assert_array_equal(db.sample(spec), indices)  # the same spec, the same items
    np.testing.assert_array_equal(diagql.connect(cnn, digits, batch_size=100).sample(spec), indices)


def test_seeds_choose_the_sample(cnn, digits, cnn_truth):
    db = diagql.connect(cnn, digits, batch_size=64)
    db.execute("SET estimator = plain")  # sample answers here are the sample means
    default = db.sample("random(0.1)")
    np.testing.assert_array_equal(db.sample("random(0.1, random_state=0)"), default)
    assert not np.array_equal(db.sample("random(0.1, random_state=1)"), default)
    db.query("SET seed = 1")
    np.testing.assert_array_equal(db.sample("random(0.1)"), db.sample("random(0.1, random_state=1)"))
    result = db.query(TOPK_MEAN.query("2", where="correct", using="SAMPLE random(0.1)"))
    assert_answer(result, expected(cnn_truth, TOPK_MEAN, "2",
                                   sampled(db, cnn_truth, "random(0.1, random_state=1)", "correct")))


def sampled(db, truth: Truth, spec: str, where: str | None) -> np.ndarray:
    """The items a sampled query answers on: those of db.sample(spec) that match."""
    mask = np.zeros(len(truth.labels), dtype=bool)
    mask[db.sample(spec)] = True
    return mask & (PREDICATES[where](truth) if where else everything(truth))


SAMPLE_SPECS = ["random(0.1)", "random(0.3, random_state=7)", "random(500)", "stratified(0.1)"]
SAMPLE_CASES = [("cnn", "0", TOPK_MEAN), ("cnn", "2", AVG_CHANNELS), ("cnn", "6", ARGMAX),
                ("mlp", "encoder.1", TOPK_MAX), ("mlp", "encoder.3", AVG)]


@pytest.mark.parametrize("where", [None, "class IN (1, 7)", "NOT (class = 3 OR predicted = 3)"])
@pytest.mark.parametrize("spec", SAMPLE_SPECS)
@pytest.mark.parametrize("model, layer, agg", SAMPLE_CASES,
                         ids=[f"{m}-{layer}-{agg}" for m, layer, agg in SAMPLE_CASES])
def test_sampled_query_is_exact_on_the_sampled_matching_items(worlds, model, layer, agg, spec, where):
    db, truth = worlds[model]
    result = db.query(agg.query(layer, where=where, using=f"SAMPLE {spec}"))
    assert result.approximate and result.source.startswith(spec.split("(")[0] + "(")
    assert result.baseline is None and not any(m in result.metrics for m in
                                               ("precision", "cosine_distance", "js_distance"))
    assert_answer(result, expected(truth, agg, layer, sampled(db, truth, spec, where)))


def metric_truth(agg: Aggregate, approx: Answer, exact: Answer) -> tuple[str, float]:
    """The paper's metric for this aggregate, by its definition (scipy for the distances)."""
    if agg.kind == "topk":
        return "precision", len(set(approx.neurons.tolist()) & set(exact.neurons.tolist())) / agg.k
    if agg.kind == "avg":
        return "cosine_distance", cosine(exact.values, approx.values)
    return "js_distance", jensenshannon(approx.values, exact.values, base=2)


BASELINE_CASES = [("cnn", "0", TOPK_MEAN), ("cnn", "6", TOPK_MAX), ("cnn", "2", AVG),
                  ("cnn", "3", ARGMAX_CHANNELS), ("cnn", "6", ARGMAX), ("cnn", "0", TOPK_CHANNELS),
                  ("mlp", "encoder.1", TOPK_MEAN), ("mlp", "encoder.3", AVG),
                  ("mlp", "encoder.1", ARGMAX)]


@pytest.mark.parametrize("where", [None, "incorrect", "(class = 1 OR class = 2) AND incorrect"])
@pytest.mark.parametrize("model, layer, agg", BASELINE_CASES,
                         ids=[f"{m}-{layer}-{agg}" for m, layer, agg in BASELINE_CASES])
def test_with_baseline(worlds, model, layer, agg, where):
    db, truth = worlds[model]
    spec = "random(0.1)"
    result = db.query(agg.query(layer, where=where, using=f"SAMPLE {spec}", baseline=True))
    approx = expected(truth, agg, layer, sampled(db, truth, spec, where))
    exact = expected(truth, agg, layer, PREDICATES[where](truth) if where else everything(truth))
    assert_answer(result, approx)
    assert result.baseline.source == "full"
    assert_answer(result.baseline, exact)
    if approx.n_items:
        name, value = metric_truth(agg, approx, exact)
    else:  # matching items in the data, none in the sample
        name, value = metric_truth_empty(agg)
    assert result.metrics[name] == pytest.approx(value, abs=1e-6)


def metric_truth_empty(agg: Aggregate) -> tuple[str, float]:
    return {"topk": ("precision", 0.0), "avg": ("cosine_distance", 1.0),
            "argmax": ("js_distance", 1.0)}[agg.kind]


@pytest.mark.parametrize("agg", [TOPK_MEAN, AVG, ARGMAX], ids=str)
def test_sample_without_matching_items_scores_worst(cnn, digits, cnn_truth, agg):
    """A class absent from a 5-item sample: precision 0 and distances 1 against the full answer."""
    db = diagql.connect(cnn, digits, batch_size=64)
    db.execute("SET estimator = plain")  # sample answers here are the sample means
    absent = min(set(range(10)) - set(cnn_truth.labels[db.sample("random(5)")].tolist()))
    where = f"class = {absent}"
    result = db.query(agg.query("6", where=where, using="SAMPLE random(5)", baseline=True))
    assert result.n_items == 0 and len(result.neurons) == 0
    assert_answer(result.baseline, expected(cnn_truth, agg, "6", cnn_truth.labels == absent))
    name, value = metric_truth_empty(agg)
    assert result.metrics[name] == value


def test_groups_a_sample_drew_none_of_are_shown_with_their_counts(cnn, digits, cnn_truth):
    """GROUP BY on a sample lists every group with matching items in the data, those the
    sample drew none of too (they were left out, and read as groups with no items at all)."""
    from diagql.results.render import to_csv, to_text

    db = diagql.connect(cnn, digits, batch_size=64)
    sample = db.sample("random(5)")
    result = db.query("TOPK 2 NEURONS IN 2 GROUP BY class USING SAMPLE random(5)")
    counts = np.bincount(cnn_truth.labels, minlength=10)
    drawn = set(cnn_truth.labels[sample].tolist())
    assert len(drawn) < 10  # some class has no sampled item
    assert list(result.groups) == [c for c in range(10) if counts[c]]
    for key, group in result.groups.items():
        assert group.n_items == int((cnn_truth.labels[sample] == key).sum())
        if key not in drawn:
            assert len(group.values) == 0 and group.estimate.population == counts[key]
    missed = min(set(range(10)) - drawn)
    text = " ".join(to_text(result).split())
    assert f"none of its {counts[missed]:,} matching items sampled" in text
    assert "of 10 groups with an estimate; the others: no matching item sampled" in text
    # Each kind of reason with its count of groups (one group's had stood for all).
    sampled = np.bincount(cnn_truth.labels[sample], minlength=10)
    none, one = int((sampled == 0).sum()), int((sampled == 1).sum())
    assert f"no matching item sampled ({none} groups)" in text
    assert ("1 matching sampled item: too few for an estimate "
            f"({one} group{'' if one == 1 else 's'})" in text) == (one > 0)
    rows = to_csv(result).splitlines()
    empty = f"{missed}" + "," * rows[0].count(",")  # its key, every other column empty
    assert empty in rows and len(rows) == 1 + 2 * len(drawn) + 10 - len(drawn)
    # pandas: the missed groups' empty rows leave rank and neuron whole numbers (Int64), not
    # float64's 3.0 (sweep OO3)
    frame = result.to_pandas()
    assert str(frame["neuron"].dtype) == "Int64" and str(frame["rank"].dtype) == "Int64"
    assert frame["neuron"].isna().sum() == 10 - len(drawn)
    assert frame["neuron"].dropna().tolist() == [r["neuron"] for r in result.records()
                                                  if "neuron" in r]


def test_with_baseline_a_group_the_sample_missed_shows_its_exact_answer(cnn, digits, cnn_truth):
    """WITH BASELINE computes a missed group's exact answer (its distance 1 counted), and its
    table column had been empty: it now lists the exact top-k, as plain torch has them."""
    from diagql.results.render import to_text

    db = diagql.connect(cnn, digits, batch_size=64)
    sample = db.sample("random(5)")
    result = db.query("TOPK 2 NEURONS IN 2 GROUP BY class USING SAMPLE random(5) WITH BASELINE")
    missed = min(set(range(10)) - set(cnn_truth.labels[sample].tolist()))
    exact = result.groups[missed].baseline
    acts = cnn_truth.activations("2")
    rows = acts[cnn_truth.labels == missed].reshape(-1, acts[0].size).mean(axis=0)
    top = np.argsort(-rows, kind="stable")[:2]
    np.testing.assert_allclose(exact.values, rows[top], rtol=1e-5)
    lines = to_text(result).splitlines()
    at = next(i for i, line in enumerate(lines) if "matching items sampled" in line)
    for rank, value in enumerate(exact.values):
        cells = lines[at + 1 + rank].split()
        assert f"{value:.4f}" in cells and exact.labels[rank] in " ".join(cells)


def test_a_sample_says_how_many_of_the_datas_matching_items_it_holds(cnn, digits, cnn_truth):
    """A sample's caption says how many matching items it holds of how many the data has
    (it said "12 matching items", which read as the data's count), and JSON carries both."""
    from diagql.results.render import to_text

    db = diagql.connect(cnn, digits, batch_size=64)
    sample = db.sample("random(40)")
    c = int(np.bincount(cnn_truth.labels[sample]).argmax())
    drawn = int((cnn_truth.labels[sample] == c).sum())
    total = int((cnn_truth.labels == c).sum())
    assert drawn < total
    result = db.query(f"AVG NEURONS IN 2 WHERE class = {c} USING SAMPLE random(40)")
    assert f"{drawn} of {total} matching items · sample random(40" in to_text(result)
    assert result.to_dict()["matching_in_data"] == total and result.n_items == drawn
    exact = db.query(f"AVG NEURONS IN 2 WHERE class = {c}")
    assert f"{total} matching items · exact" in to_text(exact)
    assert "matching_in_data" not in exact.to_dict()


def test_an_empty_table_keeps_its_header_in_csv():
    from diagql.results.render import to_csv
    from diagql.results.result import Result

    assert to_csv(Result(kind="table", columns=["layer", "entries"], rows=[])) == "layer,entries"


@pytest.mark.parametrize("statement", [
    "TOPK 3 NEURONS IN 2 WHERE {where} USING SAMPLE random(0.2)",
    "AVG NEURONS IN 2 WHERE {where} GROUP BY predicted USING SAMPLE random(0.2)",
    "ARGMAX NEURONS IN 2 WHERE {where} USING SAMPLE maxmargin(0.1)",
    "SIMILARITY 2, 5 WHERE {where} USING SAMPLE random(0.2)",
])
def test_sample_query_matching_nothing_in_the_data_is_refused(worlds, statement):
    """No item of the data matches, so the sample is not to blame: the same error as the exact
    query's (it was an empty table reading "no matching items in the sample"). A sample that
    merely missed matching items stays an empty answer (the test above)."""
    db, truth = worlds["cnn"]
    where = "class = 3 AND predicted = 3 AND incorrect"
    assert not ((truth.labels == 3) & (truth.predictions == 3) & ~truth.correct).any()
    with pytest.raises(diagql.ExecutionError, match="no items match WHERE class = 3 AND "
                                                    r"predicted = 3 AND incorrect \(0 of 1,797"):
        db.query(statement.format(where=where))


@pytest.mark.parametrize("spec", ["random(0.1)", "random(12)"])
@pytest.mark.parametrize("agg", [TOPK_MEAN, AVG, ARGMAX], ids=str)
def test_group_by_with_baseline(worlds, agg, spec):
    """Per group: the sample's answer, the group's exact answer and their metric; overall: the
    mean of the groups' metrics, a group absent from the sample scoring as an empty sample."""
    db, truth = worlds["cnn"]
    result = db.query(agg.query("2", group_by="class", using=f"SAMPLE {spec}", baseline=True))
    in_sample = sampled(db, truth, spec, None)
    assert list(result.groups) == list(range(10))
    if spec == "random(12)":  # the case this spec is here for
        assert len(np.unique(truth.labels[in_sample])) < 10
    scores = []
    for key, group in result.groups.items():
        exact = expected(truth, agg, "2", truth.labels == key)
        assert_answer(group.baseline, exact)
        approx = expected(truth, agg, "2", in_sample & (truth.labels == key))
        assert_answer(group, approx)
        if approx.n_items:
            name, value = metric_truth(agg, approx, exact)
        else:
            assert group.n_items == 0
            name, value = metric_truth_empty(agg)
        assert group.metrics[name] == pytest.approx(value, abs=1e-6)
        scores.append(value)
    assert result.metrics[name] == pytest.approx(np.mean(scores), abs=1e-6)
    assert result.n_items == in_sample.sum()
