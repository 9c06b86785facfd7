"""TOPK k INPUTS (docs/ARCHITECTURE.md, "Top inputs"): the items that activate one neuron
most (BOTTOMK: least), exactly, ties to the lower item index, first by a streamed pass and then
from the layer's inputs index. The truth is plain torch: the layer's output for every item
captured with a forward hook, ranked with a stable argsort (numpy's lexsort on (index, value)).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import diagql
from diagql.engine import inputs_index
from diagql.engine.top_items import TopItems
from diagql.errors import BindError, ExecutionError, ParseError
from diagql.results.render import to_csv, to_json, to_text


def layer_output(model: nn.Module, module: nn.Module, X: torch.Tensor) -> np.ndarray:
    """(items, ...) float64: ``module``'s output for every item, one batch, no DiagQL."""
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    try:
        with torch.no_grad():
            model.eval()(X)
    finally:
        handle.remove()
    return seen[0].double().numpy()


def ranking(values: np.ndarray, allowed: np.ndarray, k: int, largest: bool = True):
    """The truth: the k allowed items of highest (lowest) value, ties to the lower index."""
    pool = np.flatnonzero(allowed)
    order = np.lexsort((pool, -values[pool] if largest else values[pool]))
    return pool[order[:k]], values[pool[order[:k]]]


@pytest.fixture(scope="module")
def conn(cnn, digits, tmp_path_factory):
    X, y = digits
    return diagql.connect(cnn, (X, y), batch_size=300, progress=False,
                          cache_dir=tmp_path_factory.mktemp("inputs-cache"))


@pytest.fixture(scope="module")
def conv(cnn, digits) -> np.ndarray:
    """Layer "2" (Conv2d, 8×6×6) of the test CNN for every digit."""
    return layer_output(cnn, cnn[2], digits[0])


@pytest.fixture(scope="module")
def profile(cnn, digits):
    X, y = digits
    with torch.no_grad():
        logits = cnn.eval()(X).double()
    probs = torch.softmax(logits, dim=1)
    return y.numpy(), probs.argmax(dim=1).numpy(), probs.max(dim=1).values.numpy()


def check(result, values, allowed, k, largest=True):
    items, expected = ranking(values, allowed, k, largest)
    np.testing.assert_array_equal(result.items, items)
    np.testing.assert_allclose(result.values, expected, rtol=1e-5, atol=1e-6)


def test_first_query_is_exact_and_builds_the_index(conn, conv, profile, monkeypatch):
    # Few items kept per neuron, so that the later queries go past the lists into the codes.
    monkeypatch.setattr(inputs_index, "K", 6)
    result = conn.query("TOPK 7 INPUTS FOR 2[5,3,1]")
    neuron = conv[:, 5, 3, 1]
    check(result, neuron, np.ones(len(neuron), bool), 7)
    labels, predictions, confidence = profile
    np.testing.assert_array_equal(result.ranked.labels, labels[result.items])
    np.testing.assert_array_equal(result.ranked.predictions, predictions[result.items])
    np.testing.assert_allclose(result.ranked.confidence, confidence[result.items], rtol=1e-5)
    assert "built the inputs index" in result.ranked.how
    assert result.labels == ["2[5,3,1]"] and result.kind == "inputs"


@pytest.mark.parametrize("text, largest, pick, where", [
    ("TOPK 4 INPUTS FOR 2[1,0,2]", True, lambda c: c[:, 1, 0, 2], None),
    ("TOPK 30 INPUTS FOR 2[5,3,1] WHERE class = 3", True, lambda c: c[:, 5, 3, 1],
     lambda y, p: y == 3),
    ("TOPK 5 INPUTS FOR 2[0,4,4] WHERE incorrect", True, lambda c: c[:, 0, 4, 4],
     lambda y, p: y != p),
    ("BOTTOMK 9 INPUTS FOR 2[7,2,2] WHERE predicted IN (1, 7)", False,
     lambda c: c[:, 7, 2, 2], lambda y, p: np.isin(p, [1, 7])),
])
def test_later_queries_come_from_the_index(conn, conv, profile, text, largest, pick, where):
    """Any neuron, k past the lists and any WHERE: exact, reading fewer items than a pass."""
    labels, predictions, _ = profile
    allowed = np.ones(len(labels), bool) if where is None else where(labels, predictions)
    before = conn.counters["items"]
    result = conn.query(text)
    check(result, pick(conv), allowed, int(text.split()[1]), largest)
    assert "from the inputs index" in result.ranked.how
    assert conn.counters["items"] - before < allowed.sum()


def test_channel_ranks_by_the_channel_mean(conn, conv):
    result = conn.query("BOTTOMK 6 INPUTS FOR CHANNEL 2[3]")
    check(result, conv[:, 3].mean(axis=(1, 2)), np.ones(len(conv), bool), 6, largest=False)


def test_a_new_connection_reads_the_index_from_disk(cnn, digits, conn, conv):
    conn.query("TOPK 3 INPUTS FOR 6[7]")  # builds layer 6's index
    conn.cache.flush()
    again = diagql.connect(cnn, digits, batch_size=300, progress=False,
                           cache_dir=conn.cache.root)
    result = again.query("TOPK 3 INPUTS FOR 6[7] WHERE class = 1")
    assert "from the inputs index of 6" in result.ranked.how
    fc = layer_output(cnn, cnn[6], digits[0])
    check(result, fc[:, 7], digits[1].numpy() == 1, 3)


def test_sample_ranks_the_sampled_items_and_says_so(conn, conv, profile):
    sample = conn.sample("random(0.2, random_state=3)")
    allowed = np.zeros(len(conv), bool)
    allowed[sample] = True
    allowed &= profile[0] == 4
    result = conn.query("TOPK 5 INPUTS FOR 2[2,1,1] WHERE class = 4 "
                        "USING SAMPLE random(0.2, random_state=3)")
    check(result, conv[:, 2, 1, 1], allowed, 5)
    assert result.n_items == allowed.sum() and result.approximate
    assert any("not of all" in note and "the 5th value estimates" in note
               for note in result.notes)
    auto = conn.query("TOPK 5 INPUTS FOR 2[2,1,1] WHERE class = 4 USING AUTO")
    assert not auto.approximate and any(note.startswith("USING AUTO chose the exact answer")
                                        for note in auto.notes)
    from diagql.session.inputs import _ordinal

    assert [_ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 101, 111)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "101st", "111th"]


class Exact(nn.Module):
    """Integer weights on digits (multiples of 1/16): every activation is exact, whatever the
    batch, so duplicated items tie exactly."""

    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(64, 6)
        self.head = nn.Linear(6, 10)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in (self.fc, self.head):
                layer.weight.copy_(torch.randint(-2, 3, layer.weight.shape, generator=generator))
                layer.bias.zero_()

    def forward(self, x):
        return self.head(self.fc(self.flat(x)))


def test_ties_go_to_the_lower_index(digits, tmp_path, monkeypatch):
    monkeypatch.setattr(inputs_index, "K", 3)
    X = digits[0][:40].repeat(5, 1, 1, 1)  # item i ties with i + 40, i + 80, ...
    y = digits[1][:40].repeat(5)
    model = Exact()
    values = layer_output(model, model.fc, X)
    tied = diagql.connect(model, (X, y), batch_size=64, progress=False, cache_dir=tmp_path)
    for text, neuron, largest, k in (("TOPK 12 INPUTS FOR fc[2]", 2, True, 12),
                                     ("BOTTOMK 11 INPUTS FOR fc[4]", 4, False, 11),
                                     ("TOPK 7 INPUTS FOR fc[0] WHERE class != 0", 0, True, 7)):
        result = tied.query(text)
        allowed = y.numpy() != 0 if "WHERE" in text else np.ones(len(y), bool)
        items, _ = ranking(values[:, neuron], allowed, k, largest)
        np.testing.assert_array_equal(result.items, items)
        assert len(set(values[items, neuron])) < k  # there were ties to break


def test_top_items_merge_in_any_split():
    """The state a Ray engine merges: any split, any order, the same lists."""
    rng = np.random.default_rng(1)
    values = torch.from_numpy(rng.integers(0, 4, (500, 3)).astype(np.float32))
    for largest in (True, False):
        parts = np.array_split(rng.permutation(500), 4)
        states = []
        for part in parts:
            state = TopItems(3, 8, largest)
            state.update(values[part], part)
            states.append(state)
        merged = states[3].merge(states[1]).merge(states[0]).merge(states[2])
        items, _ = merged.finalize()
        for j in range(3):
            expected, _ = ranking(values[:, j].double().numpy(), np.ones(500, bool), 8, largest)
            np.testing.assert_array_equal(items[j], expected)
        assert merged.count == 500


@pytest.mark.parametrize("text, message", [
    ("TOPK 3 INPUTS FOR 2[5,3]", "name one with 3 indices, 2[c,h,w]; FOR CHANNEL"),
    ("TOPK 3 INPUTS FOR 2[5,3,6]", "index 6 is past the 6 entries on axis 2 (w)"),
    ("TOPK 3 INPUTS FOR CHANNEL 2[8]", "index 8 is past the 8 channels of layer '2' (its "
                                      "channels have shape (8,))"),
    ("TOPK 3 INPUTS FOR CHANNEL 6[1]", "CHANNELS needs a layer with channels (a conv map); "
                                      "use NEURONS (TOPK k INPUTS: leave out CHANNEL)"),
    ("TOPK 3 INPUTS FOR 2[1,1,1] TOKENS MAX", "applies to sequence layers"),
    ("TOPK 0 INPUTS FOR 6[1]", "k of at least 1"),
])
def test_bad_neurons_are_refused_before_any_pass(conn, text, message):
    before = conn.counters["items"]
    with pytest.raises(BindError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")) as caught:
        conn.query(text)
    assert caught.value.caret() is not None
    assert conn.counters["items"] == before


def test_parse_errors_point_at_the_neuron():
    with pytest.raises(ParseError, match="expected '\\['"):
        diagql.parse("TOPK 3 INPUTS FOR conv2 WHERE class = 1")


def test_no_matching_item_is_an_error(conn):
    with pytest.raises(ExecutionError, match="no items match WHERE class = 3 AND confidence > 2"):
        conn.query("TOPK 3 INPUTS FOR 6[1] WHERE class = 3 AND confidence > 2")
    # With a sample: said of the data, which holds none (it named the sample's items), and
    # with the caret under the WHERE's predicate.
    text = "TOPK 3 INPUTS FOR 6[1] WHERE class = 3 AND confidence > 2 USING SAMPLE random(0.5)"
    with pytest.raises(ExecutionError) as caught:
        conn.query(text)
    assert caught.value.message.endswith("(0 of 1,797 items)")
    assert caught.value.column == text.index("class = 3") + 1


def test_a_sample_that_misses_the_matching_items_says_how_many_the_data_holds(conn):
    profile = conn.profile
    matching = int(((profile.labels == 3) & (profile.predictions != 3)).sum())
    drawn = conn.sample("random(0.01)")  # the sample's item indices
    held = int(((profile.labels[drawn] == 3) & (profile.predictions[drawn] != 3)).sum())
    assert matching > 0 and held == 0  # the case: the data holds some, the sample none
    with pytest.raises(ExecutionError) as caught:
        conn.query("TOPK 3 INPUTS FOR 6[1] WHERE class = 3 AND incorrect USING SAMPLE random(0.01)")
    assert f"none of its {matching:,} matching items is in the sample's " \
           f"{len(drawn):,}; USING FULL ranks them all" in caught.value.message


def test_renderings_carry_items_labels_and_images(conn):
    result = conn.query("TOPK 3 INPUTS FOR 6[2]")
    text = to_text(result)
    assert str(result.items[0]) in text and "6[2]" in text
    record = result.records()[0]
    assert record["item"] == result.items[0] and set(record) >= {"label", "predicted",
                                                                 "confidence", "value"}
    assert '"items"' in to_json(result) and to_csv(result).startswith("rank,item,value")
    assert result.ranked.previews[0].shape == (8, 8)  # the digit, channel axis dropped


class _PixelNet(nn.Module):
    """Takes ``pixel_values`` (float, or uint8 scaled here), as a Hugging Face vision model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, pixel_values):
        x = pixel_values.float() / 255 if pixel_values.dtype == torch.uint8 else pixel_values
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_images_under_a_key_and_8_bit_pixels_are_shown():
    """Items as {"pixel_values", "labels"} and uint8 images (a datasets Image column's) had
    no thumbnails: only input_ids were read from a mapping, and integers only as tokens."""
    from diagql.model.previews import previews

    torch.manual_seed(0)
    X = torch.rand(20, 3, 8, 8)
    pixels = (X * 255).to(torch.uint8)
    y = torch.arange(20) % 2
    items = [{"pixel_values": X[i], "labels": y[i]} for i in range(20)]
    for data in (items, (pixels, y)):
        db = diagql.connect(_PixelNet().eval(), data, cache_dir=False, progress=False)
        result = db.query("TOPK 3 INPUTS FOR conv[0, 4, 4]")
        for item, shown in zip(result.items, result.ranked.previews):
            want = (X if data is items else pixels.float())[item].permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(shown, want)
    # A flat square row is still an image, and a 1-d integer row still tokens.
    flat = previews(_Batches(torch.rand(4, 64)), np.arange(2))
    assert flat[0].shape == (8, 8)
    assert previews(_Batches(torch.arange(12).reshape(4, 3)), np.arange(1)) == (["0", "1", "2"],)


class _Batches:
    """A source whose one batch is ``x`` (what previews reads)."""

    def __init__(self, x):
        self.x = x

    def batches(self, items, size):
        yield items, self.x[torch.from_numpy(items)], None


class Tagger(nn.Module):
    """Token ids -> embedding (a sequence layer) -> mean -> classes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(dim=1))


def test_sequence_layers_and_tokens(tmp_path):
    ids = torch.randint(0, 20, (60, 4), generator=torch.Generator().manual_seed(0))
    model = Tagger()
    labels = torch.arange(60) % 3
    vocabulary = [f"w{i}" for i in range(20)]
    seq = diagql.connect(model, (ids, labels), progress=False, cache_dir=tmp_path,
                         tokenizer=vocabulary)
    output = layer_output(model, model.embed, ids)  # (60, 4, 5)
    mean = seq.query("TOPK 4 INPUTS FOR embed[3]")
    check(mean, output[:, :, 3].mean(axis=1), np.ones(60, bool), 4)
    every = seq.query("TOPK 4 INPUTS FOR embed[2,3] TOKENS ALL")
    check(every, output[:, 2, 3], np.ones(60, bool), 4)
    assert every.labels == ["embed[2,3]"]
    first_token = seq.query("TOPK 4 INPUTS FOR embed[3] TOKEN 0")
    check(first_token, output[:, 0, 3], np.ones(60, bool), 4)
    # the caption and the plot's title name the reduction (they had read as the mean's)
    assert first_token.ranked.neuron == "embed[3] TOKEN 0" and mean.ranked.neuron == "embed[3]"
    assert "items of highest embed[3] TOKEN 0 among" in str(first_token)
    first = mean.items[0]
    assert mean.ranked.previews[0] == [vocabulary[i] for i in ids[first].tolist()]
    with pytest.raises(BindError, match="hidden units of shape \\(5,\\)"):
        seq.query("TOPK 4 INPUTS FOR embed[2,3]")


def test_plot_draws_each_item(conn, tmp_path):
    pytest.importorskip("matplotlib")
    from diagql.results.plots import draw_inputs, write_plot

    result = conn.query("TOPK 5 INPUTS FOR 6[3] WHERE incorrect")
    figure = draw_inputs(result)
    drawn = [ax for ax in figure.axes if ax.images]
    assert len(drawn) == 5
    for ax, preview in zip(drawn, result.ranked.previews):  # over each image's own range
        low, high = preview.min(), preview.max()
        np.testing.assert_array_equal(ax.images[0].get_array(),
                                      np.round((preview - low) / (high - low) * 255))
    write_plot(result, str(tmp_path / "inputs.png"))
    assert (tmp_path / "inputs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("scale", [255.0, "normalised"])
def test_plot_draws_rgb_images_over_their_own_range(scale):
    """RGB floats were drawn as they came, which matplotlib clips to 0..1: normalised
    images were saturated noise, 0..255 ones white."""
    pytest.importorskip("matplotlib")
    from diagql.results.plots import draw_inputs

    g = torch.Generator().manual_seed(0)
    X = torch.rand(40, 3, 6, 6, generator=g)
    X = X * 255 if scale == 255.0 else (X - 0.45) / 0.22
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
    db = diagql.connect(model, (X, torch.arange(40) % 3), cache_dir=False, progress=False)
    result = db.query("TOPK 3 INPUTS FOR 0[1,1,1]")
    for ax, item in zip([ax for ax in draw_inputs(result).axes if ax.images], result.items):
        image = X[int(item)].permute(1, 2, 0).double().numpy()
        truth = np.round((image - image.min()) / (image.max() - image.min()) * 255)
        np.testing.assert_array_equal(ax.images[0].get_array(), truth)


def test_an_index_error_points_into_its_own_line(conn):
    """The caret stays on the index's line when the bracket opens on the line before."""
    with pytest.raises(BindError) as caught:
        conn.query("TOPK 3 INPUTS FOR 6[\n40]")
    error = caught.value
    assert (error.line, error.column) == (2, 1) and error.caret() is not None


def test_the_bars_follow_the_ranks_whatever_the_sign():
    """Bars were |activation| long: for -5.69, -6.44, -6.85 the first (highest) item had the
    shortest."""
    from diagql.results.render import _rank_bars

    assert _rank_bars([-5.69, -6.44, -6.85], True) == sorted(
        _rank_bars([-5.69, -6.44, -6.85], True), reverse=True)
    assert _rank_bars([-5.69, -6.44, -6.85], True)[0] == 1.0
    assert _rank_bars([3.0, 2.0, 1.0], True) == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert _rank_bars([-3.0, -2.0, -1.0], False) == pytest.approx([1.0, 2 / 3, 1 / 3])
    lows = _rank_bars([1.0, 2.0, 3.0], False)  # BOTTOMK of positive values
    assert lows[0] == 1.0 and lows == sorted(lows, reverse=True) and lows[-1] > 0


def test_a_float64_models_inputs_index_keeps_its_digits():
    """The inputs index ranked float32-rounded activations: a query answered from it put item
    0 (1.0) above item 2 (1 + 3e-12), where the pass that built it had them right."""
    lin = nn.Linear(1, 2).double()
    with torch.no_grad():
        lin.weight[:] = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)
        lin.bias.zero_()
    model = nn.Sequential(lin, nn.Linear(2, 2).double())
    n = 300
    X = torch.linspace(0, 1, n, dtype=torch.float64)[:, None]
    X[:4, 0] = torch.tensor([1.0, 1.0 + 1e-12, 1.0 + 3e-12, 1.0 + 2e-12], dtype=torch.float64)
    y = torch.arange(n) % 2
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with torch.no_grad():
        activation = lin(X)[:, 0].numpy()
    first = conn.query("TOPK 4 INPUTS FOR 0[0]")  # builds the index
    assert first.items.tolist() == [2, 3, 1, 0]
    second = conn.query("TOPK 4 INPUTS FOR 0[0] WHERE class = 0")  # answered from it
    evens = np.arange(0, n, 2)
    truth = evens[np.argsort(-activation[evens], kind="stable")[:4]]
    assert second.items.tolist() == truth.tolist() == [2, 0, 298, 296]
    np.testing.assert_array_equal(second.values, activation[truth])


def test_top_inputs_that_all_tie_say_the_neuron_may_be_dead():
    """A dead channel's top inputs were items 0-4 at 0.0000 with nothing said."""
    torch.manual_seed(0)
    X, y = torch.randn(100, 6), torch.randint(0, 3, (100,))
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].bias[2] = -100.0  # neuron 2 of the ReLU is 0 on every item
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    dead = db.query("TOPK 3 INPUTS FOR 1[2]")
    assert dead.items.tolist() == [0, 1, 2] and (dead.values == 0).all()
    assert any(note.startswith("all 3 tie at 0 ") and "at least 3 of the 100 matching items "
               "share it" in note and "BOTTOMK shows the other end" in note for note in dead.notes)
    assert not any("tie at" in note for note in db.query("TOPK 3 INPUTS FOR 1[0]").notes)


def test_explain_says_how_top_inputs_would_be_found_and_runs_nothing(cnn, digits, tmp_path):
    """EXPLAIN TOPK k INPUTS had been refused ('expected CHANNELS or NEURONS'): it says what is
    ranked, the matching items, and whether a pass builds the index or the index answers,
    reading as many items as the query then reads."""
    X, y = digits
    conn = diagql.connect(cnn, (X, y), progress=False, cache_dir=tmp_path)
    with torch.no_grad():
        wrong = int((cnn.eval()(X).argmax(dim=1) != y).sum())
    before = dict(conn.counters)
    first = dict(conn.query("EXPLAIN TOPK 3 INPUTS FOR 2[5,3,1]").rows)
    assert conn.counters == before  # nothing through the model
    assert first["rank"].startswith("the 3 items of highest 2[5,3,1]")
    assert f"→ {len(y):,} of {len(y):,} items" in first["filter"]
    assert f"one pass over all {len(y):,} items" in first["read"] and "index" in first["read"]
    conn.query("TOPK 3 INPUTS FOR 2[5,3,1]")
    later = dict(conn.query("EXPLAIN BOTTOMK 4 INPUTS FOR 2[0,4,4] WHERE incorrect").rows)
    assert f"WHERE incorrect on the profile → {wrong:,} of" in later["filter"]
    assert later["read"].startswith("from the inputs index of 2, held")
    items = conn.counters["items"]
    answer = conn.query("BOTTOMK 4 INPUTS FOR 2[0,4,4] WHERE incorrect")
    read = conn.counters["items"] - items
    assert (f"{read:,} items it cannot order" in later["read"]) if read else \
        "no item read" in later["read"]
    assert answer.ranked.how.startswith("from the inputs index")
    sampled = dict(conn.query("EXPLAIN TOPK 2 INPUTS FOR CHANNEL 2[5] USING SAMPLE "
                              "random(0.1)").rows)
    assert "(its mean over the channel)" in sampled["rank"]
    assert sampled["sample"].startswith("random(0.1")


def test_a_layer_too_wide_for_an_index_is_read_for_its_one_neuron(cnn, digits, conv,
                                                                  monkeypatch):
    """A conv layer of 262,144 neurons had built its inputs index for 240 s and 5 GB where a
    pass reading the one neuron took seconds: a view wider than MAX_NEURONS (here made 100,
    below layer 2's 288) gets no index, and each query reads its matching items."""
    monkeypatch.setattr(inputs_index, "MAX_NEURONS", 100)
    X, y = digits
    conn = diagql.connect(cnn, (X, y), progress=False, cache_dir=False)
    plan = dict(conn.query("EXPLAIN TOPK 4 INPUTS FOR 2[1,0,2]").rows)
    assert "its 288 neurons are too many for an inputs index" in plan["read"]
    for _ in range(2):  # no index built, none used
        result = conn.query("TOPK 4 INPUTS FOR 2[1,0,2]")
        check(result, conv[:, 1, 0, 2], np.ones(len(y), bool), 4)
        assert result.ranked.how == f"{len(y):,} items read through the model"


def test_an_index_dearer_than_a_pass_is_built_once_the_passes_have_cost_as_much(
        cnn, digits, conv, monkeypatch):
    """A 50,257-token output's index had cost 13 s beside a 0.3 s pass, paid by the first
    query. An index estimated dearer than a pass over every item is built by the first exact
    query after the queries' passes on the view have cost as much; every answer is exact."""
    X, y = digits
    n = len(y)
    conn = diagql.connect(cnn, (X, y), progress=False, cache_dir=False)
    monkeypatch.setattr(inputs_index, "CHEAP_BUILD_SECONDS", 0.0)
    monkeypatch.setattr(inputs_index, "BUILD_SECONDS_PER_ACTIVATION", 1.0)  # ≈ 500,000 s
    first = conn.query("TOPK 4 INPUTS FOR 2[1,0,2]")
    check(first, conv[:, 1, 0, 2], np.ones(n, bool), 4)
    assert first.ranked.how == f"{n:,} items read through the model"
    assert any("the inputs index of 2 is not built yet" in note for note in first.notes)
    # Now the index costs just more than a pass and the first query's pass together, each as
    # the rule reads them: a pass up to layer 2 at the profile's rate (the whole model's had
    # been used, and under load the second query's pass did not make up the difference).
    one_pass = n * conn.profile.seconds_per_item(("2",))
    build = one_pass + first.timings["query"] + 1e-6
    monkeypatch.setattr(inputs_index, "BUILD_SECONDS_PER_ACTIVATION", build / (288 * n))
    second = conn.query("BOTTOMK 3 INPUTS FOR 2[0,4,4]")
    check(second, conv[:, 0, 4, 4], np.ones(n, bool), 3, largest=False)
    assert second.ranked.how == f"{n:,} items read through the model"
    assert "the next exact query on 2 builds its inputs index" in " ".join(second.notes)
    plan = dict(conn.query("EXPLAIN TOPK 5 INPUTS FOR 2[7,1,1]").rows)
    assert plan["read"].startswith(f"one pass over all {n:,} items")
    third = conn.query("TOPK 5 INPUTS FOR 2[7,1,1]")
    check(third, conv[:, 7, 1, 1], np.ones(n, bool), 5)
    assert "built the inputs index of 2" in third.ranked.how
    fourth = conn.query("TOPK 5 INPUTS FOR 2[1,0,2]")
    check(fourth, conv[:, 1, 0, 2], np.ones(n, bool), 5)
    assert fourth.ranked.how.startswith("from the inputs index of 2")


def test_the_grid_of_top_inputs_names_classes_by_their_names():
    """The thumbnails said y=4 pred=0 where the classes have names."""
    pytest.importorskip("matplotlib")
    from diagql.results.plots import draw_inputs

    torch.manual_seed(0)
    X, y = torch.rand(60, 1, 6, 6), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False,
                        classes=["cat", "dog", "cow"])
    result = db.query("TOPK 2 INPUTS FOR 2[0]")
    with torch.no_grad():
        predicted = model(X).argmax(1)
    names = ["cat", "dog", "cow"]
    titles = [ax.get_title() for ax in draw_inputs(result).axes if ax.get_title()]
    for title, item in zip(titles, result.items.tolist()):
        assert f"y={names[int(y[item])]} pred={names[int(predicted[item])]}" in title


def test_plot_draws_the_grid_and_a_bad_target_is_refused_first(plots_and_refuses_a_bad_target):
    """TOPK k INPUTS took no PLOT, where --plot drew its grid and SIMILARITY takes one."""
    torch.manual_seed(0)
    X, y = torch.rand(60, 1, 6, 6), torch.randint(0, 3, (60,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    db = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    plots_and_refuses_a_bad_target(db, "BOTTOMK 3 INPUTS FOR 2[1] WHERE class = 1 PLOT '{target}'")


class _Log(torch.nn.Module):
    def forward(self, x):
        return torch.log(x)


class _LogNet(torch.nn.Module):
    """``log`` is NaN in its neuron 0 for the items whose first feature is negative."""

    def __init__(self):
        super().__init__()
        self.log, self.fc = _Log(), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(torch.nan_to_num(self.log(x), nan=0.0))


def test_nan_in_some_items_refuses_only_the_queries_over_them():
    """Building the layer's index over every item had refused any TOPK INPUTS on a layer with
    NaN anywhere: a WHERE leaving the NaN items out, and a neuron that holds none, too. The
    query ranks its own neuron's allowed items; NaN among them is refused, counted over them."""
    torch.manual_seed(0)
    X, y = torch.randn(400, 6).abs() + 0.1, torch.randint(0, 3, (400,))
    bad = (y == 0) & (torch.arange(400) % 5 == 0)
    X[bad, 0] = -1.0
    db = diagql.connect(_LogNet().eval(), (X, y), cache_dir=False, progress=False)
    logs = torch.log(X).double().numpy()
    for neuron, where, mine in ((0, "WHERE class != 0", y.numpy() != 0), (2, "", y.numpy() >= 0),
                                (2, "WHERE class = 0", y.numpy() == 0)):
        for _ in range(2):  # a pass, then whatever the first left for the second
            result = db.query(f"TOPK 3 INPUTS FOR log[{neuron}] {where}")
            score = np.where(mine, logs[:, neuron], -np.inf)
            assert result.items.tolist() == np.argsort(-score, kind="stable")[:3].tolist()
            np.testing.assert_allclose(result.values, np.sort(score)[::-1][:3], rtol=1e-6)
    with pytest.raises(diagql.DiagQLError, match=r"log\[0\] is NaN or infinite for "
                                                 f"{int(bad.sum())} of {int((y == 0).sum())} "
                                                 r"items"):
        db.query("TOPK 3 INPUTS FOR log[0] WHERE class = 0")
