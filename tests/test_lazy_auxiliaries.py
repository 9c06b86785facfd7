"""A profile read from the disk cache reads its block auxiliaries lazily, each from its own
entry (docs/ARCHITECTURE.md, "Storage"), and keeps the estimator's covariates: a new
connection's sample query on a block reads that block's entry only, and answers as a connection
that holds everything in memory does, as the estimator written in numpy does, and (an entry
evicted or damaged) after the profile pass again."""
from __future__ import annotations

import copy
import os
import shutil
import warnings

import numpy as np
import pytest
import torch

import diagql
from diagql.engine import covariates as covariates_module
from diagql.model import auxiliaries
from diagql.session import artifacts
from diagql.storage import store
from tests.test_block_auxiliaries import F32, _expected

QUERY = "AVG NEURONS IN 2 WHERE class = 3 USING SAMPLE random(0.2, random_state=1)"
BLOCK = '["2"]'  # the view key of the cnn's block 2
BLOCKS = ['["0"]', '["2"]', '["6"]']  # 8 is the logits, which the profile holds whole


@pytest.fixture(scope="module", autouse=True)
def quick_fit():
    """Blocks fitted on fewer items (their fit is most of a profile pass here), in every pass
    of this module alike, the passes that make an entry again included."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(auxiliaries, "FIT_ITEMS", 300)
        yield


@pytest.fixture(scope="module")
def made(cnn, digits, tmp_path_factory):
    """A cache directory where a connection made the profile, and that connection."""
    root = tmp_path_factory.mktemp("lazy")
    conn = diagql.connect(cnn, digits, cache_dir=root, progress=False)
    conn.query(QUERY)
    conn.cache.flush()
    return root, conn


@pytest.fixture(scope="module")
def memory(cnn, digits):
    """Everything computed and held in memory: no disk cache."""
    conn = diagql.connect(copy.deepcopy(cnn), digits, cache_dir=False, progress=False)
    return conn, conn.query(QUERY)


@pytest.fixture
def fresh(made, cnn, digits, tmp_path):
    """A new connection over a copy of the made cache directory (its own to damage)."""
    shutil.copytree(made[0], tmp_path / "cache")
    return diagql.connect(copy.deepcopy(cnn), digits, cache_dir=tmp_path / "cache",
                          progress=False)


def _entry(conn, view_key: str):
    key = conn.artifacts.profile_key()
    return conn.cache.path("auxiliary", conn.artifacts.auxiliary_key(key, view_key))


def _reads(monkeypatch) -> list[str]:
    """The kinds of the entries read from disk from now on, in order."""
    seen = []
    read = store._read

    def counted(file, kind, key):
        seen.append(kind)
        return read(file, kind, key)

    monkeypatch.setattr(store, "_read", counted)
    return seen


def _passes(monkeypatch) -> list[int]:
    """One element per profile pass run from now on."""
    ran = []
    compute = artifacts.compute_profile

    def counted(*args, **kwargs):
        ran.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(artifacts, "compute_profile", counted)
    return ran


def test_the_connection_that_made_the_profile_holds_every_auxiliary(made, memory):
    for conn in (made[1], memory[0]):
        assert [a.key for a in conn.profile.auxiliaries.held()] == BLOCKS
    assert sorted(p.name for p in (made[0] / "auxiliary").iterdir()) == \
        sorted(_entry(made[1], key).name for key in BLOCKS)


def test_a_new_connection_reads_only_the_queried_blocks_entry(fresh, memory, cnn, digits,
                                                              monkeypatch):
    reads, passes = _reads(monkeypatch), _passes(monkeypatch)
    # No refit of the latent's components either: the profile entry holds them.
    monkeypatch.setattr(covariates_module, "fit_space", None)
    result = fresh.query(QUERY)
    assert reads.count("profile") == 1 and reads.count("auxiliary") == 1 and not passes
    assert [a.key for a in fresh.profile.auxiliaries.held()] == [BLOCK]
    # The same answer as the connection that holds everything in memory.
    np.testing.assert_allclose(result.values, memory[1].values, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(result.estimate.ci_high, memory[1].estimate.ci_high,
                               rtol=1e-12, atol=1e-12)
    mine, theirs = fresh.profile.auxiliary(BLOCK), memory[0].profile.auxiliary(BLOCK)
    for field in ("mean", "basis", "z"):
        np.testing.assert_array_equal(getattr(mine, field), getattr(theirs, field))
    assert covariates_module.covariates(fresh.profile).tobytes() == \
        covariates_module.covariates(memory[0].profile).tobytes()
    # And the known-coefficient estimator written in numpy, on plain torch's rows, whose
    # projections the entry holds.
    with torch.no_grad():
        rows = cnn[:3](digits[0].clone()).flatten(1).double().numpy()
    np.testing.assert_allclose(mine.z, (rows - mine.mean) @ mine.basis, atol=2e-4)
    profile = fresh.profile
    matching = np.flatnonzero(profile.labels == 3)
    mean, _ = _expected(profile, rows, result.plan.items, matching,
                        np.zeros(len(profile), int))[0]
    np.testing.assert_allclose(result.values, mean, **F32)
    # A query on a layer that is no block reads no auxiliary.
    fresh.query("AVG NEURONS IN 3 USING SAMPLE random(0.2, random_state=1)")
    assert reads.count("auxiliary") == 1


def test_the_covariates_kept_are_those_computed_from_the_latents(fresh):
    profile = fresh.profile
    assert profile.covariates is not None
    again = covariates_module.reduced(profile.latents.copy())
    assert profile.covariates.dtype == np.float64 and profile.covariates.shape == again.shape
    assert profile.covariates.tobytes() == again.tobytes()


@pytest.mark.parametrize("how", ["evicted", "damaged"])
def test_an_evicted_or_damaged_entry_costs_the_profile_pass_not_the_answer(fresh, memory, how,
                                                                           monkeypatch):
    path = _entry(fresh, BLOCK)
    if how == "evicted":
        path.unlink()
    else:
        path.write_bytes(b"PK\x03\x04 not a zip")
    passes = _passes(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fresh.query(QUERY)
    damaged = [w for w in caught if "damaged cache entry" in str(w.message)]
    assert len(damaged) == (how == "damaged") and len(passes) == 1
    np.testing.assert_allclose(result.values, memory[1].values, rtol=1e-12, atol=1e-12)
    # The pass made every block's again, and they are held and stored.
    assert [a.key for a in fresh.profile.auxiliaries.held()] == BLOCKS
    fresh.cache.flush()
    reads = _reads(monkeypatch)
    again = diagql.connect(fresh.model, fresh.data, cache_dir=fresh.cache.root, progress=False)
    np.testing.assert_allclose(again.query(QUERY).values, result.values, rtol=1e-12,
                               atol=1e-12)
    assert reads.count("auxiliary") == 1 and len(passes) == 1


def test_reading_the_profile_marks_its_auxiliaries_used(fresh):
    old = 1_000_000_000.0
    for key in BLOCKS:
        os.utime(_entry(fresh, key), (old, old))
    fresh.profile  # noqa: B018 - read the profile entry, no auxiliary
    assert fresh.profile.auxiliaries.held() == ()
    assert all(_entry(fresh, key).stat().st_mtime > old for key in BLOCKS)


def test_an_entry_of_another_block_is_refused(fresh):
    arrays = auxiliaries.entry_arrays(fresh.profile.auxiliary(BLOCK))
    with pytest.raises(ValueError, match="not of 6"):
        auxiliaries.from_entry(arrays, '["6"]', "6", len(fresh.profile))
    with pytest.raises(ValueError, match="does not describe"):
        auxiliaries.from_entry(arrays, BLOCK, "2", len(fresh.profile) - 1)


def test_a_checkpoint_s_auxiliaries_are_its_own_entries(cnn, digits, tmp_path, monkeypatch):
    """A checkpoint is a model of its own (session/models.py): its profile and its blocks'
    entries are keyed by its weights, and a new connection reads only the queried one's."""
    early = {name: value + 0.01 for name, value in cnn.state_dict().items()}
    query = "AVG NEURONS IN early.2 USING SAMPLE random(0.2, random_state=1)"

    def connect():
        return diagql.connect(copy.deepcopy(cnn), digits, checkpoints={"early": early},
                              cache_dir=tmp_path, progress=False)

    made = connect()
    want = made.query(query)
    made.cache.flush()
    # early's three blocks: no query needed the final model's profile.
    assert len(list((tmp_path / "auxiliary").iterdir())) == 3
    reads = _reads(monkeypatch)
    got = connect().query(query)
    assert reads.count("profile") == 1 and reads.count("auxiliary") == 1
    np.testing.assert_allclose(got.values, want.values, rtol=1e-12, atol=1e-12)
