"""Modules that run several times per forward pass, queried per call (``layer1.0.relu#2``).

Each answer is compared with the truth computed here by plain torch, with no hooks and no
module forward: a ResNet-style BasicBlock (torchvision's, written out, NO torchvision) whose
forward calls one ReLU module twice, its ops redone by hand with torch.nn.functional; a
weight-tied Linear called three times; a Linear whose two calls differ in layout (a sequence,
then a flat vector). The refusals are checked word for word.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cosine, jensenshannon
from torch import nn

import diagql
from diagql.errors import BindError, ExecutionError, ParseError
from tests import ray_models

ATOL = 1e-5
N = 60
BATCH = 7  # several batches, so that the hooks' call counts restart every batch


# --- models -----------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock without downsampling: ``relu`` runs twice."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetish(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.layer1 = nn.Sequential(BasicBlock(4))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.pool(self.layer1(self.stem(x))).flatten(1))


class Tied(nn.Module):
    """One Linear applied three times (weights tied across depth)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        for _ in range(3):
            h = torch.tanh(self.shared(h))
        return self.head(h)


class TwoLayouts(nn.Module):
    """``proj`` maps every token of (batch, 5, 6), then the tokens' mean: a sequence, then flat."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.proj(x))
        return self.head(self.proj(h.mean(dim=1)))


def _randomise(model: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 1.5 - 0.5)
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0, generator=gen)
    return model.eval()


def _data(shape, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(N, *shape, generator=gen), torch.arange(N) % 3


# --- the truth: the models' ops by hand -------------------------------------------------------


def _bn(x, bn):
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


def block_truth(model: ResNetish, X) -> dict:
    """The two calls of layer1.0.relu, the logits, by functional ops on the weights."""
    b = model.layer1[0]
    with torch.no_grad():
        s = F.conv2d(X, model.stem.weight, model.stem.bias, padding=1)
        first = F.relu(_bn(F.conv2d(s, b.conv1.weight, padding=1), b.bn1))
        second = F.relu(_bn(F.conv2d(first, b.conv2.weight, padding=1), b.bn2) + s)
        logits = F.linear(F.adaptive_avg_pool2d(second, 2).flatten(1), model.fc.weight,
                          model.fc.bias)
    return {"layer1.0.relu#1": first, "layer1.0.relu#2": second, "logits": logits}


def tied_truth(model: Tied, X) -> dict:
    out = {}
    with torch.no_grad():
        h = torch.tanh(F.linear(X, model.inp.weight, model.inp.bias))
        for n in (1, 2, 3):
            out[f"shared#{n}"] = F.linear(h, model.shared.weight, model.shared.bias)
            h = torch.tanh(out[f"shared#{n}"])
        out["logits"] = F.linear(h, model.head.weight, model.head.bias)
    return out


class Truth:
    def __init__(self, acts: dict, y):
        self.labels = y.numpy()
        self.predictions = acts["logits"].argmax(dim=1).numpy()
        self.correct = self.predictions == self.labels
        self.acts = {k: v.to(torch.float64).numpy() for k, v in acts.items()}

    def matrix(self, layer: str, unit: str = "neurons") -> np.ndarray:
        """Items × neurons in C order, or items × channel means."""
        A = self.acts[layer]
        if unit == "channels":
            return A.reshape(len(A), A.shape[1], -1).mean(axis=2)
        return A.reshape(len(A), -1)


def connect(model, data, cache_dir=False):
    db = diagql.connect(model, data, batch_size=BATCH, cache_dir=cache_dir, progress=False)
    db.execute("SET estimator = plain")  # sample answers here are compared with sample means
    return db


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model = _randomise(ResNetish(), 1)
    X, y = _data((1, 6, 6), 2)
    return connect(model, (X, y)), Truth(block_truth(model, X), y)


@pytest.fixture(scope="module")
def tied():
    model = _randomise(Tied(), 3)
    X, y = _data((5,), 4)
    return connect(model, (X, y)), Truth(tied_truth(model, X), y)


RELU = "layer1.0.relu"


def labels_of(layer: str, shape: tuple, neurons) -> list[str]:
    return [f"{layer}[{','.join(map(str, c))}]" for c in zip(*np.unravel_index(neurons, shape))]


# --- the catalog: SHOW LAYERS and DESCRIBE ----------------------------------------------------


def test_show_layers_lists_the_module_and_each_call(resnet):
    db, _ = resnet
    rows = {row[0]: row for row in db.query("SHOW LAYERS").rows}
    names = [row[0] for row in db.query("SHOW LAYERS").rows]
    assert names.index(RELU) + 1 == names.index(RELU + "#1") == names.index(RELU + "#2") - 1
    assert rows[RELU] == (RELU, "ReLU", "(2 calls)", "", "runs 2× per pass; name a call: "
                                                         "layer1.0.relu#1 or layer1.0.relu#2")
    for n in (1, 2):
        assert rows[f"{RELU}#{n}"] == (f"{RELU}#{n}", "ReLU", "4×6×6", 144,
                                       f"call {n} of 2 of {RELU}")
    assert rows["layer1.0.conv1"][4] == "" and rows["fc"][2:4] == ("3", 3)
    assert RELU not in db.layers and {RELU + "#1", RELU + "#2"} <= set(db.layers)


def test_describe_the_module_shows_each_call(resnet):
    db, _ = resnet
    rows = dict(db.query(f"DESCRIBE {RELU}").rows)
    assert rows["name"] == RELU and rows["type"] == "ReLU"
    assert rows["calls"] == ("2 per forward pass; a query names one: layer1.0.relu#1 or "
                             "layer1.0.relu#2")
    for n in (1, 2):
        assert rows[f"{RELU}#{n}"].startswith("4×6×6, 144 neurons; batch: axis 0 of 4")
    assert rows["module"] == "ReLU(inplace=True)" and rows["parameters"] == 0


def test_describe_one_call(resnet):
    db, _ = resnet
    rows = dict(db.query(f"DESCRIBE {RELU}#2").rows)
    assert rows["name"] == f"{RELU}#2"
    assert rows["call"] == f"2 of the 2 calls of {RELU} per forward pass"
    assert rows["output"] == "4×6×6" and rows["neurons"] == 144 and rows["channels"] == 4
    assert rows["labels"] == f"{RELU}#2[0,0,0] … {RELU}#2[3,5,5]"
    # A flat layer has no channels: no row, where one had stood empty.
    assert "channels" not in dict(db.query("DESCRIBE fc").rows)


def test_calls_that_differ_in_shape_and_view():
    model = _randomise(TwoLayouts(), 5)
    X, y = _data((5, 6), 6)
    db = connect(model, (X, y))
    rows = dict(db.query("DESCRIBE proj").rows)
    assert rows["proj#1"].startswith("5 tokens × 6, 6 neurons; batch: axis 0 of 3")
    assert "sequence: axis 1" in rows["proj#1"]
    assert rows["proj#2"].startswith("6, 6 neurons; batch: axis 0 of 2")
    with torch.no_grad():
        tokens = F.linear(X, model.proj.weight, model.proj.bias)
        pooled = F.linear(torch.relu(tokens).mean(dim=1), model.proj.weight, model.proj.bias)
    tokens, pooled = tokens.double().numpy(), pooled.double().numpy()
    np.testing.assert_allclose(db.query("AVG NEURONS IN proj#1").values,
                               tokens.mean(axis=1).mean(axis=0), atol=ATOL)
    np.testing.assert_allclose(db.query("AVG NEURONS IN proj#1 TOKENS MAX").values,
                               tokens.max(axis=1).mean(axis=0), atol=ATOL)
    np.testing.assert_allclose(db.query("AVG NEURONS IN proj#1 TOKEN -1").values,
                               tokens[:, -1].mean(axis=0), atol=ATOL)
    np.testing.assert_allclose(db.query("AVG NEURONS IN proj#2").values, pooled.mean(axis=0),
                               atol=ATOL)
    with pytest.raises(BindError, match=r"TOKENS MAX applies to sequence layers .* layer "
                                        r"'proj#2' is not one"):
        db.query("AVG NEURONS IN proj#2 TOKENS MAX")


# --- every aggregate on each call, against the block's ops by hand ----------------------------


@pytest.mark.parametrize("n", [1, 2])
def test_avg_and_labels(resnet, n):
    db, truth = resnet
    layer = f"{RELU}#{n}"
    result = db.query(f"AVG NEURONS IN {layer}")
    np.testing.assert_allclose(result.values, truth.matrix(layer).mean(axis=0), atol=ATOL)
    assert result.layer == layer and result.n_items == N
    assert result.labels[:2] == [f"{layer}[0,0,0]", f"{layer}[0,0,1]"]


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("order", ["mean", "max"])
def test_topk(resnet, n, order):
    db, truth = resnet
    layer = f"{RELU}#{n}"
    A = truth.matrix(layer)
    score = A.mean(axis=0) if order == "mean" else A.max(axis=0)
    top = np.argsort(-score, kind="stable")[:5]
    result = db.query(f"TOPK 5 NEURONS IN {layer} BY {order.upper()}")
    assert result.neurons.tolist() == top.tolist()
    np.testing.assert_allclose(result.values, score[top], atol=ATOL)
    assert result.labels == labels_of(layer, (4, 6, 6), top)  # e.g. layer1.0.relu#2[3,1,4]


@pytest.mark.parametrize("n", [1, 2])
def test_argmax_channels_and_where(resnet, n):
    db, truth = resnet
    layer = f"{RELU}#{n}"
    A = truth.matrix(layer)
    hist = np.bincount(A.argmax(axis=1), minlength=A.shape[1]) / len(A)
    np.testing.assert_allclose(db.query(f"ARGMAX NEURONS IN {layer}").values, hist, atol=ATOL)
    channels = truth.matrix(layer, "channels")
    result = db.query(f"TOPK 2 CHANNELS IN {layer}")
    top = np.argsort(-channels.mean(axis=0), kind="stable")[:2]
    assert result.neurons.tolist() == top.tolist()
    assert result.labels == [f"{layer}[{c}]" for c in top]
    match = truth.labels == 1
    np.testing.assert_allclose(db.query(f"AVG NEURONS IN {layer} WHERE class = 1").values,
                               A[match].mean(axis=0), atol=ATOL)


@pytest.mark.parametrize("n", [1, 2])
def test_group_by(resnet, n):
    db, truth = resnet
    layer = f"{RELU}#{n}"
    A = truth.matrix(layer)
    result = db.query(f"AVG NEURONS IN {layer} GROUP BY class")
    assert sorted(result.groups) == [0, 1, 2]
    for c, group in result.groups.items():
        np.testing.assert_allclose(group.values, A[truth.labels == c].mean(axis=0), atol=ATOL)
    result = db.query(f"AVG NEURONS IN {layer} GROUP BY correct")
    for ok, group in result.groups.items():
        np.testing.assert_allclose(group.values, A[truth.correct == ok].mean(axis=0), atol=ATOL)


@pytest.mark.parametrize("n", [1, 2])
def test_sample_with_baseline(resnet, n):
    db, truth = resnet
    layer = f"{RELU}#{n}"
    A = truth.matrix(layer)
    items = db.sample("random(0.5, random_state=11)")
    result = db.query(f"TOPK 4 NEURONS IN {layer} USING SAMPLE random(0.5, random_state=11) "
                      f"WITH BASELINE")
    sample_top = np.argsort(-A[items].mean(axis=0), kind="stable")[:4]
    full_top = np.argsort(-A.mean(axis=0), kind="stable")[:4]
    assert result.neurons.tolist() == sample_top.tolist() and result.n_items == len(items)
    np.testing.assert_allclose(result.values, A[items].mean(axis=0)[sample_top], atol=ATOL)
    assert result.baseline.neurons.tolist() == full_top.tolist()
    np.testing.assert_allclose(result.baseline.values, A.mean(axis=0)[full_top], atol=ATOL)
    assert result.metrics["precision"] == len(set(sample_top) & set(full_top)) / 4
    avg = db.query(f"AVG NEURONS IN {layer} USING SAMPLE stratified(0.5, random_state=2) "
                   f"WITH BASELINE")
    items = db.sample("stratified(0.5, random_state=2)")
    np.testing.assert_allclose(avg.values, A[items].mean(axis=0), atol=ATOL)
    exact = cosine(A[items].mean(axis=0), A.mean(axis=0))
    assert avg.metrics["cosine_distance"] == pytest.approx(exact, abs=1e-9)


def test_activation_cache_is_kept_per_call():
    """Rows of call 1 never answer for call 2: both from one sample, then both again from the
    cache with no forward pass at all."""
    model = _randomise(ResNetish(), 7)
    X, y = _data((1, 6, 6), 8)
    truth = Truth(block_truth(model, X), y)
    db = connect(model, (X, y))
    spec = "random(0.4, random_state=5)"
    items, _ = db.sample(spec), db.catalog  # the profile and the probe's passes come first
    passes = [0]
    model.register_forward_pre_hook(lambda module, args: passes.__setitem__(0, passes[0] + 1))
    for _ in range(2):
        for n in (1, 2):
            layer = f"{RELU}#{n}"
            result = db.query(f"AVG NEURONS IN {layer} USING SAMPLE {spec}")
            np.testing.assert_allclose(result.values, truth.matrix(layer)[items].mean(axis=0),
                                       atol=ATOL)
        batches = passes[0]
        assert batches == 2 * -(-len(items) // BATCH)  # the first round's passes, one per call
    result = db.query(f"ARGMAX NEURONS IN {RELU}#2 USING SAMPLE {spec}")  # rows from the cache
    A = truth.matrix(f"{RELU}#2")[items]
    np.testing.assert_allclose(result.values, np.bincount(A.argmax(axis=1),
                                                          minlength=144) / len(A), atol=ATOL)
    assert passes[0] == batches


def test_disk_cache_keeps_the_catalog_and_rows_per_call(tmp_path):
    """A new connection to the same model and data answers each call from the disk cache (no
    forward pass), with each call's own rows."""
    from diagql.model.layers import LayerCatalog

    model = _randomise(ResNetish(), 15)
    X, y = _data((1, 6, 6), 16)
    truth = Truth(block_truth(model, X), y)
    spec = "random(0.5, random_state=3)"
    texts = [f"AVG NEURONS IN {RELU}#{n} USING SAMPLE {spec}" for n in (1, 2)]
    first = connect(model, (X, y), cache_dir=tmp_path)
    for text in texts:
        first.query(text)
    catalog = first.catalog
    assert LayerCatalog.from_arrays(catalog.to_arrays()).layers == catalog.layers
    first.cache.flush()
    passes = [0]
    model.register_forward_pre_hook(lambda module, args: passes.__setitem__(0, passes[0] + 1))
    second = connect(model, (X, y), cache_dir=tmp_path)
    items = second.sample(spec)
    for n, text in zip((1, 2), texts):
        np.testing.assert_allclose(second.query(text).values,
                                   truth.matrix(f"{RELU}#{n}")[items].mean(axis=0), atol=ATOL)
    assert passes[0] == 0 and second.catalog.layers == catalog.layers


def test_one_pass_feeds_both_calls_and_stops_after_the_last(resnet):
    db, truth = resnet
    seen = {"conv2": 0, "fc": 0}
    handles = [db.model.layer1[0].conv2.register_forward_pre_hook(
                   lambda m, a: seen.__setitem__("conv2", seen["conv2"] + 1)),
               db.model.fc.register_forward_pre_hook(
                   lambda m, a: seen.__setitem__("fc", seen["fc"] + 1))]
    try:
        first, second = db.execute(f"AVG NEURONS IN {RELU}#1; TOPK 3 NEURONS IN {RELU}#2")
        assert seen == {"conv2": -(-N // BATCH), "fc": 0}  # ran up to call 2, then stopped
        seen.update(conv2=0)
        db.query(f"AVG NEURONS IN {RELU}#1")
        assert seen == {"conv2": 0, "fc": 0}  # call 1 comes before conv2
    finally:
        for handle in handles:
            handle.remove()
    np.testing.assert_allclose(first.values, truth.matrix(f"{RELU}#1").mean(axis=0), atol=ATOL)
    top = np.argsort(-truth.matrix(f"{RELU}#2").mean(axis=0), kind="stable")[:3]
    assert second.neurons.tolist() == top.tolist()


def test_explain_names_the_call(resnet):
    db, _ = resnet
    rows = dict(db.query(f"EXPLAIN AVG NEURONS IN {RELU}#2 USING SAMPLE random(0.5)").rows)
    assert rows["forward"].endswith(f"hook on {RELU}, read at its call 2 of 2 (4×6×6); the pass "
                                    f"stops once that call has run")
    assert f"activations of {RELU}#2" in rows["cache"]


def test_latent_may_be_a_call(resnet):
    db, truth = resnet
    db.query(f"SET latent = '{RELU}#2'")
    try:
        np.testing.assert_allclose(db.profile.latents, truth.matrix(f"{RELU}#2"), atol=ATOL)
        assert db.profile.latent_layer == f"{RELU}#2"
    finally:
        db.query("SET latent = default")


# --- a weight-tied module called three times --------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tied_module_each_call(tied, n):
    db, truth = tied
    layer = f"shared#{n}"
    A = truth.matrix(layer)
    np.testing.assert_allclose(db.query(f"AVG NEURONS IN {layer}").values, A.mean(axis=0),
                               atol=ATOL)
    result = db.query(f"TOPK 3 NEURONS IN {layer} WHERE correct")
    top = np.argsort(-A[truth.correct].mean(axis=0), kind="stable")[:3]
    assert result.neurons.tolist() == top.tolist() and result.labels == [f"{layer}[{i}]"
                                                                          for i in top]
    hist = np.bincount(A.argmax(axis=1), minlength=6) / N
    np.testing.assert_allclose(db.query(f"ARGMAX NEURONS IN {layer}").values, hist, atol=ATOL)
    grouped = db.query(f"AVG NEURONS IN {layer} GROUP BY predicted USING SAMPLE "
                       f"random(0.6, random_state=1) WITH BASELINE")
    items = db.sample("random(0.6, random_state=1)")
    for p, group in grouped.groups.items():
        mine = items[truth.predictions[items] == p]
        np.testing.assert_allclose(group.values, A[mine].mean(axis=0), atol=ATOL)
        np.testing.assert_allclose(group.baseline.values,
                                   A[truth.predictions == p].mean(axis=0), atol=ATOL)


def test_tied_module_catalog_and_refusals(tied):
    db, _ = tied
    rows = {row[0]: row for row in db.query("SHOW LAYERS").rows}
    assert rows["shared"][2:] == ("(3 calls)", "", "runs 3× per pass; name a call: shared#1, "
                                                   "shared#2 or shared#3")
    assert [rows[f"shared#{n}"][2:] for n in (1, 2, 3)] == [
        ("6", 6, f"call {n} of 3 of shared") for n in (1, 2, 3)]
    with pytest.raises(BindError) as info:
        db.query("TOPK 2 NEURONS IN shared")
    assert info.value.message == ("layer 'shared' runs 3 times per forward pass; name one call: "
                                  "shared#1, shared#2 or shared#3")
    with pytest.raises(BindError, match="it has no call 4"):
        db.query("AVG NEURONS IN shared#4")


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text,message", [
    (f"AVG NEURONS IN {RELU}",
     "layer 'layer1.0.relu' runs 2 times per forward pass; name one call: layer1.0.relu#1 or "
     "layer1.0.relu#2"),
    (f"AVG NEURONS IN {RELU}#0",
     "layer 'layer1.0.relu' runs 2 times per forward pass and calls are numbered from 1; name "
     "one call: layer1.0.relu#1 or layer1.0.relu#2"),
    (f"TOPK 3 NEURONS IN {RELU}#3 USING SAMPLE random(0.5)",
     "layer 'layer1.0.relu' runs 2 times per forward pass and it has no call 3; name one call: "
     "layer1.0.relu#1 or layer1.0.relu#2"),
    # One name per activation: a module that runs once takes no call number, not even #1.
    ("AVG NEURONS IN fc#1",
     "layer 'fc' runs once per forward pass (in DiagQL's probe), so it takes no call number; "
     "name it fc"),
    ("AVG NEURONS IN layer1.0.conv1#1",
     "layer 'layer1.0.conv1' runs once per forward pass (in DiagQL's probe), so it takes no "
     "call number; name it layer1.0.conv1"),
    ("AVG NEURONS IN layer1.0.rellu#2",  # before '#', only modules are suggested
     "unknown layer 'layer1.0.rellu'; did you mean 'layer1.0.relu', 'layer1.0' or "
     "'layer1.0.bn2'?"),
    (f"DESCRIBE {RELU}#3",
     "layer 'layer1.0.relu' runs 2 times per forward pass and it has no call 3; name one call: "
     "layer1.0.relu#1 or layer1.0.relu#2"),
    (f"EVALUATE SAMPLERS random AT 0.5 LAYERS fc, {RELU} SEEDS 1",
     "layer 'layer1.0.relu' runs 2 times per forward pass; name one call: layer1.0.relu#1 or "
     "layer1.0.relu#2"),
])
def test_refusals(resnet, text, message):
    db, _ = resnet
    with pytest.raises(BindError) as info:
        db.query(text)
    assert info.value.message == message
    assert info.value.column == text.index("fc" if "fc#" in text else "layer1") + 1


def test_a_bare_hash_is_a_parse_error(resnet):
    db, _ = resnet
    with pytest.raises(ParseError, match="'#' takes a call number: layer1.0.relu#1 is the "
                                         "module's first call"):
        db.query(f"AVG NEURONS IN {RELU}#")


# --- EVALUATE on calls ------------------------------------------------------------------------


def test_evaluate_layers_may_be_calls(resnet):
    db, truth = resnet
    layers = [f"{RELU}#1", f"{RELU}#2"]
    result = db.query(f"EVALUATE SAMPLERS random AT 0.5 K 2, 5 LAYERS {', '.join(layers)} "
                      f"SEEDS 2")
    runs = [_paper_scores([truth.matrix(layer) for layer in layers], truth,
                          db.sample(f"random(0.5, random_state={seed})"), (2, 5))
            for seed in (0, 1)]
    assert f"({', '.join(layers)})" in result.title
    for row in result.records():
        k = row["k"]
        assert row["S1"] == pytest.approx(np.mean([r[0][k] for r in runs]), abs=1e-9)
        assert row["S2"] == pytest.approx(np.mean([r[1] for r in runs]), abs=1e-9)
        assert row["S3"] == pytest.approx(np.mean([r[2] for r in runs]), abs=1e-9)


def _paper_scores(matrices, truth: Truth, sample, ks):
    """S1 per k, S2, S3 of a sample: means over layer × (class, correctness) combinations."""
    s1, s2, s3 = {k: [] for k in ks}, [], []
    for A in matrices:
        winners = A.argmax(axis=1)
        for label in np.unique(truth.labels):
            for ok in (True, False):
                full = np.flatnonzero((truth.labels == label) & (truth.correct == ok))
                if len(full) == 0:
                    continue
                part = np.intersect1d(full, sample)
                if len(part) == 0:
                    s2.append(1.0)
                    s3.append(1.0)
                    for k in ks:
                        s1[k].append(0.0)
                    continue
                full_mean, part_mean = A[full].mean(axis=0), A[part].mean(axis=0)
                s2.append(cosine(full_mean, part_mean))
                s3.append(jensenshannon(np.bincount(winners[part], minlength=A.shape[1]),
                                        np.bincount(winners[full], minlength=A.shape[1]), base=2))
                for k in ks:
                    top_full = np.argsort(-full_mean, kind="stable")[:k]
                    top_part = np.argsort(-part_mean, kind="stable")[:k]
                    s1[k].append(len(set(top_full) & set(top_part)) / k)
    return {k: float(np.mean(v)) for k, v in s1.items()}, float(np.mean(s2)), float(np.mean(s3))


# --- names with '#', and calls that are not fixed ---------------------------------------------


class Named(nn.Module):
    """A module really named 'weird#name', and one named 'act#2' beside ``act``'s second call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.act = nn.ReLU()
        self.add_module("weird#name", nn.Tanh())
        self.add_module("act#2", nn.Sigmoid())
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = getattr(self, "weird#name")(self.act(self.fc(x)))
        return self.head(getattr(self, "act#2")(self.act(h - 0.1)))


def test_quoted_names_with_a_hash_are_module_names():
    model = _randomise(Named(), 9)
    X, y = _data((5,), 10)
    db = connect(model, (X, y))
    with torch.no_grad():
        first = F.relu(F.linear(X, model.fc.weight, model.fc.bias))
        weird = torch.tanh(first)
        second = F.relu(weird - 0.1)
    for text, truth in (("'weird#name'", weird), ("act#1", first),
                        ("'act#2'", torch.sigmoid(second))):
        np.testing.assert_allclose(db.query(f"AVG NEURONS IN {text}").values,
                                   truth.double().mean(dim=0).numpy(), atol=ATOL, err_msg=text)
    result = db.query("TOPK 2 NEURONS IN 'weird#name'")
    assert result.labels == [f"weird#name[{i}]" for i in result.neurons]
    with pytest.raises(BindError) as info:
        db.query("AVG NEURONS IN 'weird#name'#1")
    assert info.value.message == ("layer 'weird#name' runs once per forward pass (in DiagQL's "
                                  "probe), so it takes no call number; name it 'weird#name'")
    # act's second call would be named like the module 'act#2': that call is refused, by name.
    with pytest.raises(BindError, match=r"layer 'act#2' cannot be queried: its name is also "
                                        r"module 'act#2''s; rename one of them"):
        db.query("AVG NEURONS IN act#2")
    with pytest.raises(ParseError):
        db.query("AVG NEURONS IN weird#name")  # unquoted, '#' starts a call number


class Varies(nn.Module):
    """``act`` runs once for a batch of one item, twice for larger batches."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        for _ in range(min(len(x), 2)):
            h = self.act(h)
        return self.head(h)


def test_calls_that_change_with_the_batch_are_refused():
    db = connect(_randomise(Varies(), 11), _data((5,), 12))
    message = ("layer 'act' cannot be queried: it runs 1, 2, 2 times in probes of 1, 2, 3 items: "
               "the number of its calls changes with the batch, so no call number names one output")
    for text in ("AVG NEURONS IN act", "AVG NEURONS IN act#2"):
        with pytest.raises(BindError) as info:
            db.query(text)
        assert info.value.message == message


class Again(nn.Module):
    """``blk`` runs once, except in a batch holding an item whose third feature is above 3.5:
    there a loop runs it twice over the whole batch (once in DiagQL's probe of items 0-2)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.blk = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        for _ in range(1 + int(x[:, 2].max() > 3.5)):
            h = torch.tanh(self.blk(h))
        return self.head(h)


def test_a_module_run_again_in_some_batch_is_refused_and_the_others_answer():
    """A query on ``blk`` stops after its first call, so the batches that run it twice had
    answered with their first call's rows alone, silently (sweep LL1): the profile pass saw
    the second call, and the query is refused; the layer before it answers as torch's."""
    model = _randomise(Again(), 21)
    X, y = _data((6,), 22)
    X[:, 2] = X[:, 2].clamp(max=3.0)
    X[30, 2] = 4.0
    db = connect(model, (X, y))
    for using in ("USING FULL", "USING SAMPLE random(0.3)"):
        with pytest.raises(ExecutionError, match="'blk' did not run in every batch of the "
                                                 "profile pass as it ran in DiagQL's probe"):
            db.query(f"AVG NEURONS IN blk {using}")
    with torch.no_grad():
        first = F.linear(X, model.inp.weight, model.inp.bias).double().numpy()
    np.testing.assert_allclose(db.query("AVG NEURONS IN inp").values, first.mean(axis=0),
                               atol=ATOL)


def test_a_shared_module_run_once_more_in_some_batch_is_refused_per_call():
    """In the batch with the side branch, ``blk#1`` had read the side call and ``blk#2`` the
    loop's first, answered as exact over every item and unwarned (max error 0.019): the
    profile pass counts a shared module's calls in every batch, so both calls are refused;
    with no such item they answer as torch does."""
    model = _randomise(ray_models.ExtraCall(), 25)
    X, y = _data((6,), 26)
    X[:, 2] = X[:, 2].clamp(max=3.0)
    with torch.no_grad():
        first = F.linear(X, model.blk.weight, model.blk.bias)
        second = F.linear(torch.tanh(first), model.blk.weight, model.blk.bias)
    db = connect(model, (X, y))
    for layer, truth in (("blk#1", first), ("blk#2", second)):
        np.testing.assert_allclose(db.query(f"AVG NEURONS IN {layer}").values,
                                   truth.double().mean(dim=0).numpy(), atol=ATOL)
    X[30, 2] = 4.0
    db = connect(model, (X, y))
    for layer in ("blk#1", "blk#2"):
        with pytest.raises(ExecutionError, match=f"'{layer}' did not run in every batch of "
                                                 "the profile pass as it ran in DiagQL's "
                                                 r"probe: .*from another place in forward\(\)"):
            db.query(f"AVG NEURONS IN {layer} USING SAMPLE random(0.3)")


class ThroughHelpers(nn.Module):
    """ray_models.ExtraCall's side call, with every call made through a helper function, through
    nn.Sequential's own loop, or two on one line: one innermost line for every call (review)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.blk = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        side = bool(x[:, 2].max() > 3.5)
        if self.how == "helper":
            if side:
                self.side = _apply(self.blk, x * 0.1)
            h = _apply(self.blk, x)
        else:  # two calls on one line
            h = self.blk(x * 0.1) if side else self.blk(x)
        return self.head(torch.tanh(_apply(self.blk, torch.tanh(h))))


def _apply(module, x):
    return module(x)


@pytest.mark.parametrize("how", ["helper", "one line"])
def test_a_shifted_call_is_refused_whatever_line_makes_it(how):
    model = _randomise(ThroughHelpers(how), 29)
    X, y = _data((6,), 30)
    X[:, 2] = X[:, 2].clamp(max=3.0)
    X[30, 2] = 4.0
    db = connect(model, (X, y))
    with pytest.raises(ExecutionError, match="'blk#1' did not run in every batch"):
        db.query("AVG NEURONS IN blk#1 USING FULL")


def test_shards_of_one_batch_each_compare_their_call_sites_when_joined():
    """A Ray shard takes its own first batch's sites: two shards of one batch each, the side
    call in the second, had compared nothing (review); their parts are compared as they
    join. Simulated with the profile pass's own parts, each given a pickled copy."""
    import pickle

    from diagql.model.call_sites import SharedCalls, shifted_between
    from diagql.model.profile_pass import profile_part

    model = _randomise(ray_models.ExtraCall(), 25)
    X, y = _data((6,), 26)
    X[:, 2] = X[:, 2].clamp(max=3.0)
    X[40, 2] = 4.0
    db = diagql.connect(model, (X, y), batch_size=30, cache_dir=False, progress=False)
    shared = SharedCalls.of(db.catalog)
    assert shared.calls == {"blk": 2}
    parts = [profile_part(model, db.source, items, latent=None, latent_is_input=False,
                          device=torch.device("cpu"), dtype=None, batch_size=30,
                          advance=lambda n: None, shared=pickle.loads(pickle.dumps(shared)))
             for items in (np.arange(30), np.arange(30, 60))]
    assert not parts[0].unran and not parts[1].unran  # one batch each: nothing within
    assert shifted_between([part.sites for part in parts]) == {"blk#1", "blk#2"}


class EarlyExit(nn.Module):
    """A batch whose items are all confidently class 0 by ``exit1`` stops there: ``l2`` and
    ``exit2``, the last layer (whose input is the default latent), run in the others only."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.exit1 = nn.Linear(8, 3)
        self.l2 = nn.Linear(8, 8)
        self.exit2 = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        early = self.exit1(h)
        if bool((x[:, 0] > 2.0).all()):
            return early
        return self.exit2(torch.relu(self.l2(h)))


def test_an_early_exit_that_skips_the_latent_says_to_name_another():
    """Every statement had been refused with "layer 'exit2' did not run in the model's
    forward pass", naming a layer no statement asked for (SW1)."""
    model = _randomise(EarlyExit(), 27)
    X, y = _data((6,), 28)
    X[BATCH:2 * BATCH, 0] = 3.0  # the second batch exits early
    db = connect(model, (X, y))
    with pytest.raises(ExecutionError, match=r"layer 'exit2', whose input DiagQL reads as the "
                                             r"profile's latent, did not run in a forward pass "
                                             r"of 7 items.*SET latent = <layer>, or latent= in "
                                             r"connect\(\)"):
        db.query("AVG NEURONS IN l1")
    db.query("SET latent = l1")
    with torch.no_grad():
        truth = F.linear(X, model.l1.weight, model.l1.bias).double().mean(dim=0).numpy()
    np.testing.assert_allclose(db.query("AVG NEURONS IN l1").values, truth, atol=ATOL)


class Chunked(nn.Module):
    """A forward that runs ``fc`` once a piece of 8 items (more than the probes' 6), ``fc``
    16 wide: as wide as the batches of 16 below are long."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.cat([torch.relu(self.fc(piece)) for piece in x.split(8)]))


def test_a_module_run_once_a_piece_of_its_batch_keeps_its_shape_error_and_remedy():
    """Its pieces' output is as wide as the batch is long: it was taken for a whole batch
    run again and refused as running in some batches only, its shape error lost (review
    MM1); along its batch axis a piece is no batch."""
    db = diagql.connect(_randomise(Chunked(), 23), _data((6,), 24), batch_size=16,
                        cache_dir=False, progress=False)
    with pytest.raises(ExecutionError, match="shape \\(8, 16\\) for a batch of 16 items"):
        db.query("AVG NEURONS IN fc USING FULL")


class Sometimes(nn.Module):
    """``act`` runs twice, except in a batch holding an item whose first feature is below -5."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.fc(x))
        if bool((x[:, 0] > -5).all()):
            h = self.act(h)
        return self.head(h)


def test_a_call_missing_from_a_batch_is_an_error():
    model = _randomise(Sometimes(), 13)
    X, y = _data((5,), 14)
    X[30, 0] = -10.0
    db = connect(model, (X, y))
    with torch.no_grad():
        first = F.relu(F.linear(X, model.fc.weight, model.fc.bias)).double().numpy()
    np.testing.assert_allclose(db.query("AVG NEURONS IN act#1").values, first.mean(axis=0),
                               atol=ATOL)
    # The pass over every item says so of its batch; the profile pass saw it first, and
    # refuses a sample's query too, which had answered from batches that ran it.
    with pytest.raises(ExecutionError) as info:
        db.query("AVG NEURONS IN act#2 USING FULL")
    assert info.value.message == ("layer 'act#2' did not run in every batch of the profile "
                                  "pass as it ran in DiagQL's probe: it runs in some batches "
                                  "only, more often in some, or from another place in forward() "
                                  "(a branch on the data, or a loop "
                                  "whose length depends on the batch), so it has no single "
                                  "activation for every item")
    with pytest.raises(ExecutionError, match="did not run in every batch of the profile pass"):
        db.query("AVG NEURONS IN act#2 USING SAMPLE random(0.3)")
    assert not model._forward_hooks and not model.act._forward_hooks  # every hook removed


class PaddedCell(nn.Module):
    """A GRUCell stepped over the batch's padded length, its state kept where a step is
    padding: the cell runs as many times as the batch's longest item has tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.emb, self.cell = nn.Embedding(20, 6, padding_idx=0), nn.GRUCell(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        e = self.emb(input_ids)
        h = torch.zeros(len(e), 8)
        for t in range(e.shape[1]):
            real = attention_mask[:, t:t + 1].float()
            h = real * self.cell(e[:, t], h) + (1 - real) * h
        return self.head(h)


def test_a_cell_stepped_over_padding_is_refused_from_a_sample_as_from_every_item(tmp_path):
    """The probe's first items are all 6 long, so it saw 6 calls; some batches run 4. A pass
    over every item refused cell#5, and a sample answered it from its own batches, padded to
    their longest item: values the model computes for a short item only beside longer ones
    (CC1). Calls every batch makes answer, as torch gives them."""
    from torch.utils.data import DataLoader

    torch.manual_seed(1)
    lengths = [6] * 3 + [2 + i % 7 for i in range(61)] + [4] * 96 + [2 + i % 5 for i in range(140)]
    items = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, 20, (n,))
        items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "labels": i % 3})

    def collate(batch):
        width = max(len(item["input_ids"]) for item in batch)
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        for row, item in enumerate(batch):
            ids[row, :len(item["input_ids"])] = item["input_ids"]
        return {"input_ids": ids, "attention_mask": (ids > 0).long(),
                "labels": torch.tensor([item["labels"] for item in batch])}

    model = PaddedCell().eval()
    for _ in range(2):  # the second connection reads the profile from the disk cache
        db = connect(model, DataLoader(items, batch_size=32, collate_fn=collate), tmp_path)
        for source in ("", " USING SAMPLE random(0.3)"):
            with pytest.raises(ExecutionError, match="'cell#5' did not run in every batch"):
                db.query("AVG NEURONS IN cell#5" + source)
    # Another model's layer, sampled on the default model's profile: a checkpoint's is known
    # from its final model's (one architecture), another model's once its profile is held.
    other = PaddedCell().eval()
    db = connect({"a": model, "b": other},
                 DataLoader(items, batch_size=32, collate_fn=collate))
    db.models["b"].profile  # noqa: B018 - held, as a query on b's predictions would hold it
    with pytest.raises(ExecutionError, match="'cell#5' did not run in every batch"):
        db.query("AVG NEURONS IN b.cell#5 USING SAMPLE random(0.3)")
    db = diagql.connect(model, DataLoader(items, batch_size=32, collate_fn=collate),
                        checkpoints={"e1": other.state_dict()}, cache_dir=False, progress=False)
    with pytest.raises(ExecutionError, match="'cell#5' did not run in every batch"):
        db.query("AVG NEURONS IN e1.cell#5 USING SAMPLE random(0.3)")
    firsts = []  # each batch's first call of the cell
    hook = model.cell.register_forward_hook(
        lambda module, args, out: firsts.append(out) if len(firsts) < done[0] else None)
    done = [0]
    with torch.no_grad():
        for start in range(0, len(items), 32):
            done[0] += 1
            batch = collate(items[start:start + 32])
            model(batch["input_ids"], batch["attention_mask"])
    hook.remove()
    truth = torch.cat(firsts).double().mean(0).numpy()
    np.testing.assert_allclose(db.query("AVG NEURONS IN cell#1").values, truth, atol=ATOL)


class MoreInBigBatches(nn.Module):
    """``step`` runs once in batches of fewer than 4 items (every probe's), twice in larger."""

    def __init__(self):
        super().__init__()
        self.fc, self.step, self.head = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        for _ in range(1 if len(x) < 4 else 2):
            h = torch.tanh(self.step(h))
        return self.head(h)


def test_a_module_whose_calls_follow_the_batch_size_leaves_the_other_layers_answered():
    """The profile pass hooks every layer for its winners and projections; 'step' running
    twice in a batch of 7 had failed that pass, and so every query on any layer."""
    model = _randomise(MoreInBigBatches(), 15)
    X, y = _data((5,), 16)
    db = connect(model, (X, y))
    with torch.no_grad():
        fc = F.linear(X, model.fc.weight, model.fc.bias)
        h = X.new_empty(0, 6)
        for start in range(0, N, BATCH):  # the batches a pass of BATCH (7) items sees
            part = fc[start:start + BATCH]
            for _ in range(1 if len(part) < 4 else 2):
                part = torch.tanh(F.linear(part, model.step.weight, model.step.bias))
            h = torch.cat([h, part])
        logits = F.linear(h, model.head.weight, model.head.bias).double().numpy()
    np.testing.assert_allclose(db.query("AVG NEURONS IN fc").values,
                               fc.double().mean(dim=0).numpy(), atol=ATOL)
    np.testing.assert_allclose(db.query("AVG NEURONS IN head").values, logits.mean(axis=0),
                               atol=ATOL)
    np.testing.assert_allclose(db.query("ARGMAX NEURONS IN head").values,
                               np.bincount(logits.argmax(axis=1), minlength=3) / N, atol=ATOL)
    assert "step" not in " ".join(db.profile.winners)  # its winners are not kept
    db.query("SHOW PROFILE")


# --- the REPL: completion and highlighting of '#n' ----------------------------------------------


def test_completion_offers_each_call(resnet):
    from prompt_toolkit.document import Document

    from diagql.shell.completion import DiagQLCompleter, connection_layers

    db, _ = resnet
    completer = DiagQLCompleter(connection_layers(db))

    def complete(text):
        return [c.text for c in completer.get_completions(Document(text, len(text)), None)]

    calls = [f"{RELU}#1", f"{RELU}#2"]
    assert complete("AVG NEURONS IN layer1.0.re") == calls  # the calls, not the bare name
    assert complete(f"AVG NEURONS IN {RELU}#") == calls
    assert complete(f"DESCRIBE {RELU}#2") == [f"{RELU}#2"]
    assert complete(f"EVALUATE SAMPLERS random LAYERS {RELU}#1, layer1.0.relu") == calls
    assert "WHERE" in complete(f"AVG NEURONS IN {RELU}#2 ")


def test_highlighting_marks_the_call_number():
    from diagql.shell.highlight import tokens

    assert list(tokens(f"TOPK 3 NEURONS IN {RELU}#2")) == [
        ("keyword", "TOPK"), ("", " "), ("number", "3"), ("", " "), ("keyword", "NEURONS"),
        ("", " "), ("keyword", "IN"), ("", " "), ("name", RELU), ("number", "#2")]
    assert ("string", "'weird#name'") in list(tokens("DESCRIBE 'weird#name'#3"))


def test_repl_runs_a_layer_at_enter_whether_or_not_a_call_could_follow():
    from diagql.shell.repl import wants_more

    assert not wants_more(f"DESCRIBE {RELU}") and not wants_more(f"DESCRIBE {RELU}#2")
    assert not wants_more("DESCRIBE 'weird#name'")
    assert wants_more(f"AVG NEURONS IN {RELU}#2")  # a WHERE may come on the next line


def test_many_calls_are_named_by_their_ends():
    from diagql.language.binder import calls_text

    assert calls_text("x", 12) == "x#1, x#2, … or x#12"
    assert calls_text("weird#name", 2) == "'weird#name'#1 or 'weird#name'#2"


class _Siamese(nn.Module):
    """Its head defined before the encoder that runs twice (once per input of a pair)."""

    def __init__(self, head_first: bool = True):
        super().__init__()
        torch.manual_seed(0)
        if head_first:
            self.head = nn.Linear(8, 2)
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 8)
        if not head_first:
            self.head = nn.Linear(8, 2)

    def encode(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

    def forward(self, a, b):
        return self.head((self.encode(a) - self.encode(b)).abs())


@pytest.mark.parametrize("head_first", [True, False])
def test_the_latent_is_the_input_of_the_linear_that_returns_the_scores(head_first):
    """The default latent was the last Linear the model defines that runs: with the head
    defined first, the encoder's fc2, which runs twice, so every query failed ("runs more
    than once per forward pass")."""
    model = _Siamese(head_first)
    a, b, y = torch.randn(N, 6), torch.randn(N, 6), torch.randint(0, 2, (N,))
    db = diagql.connect(model, _Pairs(a, b, y), cache_dir=False, progress=False,
                        batch_size=BATCH)
    with torch.no_grad():
        latent = (model.encode(a) - model.encode(b)).abs()
        first = model.fc1(a).double()
    assert db.profile.latent_layer == "input of head"
    np.testing.assert_allclose(db.profile.latents, latent.numpy(), atol=ATOL)
    np.testing.assert_allclose(db.query("AVG NEURONS IN fc1#1").values, first.mean(0).numpy(),
                               atol=ATOL)
    db.execute("SET estimator = plain")
    sample = db.sample("maxmargin(0.5)")
    np.testing.assert_allclose(db.query("AVG NEURONS IN fc1#1 USING SAMPLE maxmargin(0.5)")
                               .values, first[sample].mean(0).numpy(), atol=ATOL)


class _Pairs(torch.utils.data.Dataset):
    def __init__(self, a, b, y):
        self.a, self.b, self.y = a, b, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return (self.a[i], self.b[i]), int(self.y[i])


class Aliased(nn.Module):
    """``enc`` under two more names: ``twice`` (an attribute) and ``seq.1`` (inside a
    Sequential), called twice per pass; ``head`` also as ``out``, called once."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 5)
        self.twice = self.enc
        self.seq = nn.Sequential(nn.Linear(5, 5), self.enc)
        self.head = nn.Linear(5, 3)
        self.out = self.head

    def forward(self, x):
        return self.out(torch.tanh(self.twice(torch.tanh(self.seq(x)))))


def test_a_module_under_another_name_is_the_same_module():
    model = _randomise(Aliased(), 5)
    X, y = _data((5,), 6)
    db = connect(model, (X, y))
    with torch.no_grad():
        first = F.linear(F.linear(X, model.seq[0].weight, model.seq[0].bias),
                         model.enc.weight, model.enc.bias)
        second = F.linear(torch.tanh(first), model.enc.weight, model.enc.bias)
        logits = F.linear(torch.tanh(second), model.head.weight, model.head.bias)
    for name, truth in [("enc#1", first), ("seq.1#1", first), ("twice#2", second),
                        ("seq.1#2", second), ("out", logits), ("head", logits)]:
        np.testing.assert_allclose(db.query(f"AVG NEURONS IN {name}").values,
                                   truth.mean(dim=0).numpy(), atol=ATOL, err_msg=name)
    for name in ("twice", "seq.1"):
        with pytest.raises(BindError) as err:
            db.query(f"AVG NEURONS IN {name}")
        assert (f"layer {name!r} is the module 'enc' under another name, and it runs 2 times "
                f"per forward pass (under either name); name one call: enc#1 or enc#2 (line 1"
                ) in str(err.value)
        # DESCRIBE lists each call of the module, under either name, as it does for 'enc'.
        assert db.query(f"DESCRIBE {name}").rows == db.query("DESCRIBE enc").rows
