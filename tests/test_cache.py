"""The disk cache of profiles and samples: reuse across connections, keys that miss when they
must, damaged entries detected and recomputed, and a cache that can fail without DiagQL failing.
"""
from __future__ import annotations

import contextlib
import errno
import importlib
import io
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import diagql
from diagql.results.formats import size_text
from diagql.errors import DiagQLError, DiagQLWarning
from diagql.samplers.stratified import StratifiedSampler
from diagql.storage import entry_file
from diagql.storage import store as cache_module
from diagql.storage.fingerprint import (
    Unfingerprintable,
    data_fingerprint,
    model_fingerprint,
)
from diagql.storage.store import Cache

QUERY = "TOPK 3 NEURONS IN fc1 WHERE incorrect"
SAMPLED = "TOPK 3 NEURONS IN fc1 WHERE incorrect USING SAMPLE stratified(0.3)"


class Tiny(nn.Module):
    def __init__(self, slope: float = 0.01):
        super().__init__()
        # fc1 wider than its block's 64 directions, which would rebuild its rows with no pass.
        self.fc1 = nn.Linear(6, 80)
        self.act = nn.LeakyReLU(slope)
        self.fc2 = nn.Linear(80, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def tiny(seed: int = 0, **kwargs) -> Tiny:
    """A fresh instance each time: equal weights for equal seeds, as after loading a checkpoint."""
    torch.manual_seed(seed)
    return Tiny(**kwargs)


def pair(seed: int = 0, n: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=generator), torch.randint(0, 3, (n,), generator=generator)


def count_calls(model: nn.Module) -> list[int]:
    """Forward calls, counted by a hook (state outside the fingerprint, unlike an attribute)."""
    calls = [0]
    model.register_forward_pre_hook(lambda module, args: calls.__setitem__(0, calls[0] + 1))
    return calls


def connect(model, data, cache_dir, **options) -> diagql.Connection:
    return diagql.connect(model, data, cache_dir=cache_dir, progress=False, **options)


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def assert_same_profile(a, b) -> None:
    for field in ("labels", "predictions", "confidence", "latents"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
    assert (a.n_classes, a.latent_layer, a.seconds) == (b.n_classes, b.latent_layer, b.seconds)


def diagql_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, DiagQLWarning)]


# --- reuse -------------------------------------------------------------------------------------

def test_a_second_connection_loads_the_profile_without_a_forward_pass(tmp_path):
    first = connect(tiny(), pair(), tmp_path)
    profile = first.profile
    first.cache.flush()  # writes land in the background
    # The profile, and its one block's (fc1's) auxiliary in an entry of its own.
    assert (first.cache.hits, first.cache.misses, first.cache.writes) == (0, 1, 2)
    assert [p.parent.name for p in entries(tmp_path)] == ["auxiliary", "profile"]

    model = tiny()
    calls = count_calls(model)
    second = connect(model, pair(), tmp_path)
    assert_same_profile(second.profile, profile)
    assert calls[0] == 0
    assert (second.cache.hits, second.cache.misses, second.cache.writes) == (1, 0, 0)
    assert second.query(QUERY).rows == first.query(QUERY).rows
    assert second.query("SHOW PROFILE").rows == first.query("SHOW PROFILE").rows
    # The first session's seconds, said to be its (they had read as this session's: MM2)
    assert "s, read from the cache;" in second.query("SHOW PROFILE").title
    assert "read from the cache" not in first.query("SHOW PROFILE").title



def test_unlabelled_data_is_cached_like_labelled_data(tmp_path):
    """(X, None), the documented form of data without labels, was never cached on disk: its
    None was hashed as an array of Python objects, which no digest can stand for."""
    X, y = pair()
    assert data_fingerprint((X, None)) not in (data_fingerprint((X, y)),
                                               data_fingerprint((pair(seed=1)[0], None)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = connect(tiny(), (X, None), tmp_path)
        profile = first.profile
        first.cache.flush()
    assert not diagql_warnings(record) and first.cache.writes == 2
    model = tiny()
    calls = count_calls(model)
    second = connect(model, (X, None), tmp_path)
    assert_same_profile(second.profile, profile)
    assert calls[0] == 0 and second.cache.hits == 1 and not second.profile.has_labels
    with torch.no_grad():
        np.testing.assert_array_equal(second.profile.predictions, tiny()(X).argmax(1).numpy())
    labelled = connect(tiny(), (X, y), tmp_path)  # not the unlabelled entry: its own
    assert labelled.profile.has_labels and labelled.cache.hits == 0
    np.testing.assert_array_equal(labelled.profile.labels, y.numpy())

def test_a_sample_is_reused_from_disk(tmp_path, monkeypatch):
    first = connect(tiny(), pair(), tmp_path)
    indices = first.sample("stratified(0.3)")
    rows = first.query(SAMPLED).rows
    first.cache.flush()
    # The profile, fc1's auxiliary, the sample, the layer catalog, the sampled items'
    # activations.
    assert first.cache.writes == 5

    monkeypatch.setattr(StratifiedSampler, "fit", lambda *args: pytest.fail("sample redrawn"))
    model = tiny()
    calls = count_calls(model)
    second = connect(model, pair(), tmp_path)
    np.testing.assert_array_equal(second.sample("stratified(0.3)"), indices)
    assert second.cache.hits == 1  # the sample alone: drawing nothing needs no profile
    assert second.query(SAMPLED).rows == rows
    # The sample was in memory; the catalog and the activations came from disk: no forward
    # pass at all, not even the one-item probe that finds the layers (and fc1's auxiliary).
    assert second.cache.hits == 5
    assert calls[0] == 0


def test_other_sampler_arguments_are_other_entries(tmp_path):
    db = connect(tiny(), pair(), tmp_path)
    a = db.sample("random(0.3, random_state=1)")
    b = db.sample("random(0.3, random_state=2)")
    assert not np.array_equal(a, b)
    other = connect(tiny(), pair(), tmp_path)
    np.testing.assert_array_equal(other.sample("random(0.3, random_state=2)"), b)
    np.testing.assert_array_equal(other.sample("random(0.3, random_state=1)"), a)


def test_a_dataloader_over_the_same_tensors_shares_the_entry(tmp_path):
    X, y = pair()
    profile = connect(tiny(), (X, y), tmp_path).profile
    loader = DataLoader(TensorDataset(X, y), batch_size=7, shuffle=True)  # read by index
    db = connect(tiny(), loader, tmp_path)
    assert_same_profile(db.profile, profile)
    assert db.cache.hits == 1


# --- what must miss ----------------------------------------------------------------------------

def test_a_changed_weight_misses(tmp_path):
    connect(tiny(), pair(), tmp_path).profile
    model = tiny()
    with torch.no_grad():
        model.fc2.bias[0] += 1e-4
    calls = count_calls(model)
    db = connect(model, pair(), tmp_path)
    db.profile
    assert calls[0] > 0 and (db.cache.hits, db.cache.misses) == (0, 1)


def test_a_changed_module_attribute_misses(tmp_path):
    """LeakyReLU's slope is in no state_dict, yet it changes every output."""
    connect(tiny(slope=0.01), pair(), tmp_path).profile
    db = connect(tiny(slope=0.5), pair(), tmp_path)
    db.profile
    assert db.cache.hits == 0


@pytest.mark.parametrize("change", ["X", "y", "fewer items"])
def test_changed_data_misses(tmp_path, change):
    X, y = pair()
    connect(tiny(), (X, y), tmp_path).profile
    X, y = X.clone(), y.clone()
    if change == "X":
        X[17, 2] += 1e-3
    elif change == "y":
        y[17] = (y[17] + 1) % 3
    else:
        X, y = X[:-1], y[:-1]
    db = connect(tiny(), (X, y), tmp_path)
    np.testing.assert_array_equal(db.profile.labels, y.numpy())
    assert (db.cache.hits, db.cache.misses) == (0, 1)


def test_a_changed_latent_setting_misses(tmp_path):
    default = connect(tiny(), pair(), tmp_path)
    assert default.profile.latent_layer == "input of fc2"
    other = connect(tiny(), pair(), tmp_path, latent="fc1")
    assert other.profile.latent_layer == "fc1" and other.cache.hits == 0
    other.query("SET latent = default")
    assert_same_profile(other.profile, default.profile)
    assert other.cache.hits == 1


def test_a_changed_forward_misses(tmp_path, monkeypatch):
    """Same class name, module and weights; only forward() changed (edited and reloaded)."""
    source = textwrap.dedent("""
        from torch import nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = nn.Linear(6, 8)
                self.fc2 = nn.Linear(8, 3)

            def forward(self, x):
                return self.fc2(self.fc1(x))
    """)
    path = tmp_path / "cache_test_net.py"
    path.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    try:
        module = importlib.import_module("cache_test_net")
        torch.manual_seed(0)
        before = model_fingerprint(module.Net())
        path.write_text(source.replace("self.fc2(self.fc1(x))", "self.fc2(self.fc1(x).relu())"))
        module = importlib.reload(module)
        torch.manual_seed(0)
        assert model_fingerprint(module.Net()) != before
    finally:
        sys.modules.pop("cache_test_net", None)


# --- damaged entries ---------------------------------------------------------------------------

def _arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {name: npz[name] for name in npz.files if name != "__diagql__"}


def _store_now(root: Path, kind: str, key: str, arrays: dict) -> None:
    cache = Cache(root)
    cache.store(kind, key, arrays, {})
    cache.flush()


def _damage(path: Path, how: str, monkeypatch) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage":
        path.write_bytes(b"not an npz file\n" * 50)
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "flipped byte":  # in the middle of the largest array's data
        with zipfile.ZipFile(path) as archive:
            largest = max(archive.infolist(), key=lambda info: info.file_size)
        name_length, extra_length = struct.unpack_from("<HH", raw, largest.header_offset + 26)
        middle = largest.header_offset + 30 + name_length + extra_length + largest.file_size // 2
        path.write_bytes(raw[:middle] + bytes([raw[middle] ^ 0xFF]) + raw[middle + 1:])
    elif how == "plain npy":
        np.save(path.with_suffix(".tmp.npy"), np.arange(3))
        os.replace(path.with_suffix(".tmp.npy"), path)
    elif how == "foreign key":
        _store_now(path.parent.parent, "profile", "0" * 64, _arrays(path))
        os.replace(path.parent / f"{'0' * 64}.npz", path)
    elif how == "old version":
        with monkeypatch.context() as patch:
            patch.setattr(cache_module, "FORMAT_VERSION", 0)
            _store_now(path.parent.parent, "profile", path.stem, _arrays(path))
    elif how == "wrong length":
        arrays = {k: (v[:-1] if v.ndim else v) for k, v in _arrays(path).items()}
        _store_now(path.parent.parent, "profile", path.stem, arrays)
    elif how == "missing field":
        arrays = {k: v for k, v in _arrays(path).items() if k != "latents"}
        _store_now(path.parent.parent, "profile", path.stem, arrays)
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty", "flipped byte", "plain npy",
                                 "foreign key", "old version", "wrong length", "missing field"])
def test_a_damaged_profile_is_reported_and_recomputed(tmp_path, monkeypatch, how):
    first = connect(tiny(), pair(), tmp_path)
    profile, rows = first.profile, first.query(QUERY).rows
    first.cache.flush()
    [path] = [p for p in entries(tmp_path) if p.parent.name == "profile"]
    _damage(path, how, monkeypatch)

    model = tiny()
    calls = count_calls(model)
    second = connect(model, pair(), tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert_same_profile_values(second.profile, profile)
        second.cache.flush()
    assert len(diagql_warnings(record)) == 1, diagql_warnings(record)
    assert "damaged cache entry" in diagql_warnings(record)[0]
    # The profile, and the auxiliary of its block that the recomputed pass made again.
    assert calls[0] > 0 and second.cache.hits == 0 and second.cache.writes == 2
    assert second.query(QUERY).rows == rows

    third = connect(tiny(), pair(), tmp_path)  # the entry was rewritten whole
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        third.profile
    assert third.cache.hits == 1


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX's")
def test_a_named_pipe_at_an_entrys_path_is_skipped_not_waited_on(tmp_path):
    """A FIFO put where the profile's entry was had blocked its read forever (sweep S36)."""
    first = connect(tiny(), pair(), tmp_path)
    profile = first.profile
    first.cache.flush()
    [path] = [p for p in entries(tmp_path) if p.parent.name == "profile"]
    path.unlink()
    os.mkfifo(path)

    def unblock():  # a read that waits on the pipe is given a writer: the test fails, not hangs
        time.sleep(10)
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))

    threading.Thread(target=unblock, daemon=True).start()
    second = connect(tiny(), pair(), tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert_same_profile_values(second.profile, profile)  # recomputed, not waited for
        second.cache.flush()
    [said] = diagql_warnings(record)
    assert said == f"cannot read the cache entry {path}: [Errno {errno.EINVAL}] not a regular " \
                   f"file; recomputing it"
    assert path.is_file()  # the recomputed entry took its place
    assert connect(tiny(), pair(), tmp_path).profile is not None


def test_a_binary_classifiers_profile_is_read_back(tmp_path):
    # One logit per item scores two classes: the reader had refused its (n, 1) logits as
    # damaged, so every new session warned and computed the profile again.
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 1))

    X, _ = pair()
    y = (X[:, 0] > 0).long()
    first = connect(model(), (X, y), tmp_path)
    assert first.profile.logits.shape == (len(X), 1) and first.profile.n_classes == 2
    first.cache.flush()
    second = connect(model(), (X, y), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        assert_same_profile(second.profile, first.profile)
    assert second.cache.hits == 1


def assert_same_profile_values(a, b) -> None:
    """A recomputed profile: the same answers, though its pass took other seconds."""
    for field in ("labels", "predictions", "confidence", "latents", "n_classes", "latent_layer"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))


def test_a_damaged_sample_is_reported_and_redrawn(tmp_path):
    first = connect(tiny(), pair(), tmp_path)
    indices = first.sample("stratified(0.3)")
    first.cache.flush()
    [path] = [p for p in entries(tmp_path) if p.parent.name == "sample"]
    path.write_bytes(path.read_bytes()[:100])
    db = connect(tiny(), pair(), tmp_path)
    with pytest.warns(DiagQLWarning, match="damaged cache entry"):
        np.testing.assert_array_equal(db.sample("stratified(0.3)"), indices)
    db.cache.flush()
    assert db.cache.hits == 1 and db.cache.writes == 1  # profile hit, sample rewritten


# --- a cache that cannot be used ---------------------------------------------------------------

def _works_with_one_warning(cache_dir) -> diagql.Connection:
    db = connect(tiny(), pair(), cache_dir)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        rows = db.query(SAMPLED).rows
        db.query(QUERY)
        db.cache.flush()  # a write fails in the writer thread; the caller's thread warns
    messages = diagql_warnings(record)
    assert len(messages) == 1, messages
    assert messages[0].startswith("cache disabled:") and "works without it" in messages[0]
    assert rows == connect(tiny(), pair(), False).query(SAMPLED).rows
    return db


@pytest.mark.parametrize("refused", ["mkdir", "mkstemp", "replace"])
def test_a_read_only_directory_warns_once(tmp_path, monkeypatch, refused):
    """Each step of a write that a read-only directory refuses, refused with EACCES the way
    the OS does (chmod itself stops no one when the tests run as root): making the entry's
    folder, creating the temporary file, renaming it into place."""
    root = tmp_path / "read-only"
    root.mkdir()
    refusals = []

    def refusing(original, path_of):
        def call(*args, **kwargs):
            path = Path(path_of(*args, **kwargs))
            if path.is_relative_to(root):
                refusals.append(path)
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return original(*args, **kwargs)
        return call

    if refused == "mkdir":
        monkeypatch.setattr(Path, "mkdir", refusing(Path.mkdir, lambda self, *a, **k: self))
    elif refused == "mkstemp":
        monkeypatch.setattr(tempfile, "mkstemp",
                            refusing(tempfile.mkstemp, lambda *a, dir=None, **k: dir or "/"))
    else:
        monkeypatch.setattr(os, "replace", refusing(os.replace, lambda src, dst, **k: dst))
    db = _works_with_one_warning(root)
    assert len(refusals) == 1  # then the cache stopped trying
    assert db.cache.writes == 0
    assert [p for p in root.rglob("*") if p.is_file()] == []  # no temporary file left behind


def test_a_path_that_is_a_file_warns_once(tmp_path):
    path = tmp_path / "not-a-directory"
    path.write_text("mine")
    _works_with_one_warning(path)
    assert path.read_text() == "mine"


def test_a_full_disk_warns_once_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(entry_file, "write", no_space)
    db = _works_with_one_warning(tmp_path)
    assert db.cache.writes == 0
    assert entries(tmp_path) == []
    notes = db.query("SHOW CACHE").notes  # says why it holds nothing
    assert any(note.startswith("cache disabled: cannot write to") and "No space left" in note
               for note in notes), notes


def test_clear_cache_says_what_it_could_not_remove(tmp_path, monkeypatch):
    db = connect(tiny(), pair(), tmp_path)
    db.query(SAMPLED)
    db.cache.flush()
    held = entries(tmp_path)
    assert held

    def refuse(self, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "unlink", refuse)  # a read-only directory, as root cannot make
    result = db.query("CLEAR CACHE")
    assert result.title.startswith("removed 0 entries (0 B)")
    assert result.notes == [f"could not remove {len(held)} entries "
                            f"({size_text(sum(p.stat().st_size for p in held))}): "
                            f"Permission denied"]
    monkeypatch.undo()
    assert db.query("CLEAR CACHE").title.startswith(f"removed {len(held)} entries")
    assert entries(tmp_path) == []


def test_cache_dir_false_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("DIAGQL_CACHE_DIR", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    db = connect(tiny(), pair(), False)
    db.query(SAMPLED)
    assert not db.cache.enabled and (db.cache.hits, db.cache.misses, db.cache.writes) == (0, 0, 0)
    assert entries(tmp_path) == []


def test_a_generic_dataset_is_not_cached_on_disk(tmp_path):
    X, y = pair()

    class Items(Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return X[i], y[i]

    rows = connect(tiny(), (X, y), False).query(SAMPLED).rows
    for data in (Items(), DataLoader(TensorDataset(X, y), collate_fn=lambda b: tuple(zip(*b)))):
        with pytest.raises(Unfingerprintable):
            data_fingerprint(data)
    model = tiny()
    calls = count_calls(model)
    for _ in range(2):
        db = connect(model, Items(), tmp_path)
        before = calls[0]
        db.profile
        assert calls[0] > before  # profiled by each connection
        assert db.query(SAMPLED).rows == rows
        assert db.cache.hits == db.cache.misses == db.cache.writes == 0
    assert entries(tmp_path) == []


# --- two sessions, one directory ---------------------------------------------------------------

WRITER = """
import sys
import numpy as np
from diagql.storage.store import Cache

cache, me = Cache(sys.argv[1]), int(sys.argv[2])
for i in range(40):
    cache.store("profile", "k" * 64, {"a": np.full(250_000, me * 1000 + i, dtype=np.int64)}, {})
    cache.flush()  # each one written: a later store would supersede a pending one
assert cache.writes == 40
"""


def test_concurrent_writers_of_one_key_leave_a_whole_entry(tmp_path):
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(me)])
               for me in (1, 2)]
    reader, seen = Cache(tmp_path), set()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)  # a half-written entry would warn
        while any(w.poll() is None for w in writers):
            arrays = reader.load("profile", "k" * 64)
            if arrays is not None:
                assert len(np.unique(arrays["a"])) == 1  # one writer's, whole
                seen.add(int(arrays["a"][0]))
        assert [w.wait() for w in writers] == [0, 0]
        final = reader.load("profile", "k" * 64)
    assert int(final["a"][0]) in (1039, 2039) and len(np.unique(final["a"])) == 1
    assert [p.name for p in entries(tmp_path)] == ["k" * 64 + ".npz"]  # no temporary files


# --- writes in the background ------------------------------------------------------------------

KEY = "k" * 64


def _values(value: int, n: int = 250_000) -> dict[str, np.ndarray]:
    return {"a": np.full(n, value, dtype=np.int64)}


def _on_disk(root: Path) -> np.ndarray | None:
    """The entry as a reader in another process finds it: from the file, never from memory."""
    path = root / "profile" / f"{KEY}.npz"
    if not path.exists():
        return None
    with open(path, "rb") as file:
        return cache_module._read(file, "profile", KEY)["a"]


class HalfWrite:
    """An entry's write that writes the first half of it, then waits for ``release`` before
    writing the rest: a write caught in flight."""

    def __init__(self, monkeypatch):
        self.half, self.release = threading.Event(), threading.Event()
        real = entry_file.write

        def write(file, arrays):
            buffer = io.BytesIO()
            real(buffer, arrays)
            raw = buffer.getvalue()
            file.write(raw[: len(raw) // 2])
            file.flush()
            self.half.set()
            assert self.release.wait(60)
            file.write(raw[len(raw) // 2:])

        monkeypatch.setattr(entry_file, "write", write)


def test_a_write_in_flight_is_never_seen_half_written_and_its_entry_is_served(tmp_path,
                                                                            monkeypatch):
    cache = Cache(tmp_path)
    cache.store("profile", KEY, _values(1), {})
    cache.flush()
    gate = HalfWrite(monkeypatch)
    started = time.perf_counter()
    cache.store("profile", KEY, _values(2), {})
    assert time.perf_counter() - started < 1  # store returned while the write waits
    assert gate.half.wait(60)
    # On disk: the old entry, whole; half of the new one sits in a temporary file only.
    assert set(_on_disk(tmp_path)) == {1}
    assert [p.name.startswith(".tmp-") for p in (tmp_path / "profile").iterdir()].count(True) == 1
    # In this process, any Cache over the directory loads the new entry from memory.
    other = Cache(tmp_path)
    decoded = other.load("profile", KEY, lambda arrays: arrays["a"])
    assert set(decoded) == {2} and other.hits == 1
    decoded[:] = 7  # the load's own copy: the entry being written is unchanged
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        read = subprocess.run([sys.executable, "-c", READER, str(tmp_path)], capture_output=True,
                              text=True, timeout=120)
    assert read.returncode == 0 and read.stdout.split() == ["1"], read.stderr
    gate.release.set()
    assert cache.flush(timeout=60)
    assert set(_on_disk(tmp_path)) == {2} and cache.writes == 2
    assert [p.name for p in entries(tmp_path)] == [f"{KEY}.npz"]


READER = f"""
import sys, warnings
import numpy as np
from diagql.errors import DiagQLWarning
from diagql.storage.store import Cache

warnings.simplefilter("error", DiagQLWarning)
arrays = Cache(sys.argv[1]).load("profile", "{KEY}")
print(" ".join(str(v) for v in np.unique(arrays["a"])) if arrays is not None else "none")
"""


def test_a_later_store_of_the_same_key_supersedes_a_pending_one(tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    gate = HalfWrite(monkeypatch)
    cache.store("profile", "first", _values(0, 10), {})
    assert gate.half.wait(60)  # the writer is busy: what follows waits in its queue
    for value in (1, 2, 3):
        cache.store("profile", KEY, _values(value), {})
    assert set(Cache(tmp_path).load("profile", KEY)["a"]) == {3}
    gate.release.set()
    assert cache.flush(timeout=60)
    assert set(_on_disk(tmp_path)) == {3}
    assert cache.writes == 2  # "first" and the last of the three


def test_listing_and_clearing_see_pending_writes(tmp_path, monkeypatch):
    cache = Cache(tmp_path)
    gate = HalfWrite(monkeypatch)
    cache.store("profile", "a", _values(1, 10), {})
    cache.store("sample", "b", _values(2, 10), {})
    assert gate.half.wait(60)
    threading.Timer(0.2, gate.release.set).start()
    assert sorted(e.key for e in cache.entries()) == ["a", "b"]  # waited for both to land

    gate.release.clear()
    gate.half.clear()
    cache.store("profile", "c", _values(3, 10), {})
    cache.store("sample", "d", _values(4, 10), {})  # queued behind c: dropped by the clear
    assert gate.half.wait(60)
    threading.Timer(0.2, gate.release.set).start()
    removed, kept = Cache(tmp_path).clear()  # another Cache of the process: it waits for c too
    assert kept == []
    assert sorted(e.key for e in removed) == ["a", "b", "c"]
    assert cache.flush(timeout=60)
    assert entries(tmp_path) == [] and cache.load("sample", "d") is None


def test_an_entry_cheaper_to_recompute_than_to_read_is_not_written(tmp_path, monkeypatch):
    # The development machine's costs (tests/conftest.py makes reads free for other tests).
    monkeypatch.setattr(cache_module, "READ_FIXED", 0.0003)
    monkeypatch.setattr(cache_module, "READ_RATE", 1.0e9)
    cache = Cache(tmp_path)
    size = 8 * 1_000_000
    assert cache.read_seconds(size) == pytest.approx(
        cache_module.READ_FIXED + size / cache_module.READ_RATE)
    cache.store("profile", "cheap", _values(1, 1_000_000), {}, seconds=cache.read_seconds(size) / 2)
    cache.store("profile", "dear", _values(2, 1_000_000), {}, seconds=cache.read_seconds(size) * 2)
    cache.store("profile", "unknown", _values(3, 1_000_000), {})  # no cost given: written
    cache.flush()
    assert sorted(e.key for e in cache.entries()) == ["dear", "unknown"]
    assert (cache.writes, cache.skipped) == (2, 1)
    # Loads of large entries measure the disk: the estimate follows what reads really cost.
    started = time.perf_counter()
    cache.load("profile", "dear")
    seconds = time.perf_counter() - started
    # (the load's own measure, within the wall time around it: no timing bound, which a
    # loaded machine broke at 3x)
    assert cache.read_rate != 1.0e9 and cache.read_seconds(size) <= seconds + 1e-6


EXITING_WRITER = """
import sys, time
import numpy as np
from diagql.storage import writer
from diagql.storage.store import Cache

root, mode = sys.argv[1], sys.argv[2]
cache = Cache(root)
cache.store("profile", "%s", {"a": np.full(250_000, 1, dtype=np.int64)}, {})
cache.flush()
from diagql.storage import entry_file
real = entry_file.write
def slow(file, arrays):
    import io
    buffer = io.BytesIO()
    real(buffer, arrays)
    raw = buffer.getvalue()
    file.write(raw[: len(raw) // 2])
    print("half", flush=True)
    time.sleep(float(sys.argv[3]))
    file.write(raw[len(raw) // 2:])
entry_file.write = slow
if mode == "give up":
    writer.EXIT_WAIT = 0.5
cache.store("profile", "%s", {"a": np.full(250_000, 2, dtype=np.int64)}, {})
if mode == "interrupted":
    import atexit
    atexit.register(lambda: print("at exit", flush=True))  # runs before the cache's flush
    time.sleep(120)
""" % (KEY, KEY)


def _exiting_writer(root: Path, mode: str, sleep: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", EXITING_WRITER, str(root), mode, str(sleep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_at_exit_pending_writes_land(tmp_path):
    writer = _exiting_writer(tmp_path, "exit", 1.0)
    out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert out.split() == ["half"]  # the process reached its end with the write in flight
    assert set(_on_disk(tmp_path)) == {2}
    assert [p.name for p in entries(tmp_path)] == [f"{KEY}.npz"]


def test_at_exit_the_wait_is_bounded_and_leaves_the_old_entry_whole(tmp_path):
    writer = _exiting_writer(tmp_path, "give up", 60.0)
    started = time.monotonic()
    out, err = writer.communicate(timeout=120)
    assert time.monotonic() - started < 30
    assert writer.returncode == 0 and "gave up waiting for cache writes" in err, err
    assert set(_on_disk(tmp_path)) == {1}


def test_ctrl_c_during_a_write_leaves_whole_entries(tmp_path):
    """Ctrl-C while a write is in flight: the process still lets it land at exit; a second
    Ctrl-C while it waits ends the wait, and the entry on disk is the old one, whole."""
    import signal

    writer = _exiting_writer(tmp_path, "interrupted", 2.0)
    assert writer.stdout.readline().strip() == "half"
    writer.send_signal(signal.SIGINT)
    out, err = writer.communicate(timeout=120)
    assert "KeyboardInterrupt" in err and out.strip() == "at exit"
    assert set(_on_disk(tmp_path)) == {2}

    shutil.rmtree(tmp_path / "profile")
    writer = _exiting_writer(tmp_path, "interrupted", 60.0)
    assert writer.stdout.readline().strip() == "half"
    writer.send_signal(signal.SIGINT)
    assert writer.stdout.readline().strip() == "at exit"
    time.sleep(0.3)  # into the cache's wait
    writer.send_signal(signal.SIGINT)
    writer.communicate(timeout=30)
    assert set(_on_disk(tmp_path)) == {1}
    assert Cache(tmp_path).entries()[0].key == KEY  # the abandoned temporary file is not listed


def test_a_process_killed_while_its_writer_thread_writes_leaves_no_half_entry(tmp_path):
    import signal

    writer = _exiting_writer(tmp_path, "interrupted", 60.0)
    assert writer.stdout.readline().strip() == "half"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        assert set(Cache(tmp_path).load("profile", KEY)["a"]) == {1}


def test_an_unexpected_error_in_the_writer_turns_writing_off_instead_of_hanging(tmp_path,
                                                                              monkeypatch):
    cache = Cache(tmp_path)

    def broken(keep=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cache, "_evict", broken)
    cache.store("profile", "a", _values(1, 10), {})
    with pytest.warns(DiagQLWarning, match="cache disabled.*a bug"):
        assert cache.flush(timeout=60)
    cache.store("profile", "b", _values(2, 10), {})
    assert cache.flush(timeout=60)
    assert [e.key for e in cache.entries()] == ["a"]  # written before the error; b never


def test_abandoned_temporary_files_are_removed_after_an_hour(tmp_path):
    cache = Cache(tmp_path)
    cache.store("profile", "a", _values(1, 10), {})
    cache.flush()
    old, recent = tmp_path / "profile" / ".tmp-old.npz", tmp_path / "profile" / ".tmp-new.npz"
    for temp in (old, recent):
        temp.write_bytes(b"half")
    os.utime(old, (time.time() - 2 * cache_module.STALE_TEMP,) * 2)
    cache.store("profile", "b", _values(2, 10), {})
    cache.flush()
    assert not old.exists() and recent.exists()


def test_a_killed_writers_temporary_files_are_seen_and_removed(tmp_path):
    """A process killed mid-write had left its temporary files (193 MB in a sweep) unseen by
    SHOW CACHE, kept by CLEAR CACHE and uncounted, until a later write an hour on. A writer
    names its process: another's that has ended is abandoned at once."""
    import subprocess
    import sys

    import diagql
    from tests.models import digits, trained_mlp

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    conn = diagql.connect(trained_mlp(), digits(), cache_dir=tmp_path, progress=False)
    conn.query("AVG NEURONS IN head USING SAMPLE random(0.1)")
    conn.cache.flush()
    dead = tmp_path / "profile" / f".tmp-{gone}-abc.npz"
    mine = tmp_path / "profile" / f".tmp-{os.getpid()}-def.npz"  # this process's, in flight
    dead.write_bytes(b"x" * 3000)
    mine.write_bytes(b"y" * 10)
    shown = conn.query("SHOW CACHE")
    assert any("2.9 kB in 1 temporary file of writes that never finished" in note
               for note in shown.notes)
    cleared = conn.query("CLEAR CACHE")
    assert "and 2.9 kB of unfinished writes' temporary files" in cleared.title
    assert not dead.exists() and mine.exists()
    dead.write_bytes(b"x")  # and the next write removes it too
    conn.query("AVG NEURONS IN encoder.2 USING SAMPLE random(0.1)")
    conn.cache.flush()
    assert not dead.exists() and mine.exists()


def test_a_sessions_profile_and_catalog_stay_recently_used(tmp_path, monkeypatch):
    """Read once per session, they had looked least recently used, and a cache over its limit
    evicted them before the activations the session kept writing."""
    import diagql
    from diagql.session import artifacts
    from tests.models import digits, trained_mlp

    monkeypatch.setattr(artifacts, "KEEP_IN_USE", 0.0)
    conn = diagql.connect(trained_mlp(), digits(), cache_dir=tmp_path, progress=False)
    conn.query("AVG NEURONS IN head USING SAMPLE random(0.1)")
    conn.cache.flush()
    entries = [next((tmp_path / kind).glob("*.npz")) for kind in ("profile", "catalog")]
    old = time.time() - 3600
    for path in entries:
        os.utime(path, (old, old))
    conn.query("AVG NEURONS IN encoder.1 USING SAMPLE random(0.1)")
    conn.cache.flush()
    assert all(path.stat().st_mtime > old + 1800 for path in entries)
    oldest = conn.cache.entries()[0]
    assert oldest.kind not in ("profile", "catalog")


# --- where the cache lives, and fingerprints ----------------------------------------------------

def test_the_cache_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("DIAGQL_CACHE_DIR", str(tmp_path / "env"))
    assert Cache.resolve(None).root == tmp_path / "env"
    assert Cache.resolve(tmp_path / "given").root == tmp_path / "given"
    assert Cache.resolve(False).root is None and not Cache.resolve(False).enabled
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Cache.resolve("~/c").root == tmp_path / "c"
    with pytest.raises(DiagQLError, match="cache_dir must be a path"):
        Cache.resolve(3)

    monkeypatch.delenv("DIAGQL_CACHE_DIR")
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Cache.resolve(None).root == tmp_path / "xdg" / "diagql"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # ignored, as the XDG spec says
    assert Cache.resolve(None).root == tmp_path / ".cache" / "diagql"
    monkeypatch.setattr(sys, "platform", "darwin")
    assert Cache.resolve(None).root == tmp_path / "Library" / "Caches" / "diagql"
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "local"))
    assert Cache.resolve(None).root == tmp_path / "local" / "diagql"


def test_fingerprints():
    X, y = pair()
    assert model_fingerprint(tiny()) == model_fingerprint(tiny())
    assert model_fingerprint(tiny(0)) != model_fingerprint(tiny(1))
    bn = nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3))
    before = model_fingerprint(bn)
    bn[1].running_mean += 1  # a buffer, not a parameter
    assert model_fingerprint(bn) != before

    assert data_fingerprint((X, y)) == data_fingerprint((X.clone(), y.clone()))
    assert data_fingerprint((X, y)) == data_fingerprint(TensorDataset(X, y))
    assert data_fingerprint((X.t().contiguous().t(), y)) == data_fingerprint((X, y))
    assert data_fingerprint((X, y)) != data_fingerprint((X.double(), y))
    assert data_fingerprint((X.reshape(300, 2, 3), y)) != data_fingerprint((X, y))
    arrays = (X.numpy(), y.numpy())
    assert data_fingerprint(arrays) == data_fingerprint((arrays[0].copy(), arrays[1]))
    assert data_fingerprint((X.bfloat16(), y)) != data_fingerprint((X.half(), y))
    with pytest.raises(Unfingerprintable, match="Python objects"):
        data_fingerprint((np.array([object()] * 3), [0, 1, 2]))


def test_a_writer_killed_mid_write_leaves_no_half_entry(tmp_path):
    """SIGKILL a process while it writes large entries: whenever it dies, a reader finds either
    a whole entry or none (it recomputes), never half a file."""
    import signal
    import time

    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), "3"])
    deadline = time.monotonic() + 60
    while not any(tmp_path.rglob("*")) and time.monotonic() < deadline:
        time.sleep(0.01)  # until it has started writing
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)  # a half-written entry would warn
        arrays = Cache(tmp_path).load("profile", "k" * 64)
    if arrays is not None:
        assert len(np.unique(arrays["a"])) == 1 and len(arrays["a"]) == 250_000


def test_a_cache_in_a_folder_of_the_users_own_files_never_touches_them(tmp_path, monkeypatch):
    """--cache-dir . in a project: its data/features.npz was evicted as an entry, and CLEAR
    CACHE removed results/run-1.npz."""
    mine = [tmp_path / "data" / "features.npz", tmp_path / "results" / "run-1.npz",
            tmp_path / "notes.npz"]
    for path in mine:
        path.parent.mkdir(exist_ok=True)
        np.savez(path, a=np.zeros(100_000))
    monkeypatch.chdir(tmp_path)
    cache = Cache.resolve(".", limit=1)  # every entry over the limit: evicted at once
    cache.store("profile", "a", _values(1, 10), {})
    assert cache.flush(timeout=60)
    assert [e.kind for e in cache.entries()] in ([], ["profile"])
    removed, kept = cache.clear()
    assert all(e.kind == "profile" for e in removed) and kept == []
    assert all(path.exists() for path in mine)
    with pytest.raises(DiagQLError, match="cache_dir must be a path"):
        Cache.resolve("")


def test_a_relative_cache_dir_stays_where_it_was_named(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    cache = Cache.resolve("c21")
    monkeypatch.chdir(tmp_path / "elsewhere")  # a notebook's %cd
    cache.store("profile", "a", _values(1, 10), {})
    assert cache.flush(timeout=60)
    assert (tmp_path / "c21" / "profile" / "a.npz").exists()
    assert not (tmp_path / "elsewhere" / "c21").exists()


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX's")
def test_entries_are_written_with_the_process_umask_so_a_shared_cache_is_readable(tmp_path):
    """mkstemp makes its files 0600: a cache directory several users share (one
    $DIAGQL_CACHE_DIR) had been unreadable to all but each entry's writer, who was warned 16
    times a session and had the cache turned off. An entry now has the mode any file the
    process makes has (its umask, read when the writer's module is imported)."""
    from diagql.storage import writer

    mask = os.umask(0)
    os.umask(mask)
    assert writer._umask() == mask
    cache = Cache(tmp_path)
    cache.store("profile", "k" * 40, {"x": np.arange(3.0)}, {})
    cache.flush()
    entries = list(tmp_path.rglob("*.npz"))
    assert entries and all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in entries)
    assert 0o666 & ~mask != 0o600  # the test means something under this umask


class _BatchCentred(torch.nn.Module):
    """Outputs that depend on the batch: each hidden unit centred over the batch's items."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = torch.nn.Linear(10, 16), torch.nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.relu(h - h.mean(0, keepdim=True)))


def _incorrect_in_batches_of(model, X, y, size: int) -> int:
    with torch.no_grad():
        predicted = torch.cat([model(X[i:i + size]) for i in range(0, len(X), size)]).argmax(1)
    return int((predicted != y).sum())


def test_a_batch_dependent_models_profile_follows_the_batch_size(tmp_path):
    """Its profile was keyed and kept without the batch size: after SET batch_size = 8, and in
    a new connection at 8 on a cache filled at 32, WHERE incorrect counted the mistakes of
    batches of 32 (SW5)."""
    torch.manual_seed(1)
    X, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
    model = _BatchCentred().eval()
    at32, at8 = (_incorrect_in_batches_of(model, X, y, size) for size in (32, 8))
    assert at32 != at8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", diagql.DiagQLWarning)
        db = diagql.connect(model, (X, y), batch_size=32, cache_dir=tmp_path, progress=False)
        assert db.query("AVG NEURONS IN fc1 WHERE incorrect").n_items == at32
        db.query("SET batch_size = 8")
        assert db.query("AVG NEURONS IN fc1 WHERE incorrect").n_items == at8
        db.close()
        again = diagql.connect(model, (X, y), batch_size=8, cache_dir=tmp_path, progress=False)
        assert again.query("AVG NEURONS IN fc1 WHERE incorrect").n_items == at8
        again.close()
        first = diagql.connect(model, (X, y), batch_size=32, cache_dir=tmp_path, progress=False)
        assert first.query("AVG NEURONS IN fc1 WHERE incorrect").n_items == at32
