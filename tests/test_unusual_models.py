"""Models and data of forms the other tests do not use (found by sweeping unusual models over
every layer and statement): each answer is checked against plain torch, each refusal is one
DiagQLError naming the problem."""
from __future__ import annotations

import dataclasses
import math
import random
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import diagql
from diagql.errors import DiagQLError, DiagQLWarning


def _mlp(out: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, out))


def _hooked(model: nn.Module, name: str, *inputs) -> torch.Tensor:
    """The module's output for the whole batch, by a hook of the test's own, in float64."""
    seen = []
    module = dict(model.named_modules())[name]
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            model.eval()(*inputs)
    finally:
        handle.remove()
    (out,) = seen
    return out


def _full_mean_is_torchs(conn, model: nn.Module, layer: str, *inputs) -> None:
    """``AVG NEURONS IN layer USING FULL`` is the layer's float64 mean over plain torch's
    outputs for ``inputs`` (a hook of the test's own), to 1e-12."""
    truth = _hooked(model, layer, *inputs).flatten(1).double().mean(0).numpy()
    np.testing.assert_allclose(conn.query(f"AVG NEURONS IN {layer} USING FULL").values, truth,
                               rtol=1e-12, atol=1e-12)


class _NoLength(Dataset):
    def __getitem__(self, i):
        return torch.zeros(6), 0


@pytest.mark.parametrize("data, message", [
    ((torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64)), r"the data \(a tuple of 2\) has no items"),
    ((torch.zeros(0, 6), None), "has no items"),
    ([], r"the data \(a list of 0\) has no items"),
    ({}, "the data is an empty mapping"),
    (_NoLength(), "has no length; DiagQL reads items by index, so a Dataset must define __len__"),
])
def test_data_without_items_or_length_is_refused_at_connect(data, message):
    with pytest.raises(DiagQLError, match=message):
        diagql.connect(_mlp(), data, cache_dir=False, progress=False)


class _NonFloatLayers(nn.Module):
    """Layers whose outputs are a bool mask, int indicators and one value per item."""

    class Mask(nn.Module):
        def forward(self, x):
            return x > 0

    class Count(nn.Module):
        def forward(self, x):
            return (x > 0).long() * 3

    class Total(nn.Module):
        def forward(self, x):
            return x.sum(1)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 8)
        self.mask, self.count, self.total = self.Mask(), self.Count(), self.Total()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.fc(h * self.mask(h) + self.count(h) + self.total(h)[:, None])


@pytest.fixture(scope="module")
def non_float():
    torch.manual_seed(1)
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    model = _NonFloatLayers()
    return model, X, y, diagql.connect(model, (X, y), cache_dir=False, progress=False)


@pytest.mark.parametrize("layer", ["mask", "count", "total"])
def test_bool_int_and_one_value_layers_average_and_argmax_as_numbers(non_float, layer):
    model, X, y, conn = non_float
    rows = _hooked(model, layer, X).double().reshape(len(X), -1)
    avg = conn.query(f"AVG NEURONS IN {layer} USING FULL")
    np.testing.assert_allclose(avg.values, rows.mean(0).numpy(), rtol=1e-12)
    assert avg.labels[0] == f"{layer}[0]"
    arg = conn.query(f"ARGMAX NEURONS IN {layer} GROUP BY class USING FULL")
    for c in range(3):
        winners = rows[y == c].argmax(1)
        share = torch.bincount(winners, minlength=rows.shape[1]).double() / len(winners)
        np.testing.assert_allclose(arg.groups[c].values, share.numpy(), rtol=1e-12)


def test_one_value_per_item_is_neuron_zero_for_top_inputs(non_float):
    model, X, _, conn = non_float
    totals = _hooked(model, "total", X).double()
    top = conn.query("TOPK 3 INPUTS FOR total[0] USING FULL")
    assert top.items.tolist() == torch.argsort(totals, descending=True)[:3].tolist()
    np.testing.assert_allclose(top.values, totals.sort(descending=True).values[:3].numpy(),
                               rtol=1e-6)


@dataclasses.dataclass
class _Hidden:
    hidden: torch.Tensor
    note: str = "kept"


class _Box:
    """An output DiagQL cannot read: a plain object (no tuple, mapping or dataclass)."""

    def __init__(self, value):
        self.value = value


class _OddOutputs(nn.Module):
    class Encode(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 8)

        def forward(self, x):
            return _Hidden(torch.tanh(self.lin(x)))

    class Boxed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return _Box(self.lin(x))

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encode, self.boxed, self.head = self.Encode(), self.Boxed(), nn.Linear(8, 3)

    def forward(self, x):
        h = self.encode(x).hidden
        return _Hidden(self.head(h + self.boxed(h).value))  # the logits in a dataclass too


@pytest.fixture(scope="module")
def odd():
    torch.manual_seed(2)
    X, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    model = _OddOutputs()
    return model, X, y, diagql.connect(model, (X, y), cache_dir=False, progress=False)


def test_a_dataclass_output_is_read_as_its_first_tensor_field(odd):
    model, X, y, conn = odd
    hidden = _hooked(model, "encode", X).hidden.double()
    mask = y == 1
    avg = conn.query("AVG NEURONS IN encode WHERE class = 1 USING FULL")
    np.testing.assert_allclose(avg.values, hidden[mask].mean(0).numpy(), rtol=1e-6)
    logits = _hooked(model, "head", X).double()
    assert (conn.profile.predictions == logits.argmax(1).numpy()).all()


def test_evaluate_without_layers_skips_children_it_cannot_read(odd):
    *_, conn = odd
    with pytest.raises(DiagQLError, match="it returns a _Box holding no tensor"):
        conn.query("AVG NEURONS IN boxed")
    result = conn.query("EVALUATE SAMPLERS random(0.5) SEEDS 1")
    assert result.plan.layers and {layer.name for layer in result.plan.layers} == {"encode", "head"}


class _Binary(nn.Module):
    """A binary classifier with one logit, (batch, 1) or squeezed to (batch,)."""

    def __init__(self, squeeze: bool):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head, self.squeeze = nn.Linear(6, 8), nn.Linear(8, 1), squeeze

    def forward(self, x):
        logit = self.head(torch.relu(self.lin(x)))
        return logit.squeeze(-1) if self.squeeze else logit


@pytest.mark.parametrize("squeeze", [False, True])
def test_one_logit_is_a_binary_classifier(squeeze):
    torch.manual_seed(3)
    X, y = torch.randn(80, 6), torch.randint(0, 2, (80,))
    model = _Binary(squeeze)
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    logit = _hooked(model, "head", X).double().reshape(-1)
    p = torch.sigmoid(logit)
    predicted = (logit > 0).long()
    assert conn.n_classes == 2
    assert (conn.profile.predictions == predicted.numpy()).all()
    np.testing.assert_allclose(conn.profile.confidence, torch.maximum(p, 1 - p).numpy(),
                               rtol=1e-12)
    hidden = _hooked(model, "lin", X).double()
    wrong = predicted != y
    avg = conn.query("AVG NEURONS IN lin WHERE incorrect AND class = 1 USING FULL")
    np.testing.assert_allclose(avg.values, hidden[wrong & (y == 1)].mean(0).numpy(), rtol=1e-6)
    sampled = conn.query("AVG NEURONS IN lin GROUP BY predicted USING SAMPLE maxmargin(0.5)")
    assert set(sampled.groups) <= {0, 1}
    with pytest.raises(DiagQLError, match=r"class 2 is outside the label set 0..1"):
        conn.query("AVG NEURONS IN lin WHERE class = 2")


class _Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


class _NaNs(nn.Module):
    """A layer (``log``) with NaN for every item (a negative argument somewhere in each)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.log, self.head = nn.Linear(6, 8), _Log(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.nan_to_num(self.log(self.lin(x))))


def test_samplers_refuse_a_latent_with_nan_and_another_can_be_set():
    torch.manual_seed(4)
    X, y = torch.randn(400, 6), torch.randint(0, 3, (400,))
    model = _NaNs()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    conn.query("SET latent = log")
    for sampler in ("gmm", "maxmargin", "vas"):
        with pytest.raises(DiagQLError, match=rf"{sampler} fits on the latents, which are NaN or "
                                              rf"infinite for \d+ of 400 items \(the first is item "
                                              rf"0\); SET latent = another layer"):
            conn.query(f"AVG NEURONS IN lin USING SAMPLE {sampler}(0.5)")
    lin = _hooked(model, "lin", X).double()
    # USING AUTO, whose default is maxmargin, draws at random then (from over 100 items).
    auto = conn.query("AVG NEURONS IN lin USING AUTO")
    assert "AUTO chose a sample" in auto.plan.choice and "random" in auto.plan.choice
    drawn = conn.query("AVG NEURONS IN lin USING SAMPLE random(0.5)")  # reads no latent
    assert drawn.provenance.n_sample == 200 and np.isfinite(drawn.values).all()
    assert np.all((drawn.values >= lin.min(0).values.numpy() - 1e-6)
                  & (drawn.values <= lin.max(0).values.numpy() + 1e-6))
    conn.query("SET latent = lin")
    result = conn.query("AVG NEURONS IN lin USING SAMPLE gmm(0.5)")
    assert np.isfinite(result.values).all()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("make", [torch.jit.script, lambda m: torch.jit.trace(m, torch.zeros(2, 6))],
                         ids=["script", "trace"])
def test_torchscript_is_refused_at_connect(make):
    with pytest.raises(DiagQLError, match=r"model is TorchScript \(\w+\), whose layers take no "
                                          r"forward hooks; connect the nn.Module"):
        diagql.connect(make(_mlp()), (torch.zeros(5, 6), torch.zeros(5, dtype=torch.int64)),
                       cache_dir=False, progress=False)


class _ScriptedBody(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.jit.script(nn.Sequential(nn.Linear(6, 8), nn.ReLU()))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_a_scripted_part_is_listed_as_refused_and_the_rest_is_queried(tmp_path):
    torch.manual_seed(6)
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    model = _ScriptedBody().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)  # its code is hashed: cached on disk
        conn = diagql.connect(model, (X, y), cache_dir=tmp_path, progress=False)
        avg = conn.query("AVG NEURONS IN head WHERE class = 1 USING FULL")
    with torch.no_grad():
        truth = model(X)[y == 1].double().mean(0).numpy()
    np.testing.assert_allclose(avg.values, truth, rtol=1e-6)
    for name in ("body", "body.0"):
        with pytest.raises(DiagQLError, match=rf"layer '{name}' cannot be queried: it is "
                                              rf"TorchScript \(torch.jit.script's or "
                                              rf"torch.jit.trace's\), whose modules take no "
                                              rf"forward hooks; build this part as the "
                                              rf"nn.Module it was made from \(line"):
            conn.query(f"AVG NEURONS IN {name}")
    # Its weights are in the fingerprint: another scripted body is another model.
    other = _ScriptedBody().eval()
    other.head.load_state_dict(model.head.state_dict())
    again = diagql.connect(other, (X, y), cache_dir=tmp_path, progress=False)
    with torch.no_grad():
        moved = other(X)[y == 1].double().mean(0).numpy()
    np.testing.assert_allclose(again.query("AVG NEURONS IN head WHERE class = 1 USING FULL")
                               .values, moved, rtol=1e-6)
    assert not np.allclose(moved, truth)


def test_a_compiled_model_is_queried_through_its_original_layers():
    torch.manual_seed(5)
    X, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    model = _mlp()
    conn = diagql.connect(torch.compile(model, backend="eager"), (X, y), cache_dir=False,
                          progress=False)
    assert conn.layers == ["0", "1", "2"] and conn.model is model
    relu = _hooked(model, "1", X).double()
    top = conn.query("TOPK 2 NEURONS IN 1 WHERE class = 2 USING SAMPLE random(0.9)")
    assert top.values.shape == (2,) and np.isfinite(top.values).all()
    avg = conn.query("AVG NEURONS IN 1 WHERE class = 2 USING FULL")
    np.testing.assert_allclose(avg.values, relu[y == 2].mean(0).numpy(), rtol=1e-6)


class _Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


@pytest.mark.parametrize("how", ["submodule", "in place", "whole"])
def test_a_model_with_compiled_parts_runs_them_eagerly(how):
    """A submodule compiled by the user (model.backbone = torch.compile(...)) or the model
    compiled in place (model.compile()) had failed GROUP BY and sample queries with dynamo's
    'Guard failed' (it traced DiagQL's hooks); the passes now run compiled code eagerly."""
    torch.manual_seed(5)
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    model = _Backbone().eval()
    truth = _hooked(model, "backbone.1", X).double().numpy()
    if how == "submodule":
        model.backbone = torch.compile(model.backbone, backend="eager")
        layer = "backbone._orig_mod.1"
    elif how == "whole":  # torch.compile(model): named_modules() says '_orig_mod.backbone.1'
        model = torch.compile(model, backend="eager")
        layer = "backbone.1"
    else:
        model.compile(backend="eager")
        layer = "backbone.1"
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    grouped = conn.query(f"AVG NEURONS IN {layer} GROUP BY class")
    for key, group in grouped.groups.items():
        np.testing.assert_allclose(group.values, truth[(y == key).numpy()].mean(0), rtol=1e-6)
    conn.query("SET estimator = plain")
    sampled = conn.query(f"AVG NEURONS IN {layer} USING SAMPLE random(0.5)")
    items = conn.sample("random(0.5)")
    np.testing.assert_allclose(sampled.values, truth[items].mean(0), rtol=1e-6)
    if how == "submodule":  # the name as the user wrote it is pointed at the compiled one's
        with pytest.raises(DiagQLError, match="did you mean 'backbone._orig_mod.1'"):
            conn.query("AVG NEURONS IN backbone.1")
    if how == "whole":  # and the compiled wrapper's name at the module it compiled
        with pytest.raises(DiagQLError, match="unknown layer '_orig_mod.backbone.1'; did you "
                                              r"mean 'backbone.1'\? \(a model compiled whole"):
            conn.query("AVG NEURONS IN _orig_mod.backbone.1")


def test_a_wrapped_models_layer_named_without_its_wrapper_is_suggested():
    conn = diagql.connect(nn.DataParallel(_mlp()), (torch.randn(20, 6),
                          torch.randint(0, 3, (20,))), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="unknown layer '1'; did you mean 'module.1'"):
        conn.query("AVG NEURONS IN 1")


def test_a_torch_export_programs_module_is_refused_at_connect():
    """Its graph inlines the layers (none runs as a module); it had failed at the first query
    with a bare NotImplementedError from eval(). Its unflattened form is queried."""
    X, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    model = _mlp().eval()
    program = torch.export.export(model, (X[:4],),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    with pytest.raises(DiagQLError, match=r"torch.export program's module.*unflatten"):
        diagql.connect(program.module(), (X, y), cache_dir=False, progress=False)
    conn = diagql.connect(torch.export.unflatten(program), (X, y), cache_dir=False,
                          progress=False)
    np.testing.assert_allclose(conn.query("AVG NEURONS IN 1").values,
                               _hooked(model, "1", X).double().mean(0).numpy(), rtol=1e-6)


class _Augmented(torch.utils.data.Dataset):
    """Items with a random transform, as a training set's augmentation would give them."""

    def __init__(self, X, y, noise: float):
        self.X, self.y, self.noise = X, y, noise

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        if self.noise == "flip":  # a random horizontal flip, half the time
            x = self.X[i].flip(-1) if random.random() < 0.5 else self.X[i]
            return x, self.y[i]
        return self.X[i] + self.noise * torch.randn_like(self.X[i]), self.y[i]


@pytest.mark.parametrize("noise", [0.0, 0.1, "flip"])
def test_data_whose_reads_differ_is_warned_of(noise):
    """A random transform gave two answers to one query, silently: the profile, samples and
    each pass read the items anew. A flip half the time left the first item alike on two
    reads half the time, and went unseen then."""
    import warnings

    X, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    for seed in range(16 if noise == "flip" else 1):
        random.seed(seed)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            conn = diagql.connect(_mlp(), _Augmented(X, y, noise), cache_dir=False,
                                  progress=False)
            conn.query("AVG NEURONS IN 1")
        told = [w for w in caught if issubclass(w.category, diagql.DiagQLWarning)
                and "different inputs on two reads" in str(w.message)]
        assert len(told) == (1 if noise else 0)
        # Nor is the model blamed: its batch is compared on reads of one input only.
        assert not [w for w in caught if "share its batch" in str(w.message)]


class _OrderNoise(torch.utils.data.Dataset):
    """Noise from a generator of its own, so an item's inputs follow the order of reads (each
    of a loader's workers starts from a copy of it)."""

    def __init__(self, X, y):
        self.X, self.y, self.rng = X, y, np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i] + float(self.rng.normal()), self.y[i]


@pytest.mark.parametrize("form", ["clean first", "noise of its own"])
def test_data_that_reads_differently_past_its_first_items_is_warned_of_not_refused(form):
    """An augmentation of the data's second half (a ConcatDataset of clean and noisy parts),
    or a dataset's own generator copied into a loader's workers, passed the first items'
    check; the row-order check's reads then differed and every layer was refused as 'not in
    its batch's order', the model blamed. The data is warned of, and the layers are
    queried."""
    import warnings

    torch.manual_seed(0)
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    data = torch.utils.data.ConcatDataset([
        torch.utils.data.TensorDataset(X[:20], y[:20]), _Augmented(X[20:], y[20:], 0.5)]) \
        if form == "clean first" else \
        torch.utils.data.DataLoader(_OrderNoise(X, y), batch_size=8, num_workers=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conn = diagql.connect(_mlp(), data, cache_dir=False, progress=False)
        answer = conn.query("AVG NEURONS IN 1")
    told = [str(w.message) for w in caught if issubclass(w.category, diagql.DiagQLWarning)]
    assert any("different inputs on two reads" in t for t in told)
    assert not any("share its batch" in t for t in told)
    assert answer.n_items == 40
    # Said once as a warning, and kept where the profile and the models are shown.
    for shown in ("SHOW PROFILE", "SHOW MODELS"):
        assert any("different inputs on two reads" in note for note in conn.query(shown).notes)


class _AlwaysDropout(nn.Module):
    """Dropout called with training=True: random in eval mode too (MC dropout)."""

    def __init__(self, p: float):
        super().__init__()
        self.fc, self.head, self.p = nn.Linear(6, 8), nn.Linear(8, 3), p

    def forward(self, x):
        return self.head(nn.functional.dropout(self.fc(x).relu(), self.p, training=True))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_a_model_whose_passes_differ_is_warned_of(p):
    """Two identical exact queries answered differently, and a sample of every item called
    itself exact beside a baseline it did not match, silently."""
    import warnings

    torch.manual_seed(0)
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conn = diagql.connect(_AlwaysDropout(p), (X, y), cache_dir=False, progress=False)
        conn.query("AVG NEURONS IN fc")
    told = [w for w in caught if issubclass(w.category, diagql.DiagQLWarning)
            and "different outputs on two passes" in str(w.message)]
    assert len(told) == (1 if p else 0)


def test_a_layer_that_runs_but_is_not_per_item_says_why_in_show_layers_and_describe():
    """A parametrization (weight_norm) runs once per pass on the weights, not per item: SHOW
    LAYERS had left its note blank and DESCRIBE refused it."""
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Linear(6, 8)), nn.ReLU(), nn.Linear(8, 3))
    conn = diagql.connect(model, (torch.randn(20, 6), torch.randint(0, 3, (20,))),
                          cache_dir=False, progress=False)
    notes = {row[0]: row[4] for row in conn.query("SHOW LAYERS").rows}
    assert notes["0.parametrizations.weight.0"] == "no axis of its output follows the batch"
    described = dict(conn.query("DESCRIBE 0.parametrizations.weight.0").rows)
    assert described["output"] == "(not queryable)"
    assert described["why"].startswith("no axis of its output follows the batch (shapes (8, 6)")
    # (8, 6) for every batch, not rows of items: the reason is the weight's, not a graph's.
    with pytest.raises(DiagQLError, match="cannot be queried: no axis of its output.*: its "
                                          "rows are as many whatever the batch: a weight that "
                                          "a parametrization computes, or the rows a gate "
                                          "routed to it") as caught:
        conn.query("AVG NEURONS IN 0.parametrizations.weight.0")
    assert "several rows an item" not in caught.value.message


class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.bag, self.head = nn.EmbeddingBag(30, 8), nn.Linear(8, 3)

    def forward(self, text, offsets):
        return self.head(self.bag(text, offsets))


def _concatenated(batch):
    """The PyTorch text tutorial's collate: every item's tokens in one tensor, and offsets."""
    tokens = [t for t, _ in batch]
    offsets = torch.tensor([0] + [len(t) for t in tokens[:-1]]).cumsum(0)
    return (torch.cat(tokens), offsets), torch.stack([label for _, label in batch])


def test_embedding_bag_items_concatenated_beside_offsets_are_one_row_each():
    """It had been refused: 'a batch of 1 items came back ... with 7 inputs'. And warned of
    as augmented: the offsets, one an item, move when the batch's order does."""
    g = torch.Generator().manual_seed(2)
    tokens = [torch.randint(1, 30, (int(n),), generator=g)
              for n in torch.randint(2, 9, (50,), generator=g)]
    labels = torch.randint(0, 3, (50,), generator=g)
    model = _Bag().eval()
    loader = torch.utils.data.DataLoader(list(zip(tokens, labels)), batch_size=16,
                                         collate_fn=_concatenated)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conn = diagql.connect(model, loader, cache_dir=False, progress=False, batch_size=7)
        answer = conn.query("AVG NEURONS IN bag WHERE class = 1")
    assert not [w for w in caught if "different inputs" in str(w.message)]
    with torch.no_grad():
        truth = torch.stack([model.bag(t[None]) for t in tokens])[:, 0].double().numpy()
    mine = labels.numpy() == 1
    np.testing.assert_allclose(answer.values, truth[mine].mean(0), rtol=1e-5)


class _Graphs(nn.Module):
    """A graph classifier as torch_geometric writes one: message passing over every graph's
    nodes joined, then each graph's mean by the batch vector (``batch[i]``: node i's graph)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.message, self.own = nn.Linear(5, 8), nn.Linear(5, 8)
        self.pool, self.head = _MeanByGraph(), nn.Linear(8, 3)

    def forward(self, x, edge_index, batch):
        passed = torch.zeros(len(x), 8).index_add_(0, edge_index[1], self.message(x)[edge_index[0]])
        return self.head(self.pool(torch.relu(passed + self.own(x)), batch))


class _MeanByGraph(nn.Module):
    def forward(self, nodes, batch):
        graphs = int(batch.max()) + 1
        sums = torch.zeros(graphs, nodes.shape[1]).index_add_(0, batch, nodes)
        return sums / torch.bincount(batch, minlength=graphs)[:, None]


def _joined(items, reverse: bool = False):
    """Graph batching: the nodes joined, the edges renumbered, each node's graph; with
    ``reverse`` the joined nodes in reverse order (the batch vector out of order)."""
    nodes, edges, graphs, start = [], [], [], 0
    for j, ((x, edge_index), _) in enumerate(items):
        nodes.append(x)
        edges.append(edge_index + start)
        graphs.append(torch.full((len(x),), j))
        start += len(x)
    labels = torch.tensor([label for _, label in items])
    x, edge_index, batch = torch.cat(nodes), torch.cat(edges, 1), torch.cat(graphs)
    if reverse:
        x, edge_index, batch = x.flip(0), len(x) - 1 - edge_index, batch.flip(0)
    return (x, edge_index, batch), labels


@pytest.mark.parametrize("reverse", [False, True], ids=["in-order", "batch-vector-unsorted"])
def test_graphs_joined_beside_a_batch_vector_are_one_row_each(reverse):
    """Graph batching's collate had been refused for every query: 'a batch of 1 items came
    back from the collate_fn with 7 inputs and 1 labels'."""
    g = torch.Generator().manual_seed(5)
    items = []
    for i in range(40):
        size = int(torch.randint(3, 9, (1,), generator=g))
        items.append(((torch.randn(size, 5, generator=g),
                       torch.randint(0, size, (2, 2 * size), generator=g)), i % 3))
    model = _Graphs().eval()
    loader = torch.utils.data.DataLoader(items, batch_size=16,
                                         collate_fn=lambda batch: _joined(batch, reverse))
    conn = diagql.connect(model, loader, cache_dir=False, progress=False, batch_size=7)
    answer = conn.query("AVG NEURONS IN pool WHERE class = 1")
    with torch.no_grad():  # each graph alone
        truth = torch.cat([model.pool(torch.relu(torch.zeros(len(x), 8).index_add_(
            0, e[1], model.message(x)[e[0]]) + model.own(x)), torch.zeros(len(x), dtype=int))
            for (x, e), _ in items]).double().numpy()
    mine = np.arange(40) % 3 == 1
    np.testing.assert_allclose(answer.values, truth[mine].mean(0), rtol=1e-5)
    # A layer of the nodes is not per graph, and says why.
    with pytest.raises(DiagQLError, match="several rows an item \\(nodes of a graph"):
        conn.query("AVG NEURONS IN own")


class _TimeFirst(nn.Module):
    """A Linear over a time-first (T, B, 4) sequence given by name beside its (B, T) mask."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.proj, self.head = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, mask):
        real = mask.T[..., None].float()
        return self.head((self.proj(x) * real).sum(0) / real.sum(0))


def test_a_time_first_sequence_in_a_mapping_is_one_row_per_item():
    """{"x": (T, B, 4), "mask": (B, T)} had been refused as 'a batch of 1 items came back from
    the collate_fn with 7 inputs' (its time steps), where the same as a tuple answered."""
    g = torch.Generator().manual_seed(6)
    items = [(torch.randn(int(n), 4, generator=g), i % 3)
             for i, n in enumerate(torch.randint(2, 8, (20,), generator=g))]

    def collate(batch):
        x = nn.utils.rnn.pad_sequence([s for s, _ in batch])  # (T, B, 4)
        mask = torch.zeros(len(batch), len(x), dtype=torch.bool)
        for j, (s, _) in enumerate(batch):
            mask[j, :len(s)] = True
        return {"x": x, "mask": mask, "labels": torch.tensor([label for _, label in batch])}

    model = _TimeFirst().eval()
    conn = diagql.connect(model, torch.utils.data.DataLoader(items, batch_size=4,
                                                             collate_fn=collate),
                          cache_dir=False, progress=False)
    with torch.no_grad():
        truth = np.mean([model.proj(s).mean(0).double().numpy() for s, _ in items], axis=0)
    np.testing.assert_allclose(conn.query("AVG NEURONS IN proj USING FULL").values, truth,
                               rtol=1e-5, atol=1e-6)


class _ParametersOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 3))

    def forward(self, x):
        return x @ self.w


def test_evaluate_on_a_model_without_layers_says_so():
    conn = diagql.connect(_ParametersOnly(), (torch.randn(20, 6), torch.randint(0, 3, (20,))),
                          cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="the model has no layer EVALUATE can read"):
        conn.query("EVALUATE SAMPLERS random(0.5) SEEDS 1")


def test_ray_workers_build_a_compiled_models_original():
    from diagql.engine.ray_workers import built_models

    model = _mlp()
    assert built_models(lambda: torch.compile(model, backend="eager")) == {None: model}
    assert built_models({"a": torch.compile(model, backend="eager")}) == {"a": model}


@pytest.mark.parametrize("wrap", [lambda m: torch.compile(m, backend="eager"), nn.DataParallel,
                                  lambda m: nn.DataParallel(torch.compile(m, backend="eager"))],
                         ids=["compiled", "data-parallel", "data-parallel-of-compiled"])
def test_a_checkpoint_saved_from_a_wrapper_loads_into_the_bare_model(wrap, tmp_path):
    torch.manual_seed(6)
    X, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    earlier = _mlp()
    with torch.no_grad():
        for p in earlier.parameters():
            p.mul_(-2.0)
    torch.save(wrap(earlier).state_dict(), tmp_path / "e1.pt")
    conn = diagql.connect(_mlp(), (X, y), checkpoints={"e1": str(tmp_path / "e1.pt")},
                          cache_dir=False, progress=False)
    avg = conn.query("AVG NEURONS IN e1.1 USING FULL")
    np.testing.assert_allclose(avg.values, _hooked(earlier, "1", X).double().mean(0).numpy(),
                               rtol=1e-6)


def test_a_plain_checkpoint_loads_into_a_wrapped_model_and_a_child_named_module_keeps_its_keys():
    from diagql.model.weights import load_state

    torch.manual_seed(16)
    plain = _mlp()
    wrapped = nn.DataParallel(_mlp())
    load_state(wrapped, plain.state_dict(), "e1")  # its keys had lacked "module."
    for mine, theirs in zip(wrapped.module.parameters(), plain.parameters()):
        assert torch.equal(mine, theirs)

    class Holder(nn.Module):  # its own child is named module: "module." is no wrapper's
        def __init__(self):
            super().__init__()
            self.module = _mlp()

    holder, other = Holder(), Holder()
    with torch.no_grad():
        other.module[0].weight.add_(1)
    load_state(holder, other.state_dict(), "e1")
    assert torch.equal(holder.module[0].weight, other.module[0].weight)


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        return {"hidden": h, "logits": self.head(h)}  # the logits are not the first tensor


def test_a_dicts_logits_are_the_models_scores_wherever_they_stand():
    torch.manual_seed(7)
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    model = _DictOut()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    assert conn.n_classes == 3
    with torch.no_grad():
        logits = model(X)["logits"]
    assert (conn.profile.predictions == logits.argmax(1).numpy()).all()


class _NaNLogits(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(x) + torch.log(x[:, :1] + 0.5)  # NaN where x[:, 0] < -0.5


def test_items_whose_scores_are_nan_are_warned_of_and_noted():
    torch.manual_seed(4)
    X, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    bad = torch.nonzero(X[:, 0] < -0.5).flatten()
    conn = diagql.connect(_NaNLogits(), (X, y), cache_dir=False, progress=False)
    said = f"{len(bad)} of 30 items have NaN class scores (the first is item {int(bad[0])};"
    # Every query counts them (WHERE incorrect, GROUP BY predicted): the profile warns.
    with pytest.warns(DiagQLWarning, match=re.escape(said) + ".*WHERE confidence >= 0"):
        conn.profile
    (note,) = conn.query("SHOW PROFILE").notes
    assert note.startswith(said + " or every score -inf): their predictions are arbitrary")
    left = conn.query("AVG NEURONS IN head WHERE confidence >= 0")
    assert left.n_items == 30 - len(bad)
    finite = diagql.connect(_mlp(), (X, y), cache_dir=False, progress=False)
    assert finite.query("SHOW PROFILE").notes == []


class _InfLogits(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.head = nn.Linear(6, 3)

    def forward(self, x):  # +inf for class 2 where x[:, 0] > 0.5; -inf for class 0 elsewhere
        bump = torch.where(x[:, :1] > 0.5, torch.tensor([0.0, 0.0, math.inf]),
                           torch.tensor([-math.inf, 0.0, 0.0]))
        return self.head(x) + bump


def test_an_infinite_logit_is_the_prediction_with_all_the_confidence():
    torch.manual_seed(5)
    X, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    conn = diagql.connect(_InfLogits(), (X, y), cache_dir=False, progress=False)
    with torch.no_grad():
        logits = _InfLogits()(X).double()
    high = (X[:, 0] > 0.5).numpy()
    assert high.any() and (~high).any()
    expected = logits.argmax(1).numpy()
    assert (conn.profile.predictions == expected).all()
    confidence = torch.softmax(logits[~torch.from_numpy(high)], 1).max(1).values.numpy()
    np.testing.assert_allclose(conn.profile.confidence[~high], confidence, rtol=1e-12)
    assert (conn.profile.confidence[high] == 1.0).all()
    assert conn.query("SHOW PROFILE").notes == []


def test_a_binary_log_probability_is_warned_of():
    torch.manual_seed(6)
    X, y = torch.randn(80, 6), torch.randint(0, 2, (80,))
    head = nn.Linear(6, 1)
    model = nn.Sequential(head, nn.LogSigmoid())
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with pytest.warns(DiagQLWarning, match=r"<= 0 for every item.*log1p"):
        conn.profile
    fixed = diagql.connect(model, (X, y), cache_dir=False, progress=False,
                           scores=lambda out: out - torch.log1p(-out.exp()))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        predictions = fixed.profile.predictions
    with torch.no_grad():
        assert (predictions == (head(X)[:, 0] > 0).long().numpy()).all()


def _conv_on(images: torch.Tensor):
    """A 3-channel 8 × 8 conv classifier connected to ``images`` (10 of them)."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    return diagql.connect(model, (images, torch.randint(0, 3, (10,))), cache_dir=False,
                          progress=False)


def test_uint8_images_into_a_float_model_say_to_convert_them():
    conn = _conv_on((torch.rand(10, 3, 8, 8) * 255).to(torch.uint8))
    with pytest.raises(DiagQLError, match=r"the model's forward raised RuntimeError: .*\(the "
                                          r"data's inputs are uint8, which DiagQL passes on "
                                          r"unchanged: convert them to floats"):
        conn.query("AVG NEURONS IN 0")


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_channels_last_images_into_a_channels_first_conv_say_to_permute_them(dtype):
    """(N, H, W, C) images, as PIL and numpy hold them: torch's error named 8 channels where
    3 were expected, and the uint8 hint's remedy led to it (SW2)."""
    X = (torch.rand(10, 8, 8, 3) * 255).to(dtype)
    conn = _conv_on(X)
    with pytest.raises(DiagQLError, match=r"the images look channels-last, \(N, H, W, C\), as "
                                          r"PIL and numpy hold them: permute them to \(N, C, "
                                          r"H, W\)"):
        conn.query("AVG NEURONS IN 0")
    # Channels first, the hint is not given on another failure.
    conn = _conv_on(X.permute(0, 3, 1, 2))
    if dtype == torch.uint8:
        with pytest.raises(DiagQLError) as info:
            conn.query("AVG NEURONS IN 0")
        assert "channels-last" not in str(info.value)


@pytest.mark.parametrize("shape", [(20, 7), (20, 10, 1)])
def test_items_of_another_width_than_a_linear_takes_are_named_with_their_shape(shape):
    """torch's "mat1 and mat2 shapes cannot be multiplied (1x7 and 10x16)" named neither the
    data nor its items' shape (sweep S36)."""
    conn = diagql.connect(nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)),
                          (torch.randn(*shape), torch.arange(20) % 3), cache_dir=False,
                          progress=False)
    width = shape[-1]
    said = (f"(a Linear layer got rows of {width} value{'s' * (width != 1)} where it takes 10: "
            f"the data's items have shape {tuple(shape[1:])}; check that they are what the "
            f"model takes)")
    with pytest.raises(DiagQLError, match=re.escape(said)):
        conn.query("AVG NEURONS IN 0")


def test_uint8_images_a_model_casts_itself_are_blamed_on_their_layout_alone():
    """A model that calls x.float() gets past the dtype: the uint8 hint's remedy (convert them)
    had come first, before the layout's (sweep SY2)."""
    torch.manual_seed(8)

    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x.float()).flatten(1)[:, :3]

    X = (torch.rand(10, 8, 8, 3) * 255).to(torch.uint8)
    conn = diagql.connect(Casting(), (X, torch.randint(0, 3, (10,))), cache_dir=False,
                          progress=False)
    with pytest.raises(DiagQLError) as info:
        conn.query("AVG NEURONS IN conv")
    assert "channels-last" in str(info.value) and "uint8" not in str(info.value)


def test_string_labels_are_refused_naming_them():
    X = torch.randn(6, 6)
    names = np.array(["cat", "dog", "cow"] * 2)
    with pytest.raises(DiagQLError, match=r"labels must be class indices \(whole numbers\), not "
                                          r"'cat', 'dog', 'cow', \.\.\.: number the classes"):
        diagql.connect(_mlp(), (X, names), cache_dir=False, progress=False)
    items = [(X[i], str(names[i])) for i in range(6)]
    conn = diagql.connect(_mlp(), items, cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match=r"labels must be class indices \(whole numbers\), not "
                                          r"'cat'"):
        conn.query("SHOW PROFILE")


class _Gram(nn.Module):
    def forward(self, h):
        return h @ h.T  # (batch, batch): a row per item whose width is the batch's


class _Contrastive(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin, self.gram, self.head = nn.Linear(6, 8), _Gram(), nn.Linear(8, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.head(h + 1e-3 * self.gram(h).mean(1, keepdim=True))


def test_set_latent_refuses_a_layer_whose_shape_changes_with_the_batch():
    conn = diagql.connect(_Contrastive(), (torch.randn(20, 6), torch.randint(0, 3, (20,))),
                          cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match=r"the output shape of layer 'gram' changes with the "
                                          r"batch, so its neurons are not fixed \(line 1, "
                                          r"column 14\)"):
        conn.query("SET latent = gram")
    assert conn.query("SHOW SETTINGS") and conn.settings.latent is None
    assert conn.query("AVG NEURONS IN head USING SAMPLE maxmargin(0.5)").values.shape == (3,)


@pytest.mark.parametrize("text", [["a b", "c d", "e f"], np.array(["a b", "c d", "e f"])],
                         ids=["list", "array"])
def test_a_text_column_beside_the_inputs_is_named(text):
    data = {"text": text, "x": torch.randn(3, 6), "labels": torch.tensor([0, 1, 2])}
    with pytest.raises(DiagQLError, match="the data's column 'text' holds text, not numbers; a "
                                          "mapping's columns are the model's keyword inputs: "
                                          "leave it out"):
        diagql.connect(_mlp(), data, cache_dir=False, progress=False)


def test_a_list_of_two_items_is_two_items_not_a_pair():
    X = torch.randn(2, 6)
    model = _mlp()
    with torch.no_grad():
        predicted = model(X).argmax(1).numpy()
    for items in ([(X[0], 0), (X[1], torch.tensor(1))],
                  [{"x": X[0], "labels": 0}, {"x": X[1], "labels": 1}],
                  # labels as items carry them: a float, a one-element tensor or list
                  [(X[0], 0.0), (X[1], np.float32(1))],
                  [(X[0], torch.tensor([0])), (X[1], [1])]):
        conn = diagql.connect(model, items, cache_dir=False, progress=False)
        assert conn.profile.labels.tolist() == [0, 1]
        assert (conn.profile.predictions == predicted).all()
    pair = diagql.connect(model, [X, torch.tensor([1, 0])], cache_dir=False, progress=False)
    assert pair.profile.labels.tolist() == [1, 0]


def test_an_array_flipped_in_place_is_read_as_it_reads():
    """A view with a negative stride (BGR to RGB, x[:, ::-1]) was refused as ragged input."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 6)).astype(np.float32)
    flipped = X[:, ::-1]
    model = _mlp()
    conn = diagql.connect(model, (flipped, np.arange(20) % 3), cache_dir=False, progress=False)
    with torch.no_grad():
        expected = model(torch.from_numpy(flipped.copy())).argmax(1).numpy()
    assert (conn.profile.predictions == expected).all()


class _FirstCallCache(nn.Module):
    """Keeps a tensor made on its first call, as a positional table or a rotary cache does."""

    def __init__(self):
        super().__init__()
        self.fc, self.act, self.head = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)
        self.table = None

    def forward(self, x):
        if self.table is None:
            self.table = torch.linspace(0.5, 1.0, 8)
        return self.head(self.act(self.fc(x) * self.table))


def test_a_tensor_a_module_keeps_from_a_pass_does_not_break_training_after():
    """DiagQL's passes run under no_grad, not inference mode: an inference tensor kept by the
    model would fail the user's next backward ("Inference tensors cannot be saved")."""
    torch.manual_seed(0)
    X, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    model = _FirstCallCache()
    db = diagql.connect(model, (X, y), progress=False, cache_dir=False)
    answer = db.query("AVG NEURONS IN act")
    with torch.no_grad():
        truth = model.act(model.fc(X) * torch.linspace(0.5, 1.0, 8)).double().mean(0)
    np.testing.assert_allclose(answer.values, truth.numpy(), rtol=1e-6, atol=1e-7)
    assert not model.table.is_inference()
    nn.functional.cross_entropy(model.train()(X), y).backward()  # raised before
    assert model.fc.weight.grad is not None


class _GradientInForward(nn.Module):
    """A forward that takes an input gradient itself (an energy model's, a saliency head's)."""

    def __init__(self):
        super().__init__()
        self.energy, self.fc, self.act, self.head = (nn.Linear(6, 1), nn.Linear(6, 8),
                                                     nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            grad, = torch.autograd.grad(self.energy(x).sum(), x)
        return self.head(self.act(self.fc(x.detach() + grad)))


def test_a_forward_that_takes_gradients_itself_runs():
    torch.manual_seed(0)
    X, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    model = _GradientInForward().eval()
    db = diagql.connect(model, (X, y), progress=False, cache_dir=False)
    answer = db.query("AVG NEURONS IN act")
    moved = X + model.energy.weight.detach()  # the gradient of a linear energy: its weight
    with torch.no_grad():
        truth = model.act(model.fc(moved)).double().mean(0)
    np.testing.assert_allclose(answer.values, truth.numpy(), rtol=1e-6, atol=1e-7)


def test_a_lazy_module_not_yet_run_is_connected_and_queried(tmp_path):
    torch.manual_seed(0)
    X, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.LazyLinear(8), nn.ReLU(), nn.Linear(8, 3))
    db = diagql.connect(model, (X, y), progress=False, cache_dir=tmp_path)  # raised ValueError
    with pytest.warns(DiagQLWarning, match="cached in memory only: .* lazy module's parameter"):
        answer = db.query("AVG NEURONS IN 1")
    with torch.no_grad():
        truth = model[1](model[0](X)).double().mean(0)
    np.testing.assert_allclose(answer.values, truth.numpy(), rtol=1e-6, atol=1e-7)
    again = db.query("AVG NEURONS IN 0")  # no "model changed": its own pass made the weights
    with torch.no_grad():
        np.testing.assert_allclose(again.values, model[0](X).double().mean(0).numpy(),
                                   rtol=1e-6, atol=1e-7)


def test_labels_of_minus_one_everywhere_are_an_unlabelled_split():
    """A Hugging Face test split labels every item -1: it was refused whole, label-free
    queries too; some items' -100 (an ignore index) is refused saying what to do."""
    torch.manual_seed(0)
    X = torch.randn(50, 6)
    model = _mlp()
    db = diagql.connect(model, (X, torch.full((50,), -1)), cache_dir=False, progress=False)
    with pytest.warns(DiagQLWarning, match="every label is -1 .*taken as unlabelled"):
        answer = db.query("AVG NEURONS IN 1")
    np.testing.assert_allclose(answer.values, _hooked(model, "1", X).double().mean(0).numpy(),
                               rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        predicted = model(X).argmax(1)
    top = int(predicted.mode().values)
    assert db.query(f"AVG NEURONS IN 1 WHERE predicted = {top}").n_items == \
        int((predicted == top).sum())
    with pytest.raises(DiagQLError, match="needs the true labels"):
        db.query("AVG NEURONS IN 1 WHERE class = 0")
    some = torch.randint(0, 3, (50,))
    some[:5] = -100
    with pytest.raises(DiagQLError, match="label -100 of item 0 is outside .* 5 of 50 items "
                                          "have such labels: -100 is the ignore index of "
                                          "PyTorch's losses .*: leave those items out"):
        diagql.connect(model, (X, some), cache_dir=False, progress=False).query(
            "AVG NEURONS IN 1")
    # negative labels of several values are refused by name, not said to be "every label is
    # -2" and dropped (sweep S36)
    with pytest.raises(DiagQLError, match="label -3 of item 0 is outside .* the labels take 3 "
                                          "values \\(-3, -2, -1\\)"):
        diagql.connect(model, (X, torch.arange(50) % 3 - 3), cache_dir=False,
                       progress=False).query("AVG NEURONS IN 1")


def test_string_labels_are_refused_saying_classes_names_do_not_translate_them():
    """The advice for class names (classes=) had led users with string labels to a second
    refusal: names are for WHERE; labels must be indices."""
    X = torch.randn(12, 6)
    items = [(x, "dog" if i % 2 else "cat") for i, x in enumerate(X)]
    db = diagql.connect(_mlp(), items, cache_dir=False, progress=False,
                        classes=["cat", "dog", "eel"])
    with pytest.raises(DiagQLError, match="labels must be class indices .* not 'cat', "
                                          ".* it does not translate the labels"):
        db.query("AVG NEURONS IN 1")


@pytest.mark.parametrize("form", ["pair", "dataset", "list"])
def test_bfloat16_labels_are_read_as_their_classes(form):
    # A one-logit model trained with BCEWithLogitsLoss in bfloat16 has labels y.to(bfloat16).
    torch.manual_seed(7)
    X = torch.randn(60, 6)
    y = (X[:, 0] > 0).to(torch.bfloat16)
    data = {"pair": (X, y), "dataset": torch.utils.data.TensorDataset(X, y),
            "list": list(zip(X, y))}[form]
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 1))
    conn = diagql.connect(model, data, cache_dir=False, progress=False)
    avg = conn.query("AVG NEURONS IN 1 WHERE class = 1 USING FULL")
    assert avg.n_items == int((X[:, 0] > 0).sum())
    np.testing.assert_allclose(avg.values, _hooked(model, "1", X)[X[:, 0] > 0].double()
                               .mean(0).numpy(), rtol=1e-6)


def test_show_profile_of_many_classes_lists_each_classs_commonest_mistakes():
    # A 20-class confusion matrix no longer fits a terminal: each class gets its accuracy and
    # the classes it is most often predicted as, the worst classes first.
    torch.manual_seed(9)
    classes = 30
    X, y = torch.randn(600, 8), torch.randint(0, classes, (600,))
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, classes))
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    shown = conn.query("SHOW PROFILE")
    assert shown.columns == ["class", "items", "accuracy", "predicted instead (items)"]
    with torch.no_grad():
        predicted = model(X).argmax(1).numpy()
    truth = y.numpy()
    accuracy = [float(np.mean(predicted[truth == c] == c)) for c in range(classes)]
    assert [row[0] for row in shown.rows] == sorted(range(classes),
                                                    key=lambda c: (accuracy[c], c))
    for c, items, _, instead in shown.rows:
        assert items == int((truth == c).sum())
        wrong = np.bincount(predicted[(truth == c) & (predicted != c)], minlength=classes)
        if wrong.any():
            first = int(instead.split(" (")[0])
            assert wrong[first] == wrong.max()
            assert instead.split(", ")[0] == f"{first} ({wrong.max()})"
        else:
            assert instead == ""
    assert "confusion_matrix()" in " ".join(shown.notes)
    np.testing.assert_array_equal(conn.profile.confusion_matrix().sum(1),
                                  np.bincount(truth, minlength=classes))


def test_a_compiled_part_is_fingerprinted_through_its_original(tmp_path):
    torch.manual_seed(11)
    X, y = torch.randn(30, 6), torch.randint(0, 3, (30,))

    def made(seed):
        model = _mlp()
        with torch.no_grad():
            model[0].weight.add_(seed)
        model[0] = torch.compile(model[0], backend="eager")
        return model

    answers = []
    for seed in (1, 2):
        model = made(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error", DiagQLWarning)  # cached on disk, not in memory only
            conn = diagql.connect(model, (X, y), cache_dir=tmp_path, progress=False)
            answers.append(conn.query("AVG NEURONS IN 1 USING FULL").values)
        np.testing.assert_allclose(answers[-1], _hooked(model, "1", X).double().mean(0).numpy(),
                                   rtol=1e-6)
    assert not np.allclose(*answers)  # another compiled part's weights: another model


class _BatchCentred(nn.Module):
    """Centres its hidden layer over the batch: an item's outputs depend on its batch mates,
    as dynamic quantization's per-batch scales make them."""

    def __init__(self, centred: bool):
        super().__init__()
        self.fc, self.head, self.centred = nn.Linear(6, 8), nn.Linear(8, 3), centred

    def forward(self, x):
        h = self.fc(x)
        return self.head(h - h.mean(0, keepdim=True) if self.centred else h)


@pytest.mark.parametrize("centred", [False, True])
def test_a_model_whose_items_depend_on_their_batch_is_warned_of(centred):
    """AVG ... WHERE class = 1 and GROUP BY class's group 1 had differed by 1% (the groups
    run in other batches), silently."""
    torch.manual_seed(0)
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diagql.connect(_BatchCentred(centred), (X, y), cache_dir=False, progress=False).layers
    told = [w for w in caught if issubclass(w.category, diagql.DiagQLWarning)
            and "other outputs when other items share its batch" in str(w.message)]
    assert len(told) == (1 if centred else 0)
    assert not [w for w in caught if "different outputs on two passes" in str(w.message)]
    assert all("WHERE and samples run other batches" in str(w.message) for w in told)


def _batch_centred_world():
    """40 items, 3 classes, a batch-centred model connected in batches of 8: (X, y, model,
    conn)."""
    torch.manual_seed(0)
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    model = _BatchCentred(True).eval()
    return X, y, model, diagql.connect(model, (X, y), batch_size=8, cache_dir=False,
                                       progress=False)


def test_group_by_runs_the_batches_of_the_exact_pass_on_a_batch_dependent_model():
    """The warning above had said GROUP BY runs other batches than an exact pass; it runs
    every item in order, so its groups are those of plain torch over the same batches."""
    X, y, model, conn = _batch_centred_world()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = conn.query("AVG NEURONS IN head GROUP BY class USING FULL")
    with torch.no_grad():
        rows = torch.cat([model(X[i:i + 8]) for i in range(0, 40, 8)]).double().numpy()
    got = result.to_pandas().pivot(index="class", columns="neuron", values="value")
    for c in range(3):
        np.testing.assert_allclose(got.loc[c].to_numpy(), rows[(y == c).numpy()].mean(0),
                                   rtol=1e-6, atol=1e-7)


def test_a_where_on_a_batch_dependent_model_says_its_batches_differ():
    """A WHERE's exact answer (its matching items batched among themselves) had read "exact"
    beside an eval loop's up to 4.6 away (sweep SS7: BatchNorm with batch statistics), with
    the warning said once per session; every such answer now carries the note, while a pass
    over every item in order (plain torch's batches) does not."""
    X, y, model, conn = _batch_centred_world()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        where = conn.query("AVG NEURONS IN fc WHERE class = 1")
        sampled = conn.query("AVG NEURONS IN fc USING SAMPLE random(0.5)")
        every = conn.query("AVG NEURONS IN fc")
    with torch.no_grad():
        mine = model.fc(X[y == 1]).double().mean(0).numpy()  # fc itself needs no batch
    np.testing.assert_allclose(where.values, mine, rtol=1e-6, atol=1e-7)
    said = "the model's outputs depend on the batch: this pass ran the "
    assert any(note.startswith(said + "matching items") for note in where.notes)
    assert any(note.startswith(said + "sampled matching items") for note in sampled.notes)
    assert not any(note.startswith(said) for note in every.notes)


class _BatchBranch(nn.Module):
    """Adds a block for batches whose mean first feature is positive (a branch on the batch)."""

    def __init__(self):
        super().__init__()
        self.fc, self.extra, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        if x[:, 0].mean() > 0:
            h = h + self.extra(h)
        return self.head(h)


def test_a_branch_on_the_batch_is_warned_of_where_the_first_items_all_take_it():
    """The first items all took the branch, alone and together, so the model looked
    batch-independent; a sample then answered for `extra` over every item, though it runs
    for some batches only. Items spread over the data tell it."""
    torch.manual_seed(1)
    X, y = torch.randn(300, 6), torch.randint(0, 3, (300,))
    X[:6, 0] = X[:6, 0].abs() + 0.1  # the first items take it, alone and together
    X[6:, 0] = torch.where(torch.arange(294) % 2 == 0, 1.0, -1.0) * X[6:, 0].abs()
    with torch.no_grad():  # truth: three spread items differ alone and together
        model = _BatchBranch().eval()
        spread = [100, 200, 299]
        assert not torch.allclose(model(X[spread]), torch.cat([model(X[i:i + 1])
                                                               for i in spread]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diagql.connect(model, (X, y), cache_dir=False, progress=False).layers
    assert [w for w in caught if "other outputs when other items share its batch"
            in str(w.message)]


class _Squeezed(nn.Module):
    """A classifier whose forward ends in ``.squeeze()``, as many are written: a batch of one
    item gives (3,) where (1, 3) is meant."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.out = nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.act(self.fc1(x))).squeeze()


class _Sizes(nn.Module):
    """Records the batch sizes its forward is called with."""

    def __init__(self):
        super().__init__()
        self.fc, self.out, self.seen = nn.Linear(6, 8), nn.Linear(8, 3), set()

    def forward(self, x):
        self.seen.add(len(x))
        return self.out(torch.relu(self.fc(x)))


def test_batches_of_one_run_every_item_alone():
    """connect(batch_size=1) ran the last two items together, the one padded to the other's
    length by a padding collate (a point cloud's TOKEN -1 read 0.532 for 1.806)."""
    torch.manual_seed(0)
    model = _Sizes().eval()
    X, y = torch.randn(9, 6), torch.randint(0, 3, (9,))
    conn = diagql.connect(model, (X, y), batch_size=1, cache_dir=False, progress=False)
    assert conn.catalog is not None  # the probe's batches (1 to 3 items, its checks') done
    # Recorded by a hook of the test's: clearing the model's own set is a change of the
    # model, which the next statement notices (and probes again).
    sizes = set()
    model.register_forward_pre_hook(lambda module, args: sizes.add(len(args[0])))
    conn.query("SHOW PROFILE")
    conn.query("AVG NEURONS IN fc USING FULL")
    assert sizes == {1}


@pytest.mark.parametrize("collated", [False, True])
def test_no_batch_holds_one_item_alone_after_others(collated):
    """257 items in batches of 256 had left one item alone in the last batch: a forward
    ending in .squeeze() failed the profile pass with a raw ValueError. The last two
    batches are 255 + 2 now, and every answer is plain torch's."""
    from diagql.model.data import spans

    assert spans(257, 256) == [(0, 257)] and spans(513, 256) == [(0, 256), (256, 513)]
    assert spans(1, 256) == [(0, 1)] and spans(512, 256) == [(0, 256), (256, 512)]
    # Batches of 1 are one item each by choice, so that no item is padded to another's.
    assert spans(3, 1) == [(0, 1), (1, 2), (2, 3)]
    torch.manual_seed(0)
    model = _Squeezed().eval()
    X, y = torch.randn(257, 6), torch.randint(0, 3, (257,))
    data = DataLoader(TensorDataset(X, y), batch_size=256, collate_fn=lambda b: (
        torch.stack([x for x, _ in b]), torch.stack([t for _, t in b]))) if collated else (X, y)
    conn = diagql.connect(model, data, cache_dir=False, progress=False)
    with torch.no_grad():
        out, act = model(X), model.act(model.fc1(X)).double()
    mistakes = out.argmax(dim=1) != y
    answer = conn.query("AVG NEURONS IN act WHERE incorrect")
    assert answer.n_items == int(mistakes.sum())
    np.testing.assert_allclose(answer.values, act[mistakes].mean(dim=0).numpy(), rtol=1e-5,
                               atol=1e-6)


def test_a_model_that_fails_on_the_probes_batch_of_one_is_told_so():
    """A BatchNorm without running statistics runs on the user's batches of 100 and fails on
    one item: the error had read as the model's alone, naming no batch of one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False),
                          nn.ReLU(), nn.Linear(8, 3)).eval()
    X, y = torch.randn(100, 6), torch.randint(0, 3, (100,))
    model(X)  # the user's batch runs
    with pytest.raises(DiagQLError, match="Expected more than 1 value per channel.*probe of "
                                          "the model with a batch of 1 item.*BatchNorm"):
        diagql.connect(model, (X, y), cache_dir=False, progress=False).query("SHOW LAYERS")


class _Spectrum(nn.Module):
    """An FFT module: its output is complex."""

    def forward(self, x):
        return torch.fft.rfft(x, dim=1)


def test_a_layer_of_complex_numbers_is_refused_naming_why():
    """AVG over an rfft's output had answered its real part (-0.8457 for -0.8457-0.3482j)
    with only torch's warning, TOPK ranked by it and BY MAX crashed."""
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fft, self.head = _Spectrum(), nn.Linear(5, 3)

        def forward(self, x):
            return self.head(self.fft(x).abs())

    net = Model().eval()
    X, y = torch.randn(60, 8), torch.randint(0, 3, (60,))
    conn = diagql.connect(net, (X, y), cache_dir=False, progress=False)
    for query in ("AVG NEURONS IN fft", "TOPK 2 NEURONS IN fft BY MAX", "ARGMAX NEURONS IN fft"):
        with pytest.raises(DiagQLError, match="layer 'fft' cannot be queried: it returns complex "
                                              "numbers.*magnitude"):
            conn.query(query)
    with torch.no_grad():
        want = net.head(net.fft(X).abs()).double().mean(dim=0).numpy()
    np.testing.assert_allclose(conn.query("AVG NEURONS IN head").values, want, rtol=1e-5,
                               atol=1e-6)


class _ReadsItsBatch(nn.Module):
    """forward(batch) reading batch["x"], Lightning's style."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, batch):
        return self.fc(batch["x"])


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence")  # the tensor read as a dict
def test_a_mapping_of_one_entry_passed_as_forwards_argument_says_how_to_pass_it_whole():
    """Items ({"x": t}, y) for forward(batch): the one entry is passed as the argument (as
    {"image": t} for forward(x) wants), and the forward's own TypeError was all it said."""
    torch.manual_seed(0)
    model = _ReadsItsBatch().eval()
    X, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    items = [({"x": X[i]}, int(y[i])) for i in range(20)]
    with pytest.raises(DiagQLError, match="the mapping's one entry 'x' was passed as forward's "
                                          r"argument.*\(\(mapping,\), y\)") as caught:
        diagql.connect(model, items, cache_dir=False, progress=False).query("SHOW LAYERS")
    assert "batch of 2 runs" not in str(caught.value)  # not the batch of one's fault
    whole = [(({"x": X[i]},), int(y[i])) for i in range(20)]
    conn = diagql.connect(model, whole, cache_dir=False, progress=False)
    with torch.no_grad():
        want = model.fc(X).double().mean(dim=0).numpy()
    np.testing.assert_allclose(conn.query("AVG NEURONS IN fc").values, want, rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("n", [2, 3])
def test_a_sample_of_a_data_set_of_two_or_three_items_answers(n):
    """Every sample query on 2 or 3 items had raised numpy's 'Singular matrix' (the latent's
    minor components solved against collinear covariates)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(),
                          nn.Linear(8, 3)).eval()
    X, y = torch.randn(n, 6), torch.arange(n) % 2
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with torch.no_grad():
        rows = model[1](model[0](X)).double().numpy()
    for sampler in ("random(1)", "random(2)", "stratified(2)"):
        assisted = conn.query(f"AVG NEURONS IN 1 USING SAMPLE {sampler}")
        assert np.isfinite(assisted.values).all()
        conn.query("SET estimator = plain")  # the sample's own mean, to compare with
        plain = conn.query(f"AVG NEURONS IN 1 USING SAMPLE {sampler}")
        conn.query("SET estimator = assisted")
        drawn = conn.sample(sampler)
        np.testing.assert_allclose(plain.values, rows[drawn].mean(axis=0), rtol=1e-5,
                                   atol=1e-6)
    assert conn.query("AVG NEURONS IN 1 USING AUTO").n_items == n


def test_samplers_that_read_the_latents_refuse_one_item_and_one_class_naming_themselves():
    """gmm and latentgrid on 1 item had raised scikit-learn's and numpy's own errors; weighted
    on data of one class said 'maxmargin needs ...'."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    one = diagql.connect(model, (torch.randn(1, 6), torch.tensor([1])), cache_dir=False,
                         progress=False)
    for sampler in ("gmm", "latentgrid", "vas", "maxmargin"):
        with pytest.raises(DiagQLError, match=f"{sampler} draws from the spread of the latents, "
                                              f"which one item has not"):
            one.query(f"AVG NEURONS IN 1 USING SAMPLE {sampler}(0.5)")
    assert one.query("AVG NEURONS IN 1 USING SAMPLE random(0.5)").n_items == 1
    single = diagql.connect(model, (torch.randn(40, 6), torch.zeros(40, dtype=torch.long)),
                            cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="the SVM that maxmargin and weighted rate items by "
                                          "needs items of at least two true classes"):
        single.query("AVG NEURONS IN 1 USING SAMPLE weighted(0.5)")


class _ConvNeXtBlock(nn.Module):
    """A ConvNeXt block's layout: a conv map permuted to channels-last, a LayerNorm and two
    Linears over its channels, permuted back."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.norm, self.pw1, self.act = nn.LayerNorm(6), nn.Linear(6, 12), nn.GELU()
        self.pw2, self.head = nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x):
        x = self.stem(x)
        t = self.pw2(self.act(self.pw1(self.norm(x.permute(0, 2, 3, 1)))))
        return self.head((x + t.permute(0, 3, 1, 2)).mean(dim=(2, 3)))


def test_a_channels_last_maps_channels_are_its_last_axis():
    """CHANNELS of a map a Linear or LayerNorm made over a permuted (H, W, C) map (and of the
    activation after it) averaged its rows: 5 "channels" where it has 6 and 12."""
    model = _ConvNeXtBlock()
    X, y = torch.randn(120, 3, 5, 7), torch.randint(0, 3, (120,))
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    for name, channels in (("norm", 6), ("pw1", 12), ("act", 12), ("stem", 6)):
        out = _hooked(model, name, X).double()
        last = name != "stem"
        means = out.mean(dim=(1, 2) if last else (2, 3))  # each item's channel means
        assert db.catalog[name].channels == channels
        result = db.query(f"AVG CHANNELS IN {name}")
        np.testing.assert_allclose(result.values, means.mean(0).numpy(), atol=1e-9)
        shares = np.bincount(means.argmax(1).numpy(), minlength=channels) / len(X)
        np.testing.assert_allclose(db.query(f"ARGMAX CHANNELS IN {name}").values, shares)
        np.testing.assert_allclose(db.query(f"AVG NEURONS IN {name}").values,
                                   out.reshape(len(X), -1).mean(0).numpy(), atol=1e-9)
    assert "channels: the last axis (12)" in str(db.query("DESCRIBE pw1"))
    c = 5
    top = db.query(f"TOPK 3 INPUTS FOR CHANNEL pw1[{c}]")
    means = _hooked(model, "pw1", X).double().mean(dim=(1, 2))[:, c]
    assert top.items.tolist() == torch.argsort(-means, stable=True)[:3].tolist()
    means = _hooked(model, "pw1", X).double().mean(dim=(1, 2)).numpy()
    assisted = db.query("AVG CHANNELS IN pw1 USING SAMPLE random(0.5)")
    low, high = assisted.estimate.ci_low, assisted.estimate.ci_high
    assert ((low <= means.mean(0)) & (means.mean(0) <= high)).sum() >= 10  # of 12, at 95%
    db.execute("SET estimator = plain")
    sample = db.sample("random(0.5)")
    np.testing.assert_allclose(db.query("AVG CHANNELS IN pw1 USING SAMPLE random(0.5)").values,
                               means[sample].mean(0), atol=1e-9)


class _Permute(nn.Module):
    """torchvision's ops.misc.Permute, which its ConvNeXt's blocks use."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class _PermutedMap(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.to_last = nn.Conv2d(3, channels, 3, padding=1), _Permute([0, 2, 3, 1])
        self.act, self.head = nn.GELU(), nn.Linear(channels, 3)

    def forward(self, x):
        return self.head(self.act(self.to_last(self.conv(x))).mean(dim=(1, 2)))


@pytest.mark.parametrize("channels,memory", [(8, "contiguous"), (6, "contiguous"),
                                             (8, "channels_last")])
def test_a_map_permuted_to_channels_last_by_a_module_has_its_channels_last(channels, memory):
    """A Permute module's (N, H, W, C) output, and the GELU's after it, which no Linear or
    LayerNorm made: its channels were read from its H axis, silently where H == C. The
    Permute's output is a view of its input with the input's axis 1 last; the GELU keeps
    its strides, or its shape (in channels_last memory the permuted map is contiguous)."""
    model = _PermutedMap(channels)
    X, y = torch.randn(150, 3, 8, 8), torch.randint(0, 3, (150,))
    X = X.to(memory_format=getattr(torch, f"{memory}_format" if memory == "contiguous"
                                   else memory))
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    for name in ("to_last", "act"):
        means = _hooked(model, name, X).double().mean(dim=(1, 2))  # (items, C)
        assert db.catalog[name].channels == channels
        np.testing.assert_allclose(db.query(f"AVG CHANNELS IN {name}").values,
                                   means.mean(0).numpy(), atol=1e-9)
        shares = np.bincount(means.argmax(1).numpy(), minlength=channels) / len(X)
        np.testing.assert_allclose(db.query(f"ARGMAX CHANNELS IN {name}").values, shares)
    # The conv's channels stay first (axis 1), in channels_last memory too.
    conv = _hooked(model, "conv", X).double().mean(dim=(2, 3))
    np.testing.assert_allclose(db.query("AVG CHANNELS IN conv").values, conv.mean(0).numpy(),
                               atol=1e-9)


class _LayerNorm2d(nn.LayerNorm):
    """A LayerNorm over a (C, H, W) map's channels, permuted to last and back (timm's
    LayerNorm2d; Hugging Face's ConvNextLayerNorm(data_format="channels_first"))."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _ChannelsFirstNorm(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.norm = nn.Conv2d(3, channels, 3, padding=1), _LayerNorm2d(channels)
        self.head = nn.Linear(channels, 3)

    def forward(self, x):
        return self.head(self.norm(self.stem(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("channels,side", [(8, 12), (8, 8)])
def test_a_layernorm_over_channels_first_keeps_them_first(channels, side):
    """A LayerNorm subclass that permutes to normalise its channels and back had been read as
    channels-last: CHANNELS of ConvNeXt's embeddings were its 12 columns (all near 0), and
    silently wrong where the width equals the channels."""
    model = _ChannelsFirstNorm(channels)
    X, y = torch.randn(60, 3, side, side), torch.randint(0, 3, (60,))
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    out = _hooked(model, "norm", X).double()
    assert db.catalog["norm"].channels == channels
    np.testing.assert_allclose(db.query("AVG CHANNELS IN norm").values,
                               out.mean(dim=(2, 3)).mean(0).numpy(), atol=1e-9)


class _ConvLayerNormBlock(nn.Module):
    """Wav2Vec2's feature encoder layer: conv, transpose, LayerNorm, transpose back, GELU."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm, self.act = nn.Conv1d(1, 6, 5, stride=3), nn.LayerNorm(6), nn.GELU()

    def forward(self, x):
        return self.act(self.norm(self.conv(x).transpose(1, 2)).transpose(1, 2))


class _AudioNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer, self.head = _ConvLayerNormBlock(), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(dim=2))


def test_an_activation_after_a_transpose_back_keeps_the_convs_layout():
    """The GELU's input is made by no module (a transpose back): it had been read as a
    sequence, its 16 channels "tokens" of 79 hidden units, and CHANNELS refused."""
    model = _AudioNet()
    X, y = torch.randn(50, 1, 64), torch.randint(0, 3, (50,))
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    for name in ("layer", "layer.act"):
        out = _hooked(model, name, X).double()  # (items, 6 channels, 20 frames)
        assert db.catalog[name].channels == 6
        np.testing.assert_allclose(db.query(f"AVG CHANNELS IN {name}").values,
                                   out.mean(dim=(0, 2)).numpy(), atol=1e-9)
        np.testing.assert_allclose(db.query(f"AVG NEURONS IN {name}").values,
                                   out.reshape(len(X), -1).mean(0).numpy(), atol=1e-9)


class _BatchSimilarities(nn.Module):
    """CLIP's output: the batch × batch similarities of its two encoders' embeddings."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img, self.txt = nn.Linear(6, 8), nn.Linear(5, 8)

    def forward(self, a, b):
        return self.img(a) @ self.txt(b).T


@pytest.mark.parametrize("batch_size", [256, 64])
def test_scores_whose_width_follows_the_batch_are_refused_naming_why(
        batch_size):
    """Read as class scores they made 200 classes in one batch of 200 items (every WHERE
    meaningless), and a raw numpy broadcast error with batches of 64."""
    a, b = torch.randn(200, 6), torch.randn(200, 5)
    items = [((a[i], b[i]), 0) for i in range(200)]
    db = diagql.connect(_BatchSimilarities(), items, cache_dir=False, progress=False,
                        batch_size=batch_size)
    assert db.query("SHOW LAYERS").rows  # listed
    with pytest.raises(DiagQLError, match=r"change shape with the batch \(per-item shapes "
                                          r"\(2,\), \(3,\) for batches of 2, 3 items"):
        db.query("AVG NEURONS IN img")


class _AuxLossBlock(nn.Module):
    """A mixture-of-experts-style block: an auxiliary loss (0-d) beside its per-item output."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(10, 8)

    def forward(self, x):
        h = torch.relu(self.linear(x))
        return {"aux_loss": h.pow(2).mean(), "hidden": h}


class _AuxLossNet(nn.Module):
    """Returns (loss, logits): the scores are the tensor after the scalar."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blk = _AuxLossBlock()
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out = self.blk(x)
        return out["aux_loss"], self.head(out["hidden"])


def test_a_scalar_beside_the_activation_is_passed_over():
    """A block's {'aux_loss': 0-d, 'hidden': h} is read as h, and a model's (loss, logits) as
    its logits (truth: plain torch); the scalar had been taken as the output and refused."""
    model = _AuxLossNet().eval()
    X, y = torch.randn(200, 10), torch.randint(0, 3, (200,))
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with torch.no_grad():
        hidden = model.blk(X)["hidden"].double().numpy()
        predicted = model(X)[1].argmax(dim=1).numpy()
    result = db.query("AVG NEURONS IN blk WHERE class = 1")
    np.testing.assert_allclose(result.values, hidden[y.numpy() == 1].mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(db.profile.predictions, predicted)


def test_a_latent_named_by_a_number_is_the_layer_written():
    """In an nn.Sequential of eleven modules and more, `SET latent = 0.10` lexes as the float
    0.1: it had set the layer 0.1 (another width) without a word."""
    torch.manual_seed(0)
    body = [nn.Linear(6, 6) if i % 2 == 0 else nn.ReLU() for i in range(10)]
    model = nn.Sequential(nn.Sequential(*body, nn.Linear(6, 4), nn.ReLU()), nn.Linear(4, 3))
    X, y = torch.randn(120, 6), torch.randint(0, 3, (120,))
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    conn.execute("SHOW MODELS;\nSET latent = 0.10")  # a script: positions are its own
    assert conn.settings.latent == "0.10"
    assert conn.profile.latents.shape[1] == 4  # 0.10's four outputs, not 0.1's six
    conn.query("SET latent = 0.1")
    assert conn.settings.latent == "0.1" and conn.profile.latents.shape[1] == 6


def test_nan_and_infinite_activations_raise_no_numpy_warnings():
    """NaN class scores and an infinite column reached stderr as numpy's "invalid value
    encountered in subtract" with its source line, beside DiagQL's own warning and refusal."""
    import warnings

    class Poisoned(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.fc, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = self.fc(x).clone()
            h[:, 2], h[:, 3] = float("nan"), float("inf")
            return self.head(h)

    X, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    conn = diagql.connect(Poisoned(), (X, y), cache_dir=False, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        conn.profile
        with pytest.raises(DiagQLError, match="NaN or infinite activations"):
            conn.query("TOPK 3 NEURONS IN head")
    assert [w for w in caught if issubclass(w.category, RuntimeWarning)] == []


def test_a_node_layer_of_graphs_whose_first_have_one_node_says_several_rows_an_item():
    """The probe's first graphs had one node each, so the node rows followed the batch there;
    past them they were several an item, and the layer had been refused as rows in an order
    of their own (a batch sorted for pack_padded_sequence, experts), not as what it is."""
    g = torch.Generator().manual_seed(6)
    items = []
    for i in range(30):
        size = 1 if i < 3 else int(torch.randint(3, 9, (1,), generator=g))
        items.append(((torch.randn(size, 5, generator=g),
                       torch.randint(0, size, (2, 2 * size), generator=g)), i % 3))
    loader = torch.utils.data.DataLoader(items, batch_size=8, collate_fn=_joined)
    conn = diagql.connect(_Graphs().eval(), loader, cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="several rows an item \\(nodes of a graph") as caught:
        conn.query("AVG NEURONS IN own")
    assert "pack_padded_sequence" not in caught.value.message
    assert conn.query("AVG NEURONS IN pool").n_items == 30


class _TwoBranch(nn.Module):
    """A frozen half-precision embedding registered first, a float32 conv branch that reads
    the float image (``defensive``: cast back to float32 by the forward itself)."""

    def __init__(self, defensive: bool):
        super().__init__()
        self.defensive = defensive
        self.text = nn.Embedding(50, 8).half().requires_grad_(False)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.head = nn.Linear(4 * 36 + 8, 3)

    def forward(self, ids, img):
        if self.defensive:
            img = img.float()
        t = self.text(ids).float().mean(1)
        return self.head(torch.cat([torch.relu(self.conv(img)).flatten(1), t], 1))


@pytest.mark.parametrize("defensive", [False, True], ids=["plain", "cast back"])
def test_a_mixed_dtype_model_gets_its_float_inputs_in_its_main_branchs_dtype(defensive):
    """Inputs took the first floating parameter's dtype, a frozen half embedding's: the conv
    branch refused the half image, or, cast back by the forward, answered 1e-4 off torch
    (sweep LL1). An embedding takes indices: the conv's float32 is the image's."""
    torch.manual_seed(0)
    model = _TwoBranch(defensive).eval()
    X = {"ids": torch.randint(0, 50, (120, 5)), "img": torch.randn(120, 1, 6, 6) * 3 + 10,
         "label": torch.arange(120) % 3}
    conn = diagql.connect(model, X, cache_dir=False, progress=False)
    _full_mean_is_torchs(conn, model, "conv", X["ids"], X["img"])


class _Ensemble(nn.Module):
    """torch.func's model ensembling: ``base`` run with each member's weights under vmap."""

    def __init__(self):
        super().__init__()
        from torch.func import stack_module_state

        members = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)) for _ in range(3)]
        stacked, _ = stack_module_state(members)
        self.names = list(stacked)
        self.stacked = nn.ParameterDict({k.replace(".", "_"): nn.Parameter(v)
                                         for k, v in stacked.items()})
        self.base = members[0]
        self.pre = nn.Linear(6, 6)

    def forward(self, x):
        from torch.func import functional_call, vmap

        x = self.pre(x)
        weights = {k: self.stacked[k.replace(".", "_")] for k in self.names}
        return vmap(lambda w, x: functional_call(self.base, w, (x,)),
                    in_dims=(0, None))(weights, x).mean(0)


def test_modules_run_inside_a_vmap_are_refused_and_the_others_answer():
    """A hook inside vmap sees the transform's batched values, which DiagQL kept and later
    compared, so every query failed with torch's traceback (sweep LL1): those modules are
    refused by name, and a layer outside the transform answers as torch's."""
    torch.manual_seed(0)
    model = _Ensemble().eval()
    X, y = torch.randn(90, 6), torch.arange(90) % 3
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    for layer in ("base", "base.0"):
        with pytest.raises(DiagQLError, match="inside a torch.func transform"):
            conn.query(f"AVG NEURONS IN {layer}")
    _full_mean_is_torchs(conn, model, "pre", X)


class _Routed(nn.Module):
    """Each item through expert ``a`` or ``b`` by the sign of its first feature."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(6, 4), nn.Linear(6, 4), nn.Linear(4, 3)

    def forward(self, x):
        chosen = x[:, 0] > 0
        h = torch.zeros(len(x), 4)
        if chosen.any():
            h[chosen] = self.a(x[chosen])
        if (~chosen).any():
            h[~chosen] = self.b(x[~chosen])
        return self.head(h)


def test_an_expert_the_first_items_all_went_to_is_refused_for_holding_fewer_rows():
    """The probe's first items all routed to ``a``: its rows followed their batches there, and
    past them it holds fewer rows than items; the refusal had said it held several an item
    (nodes of a graph), the opposite (sweep LL1)."""
    torch.manual_seed(0)
    X, y = torch.randn(200, 6), torch.arange(200) % 3
    X[:3, 0] = X[:3, 0].abs() + 0.1
    conn = diagql.connect(_Routed().eval(), (X, y), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="fewer rows than its batch's items") as caught:
        conn.query("AVG NEURONS IN a")
    assert "several rows an item" not in caught.value.message
    assert conn.query("AVG NEURONS IN head").n_items == 200


class _Stemmed(nn.Module):
    """A float32 stem (or LayerNorm) before a lower-precision body, cast back by the body."""

    def __init__(self, body_dtype, stem):
        super().__init__()
        self.stem = nn.LayerNorm(6) if stem == "norm" else nn.Linear(6, 6)
        self.body = nn.Linear(6, 16).to(body_dtype)
        self.head = nn.Linear(16, 3).to(body_dtype)

    def forward(self, x):
        h = self.stem(x).to(self.body.weight.dtype)
        return self.head(torch.relu(self.body(h))).float()


@pytest.mark.parametrize("body_dtype, stem", [(torch.bfloat16, "linear"),
                                              (torch.float16, "norm")],
                         ids=["bf16 body", "half body"])
def test_a_float32_stem_before_a_low_precision_body_takes_float32_inputs(body_dtype, stem):
    """The first module that takes the input decides its dtype, however many parameters the
    body holds (counting them had cast the input to the body's dtype: refused, or 5.5e-5 off
    torch after a float32 LayerNorm, review MM1)."""
    torch.manual_seed(0)
    model = _Stemmed(body_dtype, stem).eval()
    X, y = torch.randn(90, 6) * 3, torch.arange(90) % 3
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    _full_mean_is_torchs(conn, model, "stem", X)


def test_the_probes_copy_of_a_batch_detaches_tensors_in_slots_and_containers():
    """deepcopy refuses a tensor with autograd history that is no leaf; the probe's copy of
    the first batch finds such tensors in mappings, sequences, attributes and __slots__
    (an object with __slots__ had still failed: review MM1), and copies them detached."""
    from diagql.model.forward import kept_copy

    @dataclasses.dataclass(slots=True)
    class Batch:
        x: torch.Tensor
        n: int

    X, Y = (torch.randn(3, 2, requires_grad=True) * 2.0 for _ in range(2))
    copied = kept_copy({"batch": Batch(X, 3), "more": [(Y, 1)]})
    assert torch.equal(copied["batch"].x, X.detach()) and copied["batch"].n == 3
    assert not copied["more"][0][0].requires_grad and torch.equal(copied["more"][0][0], Y)


class _Scaled(nn.Module):
    """A half body and a float32 logit scale at the root, registered after it (CLIP's)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 16).half()
        self.head = nn.Linear(16, 3).half()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return (self.head(torch.relu(self.body(x))).float() * self.scale).float()


def test_a_parameter_at_the_root_does_not_decide_the_inputs_dtype():
    """The root's own parameters come first in every walk: a float32 logit scale cast a half
    model's inputs to float32, and every query failed (review NN1)."""
    torch.manual_seed(0)
    model = _Scaled().eval()
    X, y = torch.randn(90, 6).half(), torch.arange(90) % 3
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    _full_mean_is_torchs(conn, model, "body", X)


class _Projected(nn.Module):
    """A float32 input projection held at the root as a raw parameter, then a half body."""

    def __init__(self):
        super().__init__()
        self.project = nn.Parameter(torch.randn(6, 6))
        self.body = nn.Linear(6, 16).half()
        self.head = nn.Linear(16, 3).half()

    def forward(self, x):
        return self.head(torch.relu(self.body((x @ self.project).half()))).float()


def test_a_model_of_mixed_dtypes_takes_its_inputs_as_given():
    """Whichever parameter's dtype the inputs took, some mix broke: the root's float32
    projection before a half body had them cast to half (review NN2), where the half logit
    scale's model took them as float32. Where the parameters mix dtypes the data stay as
    given, as the model itself takes them; where they share one they take it."""
    from diagql.model.forward import Cast
    from diagql.session.models import input_dtype

    torch.manual_seed(0)
    model = _Projected().eval()
    X, y = torch.randn(90, 6), torch.arange(90) % 3
    mixed = input_dtype(model)
    assert mixed == Cast(torch.float32, frozenset({torch.float32, torch.float16}))
    assert input_dtype(_Scaled()) == mixed
    assert input_dtype(nn.Sequential(nn.Linear(4, 4)).half()) == torch.float16
    assert input_dtype(_TwoBranch(False)) == torch.float32  # its half embedding takes indices
    # float32 data as given; numpy's float64, none of its dtypes, as its widest (review NN3)
    for data in ((X, y), (X.double().numpy(), y.numpy())):
        conn = diagql.connect(model, data, cache_dir=False, progress=False)
        _full_mean_is_torchs(conn, model, "body", X)


def test_a_transformer_encoder_on_its_fast_path_with_a_padding_mask_connects():
    """nn.TransformerEncoder's fast path hands its layers nested tensors, which have no
    shape; the probe read one's, tracing token ids, and the connection failed, blamed on the
    model (review NN3)."""
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8, padding_idx=0)
            layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 1)  # enable_nested_tensor by default
            self.head = nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask):
            h = self.enc(self.emb(input_ids), src_key_padding_mask=attention_mask == 0)
            return self.head(h[:, 0])

    lengths = torch.randint(3, 9, (40,))
    ids = torch.randint(1, 20, (40, 8)) * (torch.arange(8) < lengths[:, None])
    items = [{"input_ids": ids[i], "attention_mask": (ids[i] > 0).long(), "labels": i % 3}
             for i in range(40)]
    conn = diagql.connect(Encoder().eval(), items, cache_dir=False, progress=False)
    assert conn.query("AVG NEURONS IN head").n_items == 40


class _MultipleChoice(nn.Module):
    """Scores each of an item's 4 choices, flattened into the batch (BertForMultipleChoice's
    form): no layer before its scores is one row per item."""

    def __init__(self):
        super().__init__()
        self.encode = nn.Sequential(nn.Linear(6, 8), nn.ReLU())
        self.classifier = nn.Linear(8, 1)

    def forward(self, x):  # (batch, choices, features)
        return self.classifier(self.encode(x.flatten(0, 1))).view(len(x), -1)


def test_a_multiple_choice_models_latent_is_refused_naming_its_rows_an_item():
    """Its head's input is (batch × choices) rows: the refusal had said only 'a head applied
    before the batch axis comes first?' and sent the user to name another latent, of which
    such a model may have none; it says the rows an item now (4 here, as the model makes them)."""
    torch.manual_seed(0)
    X, y = torch.randn(40, 4, 6), torch.randint(0, 4, (40,))
    with torch.no_grad():
        assert _MultipleChoice()(X[:10]).shape == (10, 4)
    conn = diagql.connect(_MultipleChoice(), (X, y), batch_size=10, cache_dir=False,
                          progress=False)
    with pytest.raises(diagql.DiagQLError, match=r"not a tensor of one row per item of the "
                       r"batch of 10, 4 rows an item \(a multiple-choice model's choices "
                       r"flattened into the batch\?\)"):
        conn.query("SHOW PROFILE")
