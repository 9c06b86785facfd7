"""Fingerprints of models and data: two models that compute different outputs never share one,
equal models share theirs, and what cannot be seen whole raises Unfingerprintable (so that it is
cached in memory only) instead of being hashed by its type alone.

Each "differs" case first checks with plain torch that the two models really give different
outputs on the same input, so a fingerprint that stays equal would serve a stale profile.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import importlib
import random
import threading
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import diagql
from diagql.storage.fingerprint import (
    Unfingerprintable,
    data_fingerprint,
    model_fingerprint,
)
from diagql.storage.hook_effects import may_change_outputs
from tests import models

X = torch.randn(32, 6, generator=torch.Generator().manual_seed(0))
IMAGES = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))  # tests.models' input


class Block(nn.Module):
    """Linear then an activation held as a plain attribute (not a submodule)."""

    def __init__(self, act):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = act

    def forward(self, x):
        return self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.block = Block(act)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.block(x))


class Config:
    def __init__(self, scale, shift=0.0):
        self.scale = scale
        self.shift = shift


@dataclasses.dataclass(frozen=True)
class FrozenConfig:
    scale: float
    names: tuple = ("a", "b")


class Slotted:
    __slots__ = ("__hidden", "scale")

    def __init__(self, scale):
        self.scale = scale
        self.__hidden = scale


class Mode(enum.Enum):
    DOUBLE = 2
    TRIPLE = 3


class Scaled(nn.Module):
    """Multiplies by whatever ``scale_of(self.cfg)`` reads from a config held as an attribute."""

    def __init__(self, cfg, scale_of):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)
        self.cfg = cfg
        self.scale_of = scale_of

    def forward(self, x):
        return self.fc(x) * self.scale_of(self.cfg)


def net(act, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net(act)


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IMAGES if isinstance(model, nn.Sequential) else X)


def assert_fingerprints_differ(a: nn.Module, b: nn.Module) -> None:
    assert not torch.equal(outputs(a), outputs(b)), "the test's two models must differ"
    assert model_fingerprint(a) != model_fingerprint(b)


def make_scaler(factor):
    def scale(x):
        return x * factor
    return scale


def with_default(x, slope=0.1):
    return F.leaky_relu(x, slope)


# --- two models with different outputs, different fingerprints --------------------------------

def test_a_partial_with_another_keyword_differs():
    assert_fingerprints_differ(net(functools.partial(F.leaky_relu, negative_slope=0.1)),
                               net(functools.partial(F.leaky_relu, negative_slope=0.3)))


def test_a_partial_with_another_positional_argument_differs():
    assert_fingerprints_differ(net(functools.partial(F.leaky_relu, negative_slope=0.1)),
                               net(functools.partial(with_default, slope=0.3)))
    assert_fingerprints_differ(net(functools.partial(torch.clamp, min=-0.1)),
                               net(functools.partial(torch.clamp, min=-0.2)))


@pytest.mark.parametrize("cfg_a, cfg_b, scale_of", [
    (Config(2.0), Config(3.0), lambda c: c.scale),
    (Config(2.0, shift=1.0), Config(2.0, shift=2.0), lambda c: c.scale + c.shift),
    (FrozenConfig(2.0), FrozenConfig(3.0), lambda c: c.scale),
    (Slotted(2.0), Slotted(3.0), lambda c: c._Slotted__hidden),
    (types.SimpleNamespace(scale=2.0), types.SimpleNamespace(scale=3.0), lambda c: c.scale),
    (Mode.DOUBLE, Mode.TRIPLE, lambda c: c.value),
    ({"scale": 2.0}, {"scale": 3.0}, lambda c: c["scale"]),
    ({Config(2.0)}, {Config(3.0)}, lambda c: next(iter(c)).scale),
    (frozenset({2.0}), frozenset({3.0}), lambda c: next(iter(c))),
    ([Config(2.0)], [Config(3.0)], lambda c: c[0].scale),
], ids=["object", "second attribute", "dataclass", "slots", "namespace", "enum", "dict",
        "set of objects", "frozenset", "list of objects"])
def test_a_value_inside_a_config_object_differs(cfg_a, cfg_b, scale_of):
    assert_fingerprints_differ(Scaled(cfg_a, scale_of), Scaled(cfg_b, scale_of))


def test_a_closure_differs():
    assert_fingerprints_differ(net(make_scaler(2.0)), net(make_scaler(3.0)))


def test_a_function_default_differs():
    def leaky(x, slope=0.1):
        return F.leaky_relu(x, slope)

    other = types.FunctionType(leaky.__code__, leaky.__globals__, leaky.__name__, (0.3,))
    assert_fingerprints_differ(net(leaky), net(other))

    def keyword_only(x, *, slope=0.1):
        return F.leaky_relu(x, slope)

    other = types.FunctionType(keyword_only.__code__, keyword_only.__globals__)
    other.__kwdefaults__ = {"slope": 0.3}
    assert_fingerprints_differ(net(keyword_only), net(other))


def test_lambdas_on_one_line_differ():
    """Same qualname (<lambda>) and the same source line: only their code tells them apart."""
    double, triple = (lambda x: x * 2), (lambda x: x * 3)
    assert_fingerprints_differ(net(double), net(triple))


class Multiplier:
    def __init__(self, factor):
        self.factor = factor

    def apply(self, x):
        return x * self.factor


def test_a_bound_method_of_another_object_differs():
    assert_fingerprints_differ(net(Multiplier(2).apply), net(Multiplier(3).apply))


def test_a_private_attribute_of_a_custom_module_differs():
    class Private(nn.Module):
        def __init__(self, scale):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(6, 3)
            self._scale = scale

        def forward(self, x):
            return self.fc(x) * self._scale

    assert_fingerprints_differ(Private(2.0), Private(3.0))


def test_an_unregistered_module_in_a_list_differs():
    """A module in a plain list is in no state_dict and not among named_modules()."""
    class Helpers(nn.Module):
        def __init__(self, seed):
            super().__init__()
            torch.manual_seed(0)
            self.fc = nn.Linear(6, 6)
            torch.manual_seed(seed)
            self.helpers = [nn.Linear(6, 3)]

        def forward(self, x):
            return self.helpers[0](self.fc(x))

    assert_fingerprints_differ(Helpers(1), Helpers(2))


def test_a_class_without_source_differs():
    """Classes defined at a prompt (exec'd, no file) have no source to hash: their code must be."""
    def define(body: str) -> type:
        namespace = {"nn": nn, "__name__": "prompt"}
        source = ("class Net(nn.Module):\n"
                  "    def __init__(self):\n"
                  "        super().__init__()\n"
                  "        self.fc = nn.Linear(6, 3)\n"
                  "    def forward(self, x):\n"
                  f"        return {body}\n")
        exec(compile(source, "<prompt>", "exec"), namespace)  # noqa: S102 - our own text
        return namespace["Net"]

    first, second = define("self.fc(x)"), define("self.fc(x).relu()")
    torch.manual_seed(0)
    a = first()
    torch.manual_seed(0)
    b = second()
    assert_fingerprints_differ(a, b)


def _import_fresh(folder, name: str, files: dict):
    """Write ``files`` (module name -> source) into ``folder`` and import ``name`` anew, as a
    new process would after the user edited them."""
    import importlib
    import sys

    for module, source in files.items():
        (folder / f"{module}.py").write_text(source)
        sys.modules.pop(module, None)
    sys.path.insert(0, str(folder))
    try:
        importlib.invalidate_caches()
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(folder))
        for module in files:
            sys.modules.pop(module, None)


NET_FILE = """
import torch
from torch import nn
{imports}

SCALE = {scale}
LIMIT = 6.0


def squash(x):
    return torch.clamp(x * SCALE, max=LIMIT)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return {body}
"""


@pytest.mark.parametrize("body, imports", [
    ("squash(self.fc(x))", ""),  # a helper function in the model's file, reading a constant
    ("self.fc(x) * SCALE", ""),  # a constant in the model's file
    ("self.fc(x) * settings.FACTOR", "import settings"),  # another of the user's files
    ("helpers.shift(self.fc(x))", "import helpers"),  # its function, reading its constant
], ids=["helper", "constant", "other file's constant", "other file's helper"])
def test_an_edit_to_what_forward_reads_in_the_users_files_differs(tmp_path, body, imports):
    """The class's source is unchanged: only a global it reads is edited."""
    fingerprints, answers = [], []
    for version, scale in enumerate((2.0, 3.0)):
        folder = tmp_path / str(version)
        folder.mkdir()
        module = _import_fresh(folder, "usernet", {
            "usernet": NET_FILE.format(scale=scale, body=body, imports=imports),
            "settings": f"FACTOR = {scale}\n",
            "helpers": f"OFFSET = {scale}\n\ndef shift(x):\n    return x + OFFSET\n"})
        model = module.Net()
        fingerprints.append(model_fingerprint(model))
        answers.append(outputs(model))
    assert not torch.equal(*answers)
    assert fingerprints[0] != fingerprints[1]


def test_the_same_users_files_hash_equal_and_a_logger_does_not_stop_the_cache(tmp_path):
    source = NET_FILE.format(scale=2.0, body="log(squash(self.fc(x)))", imports="import logging")
    source += "\nLOGGER = logging.getLogger('usernet')\n\n\ndef log(x):\n" \
              "    LOGGER.debug('seen')\n    return x\n"
    digests = []
    for version in range(2):
        folder = tmp_path / str(version)
        folder.mkdir()
        digests.append(model_fingerprint(_import_fresh(folder, "usernet",
                                                       {"usernet": source}).Net()))
    assert digests[0] == digests[1]


def test_an_installed_modules_class_is_hashed_by_its_file_without_parsing(monkeypatch):
    """Finding one class's source parses its whole file: an installed package's file is
    hashed whole instead (a tiny BERT's classes took seconds)."""
    import inspect
    import json.encoder
    from pathlib import Path

    import xxhash

    from diagql.storage.fingerprint import source_digest

    calls = []
    monkeypatch.setattr(inspect, "getsource", lambda obj: calls.append(obj) or "")
    want = xxhash.xxh3_128(Path(json.encoder.__file__).read_bytes()).hexdigest()
    assert source_digest(json.encoder.JSONEncoder) == want
    assert not calls


# --- equal models, equal fingerprints ---------------------------------------------------------

@pytest.mark.parametrize("build", [
    lambda: net(functools.partial(F.leaky_relu, negative_slope=0.1)),
    lambda: net(make_scaler(2.0)),
    lambda: net(Multiplier(2).apply),
    lambda: Scaled(Config(2.0), lambda c: c.scale),
    lambda: Scaled({Config(2.0), Config(3.0)}, lambda c: len(c)),
    lambda: Scaled(FrozenConfig(2.0), lambda c: c.scale),
    lambda: Scaled(Mode.DOUBLE, lambda c: c.value),
    lambda: models.build_cnn(),
    lambda: models.build_bn_cnn(),
], ids=["partial", "closure", "method", "config", "set", "dataclass", "enum", "cnn", "bn cnn"])
def test_equal_models_hash_equal(build):
    a, b = build(), build()
    assert torch.equal(outputs(a), outputs(b))
    assert model_fingerprint(a) == model_fingerprint(b)


def test_an_object_graph_with_cycles_hashes_equal():
    def build():
        model = Scaled(Config(2.0), lambda c: c.scale)
        model.cfg.owner = model  # back to the model
        model.cfg.self_ref = model.cfg
        model.cfg.items = [model.fc, model.fc.weight]  # a registered module and parameter
        return model

    assert model_fingerprint(build()) == model_fingerprint(build())


@pytest.mark.parametrize("layer", [
    lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda: nn.BatchNorm2d(4),
    lambda: nn.LSTM(4, 8, 2), lambda: nn.GRU(4, 8, batch_first=True),
    lambda: nn.MultiheadAttention(8, 2), lambda: nn.TransformerEncoderLayer(8, 2, 16),
    lambda: nn.Upsample(scale_factor=2), lambda: nn.Embedding(5, 4),
    lambda: nn.GELU(approximate="tanh"), lambda: nn.Unflatten(1, (2, 2)),
    lambda: models.MLP(), lambda: models.build_cnn(),
])
def test_torch_layers_can_be_fingerprinted(layer):
    """Raising costs the disk cache: what torch's own layers hold must all be seen."""
    assert len(model_fingerprint(layer())) == 32  # XXH3-128, in hex


# --- what cannot be seen raises ---------------------------------------------------------------

@pytest.mark.parametrize("opaque, shown", [
    (torch.Generator().manual_seed(1), "Generator"),
    (random.Random(1), "Random"),
    (threading.Lock(), "lock"),
    (functools.partial(F.dropout, generator=torch.Generator()), "Generator"),
    (Config([threading.Lock()]), "lock"),
], ids=["generator", "random", "lock", "inside a partial", "inside an object"])
def test_what_cannot_be_seen_raises_and_names_the_attribute(opaque, shown):
    with pytest.raises(Unfingerprintable) as info:
        model_fingerprint(net(opaque))
    message = str(info.value)
    assert "'act'" in message and "'block'" in message and shown in message, message


def test_a_random_state_with_the_same_attributes_is_not_seen_whole():
    """random.Random keeps its state in C: its __dict__ alone would make two states equal."""
    a, b = random.Random(1), random.Random(2)
    assert vars(a) == vars(b) and a.random() != b.random()
    for state in (a, b):
        with pytest.raises(Unfingerprintable):
            model_fingerprint(net(state))


def test_a_too_deep_object_raises_instead_of_overflowing():
    chain = Config(1.0)
    for _ in range(5000):
        chain = Config(chain)
    with pytest.raises(Unfingerprintable, match="'cfg'"):
        model_fingerprint(Scaled(chain, lambda c: 1.0))


def test_unfingerprintable_is_a_plain_exception():
    assert issubclass(Unfingerprintable, Exception)
    assert not issubclass(Unfingerprintable, diagql.DiagQLError)


# --- data ---------------------------------------------------------------------------------------

class Items(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.X[i], self.y[i]


def test_data_that_cannot_be_hashed_exactly_raises_with_a_reason():
    y = torch.arange(32) % 3
    with pytest.raises(Unfingerprintable, match="data of type Items cannot be hashed exactly"):
        data_fingerprint(Items(X, y))
    with pytest.raises(Unfingerprintable, match="collate"):
        data_fingerprint(DataLoader(TensorDataset(X, y), collate_fn=lambda b: b))
    with pytest.raises(Unfingerprintable, match="Python objects"):
        data_fingerprint((np.array([object()] * 3), [0, 1, 2]))
    with pytest.raises(Unfingerprintable):
        data_fingerprint((X, y, y))  # not a pair


def test_exact_data_hashes_by_content():
    y = torch.arange(32) % 3
    fingerprint = data_fingerprint((X, y))
    assert fingerprint == data_fingerprint(TensorDataset(X.clone(), y.clone()))
    assert fingerprint == data_fingerprint(DataLoader(TensorDataset(X, y), batch_size=5,
                                                      shuffle=True))
    assert data_fingerprint((X.numpy(), y.numpy())) == data_fingerprint((X.numpy().copy(), y.numpy()))
    changed = X.clone()
    changed[3, 1] = torch.nextafter(changed[3, 1], torch.tensor(np.inf))
    assert data_fingerprint((changed, y)) != fingerprint


class _Keywords(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = torch.nn.Embedding(20, 4), torch.nn.Linear(4, 3)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask[..., None].float()
        return self.head((self.embed(input_ids) * mask).sum(1) / mask.sum(1))


def test_data_given_as_columns_is_hashed_with_its_labels(tmp_path):
    """A tokenizer's output (a mapping of arrays, alone with a label column or beside the
    labels) had been held in memory only, so text data was never cached on disk."""
    g = torch.Generator().manual_seed(1)
    ids, mask = torch.randint(1, 20, (40, 6), generator=g), torch.ones(40, 6, dtype=torch.long)
    y, other = torch.arange(40) % 3, torch.arange(40) % 2
    model = _Keywords()

    def key(data, **options):
        conn = diagql.connect(model, data, cache_dir=tmp_path, progress=False, **options)
        return conn.artifacts.profile_key()

    columns = {"input_ids": ids, "attention_mask": mask}
    first = key((columns, y))
    assert first is not None
    assert key(({"attention_mask": mask.clone(), "input_ids": ids.clone()}, y)) == first
    assert key({**columns, "labels": y}) == first  # the same columns and labels
    changed = ids.clone()
    changed[5, 2] += 1
    assert key(({"input_ids": changed, "attention_mask": mask}, y)) != first
    assert key((columns, other)) != first
    # Which column holds the labels is part of it (the other is an input column then).
    both = {**columns, "labels": y, "target": other}
    assert key(both, label_key="labels") != key(both, label_key="target")
    # A second connection reads the profile back.
    conn = diagql.connect(model, (columns, y), cache_dir=tmp_path, progress=False)
    conn.query("AVG NEURONS IN embed WHERE class = 1")
    conn.cache.flush()
    again = diagql.connect(model, (columns, y), cache_dir=tmp_path, progress=False)
    again.query("AVG NEURONS IN embed WHERE class = 1")
    assert again.cache.by_kind["profile"] == {"hits": 1, "misses": 0}


def test_a_named_cache_directory_that_data_cannot_use_is_warned_of(tmp_path, monkeypatch):
    """Nothing was written and nothing said when the user named the directory."""
    items = [{"x": torch.randn(6), "labels": i % 3} for i in range(20)]
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    with pytest.warns(diagql.DiagQLWarning, match=f"the data is cached in memory only, "
                                                  f"nothing in {tmp_path}: data of type list"):
        diagql.connect(model, items, cache_dir=tmp_path, progress=False).query("AVG NEURONS IN 1")
    monkeypatch.setenv("DIAGQL_CACHE_DIR", str(tmp_path / "default"))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", diagql.DiagQLWarning)  # the default directory: quiet
        diagql.connect(model, items, progress=False).query("AVG NEURONS IN 1")


def _flip(array: np.ndarray, bit: int) -> np.ndarray:
    flipped = array.copy()
    flipped.reshape(-1).view(np.uint8)[bit // 8] ^= np.uint8(1 << (bit % 8))
    return flipped


@pytest.mark.parametrize("chunk", [None, 4096], ids=["32 MB pieces", "4 kB pieces"])
def test_large_data_hashes_the_same_on_any_number_of_threads_and_sees_every_bit(chunk,
                                                                                monkeypatch):
    """Inputs larger than a piece are hashed piece by piece, on threads where there are cores:
    the digest must not depend on the threads, and one flipped bit anywhere (first byte, either
    side of a piece boundary, last byte) must change it."""
    from diagql.storage import fingerprint

    if chunk is not None:
        monkeypatch.setattr(fingerprint, "_CHUNK", chunk)
    piece = fingerprint._CHUNK
    n_bytes = 2 * piece + 1000  # two whole pieces and a partial one
    X = np.random.default_rng(0).integers(0, 256, n_bytes, dtype=np.uint8).view(np.float32)
    y = np.arange(len(X)) % 3

    digests = set()
    for threads in (1, 2, 3, 8):
        monkeypatch.setattr(fingerprint, "_hash_threads", lambda pieces, t=threads: t)
        digests.add(data_fingerprint((X, y)))
    assert len(digests) == 1
    [digest] = digests
    assert data_fingerprint((X.copy(), y.copy())) == digest
    seen = {digest}
    for bit in (0, 7, 8 * piece - 1, 8 * piece, 8 * 2 * piece + 5, 8 * n_bytes - 1):
        flipped = data_fingerprint((_flip(X, bit), y))
        assert flipped not in seen, f"bit {bit} flipped, same digest"
        seen.add(flipped)


def test_threads_are_used_only_where_there_are_more_than_two_cores(monkeypatch):
    from diagql.storage import fingerprint

    monkeypatch.setattr(fingerprint.os, "cpu_count", lambda: 2)
    assert fingerprint._hash_threads(10) == 1
    monkeypatch.setattr(fingerprint.os, "cpu_count", lambda: 16)
    assert fingerprint._hash_threads(10) == 10 and fingerprint._hash_threads(40) == 16


def test_small_data_sees_every_bit():
    y = (torch.arange(32) % 3).numpy()
    digest = data_fingerprint((X.numpy(), y))
    for bit in range(0, X.numel() * 32, 97):
        assert data_fingerprint((_flip(X.numpy(), bit), y)) != digest
    assert data_fingerprint((X.numpy(), _flip(y, 3))) != digest


# --- end to end: the disk cache does not serve another model's profile ------------------------

def test_a_second_connection_to_another_partial_is_not_served_the_first_profile(tmp_path):
    y = torch.arange(len(X)) % 3
    nets = [net(functools.partial(F.leaky_relu, negative_slope=s)) for s in (0.1, -3.0)]
    truths = [outputs(model).argmax(1).numpy() for model in nets]
    assert not np.array_equal(*truths), "the test's two models must predict differently"
    for model, truth in zip(nets, truths):
        db = diagql.connect(model, (X, y), cache_dir=tmp_path, progress=False)
        np.testing.assert_array_equal(db.profile.predictions, truth)


def test_a_model_that_cannot_be_seen_whole_is_cached_in_memory_only(tmp_path):
    """The connection's side: one warning naming the attribute, nothing written to disk, the
    reason in SHOW CACHE, and answers equal to plain torch all the same."""
    import warnings

    from diagql.errors import DiagQLWarning

    model = net(F.relu)
    model.rng = random.Random(0)  # its generator state is invisible to any fingerprint
    y = torch.arange(len(X)) % 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        db = diagql.connect(model, (X, y), cache_dir=tmp_path, progress=False)
        np.testing.assert_array_equal(db.profile.predictions, outputs(model).argmax(1).numpy())
        db.query("AVG NEURONS IN block USING SAMPLE random(0.5)")
        shown = db.query("SHOW CACHE")
    memory_only = [w for w in caught if issubclass(w.category, DiagQLWarning)]
    assert len(memory_only) == 1, [str(w.message) for w in memory_only]
    assert "cached in memory only" in str(memory_only[0].message)
    assert "'rng'" in str(memory_only[0].message)
    assert db.cache.writes == 0 and not list(tmp_path.rglob("*.npz"))
    assert any("model is cached in memory only" in note and "'rng'" in note
               for note in shown.notes), shown.notes
    assert "memory only" in str(shown)


def test_a_global_named_like_an_attribute_is_not_read(tmp_path):
    """``self.r`` is no read of a global ``r`` (a notebook's ``r = db.query(...)``): rebinding
    it must not change the fingerprint, or every statement would derive everything again."""
    source = NET_FILE.format(scale=2.0, body="self.r(self.fc(x))", imports="") + \
        "\n\nclass Net2(Net):\n    def __init__(self):\n        super().__init__()\n" \
        "        self.r = nn.ReLU()\n"
    digests = []
    for version, value in enumerate(("1", "'a result'")):
        folder = tmp_path / str(version)
        folder.mkdir()
        module = _import_fresh(folder, "usernet", {"usernet": source + f"\nr = {value}\n"})
        digests.append(model_fingerprint(module.Net2()))
    assert digests[0] == digests[1]


VARIANT_FILE = """
import functools
import importlib
import torch
from torch import nn
import pkg.ops

SCALE = {scale}


@functools.lru_cache(maxsize=None)
def factor():
    return SCALE


class Net(nn.Module):
    K = 1.0

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 3)

    @torch.no_grad()
    def forward(self, x):
        return {body}
"""


@pytest.mark.parametrize("body, runtime", [
    ("self.fc(x) * SCALE", False),  # a global read by a decorated forward
    ("self.fc(x) * factor()", False),  # a helper behind functools.lru_cache
    ("pkg.ops.shift(self.fc(x))", False),  # a helper two modules down
    ("self.fc(x) * Net.K", True),  # a class attribute set at run time (Net.K = 3)
], ids=["decorated forward", "lru_cache helper", "pkg.ops helper", "class attribute"])
def test_what_the_source_of_the_class_does_not_show_is_seen(tmp_path, body, runtime):
    digests = []
    for version, scale in enumerate((2.0, 3.0)):
        folder = tmp_path / str(version)
        (folder / "pkg").mkdir(parents=True)
        (folder / "pkg" / "__init__.py").write_text("")
        import sys

        for name in ("pkg", "pkg.ops"):
            sys.modules.pop(name, None)
        (folder / "pkg" / "ops.py").write_text(f"OFFSET = {scale}\n\n\ndef shift(x):\n"
                                               f"    return x + OFFSET\n")
        module = _import_fresh(folder, "usernet", {
            "usernet": VARIANT_FILE.format(scale=2.0 if runtime else scale, body=body)})
        if runtime:
            module.Net.K = scale
        model = module.Net()
        digests.append(model_fingerprint(model))
        for name in ("pkg", "pkg.ops"):
            sys.modules.pop(name, None)
    assert digests[0] != digests[1]


def test_a_class_defined_in_python_c_is_fingerprinted():
    """Its source lookup raises OSError there (and in IPython), not TypeError."""
    import subprocess
    import sys

    code = ("import torch\nfrom diagql.storage.fingerprint import model_fingerprint\n"
            "class Net(torch.nn.Module):\n"
            "    def __init__(self):\n        super().__init__()\n"
            "        self.fc = torch.nn.Linear(2, 2)\n"
            "    def forward(self, x):\n        return self.fc(x)\n"
            "print(len(model_fingerprint(Net())))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "32"


def _looping(x):
    return x


_looping.__wrapped__ = _looping  # a wrapper chain that loops, as a careless decorator leaves


class _ReadsALoopingHelper(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        return _looping(self.fc(x))


def test_a_helper_whose_wrapper_chain_loops_is_fingerprinted():
    assert len(model_fingerprint(_ReadsALoopingHelper())) == 32


def _count(module, args):
    COUNTS[0] += 1


def _record(module, inputs, output):
    STORE["out"] = output.detach()


def _zero_in_place(module, inputs, output):
    output[:, 3] = 0


def _scaled(module, inputs, output):
    return output * 2


def _inplace_method(module, inputs, output):
    output.mul_(0)


def _init_zero(module, inputs, output):
    torch.nn.init.zeros_(output)


def _named(name, module, inputs, output):
    STORE[name] = output


def _zero(tensor):
    tensor.zero_()


def _through_a_helper(module, inputs, output):
    _zero(output)


class _Recorder:
    def __init__(self):
        self.outputs = {}

    def hook(self, module, inputs, output):
        self.outputs["a"] = output

    def __call__(self, module, inputs, output):
        self.outputs["b"] = output


class _Clamp:
    def __call__(self, module, inputs, output):
        return output.clamp(min=0)


COUNTS, STORE, SEEN = [0], {}, []
UNIT = 3  # which unit _zero_unit zeroes: a global an ablation study changes


def _alias(module, inputs, output):
    acts = output[0] if isinstance(output, tuple) else output
    acts[:, 3] = 0


def _each_row(module, inputs, output):
    for row in output:
        row[3] = 0


def _functional_in_place(module, inputs, output):
    torch.nn.functional.relu(output, inplace=True)


def _not_in_place(module, inputs, output):
    STORE["relu"] = torch.nn.functional.relu(output.detach(), inplace=False)


def _zero_unit(module, inputs, output):
    output[:, UNIT] = 0


class _Scale:
    def __init__(self, s):
        self.s = s

    def __call__(self, module, inputs, output):
        return output * self.s


@pytest.mark.parametrize("hook, changes", [
    (_count, False), (_record, False), (functools.partial(_named, "x"), False),
    (_Recorder().hook, False), (_Recorder(), False),
    (lambda m, a: COUNTS.__setitem__(0, COUNTS[0] + 1), False),
    (lambda m, a: SEEN.append(len(a[0])), False), (lambda m, i, o: print(o.shape), False),
    (_zero_in_place, True), (_scaled, True), (_inplace_method, True), (_init_zero, True),
    (_Clamp(), True), (lambda m, i, o: o * 2, True), (lambda m, i, o: o.mul_(0), True),
    (lambda m, a: SEEN.append(1) or (a[0] * 0,), True), (print, True),
    (_through_a_helper, True), (_alias, True), (_each_row, True), (_functional_in_place, True),
    (_not_in_place, False),
], ids=["count", "record", "partial", "method", "callable", "lambda count", "lambda append",
        "lambda print", "write in place", "return", "in-place method", "init zeros_",
        "callable returning", "lambda returning", "lambda in place", "lambda or", "builtin",
        "a helper given the output", "an alias written", "a loop's rows written",
        "inplace=True", "inplace=False"])
def test_hooks_that_may_change_outputs_are_told_from_instrumentation(hook, changes):
    assert may_change_outputs(hook) is changes


def test_a_user_modules_helper_given_the_output_may_change_it(tmp_path, monkeypatch):
    (tmp_path / "ablations_1.py").write_text("def zero_unit(t, k):\n    t[:, k] = 0\n")
    (tmp_path / "hooks_1.py").write_text(
        "import torch\nimport ablations_1\nSTORE = {}\n"
        "def via_module(module, inputs, output):\n    ablations_1.zero_unit(output, 3)\n"
        "def via_torch(module, inputs, output):\n    STORE['a'] = torch.relu(output)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    hooks = importlib.import_module("hooks_1")
    assert may_change_outputs(hooks.via_module) is True
    assert may_change_outputs(hooks.via_torch) is False


def test_an_ablations_state_keys_its_fingerprint():
    """The unit a global names, a list a closure holds, an object's attribute: each had been
    hashed by its type alone, so ablating unit 11 read unit 3's cached answers."""
    global UNIT
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU())
    box = [0.5]
    for make, change in ((lambda: _zero_unit, lambda: globals().__setitem__("UNIT", 11)),
                         (lambda: (lambda m, i, o: o * box[0]), lambda: box.__setitem__(0, 0.0)),
                         (lambda: _Scale(0.5), None)):
        hook = make()
        handle = model[0].register_forward_hook(hook)
        before = model_fingerprint(model)
        assert model_fingerprint(model) == before  # the same state: the same digest
        if change is None:
            hook.s = 0.0
        else:
            change()
        assert model_fingerprint(model) != before
        handle.remove()
    UNIT = 3


def test_only_hooks_that_change_outputs_change_the_fingerprint():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    bare = model_fingerprint(model)
    handle = model[0].register_forward_hook(_record)
    counting = model.register_forward_pre_hook(lambda m, a: COUNTS.__setitem__(0, 1))
    assert model_fingerprint(model) == bare
    ablation = model[0].register_forward_hook(_zero_in_place)
    ablated = model_fingerprint(model)
    assert ablated != bare
    ablation.remove()
    scaling = model[0].register_forward_hook(_scaled)
    assert model_fingerprint(model) not in (bare, ablated)
    for added in (handle, counting, scaling):
        added.remove()
    assert model_fingerprint(model) == bare
    every = nn.modules.module.register_module_forward_hook(_scaled)  # torch's global hooks
    try:
        assert model_fingerprint(model) != bare
    finally:
        every.remove()


def test_a_global_the_code_changes_itself_is_its_state_not_a_setting():
    """A cache its forward fills, a counter under ``global``, a lazy singleton: their values
    are what the process has run, and had changed the fingerprint (a Ray worker's against
    the driver's, sweep JJ1); a setting it only reads still changes it."""
    import types

    from diagql.storage.code_reads import globals_written
    from diagql.storage.fingerprint import globals_digests

    namespace = {"__name__": "settings_module", "SEEN": {}, "CALLS": 0, "_TOK": None,
                 "ORDER": [], "SCALE": 1.0, "CONFIG": {"shift": 0.0}, "COUNTS": [0, 0],
                 "OUT": {}, "TABLE": {}}
    exec("def forward(x):\n"
         "    global CALLS, _TOK\n"
         "    CALLS += 1\n"
         "    COUNTS[len(x) % 2] += 1\n"
         "    OUT[len(x)] = TABLE\n"
         "    SEEN[len(x)] = True\n"
         "    ORDER.append(len(x))\n"
         "    if _TOK is None:\n"
         "        _TOK = object()\n"
         "    return [v * SCALE + CONFIG['shift'] for v in x]\n", namespace)
    forward = namespace["forward"]
    assert isinstance(forward, types.FunctionType)
    # TABLE is only stored as a value into OUT: read, not written
    assert globals_written(forward.__code__) == {"CALLS", "_TOK", "SEEN", "ORDER", "COUNTS",
                                                 "OUT"}
    before = globals_digests([forward])
    assert set(before) == {"settings_module.SCALE", "settings_module.CONFIG",
                           "settings_module.TABLE"}
    forward([1.0, 2.0])
    assert globals_digests([forward]) == before
    namespace["CONFIG"]["shift"] = 1.0
    assert globals_digests([forward])["settings_module.CONFIG"] != before["settings_module.CONFIG"]


def test_a_constant_the_forward_imports_itself_or_reads_through_globals_is_followed(
        tmp_path, monkeypatch):
    """``import cfg`` or ``from cfg import K`` inside forward (Hugging Face's lazy imports),
    and ``globals()["SCALE"]``: an edit of such a constant had left a cached profile stale,
    the old model's answers with no warning (sweep JJ2). Before the forward first ran, the
    module is followed by its file, never imported (a branch the forward never takes could
    import a script that parses the command line: review KK1); once imported, by the
    attributes the code reads."""
    import sys

    from diagql.storage.fingerprint import globals_digests, model_functions

    (tmp_path / "lazy_cfg_mod.py").write_text("K = 1.0\nK2 = 2.0\n")
    (tmp_path / "lazy_net_mod.py").write_text(
        "import torch\n"
        "SCALE = 1.0\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(3, 2)\n"
        "    def forward(self, x):\n"
        "        import lazy_cfg_mod\n"
        "        from lazy_cfg_mod import K2\n"
        "        return self.fc(x) * lazy_cfg_mod.K * K2 * globals()['SCALE']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = importlib.import_module("lazy_net_mod").Net()
        before = model_fingerprint(model)
        assert "lazy_cfg_mod" not in sys.modules  # followed by its file, not imported
        (tmp_path / "lazy_cfg_mod.py").write_text("K = 3.0\nK2 = 2.0\n")
        edited = model_fingerprint(model)
        assert edited != before
        model(torch.zeros(1, 3))  # the forward imports it: now by its attributes
        cfg, net = sys.modules["lazy_cfg_mod"], sys.modules["lazy_net_mod"]
        imported = model_fingerprint(model)
        for module, name in ((cfg, "K"), (cfg, "K2"), (net, "SCALE")):
            value = getattr(module, name)
            setattr(module, name, value + 1.0)
            assert model_fingerprint(model) != imported, name
            setattr(module, name, value)
        assert model_fingerprint(model) == imported
        # a Ray worker's reads are compared with the driver's by the same reads (review LL)
        reads = globals_digests(model_functions(model))
        assert "lazy_net_mod.<import lazy_cfg_mod>" in reads
        cfg.K += 1.0
        assert globals_digests(model_functions(model)) != reads
        cfg.K -= 1.0
        assert globals_digests(model_functions(model)) == reads
    finally:
        for name in ("lazy_cfg_mod", "lazy_net_mod"):
            sys.modules.pop(name, None)


def test_a_module_function_named_like_a_mutator_and_a_setting_the_code_writes_are_followed(
        tmp_path, monkeypatch):
    """``ops.add(x, 1)`` is no write of the module ``ops``, and ``global MODE; if MODE is
    None: MODE = 1.0`` leaves MODE a setting the user may edit: both had dropped out of the
    cache key, and an edit of either left a cached profile stale (review KK1)."""
    import sys

    (tmp_path / "kk_ops_mod.py").write_text(
        "ALPHA = 1.0\ndef add(x, y):\n    return x + ALPHA * y\n")
    (tmp_path / "kk_net_mod.py").write_text(
        "import torch\nimport kk_ops_mod\nMODE = None\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(3, 2)\n"
        "    def forward(self, x):\n"
        "        global MODE\n"
        "        if MODE is None:\n"
        "            MODE = 1.0\n"
        "        return kk_ops_mod.add(self.fc(x), 1.0) * MODE\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        model = importlib.import_module("kk_net_mod").Net()
        ops, net = sys.modules["kk_ops_mod"], sys.modules["kk_net_mod"]
        before = model_fingerprint(model)
        for module, name, value in ((ops, "ALPHA", 7.0), (net, "MODE", 3.0)):
            old = getattr(module, name)
            setattr(module, name, value)
            assert model_fingerprint(model) != before, name
            setattr(module, name, old)
    finally:
        for name in ("kk_ops_mod", "kk_net_mod"):
            sys.modules.pop(name, None)


def test_a_scripts_model_is_compared_with_a_ray_workers_by_the_modules_it_reads(tmp_path):
    """A class of the running script (``__main__``) reaches a Ray worker by value, with the
    values its code reads then: only what it reads of the user's modules, which a worker
    imports afresh, is compared, its own helpers followed. Its reads had been none on the
    worker (no source file there), then its classes and helpers digested otherwise there:
    every global of the driver's said to differ (sweeps SX8, SX9)."""
    import importlib.util

    from diagql.storage.fingerprint import globals_digests, model_functions

    (tmp_path / "config_of_test.py").write_text("GAIN = 2.0\n")
    spec = importlib.util.spec_from_file_location("config_of_test", tmp_path / "config_of_test.py")
    config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config)
    script = {"__name__": "__main__", "torch": torch, "config": config, "SCALE": 3.0}
    exec("def helper(h):\n"
         "    return h * config.GAIN\n"
         "class Net(torch.nn.Module):\n"
         "    def __init__(self):\n"
         "        super().__init__()\n"
         "        self.fc = torch.nn.Linear(2, 2)\n"
         "    def forward(self, x):\n"
         "        return helper(self.fc(x)) * SCALE\n", script)
    net = script["Net"]()
    reads = globals_digests(model_functions(net, script=True), shipped=True)
    assert set(reads) == {"__main__.config"}, reads  # through helper; not SCALE, torch, helper
    assert "__main__.SCALE" in globals_digests(model_functions(net, script=True))
