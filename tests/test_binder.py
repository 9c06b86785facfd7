"""The binder: names checked against the model, the label set, the sampler registry and SET."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import diagql
from diagql import BindError, DiagQLError

N_ITEMS, N_CLASSES = 60, 10


def _data():
    generator = torch.Generator().manual_seed(0)
    X = torch.randn(N_ITEMS, 1, 6, 6, generator=generator)
    y = torch.arange(N_ITEMS) % N_CLASSES
    return X, y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 4, 3, padding=1)),
        ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(4, 6, 3, padding=1)),
        ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(24, 16)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(16, N_CLASSES)),
    ]))


class SharedAndUnused(nn.Module):
    """``act`` runs twice per forward; ``spare`` never runs."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.spare = nn.Linear(8, 8)
        self.head = nn.Linear(8, N_CLASSES)

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


@pytest.fixture(scope="module")
def db():
    return diagql.connect(_model(), _data(), progress=False)


@pytest.fixture(scope="module")
def shared_db():
    torch.manual_seed(0)
    X = torch.randn(N_ITEMS, 8)
    return diagql.connect(SharedAndUnused(), (X, torch.arange(N_ITEMS) % N_CLASSES), progress=False)


def bind_error(db, text: str) -> BindError:
    with pytest.raises(BindError) as info:
        db.query(text)
    err = info.value
    assert isinstance(err, DiagQLError)
    assert err.source == text
    return err


def caret(err: DiagQLError) -> tuple[int, int]:
    """1-based column of the first '^' in format() and the number of carets."""
    lines = err.format("q.dql").split("\n")
    marks = next(line for line in lines if line.strip() and set(line.strip()) == {"^"})
    body = marks[4:]
    return body.index("^") + 1, body.count("^")


def assert_caret_under(err: DiagQLError, text: str, token: str, *, exact: bool = True) -> None:
    """format() puts the caret under ``token`` (the first occurrence after the statement start)."""
    column = text.index(token) + 1
    assert err.line == 1
    start, width = caret(err)
    head = err.format("q.dql").split("\n")[0]
    assert head.startswith(f"q.dql:1:{err.column}: error: ")
    if exact:
        assert (start, width) == (column, len(token)), err.format()
    else:  # the underline covers the token
        assert start <= column and column + len(token) <= start + width, err.format()


# --- layers ---------------------------------------------------------------------------------


def test_unknown_layer_names_it_and_suggests(db):
    text = "TOPK 3 NEURONS IN conv3 WHERE class = 1"
    err = bind_error(db, text)
    assert "unknown layer 'conv3'" in err.message
    assert "did you mean" in err.message and "'conv2'" in err.message
    assert err.hint is not None and "conv1" in err.hint and "fc2" in err.hint
    assert (err.line, err.column, err.end_column) == (1, 19, 24)
    assert_caret_under(err, text, "conv3")
    assert err.format().endswith(err.hint)


def test_unknown_layer_position_in_a_script(db):
    script = "SHOW LAYERS;\n\n  AVG NEURONS\n    IN fc9;"
    with pytest.raises(BindError) as info:
        db.execute(script)
    err = info.value
    assert (err.line, err.column) == (4, 8)
    assert "'fc9'" in err.message and "'fc1'" in err.message
    assert len(err.results) == 1  # SHOW LAYERS ran
    assert err.format("s.dql").startswith("s.dql:4:8: error: unknown layer 'fc9'")


def test_unknown_quoted_layer(db):
    err = bind_error(db, "AVG NEURONS IN 'conv 2'")
    assert "'conv 2'" in err.message and err.column == 16


def test_describe_unknown_layer(db):
    with pytest.raises(BindError, match="unknown layer 'fc3'"):
        db.query("DESCRIBE fc3")


def test_channels_on_a_1d_layer(db):
    text = "TOPK 2 CHANNELS IN fc1"
    err = bind_error(db, text)
    assert "CHANNELS" in err.message and "'fc1'" in err.message and "NEURONS" in err.message
    assert_caret_under(err, text, "fc1")


def test_k_larger_than_the_neuron_count(db):
    text = "TOPK 17 NEURONS IN fc1"
    err = bind_error(db, text)
    assert "17" in err.message and "(16)" in err.message and "'fc1'" in err.message
    assert_caret_under(err, text, "17", exact=False)
    err = bind_error(db, "TOPK 7 CHANNELS IN conv2")  # conv2 has 6 channels
    assert "channels" in err.message and "(6)" in err.message


def test_k_zero(db):
    text = "TOPK 0 NEURONS IN fc1"
    err = bind_error(db, text)
    assert "at least 1" in err.message
    assert_caret_under(err, text, "0", exact=False)


def test_k_at_the_limits_binds(db):
    assert len(db.query("TOPK 16 NEURONS IN fc1").neurons) == 16
    assert len(db.query("TOPK 1 CHANNELS IN conv2").neurons) == 1


def test_shared_module_runs_twice(shared_db):
    err = bind_error(shared_db, "AVG NEURONS IN act")
    assert "'act'" in err.message and "2 times" in err.message
    assert err.message.endswith("name one call: act#1 or act#2")  # tests/test_reused_modules.py
    assert err.column == 16


@pytest.mark.parametrize("name,layer,part", [("fc1.weight", "fc1", "weight"),
                                              ("fc2.bias", "fc2", "bias")])
def test_a_parameter_name_points_at_its_layer(db, name, layer, part):
    """A user who copies a name from state_dict() gets the module, not a bare 'unknown'."""
    text = f"DESCRIBE {name}"
    err = bind_error(db, text)
    assert err.message == (f"unknown layer {name!r}; did you mean {layer!r}? (a query reads a "
                           f"module's output, not its {part})")
    assert_caret_under(err, text, name)


def test_module_that_never_runs(shared_db):
    err = bind_error(shared_db, "TOPK 1 NEURONS IN spare")
    assert "'spare'" in err.message and "does not run" in err.message
    assert err.column == 19
    # the modules that do run still answer
    assert len(shared_db.query("TOPK 2 NEURONS IN fc2").neurons) == 2


class Stacked(nn.Module):
    """Layers in an nn.ModuleList, heads in an nn.ModuleDict, stages in nested lists, a block
    called twice, a list none of whose members runs, and an encoder whose layers the model
    calls itself: modules that hold others and never run themselves."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8), nn.Linear(8, 8)])
        self.stages = nn.ModuleList([nn.ModuleList([nn.Linear(8, 8)]) for _ in range(2)])
        self.twice = nn.ModuleList([nn.Linear(8, 8)])
        self.unused = nn.ModuleList([nn.Linear(8, 8)])
        self.encoder = nn.Module()
        self.encoder.layer = nn.Linear(8, 8)
        self.heads = nn.ModuleDict({"cls": nn.Linear(8, N_CLASSES)})

    def forward(self, x):
        for block in [*self.blocks, *self.stages[0], *self.stages[1]]:
            x = torch.relu(block(x))
        x = self.twice[0](self.twice[0](x))
        return self.heads["cls"](self.encoder.layer(x))


CONTAINER = "a container with no forward of its own: it never runs"


@pytest.mark.parametrize("name, said", [
    ("blocks", f"is an nn.ModuleList, {CONTAINER}; query one of its members: blocks.0, blocks.1"),
    ("heads", f"is an nn.ModuleDict, {CONTAINER}; query one of its members: heads.cls"),
    ("stages", f"is an nn.ModuleList, {CONTAINER}; query one of its members: stages.0.0, "
               f"stages.1.0"),
    ("twice", f"is an nn.ModuleList, {CONTAINER}; query one of its members: twice.0#1, "
              f"twice.0#2"),
    ("unused", f"is an nn.ModuleList, {CONTAINER}"),
    ("encoder", "does not run in the model's forward pass: the model calls its members, not it; "
                "query one of its members: encoder.layer")])
def test_a_module_that_holds_others_offers_the_members_that_run(name, said):
    torch.manual_seed(0)
    conn = diagql.connect(Stacked(), (torch.randn(N_ITEMS, 8), torch.arange(N_ITEMS) % N_CLASSES),
                          progress=False, cache_dir=False)
    err = bind_error(conn, f"AVG NEURONS IN {name}")
    assert err.message == f"layer {name!r} {said}"
    for member in said.partition("members: ")[2].split(", ") if "members" in said else []:
        assert len(conn.query(f"AVG NEURONS IN {member}")) in (8, N_CLASSES)  # each one binds


# --- WHERE: the label set -------------------------------------------------------------------


@pytest.mark.parametrize("predicate,bad,field", [
    ("class = 12", "12", "class"),
    ("predicted = -1", "-1", "predicted"),
    ("class IN (1, 99)", "99", "class"),
    ("correct AND predicted != 10", "10", "predicted"),
    ("NOT class NOT IN (3, 10)", "10", "class"),
])
def test_class_outside_the_label_set(db, predicate, bad, field):
    text = f"AVG NEURONS IN fc1 WHERE {predicate}"
    err = bind_error(db, text)
    assert f"{field} {bad}" in err.message and "0..9" in err.message
    assert_caret_under(err, text, bad, exact=False)


@pytest.mark.parametrize("predicate,bad", [("class = 2.5", "2.5"),
                                           ("predicted IN (1, 0.5)", "0.5")])
def test_class_that_is_not_whole(db, predicate, bad):
    """2.5 lies inside 0..9, so "outside the label set" was the wrong reason."""
    text = f"AVG NEURONS IN fc1 WHERE {predicate}"
    err = bind_error(db, text)
    assert err.message.endswith(f"takes a whole number (a class 0..9), not {bad}")
    assert "outside" not in err.message
    assert_caret_under(err, text, bad, exact=False)


def test_labels_inside_the_set_bind(db):
    result = db.query("AVG NEURONS IN fc1 WHERE class IN (0, 9) OR predicted = 9")
    assert result.n_items > 0


def test_in_on_confidence(db):
    err = bind_error(db, "AVG NEURONS IN fc1 WHERE confidence IN (1)")
    assert "confidence" in err.message


# --- samplers -------------------------------------------------------------------------------


def test_unknown_sampler_suggests(db):
    text = "AVG NEURONS IN fc1 USING SAMPLE stratifed(0.5)"
    err = bind_error(db, text)
    assert "unknown sampler 'stratifed'" in err.message
    assert "did you mean 'stratified'? (samplers are random, " in err.message
    assert_caret_under(err, text, "stratifed", exact=False)


@pytest.mark.parametrize("call,bad,message", [
    ("random(0.1, 0.2)", "0.2", ("sampler 'random' takes one positional argument (the size); "
                                "name the others: random_state=...")),
    ("maxmargin(0.1, 0.7)", "0.7", ("sampler 'maxmargin' takes one positional argument (the "
                                   "size); name the others: j=..., method=..., random_state=...")),
    ("ebtree(3, 4)", "3", ("sampler 'ebtree' takes no positional argument; name them: "
                          "max_children=..., random_state=...")),
])
def test_a_second_positional_argument_names_the_samplers_own_parameters(db, call, bad, message):
    """It suggested 'e.g. j=0.7' whatever the sampler, and random has no j."""
    text = f"AVG NEURONS IN fc1 USING SAMPLE {call}"
    err = bind_error(db, text)
    assert err.message == message
    assert_caret_under(err, text, bad)


def test_unknown_sampler_parameter(db):
    text = "AVG NEURONS IN fc1 USING SAMPLE stratified(0.5, jj=3)"
    err = bind_error(db, text)
    assert "no parameter 'jj'" in err.message and "random_state" in err.message
    assert_caret_under(err, text, "jj=3", exact=False)


def test_two_positional_arguments(db):
    text = "AVG NEURONS IN fc1 USING SAMPLE random(5, 6)"
    err = bind_error(db, text)
    assert "one positional argument" in err.message
    assert_caret_under(err, text, "6")


def test_size_given_twice(db):
    err = bind_error(db, "AVG NEURONS IN fc1 USING SAMPLE random(5, size=6)")
    assert "size" in err.message and "twice" in err.message
    err = bind_error(db, "AVG NEURONS IN fc1 USING SAMPLE random(random_state=1, random_state=2)")
    assert "'random_state'" in err.message and "twice" in err.message


SIZE_ERRORS = [
    ("0", "size 0"),
    ("1.5", "size 1.5"),
    ("61", "size 61"),
    ("-5", "size -5"),
    ("0.0", "size 0.0"),
    ("size='a'", "size must be a number"),
]


@pytest.mark.parametrize("size,words", SIZE_ERRORS)
def test_bad_sample_size_is_a_bind_error(db, size, words):
    err = bind_error(db, f"AVG NEURONS IN fc1 USING SAMPLE random({size})")
    assert words in err.message


@pytest.mark.parametrize("size", ["0", "1.5", "61", "-5", "size=0", "1, random_state=1.5"])
def test_bad_sample_size_points_at_the_argument(size):
    fresh = diagql.connect(_model(), _data(), progress=False)
    text = f"AVG NEURONS IN fc1 USING SAMPLE random({size})"
    with pytest.raises(BindError) as info:
        fresh.query(text)
    err = info.value
    assert err.line == 1 and err.column is not None
    bad = size.split(", ")[-1]
    assert_caret_under(err, text, bad, exact=False)
    assert fresh.artifacts.profile is None, "a bad sampler argument should fail before the profile pass"


def test_samples_at_the_limits_bind(db):
    for sampler, size in (("random(60)", 60), ("stratified(1)", 1), ("stratified(1.0)", 60)):
        result = db.query(f"AVG NEURONS IN fc1 USING SAMPLE {sampler}")
        # fc1 is the latent: answered from every item, whatever the sample's size
        assert result.provenance.n_sample == len(result.plan.items) == size
        assert result.n_items == 60


def test_connection_sample_errors(db):
    with pytest.raises(BindError, match="unknown sampler"):
        db.sample("stratifed(0.5)")
    with pytest.raises(BindError, match="size 0"):
        db.sample("random(0)")


# --- SET --------------------------------------------------------------------------------------


def test_unknown_setting_suggests():
    fresh = diagql.Connection.detached()
    err = bind_error(fresh, "SET batchsize = 3")
    assert "unknown setting 'batchsize'" in err.message
    assert "did you mean 'batch_size'? (settings are " in err.message  # not "?;"
    assert err.line == 1


def test_unknown_setting_caret_under_the_name():
    text = "SET batchsize = 3"
    err = bind_error(diagql.Connection.detached(), text)
    assert_caret_under(err, text, "batchsize")


@pytest.mark.parametrize("text,words,bad", [
    ("SET batch_size = 0", "at least 1", "0"),
    ("SET max_rows = -2", "at least 1", "-2"),
    ("SET format = xml", "format must be one of table, json, csv", "xml"),
    ("SET seed = 1.5", "whole number", "1.5"),
    ("SET batch_size = 'big'", "whole number", "'big'"),
    ("SET batch_size = many", "whole number", "many"),
])
def test_bad_setting_values(db, text, words, bad):
    err = bind_error(db, text)
    assert words in err.message
    assert_caret_under(err, text, bad)


def test_set_latent_unknown_layer(db):
    text = "SET latent = conv3"
    err = bind_error(db, text)
    assert "unknown layer 'conv3'" in err.message and "did you mean" in err.message
    assert_caret_under(err, text, "conv3")
    assert db.settings.latent is None


def test_good_settings_still_apply():
    fresh = diagql.connect(_model(), _data(), progress=False)
    fresh.query("SET batch_size = 7")
    fresh.query("SET format = JSON")
    assert fresh.settings.batch_size == 7 and fresh.settings.format == "json"


# --- nothing is lost after an error ---------------------------------------------------------


def test_nothing_is_lost_after_errors():
    fresh = diagql.connect(_model(), _data(), progress=False)
    first = fresh.query("TOPK 3 NEURONS IN fc1 WHERE class = 3")
    profile = fresh.profile
    settings = dict(vars(fresh.settings))
    for bad in ["TOPK 3 NEURONS IN conv3", "AVG NEURONS IN fc1 WHERE class = 12",
                "TOPK 99 NEURONS IN fc1", "AVG NEURONS IN fc1 USING SAMPLE stratifed(5)",
                "AVG NEURONS IN fc1 USING SAMPLE random(0)", "SET latent = nope",
                "SET format = xml", "SET batch_size = 0", "TOPK 2 CHANNELS IN fc1",
                "TOPK 3 NEURONS IN fc1 WHERE"]:
        with pytest.raises(DiagQLError):
            fresh.query(bad)
    assert fresh.profile is profile
    assert dict(vars(fresh.settings)) == settings
    again = fresh.query("TOPK 3 NEURONS IN fc1 WHERE class = 3")
    assert again.labels == first.labels
    assert fresh.profile is profile


def test_script_stops_at_the_bad_statement_and_keeps_results(db):
    with pytest.raises(BindError) as info:
        db.execute("AVG NEURONS IN fc1; AVG NEURONS IN fc9; SHOW LAYERS")
    assert len(info.value.results) == 1
    assert db.query("SHOW LAYERS").rows


def test_with_several_models_a_layer_of_another_or_a_head_that_is_no_model_is_named(digits):
    from tests.models import trained_cnn, trained_mlp

    db = diagql.connect({"base": trained_cnn(), "wide": trained_mlp()}, digits,
                        cache_dir=False, progress=False)
    assert [row[:2] for row in db.query("SHOW SETTINGS").rows if row[0] == "model"] == \
        [("model", "default")]
    db.query("SET model = wide")
    assert db.query("SET model = default").rows == [("model", "base")]  # the first, as before
    db.query("SET model = wide")
    err = bind_error(db, "TOPK 2 NEURONS IN 8")
    assert err.message == "the default model 'wide' has no layer '8'; model 'base' has one: base.8"
    err = bind_error(db, "TOPK 2 NEURONS IN bse.8")
    assert err.message == ("unknown layer 'bse.8': 'bse' is neither a model nor a module of the "
                           "default model 'wide'; did you mean 'base'?")
    assert "did you mean 'encoder.3'" in bind_error(db, "TOPK 2 NEURONS IN encodr.3").message
