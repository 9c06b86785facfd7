"""Checkpoints as models: loaded one at a time into one copy of the final model, keyed by their
own weights, and ACROSS CHECKPOINTS answering per checkpoint, each checked against plain torch
on a model loaded with that checkpoint's weights."""
from __future__ import annotations

import contextlib
import copy
import json
import warnings
import weakref

import numpy as np
import pytest
import torch

import diagql
from diagql.errors import BindError, DiagQLError, ExecutionError
from diagql.model.weights import read_state
from diagql.results.render import to_json
from tests import models
from tests.test_models import outputs


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """An MLP trained for three epochs, its weights saved after each: (final model, paths, the
    state_dicts in memory)."""
    X, y = digits
    folder = tmp_path_factory.mktemp("ckpt")
    model = models.build_mlp(seed=1)
    paths, states = {}, {}
    for epoch in (1, 2, 3):
        models.train(model, X, y, epochs=1, seed=epoch)
        states[f"epoch{epoch}"] = copy.deepcopy(model.state_dict())
        paths[f"epoch{epoch}"] = folder / f"epoch{epoch}.pt"
        torch.save(model.state_dict(), paths[f"epoch{epoch}"])
    models.train(model, X, y, epochs=2, seed=9)  # the final model trains on past the last one
    return model, paths, states


def loaded(state) -> torch.nn.Module:
    model = models.MLP()
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def data(digits):
    """A third of the digits: the queries' data (the models trained on all of them)."""
    X, y = digits
    return X[:600], y[:600]


@pytest.fixture(scope="module")
def db(trained, data):
    model, paths, states = trained
    # Paths and a state_dict given in memory mix.
    checkpoints = {"epoch1": str(paths["epoch1"]), "epoch2": paths["epoch2"],
                   "epoch3": states["epoch3"]}
    return diagql.connect(model, data, checkpoints=checkpoints, cache_dir=False,
                          progress=False)


def test_checkpoints_are_models_in_training_order_with_their_own_accuracy(db, trained, data):
    X, y = data
    model, _, states = trained
    rows = db.query("SHOW MODELS").rows
    assert [row[0] for row in rows] == ["epoch1", "epoch2", "epoch3", "final"]
    assert rows[-1][5] == "*" and db.model is model
    for row in rows:
        truth = model if row[0] == "final" else loaded(states[row[0]])
        accuracy = float((truth(X).argmax(1) == y).double().mean())
        assert row[4] == pytest.approx(accuracy)
    assert len({row[4] for row in rows}) > 1  # training changed the accuracy


def test_across_checkpoints_answers_once_per_checkpoint(db, trained, data):
    X, y = data
    model, _, states = trained
    result = db.query("AVG NEURONS IN encoder.3 WHERE correct GROUP BY class ACROSS CHECKPOINTS")
    assert result.kind == "across" and list(result.checkpoints) == ["epoch1", "epoch2", "epoch3",
                                                                  "final"]
    for name, answer in result.checkpoints.items():
        truth_model = model if name == "final" else loaded(states[name])
        correct = (truth_model(X).argmax(1) == y).numpy()  # each checkpoint's own mistakes
        rows = outputs(truth_model, X, "encoder.3")
        classes = sorted(set(y.numpy()[correct].tolist()))
        assert list(answer.groups) == classes  # the early checkpoints get whole classes wrong
        for c in classes:
            mask = correct & (y == c).numpy()
            np.testing.assert_allclose(answer.groups[c].values, rows[mask].mean(0), atol=1e-5)
    # The table: one column per checkpoint, a row per (class, neuron); the cells are the means.
    assert result.columns[:2] == ["class", "label"] and result.columns[2:] == list(
        result.checkpoints)
    first = result.rows[0]
    assert first[:2] == (0, "encoder.3[0]")
    assert float(first[-1]) == pytest.approx(result.checkpoints["final"].groups[0].values[0],
                                             rel=1e-3)
    assert len(result.rows) == 10 * 16


def test_across_checkpoints_on_a_sample_uses_the_final_models_sample(db, trained, data, tmp_path):
    X, _ = data
    model, _, states = trained
    plot = tmp_path / "curves.png"
    db.execute("SET estimator = plain")  # the ranks compared here are the sample means'
    try:
        result = db.query(f"TOPK 3 NEURONS IN head USING SAMPLE random(0.2) ACROSS CHECKPOINTS "
                          f"PLOT '{plot}'")
    finally:
        db.execute("SET estimator = assisted")
    items = db.sample("random(0.2)")
    for name, answer in result.checkpoints.items():
        truth = outputs(model if name == "final" else loaded(states[name]), X, "head")
        assert answer.neurons.tolist() == np.argsort(-truth[items].mean(0))[:3].tolist()
    # Three ranks: checkpoints down, ranks across.
    assert result.columns == ["checkpoint", "1", "2", "3"] and len(result.rows) == 4
    assert plot.stat().st_size > 1000
    # The curves follow neurons, not ranks: each ranked neuron's value where a checkpoint
    # ranks it, a gap (NaN) elsewhere.
    ranked = {int(n) for answer in result.checkpoints.values() for n in answer.neurons}
    assert set(result.series) == {f"head[{n}]" for n in ranked}
    for n in ranked:
        for name, value in zip(result.checkpoints, result.series[f"head[{n}]"]):
            answer = result.checkpoints[name]
            if n in answer.neurons.tolist():
                assert value == answer.values[answer.neurons.tolist().index(n)]
            else:
                assert np.isnan(value)
    assert result.to_dict()["checkpoints"]["final"]["kind"] == "topk"


def _ablate_unit_3(module, inputs, output):
    output = output.clone()
    output[:, 3] = 0
    return output


def test_checkpoints_run_with_the_final_models_hooks_as_they_are_now(trained, data):
    """The copy a checkpoint runs in had kept the final model's hooks of the moment it was
    made: an ablation added after the first query reached the final model alone, one there
    at the first query reached the checkpoints for good, removed or not. Each checkpoint now
    runs with the final model's output-changing hooks of the statement, and its kept rows
    (a sample's) are derived again when they change."""
    X, _ = data
    model, _, states = trained
    db = diagql.connect(model, data, checkpoints={"epoch1": states["epoch1"]}, cache_dir=False,
                        progress=False)
    statement = "AVG NEURONS IN head USING SAMPLE random(0.3) ACROSS CHECKPOINTS"
    db.execute("SET estimator = plain")  # the sampled items' plain means, as below
    items = db.sample("random(0.3)")
    records = []

    def truth(name, hooked):
        module = copy.deepcopy(model) if name == "final" else loaded(states[name])
        module._forward_hooks.clear()
        module.encoder[3]._forward_hooks.clear()
        if hooked:
            module.encoder[3].register_forward_hook(_ablate_unit_3)
        return outputs(module, X, "head")[items].mean(0)

    for hooked in (False, True, False):
        handle = model.encoder[3].register_forward_hook(_ablate_unit_3) if hooked else None
        with pytest.warns(Warning) if hooked else contextlib.nullcontext():
            result = db.query(statement)
        for name in ("epoch1", "final"):
            np.testing.assert_allclose(result.checkpoints[name].values, truth(name, hooked),
                                       rtol=1e-5, atol=1e-6)
        if handle is not None:
            handle.remove()
    # A hook that only records is the final model's alone: its list gathers no checkpoint's.
    recorder = model.encoder[3].register_forward_hook(
        lambda module, inputs, output: records.append(len(output)))
    try:
        db.query("AVG NEURONS IN epoch1.head")
    finally:
        recorder.remove()
    assert records == []


def test_checkpoints_follow_a_module_swapped_in_the_final_model(trained, data):
    """The copy a checkpoint runs in, made at its first use, had kept the final model's
    modules of that moment: a ReLU swapped for an Identity afterwards (an ablation by
    replacement) reached the final model's answers alone, the checkpoints' silently not."""
    X, _ = data
    model = copy.deepcopy(trained[0])
    states = trained[2]
    db = diagql.connect(model, data, checkpoints={"epoch1": states["epoch1"]}, cache_dir=False,
                        progress=False)
    statement = "AVG NEURONS IN encoder.3 ACROSS CHECKPOINTS"
    db.query(statement)
    model.encoder[2] = torch.nn.Identity()
    with pytest.warns(Warning, match="changed"):
        result = db.query(statement)
    swapped = loaded(states["epoch1"])
    swapped.encoder[2] = torch.nn.Identity()
    for name, module in (("epoch1", swapped), ("final", model)):
        np.testing.assert_allclose(result.checkpoints[name].values,
                                   outputs(module, X, "encoder.3").mean(0), rtol=1e-5,
                                   atol=1e-6, err_msg=name)


def test_topk_across_checkpoints_records_keep_each_neuron_and_value_whole(db, trained, data):
    """Its CSV and records had been the table's cells, "encoder.3[10] 2.167": a label and a
    value rounded to 4 digits in one string. A row per checkpoint's group and rank now."""
    X, y = data
    model, _, states = trained
    result = db.query("TOPK 2 NEURONS IN encoder.3 GROUP BY class ACROSS CHECKPOINTS")
    records = result.records()
    assert len(records) == 4 * 10 * 2 and list(records[0]) == ["checkpoint", "class", "rank",
                                                               "neuron", "label", "value"]
    for record in records:
        module = model if record["checkpoint"] == "final" else loaded(states[record["checkpoint"]])
        mine = (y == record["class"]).numpy()
        truth = outputs(module, X, "encoder.3")[mine].mean(0)
        assert record["label"] == f"encoder.3[{record['neuron']}]"
        assert record["value"] == pytest.approx(truth[record["neuron"]], rel=1e-5)
        assert record["neuron"] == np.argsort(-truth, kind="stable")[record["rank"] - 1]


def test_a_wide_across_table_is_shown_turned_and_differing_items_are_said(db, trained, data):
    """A TOPK GROUP BY's "group rank" columns of "neuron value" ran past the terminal, every
    cell cut (MM2): past TURN_WIDTH the table shows the answer's rows down, a column per
    model, while CSV, JSON and records keep a row per checkpoint (review NN1). A WHERE on
    predictions reads each checkpoint's own: their matching items, of the whole data even
    for a sample (NN1), are said, and a GROUP BY's that differ too."""
    result = db.query("TOPK 2 NEURONS IN encoder.3 WHERE class < 3 GROUP BY class "
                      "ACROSS CHECKPOINTS")
    assert result.columns[0] == "checkpoint" and len(result.rows) == 4
    assert result.turned[0] == ["class", "rank", "epoch1", "epoch2", "epoch3", "final"]
    text = str(result).splitlines()
    assert any(line.split()[:3] == ["│", "0", "│"] for line in text)  # a row per (class, rank)
    assert max(len(line) for line in text) < 120
    narrow = db.query("TOPK 2 NEURONS IN encoder.3 WHERE class = 1 ACROSS CHECKPOINTS")
    assert any(line.split()[:2] == ["│", "epoch1"] for line in str(narrow).splitlines())
    model, _, states = trained
    X, y = data
    nets = [*(loaded(states[n]) for n in ("epoch1", "epoch2", "epoch3")), model]
    counts = [int((outputs(m, X, "head").argmax(1) != y.numpy()).sum()) for m in nets]
    expected = "matching items differ, each model's own predictions read: " + ", ".join(
        f"{n} {c:,}" for n, c in zip(["epoch1", "epoch2", "epoch3", "final"], counts))
    assert len(set(counts)) > 1
    assert expected in db.query("AVG NEURONS IN head WHERE incorrect ACROSS CHECKPOINTS").notes
    assert expected in db.query("AVG NEURONS IN head WHERE incorrect USING SAMPLE "
                                "random(0.5) ACROSS CHECKPOINTS").notes
    grouped = db.query("AVG NEURONS IN head GROUP BY predicted ACROSS CHECKPOINTS")
    assert "each model's groups hold other items, its own predictions read" in grouped.notes


def test_a_checkpoint_query_never_holds_two_checkpoints_weights(trained, data, monkeypatch):
    import gc

    model, paths, _ = trained
    live, peak = [0], [0]
    real_load = torch.load

    def counting_load(*args, **kwargs):
        state = real_load(*args, **kwargs)
        live[0] += 1
        peak[0] = max(peak[0], live[0])
        weakref.finalize(next(iter(state.values())), lambda: live.__setitem__(0, live[0] - 1))
        return state

    def mlps() -> set[int]:
        gc.collect()
        return {id(o) for o in gc.get_objects() if type(o) is models.MLP}

    before = mlps()
    monkeypatch.setattr(torch, "load", counting_load)
    db = diagql.connect(model, data, checkpoints=paths, cache_dir=False, progress=False)
    db.query("ARGMAX NEURONS IN head WHERE incorrect ACROSS CHECKPOINTS")
    assert db.models["epoch1"].slot.loads == 3 and peak[0] == 1 and live[0] == 0
    # One copy of the architecture besides the final model, whatever the number of checkpoints.
    assert mlps() - before == {id(db.models["epoch1"].slot.module)}


def test_across_checkpoints_with_baseline_shows_each_checkpoints_error(db, trained, data):
    """WITH BASELINE was computed per checkpoint but shown nowhere in the table or its CSV."""
    X, y = data
    model, _, states = trained
    result = db.query("AVG NEURONS IN head WHERE class = 1 USING SAMPLE random(0.3) "
                      "WITH BASELINE ACROSS CHECKPOINTS")
    assert "cosine_distance vs exact" in result.columns and "speedup" in result.columns
    column = result.columns.index("cosine_distance vs exact")
    mine = (y == 1).numpy()
    for row in result.rows:
        answer = result.checkpoints[row[0]]
        net = model if row[0] == "final" else loaded(states[row[0]])
        exact = net(X).double()[mine].mean(dim=0).detach().numpy()
        got = answer.values
        cosine = 1 - got @ exact / (np.linalg.norm(got) * np.linalg.norm(exact))
        assert row[column] == pytest.approx(cosine, abs=1e-9)
    assert "cosine_distance vs exact" not in result.series  # the curves are the answer's


def test_a_checkpoints_cache_key_is_that_of_its_weights(trained, data, tmp_path):
    model, paths, states = trained
    db = diagql.connect(model, data, checkpoints=paths, cache_dir=tmp_path, progress=False)
    alone = diagql.connect(loaded(states["epoch2"]), data, cache_dir=tmp_path, progress=False)
    keys = {name: entry.artifacts.profile_key() for name, entry in db.models.items()}
    assert keys["epoch2"] == alone.artifacts.profile_key()
    assert len(set(keys.values())) == 4


def test_checkpoints_as_training_libraries_save_them(trained, data, tmp_path):
    """A LightningModule's (its model under ``model.``, beside a loss's buffer, the epoch and
    optimizer), an AveragedModel's (``module.`` beside ``n_averaged``) and a save_pretrained
    directory's (named by its folder, as a glob of such folders' files is): each had been
    refused ("unexpected model.encoder.1.weight ..." or "is not a file")."""
    X, _ = data
    model, _, states = trained
    lightning = {"epoch": 1, "optimizer_states": [{"lr": 0.1}], "state_dict": {
        **{f"model.{k}": v for k, v in states["epoch1"].items()},
        "criterion.weight": torch.ones(10)}}
    torch.save(lightning, tmp_path / "epoch=1-step=50.ckpt")
    averaged = {**{f"module.{k}": v for k, v in states["epoch2"].items()},
                "n_averaged": torch.tensor(7)}
    torch.save(averaged, tmp_path / "swa.pt")
    for folder in ("checkpoint-100", "checkpoint-200"):
        (tmp_path / folder).mkdir()
        torch.save(states["epoch3" if folder.endswith("100") else "epoch1"],
                   tmp_path / folder / "pytorch_model.bin")
    db = diagql.connect(model, data, checkpoints={
        "lit": tmp_path / "epoch=1-step=50.ckpt", "swa": tmp_path / "swa.pt",
        "hf": tmp_path / "checkpoint-100"}, cache_dir=False, progress=False)
    result = db.query("AVG NEURONS IN head ACROSS CHECKPOINTS")
    for name, state in (("lit", "epoch1"), ("swa", "epoch2"), ("hf", "epoch3")):
        np.testing.assert_allclose(result.checkpoints[name].values,
                                   outputs(loaded(states[state]), X, "head").mean(0),
                                   rtol=1e-5, atol=1e-6)
    globbed = diagql.connect(model, data, checkpoints=str(tmp_path / "*" / "pytorch_model.bin"),
                             cache_dir=False, progress=False)
    assert list(globbed.models) == ["checkpoint_100", "checkpoint_200", "final"]
    # timm's file with an EMA beside the weights: which one is read is said.
    torch.save({"state_dict": states["epoch1"], "state_dict_ema": states["epoch2"]},
               tmp_path / "timm.pth.tar")
    ema = diagql.connect(model, data, checkpoints={"t": tmp_path / "timm.pth.tar"},
                         cache_dir=False, progress=False)
    with pytest.warns(Warning, match="its 'state_dict' is read; it also holds "
                                     "'state_dict_ema', a moving average"):
        ema.query("AVG NEURONS IN t.head")
    # Two parts that both fit (a teacher and a student) are no one model's: refused.
    torch.save({**{f"teacher.{k}": v for k, v in states["epoch1"].items()},
                **{f"student.{k}": v for k, v in states["epoch2"].items()}}, tmp_path / "kd.pt")
    both = diagql.connect(model, data, checkpoints={"kd": tmp_path / "kd.pt"}, cache_dir=False,
                          progress=False)
    with pytest.raises(DiagQLError, match="holds the model's weights under 2 prefixes "
                                          r"\('student.', 'teacher.'\): save the one"):
        both.query("AVG NEURONS IN kd.head")
    # A LightningModule's EMA beside its model: the model's is read, and said.
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in states["epoch1"].items()},
                               **{f"ema_model.{k}": v for k, v in states["epoch2"].items()}}},
               tmp_path / "ema.ckpt")
    lit = diagql.connect(model, data, checkpoints={"e": tmp_path / "ema.ckpt"},
                         cache_dir=False, progress=False)
    with pytest.warns(Warning, match="its 'model.' weights are read; it also holds "
                                     "'ema_model.', a moving average"):
        np.testing.assert_allclose(lit.query("AVG NEURONS IN e.head").values,
                                   outputs(loaded(states["epoch1"]), X, "head").mean(0),
                                   rtol=1e-5, atol=1e-6)
    with pytest.raises(DiagQLError, match="is a directory without model.safetensors or "
                                          "pytorch_model.bin"):
        diagql.connect(model, data, checkpoints={"dir": tmp_path}, progress=False)


def test_across_checkpoints_needs_checkpoints(cnn, digits):
    db = diagql.connect(cnn, digits, cache_dir=False, progress=False)
    with pytest.raises(BindError, match="ACROSS CHECKPOINTS needs checkpoints") as error:
        db.query("AVG NEURONS IN 8 ACROSS CHECKPOINTS")
    # The caret under the clause, not the layer (a sweep's finding).
    assert (error.value.column, error.value.end_column) == (18, 36)


def test_checkpoints_that_do_not_fit_are_reported(trained, data, tmp_path):
    model, _, _ = trained
    path = tmp_path / "wrong.pt"
    torch.save({"head.weight": torch.zeros(3, 3)}, path)
    db = diagql.connect(model, data, checkpoints={"bad": path}, cache_dir=False,
                        progress=False)
    with pytest.raises(diagql.DiagQLError, match="checkpoint 'bad' .* does not fit the model"):
        db.query("AVG NEURONS IN bad.head")
    with pytest.raises(diagql.DiagQLError, match="name 'not ok' cannot be written"):
        diagql.connect(model, data, checkpoints={"not ok": path}, cache_dir=False)


def test_a_checkpoint_that_does_not_fit_leaves_the_others_answering(trained, data, tmp_path):
    """One bad checkpoint had failed every ACROSS CHECKPOINTS statement and SHOW MODELS,
    losing the good checkpoints' answers."""
    X, y = data
    model, paths, states = trained
    bad = {key: value for key, value in states["epoch1"].items() if key != "head.bias"}
    db = diagql.connect(model, data, checkpoints={"epoch1": paths["epoch1"], "bad": bad,
                                                  "epoch3": states["epoch3"]},
                        cache_dir=False, progress=False)
    rows = {row[0]: row for row in db.query("SHOW MODELS").rows}
    assert rows["bad"][4] == "—" and rows["epoch1"][4] != "—"
    result = db.query("AVG NEURONS IN head ACROSS CHECKPOINTS")
    assert result.checkpoints["bad"].records() == []
    assert result.notes == ["bad: checkpoint 'bad' (a state_dict) does not fit the model: "
                            "missing head.bias"]
    for name in ("epoch1", "epoch3"):
        truth = loaded(states[name])(X).double().mean(dim=0).detach().numpy()
        np.testing.assert_allclose(result.checkpoints[name].values, truth, rtol=1e-6)
    similarity = db.query("SIMILARITY encoder.3 ACROSS CHECKPOINTS")
    assert [row[0] for row in similarity.rows] == ["epoch1", "bad", "epoch3", "final"]
    with pytest.raises(diagql.DiagQLError, match="does not fit the model: missing head.bias"):
        db.query("AVG NEURONS IN bad.head")


def test_a_checkpoint_path_that_is_not_a_file_is_refused_at_connect(trained, data, tmp_path):
    """It was accepted, then failed every statement, SHOW MODELS included."""
    model, _, _ = trained
    missing = tmp_path / "nope.pt"
    with pytest.raises(diagql.DiagQLError, match=f"checkpoint 'gone': '{missing}' is not a "
                                                 f"file$"):
        diagql.connect(model, data, checkpoints={"gone": missing}, cache_dir=False)
    # A directory is one only where it holds a save_pretrained model's weights.
    with pytest.raises(diagql.DiagQLError, match=f"checkpoint 'gone': '{tmp_path}' is a "
                                                 f"directory without model.safetensors"):
        diagql.connect(model, data, checkpoints={"gone": tmp_path}, cache_dir=False)
    with pytest.raises(diagql.DiagQLError, match="checkpoint 'nope': .* is not a file"):
        diagql.connect(model, data, checkpoints=[str(tmp_path / "nope.pt")], cache_dir=False)


@pytest.mark.parametrize("content, what", [(b"import torch\n", "text"), (b"", "an empty file"),
                                           (b"\xff\xfe\x00" * 200, "another format")])
def test_a_file_of_no_checkpoint_format_is_refused_at_connect(trained, data, tmp_path, content,
                                                              what):
    """`--checkpoint 'mods/*'` caught scripts: connect took them, every ACROSS CHECKPOINTS row
    but the final model's was blank, and the command line exited 0."""
    from diagql.shell.cli import main

    model, paths, _ = trained
    (tmp_path / "train.py").write_bytes(content)
    with pytest.raises(diagql.DiagQLError, match=f"checkpoint 'train': '{tmp_path}/train.py' "
                                                 f"is not a torch checkpoint \\(it is {what}\\)"):
        diagql.connect(model, data, checkpoints=[paths["epoch1"], tmp_path / "train.py"],
                       cache_dir=False)
    assert main(["--model", "tests.models:build_mlp", "--data", "tests.models:digits",
                 "--checkpoint", str(tmp_path / "*"), "--no-cache", "--no-progress",
                 "-e", "AVG NEURONS IN head ACROSS CHECKPOINTS"]) == 1


def test_the_formats_torch_load_reads_are_checkpoints(trained, data, tmp_path):
    """What the format check lets through: torch's zip and legacy pickle, safetensors, and a
    numpy archive of named arrays (a zip that torch.load had refused naming its internals)."""
    save_file = pytest.importorskip("safetensors.torch").save_file
    X, _ = data
    model, _, states = trained
    torch.save(states["epoch1"], tmp_path / "zip.pt")
    torch.save(states["epoch1"], tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file({key: value.contiguous() for key, value in states["epoch1"].items()},
              tmp_path / "safe.safetensors")
    np.savez(tmp_path / "arrays.npz", **{key: value.numpy() for key, value in
                                         states["epoch1"].items()})
    db = diagql.connect(model, data, checkpoints=sorted(tmp_path.iterdir()), cache_dir=False,
                        progress=False)
    result = db.query("AVG NEURONS IN head ACROSS CHECKPOINTS")
    truth = loaded(states["epoch1"])(X).double().mean(dim=0).detach().numpy()
    for name in ("zip", "legacy", "safe", "arrays"):
        np.testing.assert_allclose(result.checkpoints[name].values, truth, rtol=1e-6)
    np.savez(tmp_path / "objects.npz", a=np.array([object()], dtype=object))
    with pytest.raises(DiagQLError, match="is a numpy archive that DiagQL cannot read as "
                                          "weights \\(Object arrays"):
        read_state(tmp_path / "objects.npz", "--weights 'objects.npz'")


def test_plot_on_the_command_line_draws_an_across_checkpoints_answer(trained, data, tmp_path):
    """--plot skipped ACROSS CHECKPOINTS answers ('no statement made a figure')."""
    from tests.cli_in_process import diagql as diagql_cli

    _, paths, _ = trained
    target = tmp_path / "curves.png"
    done = diagql_cli("--model", "tests.models:build_mlp", "--data", "tests.models:digits",
                      "--checkpoint", f"e1={paths['epoch1']}", "--checkpoint",
                      f"e2={paths['epoch2']}", "--plot", str(target), "-e",
                      "SIMILARITY encoder.3 ACROSS CHECKPOINTS")
    assert done.returncode == 0, done.stderr
    assert target.stat().st_size > 0 and f"plot written to {target}" in done.stdout


def test_colliding_checkpoint_names_are_told_how_to_name_them_in_both_ways_in():
    """The command line had been told to "pass a mapping" (sweep SY4)."""
    from diagql.session.checkpoints import checkpoint_specs

    for paths in (["a/final.pt"], ["a/e1.pt", "a/e1.pth"]):
        with pytest.raises(DiagQLError, match=r"name them: checkpoints=\{'epoch3': path, "
                                              r"\.\.\.\} in Python, --checkpoint epoch3=PATH"):
            checkpoint_specs(paths)


def test_the_command_line_takes_named_models_weights_and_a_glob_of_checkpoints(
        trained, tmp_path, capsys):
    """--model NAME=SPEC twice with --weights NAME=PATH, then --checkpoint with a glob (files
    named by their stems, in natural order); in this process, whose models are trained."""
    import csv
    import io

    from diagql.shell.cli import main

    def tables(argv) -> list[list[dict]]:
        assert main(argv) == 0, capsys.readouterr().err
        out = capsys.readouterr().out
        return [list(csv.DictReader(io.StringIO(part))) for part in out.split("\n\n")
                if part.strip()]

    _, _, states = trained
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for epoch in (1, 2, 10):  # epoch10 sorts after epoch2
        torch.save(states[f"epoch{min(epoch, 3)}"], folder / f"epoch{epoch}.pt")
    torch.save(states["epoch1"], tmp_path / "wide.pt")
    common = ["--data", "tests.models:digits", "--format", "csv", "--no-cache", "--no-progress"]
    shown = tables(["--model", "base=tests.models:trained_cnn", "--model",
                    "wide=tests.models:build_mlp", "--weights", f"wide={tmp_path / 'wide.pt'}",
                    *common, "-e", "SHOW MODELS; SET model = wide; SHOW MODELS"])
    X, y = models.digits()
    wide = float((loaded(states["epoch1"])(X).argmax(1) == y).double().mean())
    assert [row["model"] for row in shown[0]] == ["base", "wide"]
    assert float(shown[0][1]["accuracy"]) == pytest.approx(wide)  # --weights wide= loaded
    assert [row["default"] for row in shown[-1]] == ["", "*"]
    rows = tables(["--model", "tests.models:build_mlp", "--checkpoint", str(folder / "*.pt"),
                   *common, "-e", "AVG NEURONS IN head WHERE class = 4 ACROSS CHECKPOINTS"])[0]
    # each model's own rows (neuron, label, value), under its name, in training order
    assert list(dict.fromkeys(row["checkpoint"] for row in rows)) == \
        ["epoch1", "epoch2", "epoch10", "final"]
    truth = outputs(loaded(states["epoch3"]), X, "head")[(y == 4).numpy()].mean(0)
    tenth = {int(row["neuron"]): float(row["value"]) for row in rows
             if row["checkpoint"] == "epoch10"}
    # the whole number, not the table's 4 digits
    assert tenth == pytest.approx(dict(enumerate(truth)), rel=1e-6, abs=1e-6)


def test_a_where_that_one_checkpoint_matches_nowhere_leaves_its_cells_blank():
    """`WHERE predicted = 1` on a checkpoint that predicts 0 for every item had failed the
    whole ACROSS query ("no items match"); that checkpoint's cells are blank now, with a note,
    and the others answer as plain torch does."""
    torch.manual_seed(0)
    X, y = torch.randn(80, 4), torch.randint(0, 2, (80,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        model[2].bias.copy_(torch.tensor([0.0, 50.0]))  # the final model predicts 1 throughout
    early = copy.deepcopy(model.state_dict())
    early["2.bias"] = torch.tensor([50.0, 0.0])  # the checkpoint predicts 0 throughout
    db = diagql.connect(model, (X, y), checkpoints={"early": early}, cache_dir=False,
                        progress=False)
    result = db.query("AVG NEURONS IN 0 WHERE predicted = 1 ACROSS CHECKPOINTS")
    with torch.no_grad():
        truth = model[0](X).double().mean(dim=0).numpy()
    answers = result.checkpoints
    np.testing.assert_allclose(answers["final"].values, truth, rtol=1e-6)
    assert answers["early"].records() == []
    assert result.notes == ["early: no items match WHERE predicted = 1 (0 of 80 items)"]
    early_row = next(row for row in result.rows if row[0] == "early")  # checkpoints down
    assert all(cell is None for cell in early_row[1:])  # blank in the table, JSON's null
    shown = json.loads(to_json(result))["rows"]
    assert all(v is None for row in shown if row[0] == "early" for v in row[1:])
    assert [row for row in result.records() if row["checkpoint"] == "early"] == \
        [{"checkpoint": "early"}]  # a row of its own in CSV, its values empty
    with pytest.raises(ExecutionError, match="no items match"):  # on no model: the error
        db.query("AVG NEURONS IN 0 WHERE predicted = 0 AND predicted = 1 ACROSS CHECKPOINTS")


def test_a_checkpoint_whose_layer_is_nan_leaves_its_cells_blank_and_names_its_model():
    """A diverged epoch whose weights hold a NaN had failed the whole ACROSS statement, the
    healthy checkpoints' answers lost, and SIMILARITY of two models named "layer '2'" of
    either (SW3)."""
    torch.manual_seed(0)
    X, y = torch.randn(80, 4), torch.randint(0, 2, (80,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 5),
                                torch.nn.ReLU(), torch.nn.Linear(5, 2))
    diverged = copy.deepcopy(model.state_dict())
    diverged["2.weight"][0, 0] = float("nan")
    db = diagql.connect(model, (X, y), checkpoints={"diverged": diverged}, cache_dir=False,
                        progress=False)
    result = db.query("AVG NEURONS IN 3 ACROSS CHECKPOINTS")
    with torch.no_grad():
        truth = model[:4](X).double().mean(dim=0).numpy()
    np.testing.assert_allclose(result.checkpoints["final"].values, truth, rtol=1e-6)
    assert result.checkpoints["diverged"].records() == []
    assert result.notes == ["diverged: layer '3' has NaN or infinite activations for 80 of 80 "
                            "items (the first is item 0); DiagQL does not average over them"]
    shown = db.query("SIMILARITY 3 ACROSS CHECKPOINTS")
    assert [row[0] for row in shown.rows if row[1] is None] == ["diverged"]
    assert "layer 'diverged.3' has NaN" in shown.notes[0]
    with pytest.raises(ExecutionError, match="layer 'diverged.3' has NaN or infinite"):
        db.query("SIMILARITY final.3, diverged.3")


def test_similarity_between_two_checkpoints_runs_each_in_a_copy_of_its_own(trained, data):
    """`SIMILARITY epoch1.x, epoch2.x` had been refused (checkpoints took turns in one copy of
    the model, and a pass needs both): the second now gets a second copy, made once, and the
    CKA is plain torch's on models loaded with the two checkpoints' weights."""
    X, _ = data
    model, paths, states = trained
    db = diagql.connect(model, data, checkpoints=paths, cache_dir=False, progress=False)

    def features(state, layer):
        out = []
        net = loaded(state)
        handle = dict(net.named_modules())[layer].register_forward_hook(
            lambda module, args, output: out.append(output.detach().double().flatten(1)))
        with torch.no_grad():
            net(X)
        handle.remove()
        return out[0].numpy()

    def cka(x, y):
        x, y = x - x.mean(axis=0), y - y.mean(axis=0)
        return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))

    for pair in (("epoch1", "epoch3"), ("epoch3", "epoch1"), ("epoch2", "epoch3")):
        result = db.query(f"SIMILARITY {pair[0]}.encoder.1, {pair[1]}.encoder.3 USING FULL")
        truth = cka(features(states[pair[0]], "encoder.1"), features(states[pair[1]], "encoder.3"))
        assert result.value == pytest.approx(truth, rel=1e-9)
    slot = db.models["epoch1"].slot
    assert len(slot.copies) == 2
    # Each checkpoint alone still answers with its own weights, from a copy that holds them.
    loads = slot.loads
    for name in ("epoch2", "epoch3"):
        answer = db.query(f"AVG NEURONS IN {name}.encoder.3 USING FULL")
        truth = features(states[name], "encoder.3").mean(axis=0)
        np.testing.assert_allclose(answer.values, truth, rtol=1e-9, atol=1e-12)
    assert slot.loads == loads  # both were held already


@pytest.mark.parametrize("statement", ["AVG NEURONS IN epoch2.encoder.3 ACROSS CHECKPOINTS",
                                       "SIMILARITY epoch2.encoder.3 ACROSS CHECKPOINTS"])
def test_across_checkpoints_of_one_checkpoints_layer_is_refused(db, statement):
    # It had read every checkpoint's layer, the 'epoch2.' silently ignored.
    with pytest.raises(BindError, match="ACROSS CHECKPOINTS reads the layer of every checkpoint "
                                        "and of the final model: name it without 'epoch2' "
                                        r"\(encoder.3\)"):
        db.query(statement)


def test_across_checkpoints_of_a_layer_named_alone_reads_every_model_whatever_the_default(
        trained, data):
    """With a checkpoint as the default model (SET model = epoch2) a layer named alone had
    been refused as if the statement had written 'epoch2.': its answer is every model's."""
    X, _ = data
    model, paths, states = trained
    db = diagql.connect(model, data, checkpoints=paths, cache_dir=False, progress=False)
    db.execute("SET model = epoch2")
    result = db.query("AVG NEURONS IN head ACROSS CHECKPOINTS")
    for name in ("epoch1", "epoch2", "epoch3", "final"):
        net = model if name == "final" else loaded(states[name])
        np.testing.assert_allclose(result.checkpoints[name].values,
                                   outputs(net, X, "head").mean(0), rtol=1e-5, atol=1e-6)
    # SET model = default, as SHOW SETTINGS writes the default, had been "unknown model".
    assert db.query("SET model = default").rows == [("model", "final")]
    np.testing.assert_allclose(db.query("AVG NEURONS IN head").values,
                               outputs(model, X, "head").mean(0), rtol=1e-5, atol=1e-6)


def test_a_checkpoint_that_cannot_be_read_says_why_on_stderr_beside_a_csv(
        trained, tmp_path, capsys):
    """A CSV has no place for notes: a checkpoint that could not be read left its cells blank
    and its reason on neither stdout nor stderr (JSON and tables carry it)."""
    from diagql.shell.cli import main

    _, paths, _ = trained
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 a zip cut short")
    argv = ["--model", "tests.models:build_mlp", "--data", "tests.models:digits",
            "--checkpoint", f"epoch1={paths['epoch1']}", "--checkpoint",
            f"broken={tmp_path / 'broken.pt'}", "--format", "csv", "--no-cache",
            "--no-progress", "-e", "AVG NEURONS IN head ACROSS CHECKPOINTS"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.split()[1:]
    assert list(dict.fromkeys(line.split(",")[0] for line in lines)) == \
        ["epoch1", "broken", "final"]
    assert [line for line in lines if line.startswith("broken")] == ["broken,,,"]
    assert "note: broken: checkpoint 'broken'" in captured.err
    assert "is not a readable torch checkpoint" in captured.err


def test_checkpoints_beside_several_models_are_refused_in_words_for_both_ways_in(trained, data):
    model, paths, _ = trained
    with pytest.raises(DiagQLError, match=r"checkpoints \(checkpoints=, --checkpoint\) go with "
                                          r"one model, the final one"):
        diagql.connect({"a": model, "b": model}, data, checkpoints=paths, cache_dir=False)


def test_across_checkpoints_curves_name_up_to_sixty_and_say_when_they_cannot(db):
    pytest.importorskip("matplotlib")
    from diagql.results.across import draw_curves

    wide = db.query("AVG NEURONS IN encoder.1 ACROSS CHECKPOINTS")
    assert 12 < len(wide.series) <= 60
    figure = draw_curves(wide)  # a legend beside the axes, not dropped
    legend = figure.axes[0].get_legend()
    assert legend is not None and len(legend.get_texts()) == len(wide.series)
    wide.series = {f"{label}#{i}": v for i in range(3) for label, v in wide.series.items()}
    figure = draw_curves(wide)
    assert figure.axes[0].get_legend() is None
    assert f"{len(wide.series):,} curves, too many to label" in figure.axes[0].get_title()


def test_a_wide_across_table_on_a_narrow_terminal_keeps_its_numbers_whole(db):
    """At 60 columns rich folded each number: 0.4997 read '0.499' with its '7' a line below.
    Narrower, the table takes 3 digits, then drops its lines between columns; a number that
    still cannot fit is cut with '…', never folded."""
    import io

    from rich.console import Console

    from diagql.results.formats import number
    from diagql.results.render import renderable

    result = db.query("AVG NEURONS IN encoder.3 WHERE class = 2 ACROSS CHECKPOINTS")
    assert result.columns[:2] == ["label", "epoch1"]  # checkpoints across: 16 neurons down
    for width, digits in ((120, 4), (60, 4), (48, 3)):
        console = Console(width=width, file=io.StringIO(), force_terminal=False)
        console.print(renderable(result))
        lines = console.file.getvalue().splitlines()
        assert max(len(line) for line in lines) <= width
        cells = [line.replace("│", " ").split() for line in lines]
        rows = {row[0]: row[1:] for row in cells if row and row[0].startswith("encoder.3[")}
        assert len(rows) == 16  # one line each: nothing folded onto a second line
        for label, shown in rows.items():
            assert shown == [number(v, digits) for v in result.series[label]], (width, label)


class _Tied(torch.nn.Module):
    """A language model's head tied to its embedding: one Parameter under two keys."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(12, 8)
        self.body = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.embed(ids))).mean(1))


def test_checkpoint_files_as_they_are_saved_and_changed(tmp_path):
    """Sweep SX3: a tied weight saved once (save_pretrained, safetensors' save_model) had
    been refused as missing; a save_pretrained directory's file copied over, and a file
    rewritten with its modification time kept, had answered the old weights unwarned; a
    training loop's checkpoint with its args, and a file cut short, had unclear refusals."""
    import argparse
    import os
    import shutil

    ids = torch.randint(0, 12, (40, 5), generator=torch.Generator().manual_seed(1))
    data = (ids, torch.randint(0, 12, (40,)))
    model, other = _Tied().eval(), _Tied().eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.5)

    def body_mean(m):
        with torch.no_grad():
            return m.body(m.embed(ids)).double().mean((0, 1)).numpy()

    once = {k: v for k, v in other.state_dict().items() if k != "head.weight"}
    torch.save(once, tmp_path / "tied.pt")
    (tmp_path / "run").mkdir()
    torch.save(model.state_dict(), tmp_path / "run" / "pytorch_model.bin")
    torch.save(model.state_dict(), tmp_path / "same.pt")
    torch.save({"model": other.state_dict(), "args": argparse.Namespace(lr=0.1)},
               tmp_path / "args.pt")
    whole = (tmp_path / "same.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[:len(whole) // 2])
    db = diagql.connect(model, data, checkpoints={
        "tied": tmp_path / "tied.pt", "run": tmp_path / "run", "same": tmp_path / "same.pt",
        "args": tmp_path / "args.pt", "cut": tmp_path / "cut.pt"}, cache_dir=False,
        progress=False)
    np.testing.assert_allclose(db.query("AVG NEURONS IN tied.body").values, body_mean(other),
                               rtol=1e-5, atol=1e-6)
    for name in ("run", "same"):
        np.testing.assert_allclose(db.query(f"AVG NEURONS IN {name}.body").values,
                                   body_mean(model), rtol=1e-5, atol=1e-6)
    with pytest.raises(DiagQLError, match="holds an object of type argparse.Namespace, and "
                                          "DiagQL reads weights only.*torch.load.path, "
                                          "weights_only=False"):
        db.query("AVG NEURONS IN args.body")
    # A tie saved under both keys with two values, keys that are no names: refused in words.
    from diagql.model.weights import load_state
    both = {**model.state_dict(), "head.weight": model.embed.weight + 1}
    with pytest.raises(DiagQLError, match="two different values for 'embed.weight' and "
                                          "'head.weight', which are one tied tensor"):
        load_state(_Tied(), both, "both")
    with pytest.raises(DiagQLError, match="its key 0 is no parameter's name"):
        load_state(_Tied(), {0: torch.zeros(1)}, "odd")
    # The model's own keys beside a copy (sweep SX9: the copy had been read, unsaid).
    own = model.state_dict()
    with pytest.raises(DiagQLError, match=r"under 2 prefixes \(top-level, 'teacher.'\)"):
        load_state(_Tied(), {**own, **{f"teacher.{k}": v for k, v in own.items()}}, "kd")
    averaged = _Tied()
    with pytest.warns(Warning, match="its top-level weights are read; it also holds 'ema.'"):
        load_state(averaged, {**own, **{f"ema.{k}": v + 1 for k, v in own.items()}}, "ema")
    assert torch.equal(averaged.body.weight, model.body.weight)
    # A block of a stack saved whole: every block's prefix fits, a few of them named.
    blocks = {f"blocks.{i}.{k}": v for i in range(40) for k, v in model.state_dict().items()}
    with pytest.raises(DiagQLError, match=r"under 40 prefixes \('blocks.0.', 'blocks.1.', "
                                          r"'blocks.10.', 'blocks.11.' \(\+36 more\)\)"):
        load_state(_Tied(), blocks, "stack")
    with pytest.raises(DiagQLError, match="cut short or corrupt|corrupted"):
        db.query("AVG NEURONS IN cut.body")
    # A chmod or a backup's hard link changes no weights: nothing said (sweep SX5).
    os.chmod(tmp_path / "same.pt", 0o444)
    os.link(tmp_path / "same.pt", tmp_path / "same.bak")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        db.query("AVG NEURONS IN same.body")
    # The folder's times kept as a file is copied into it; a file replaced with its time kept
    # (rsync -t writes a new file).
    folder = os.stat(tmp_path / "run")
    torch.save(other.state_dict(), tmp_path / "new.bin")
    shutil.copyfile(tmp_path / "new.bin", tmp_path / "run" / "pytorch_model.bin")
    os.utime(tmp_path / "run", ns=(folder.st_atime_ns, folder.st_mtime_ns))
    kept = os.stat(tmp_path / "same.pt")
    shutil.copyfile(tmp_path / "new.bin", tmp_path / "same.new")
    os.replace(tmp_path / "same.new", tmp_path / "same.pt")
    os.utime(tmp_path / "same.pt", ns=(kept.st_atime_ns, kept.st_mtime_ns))
    with pytest.warns(Warning) as said:  # a statement checks every model: both said at once
        answers = [db.query(f"AVG NEURONS IN {name}.body").values for name in ("run", "same")]
    for name, answer in zip(("run", "same"), answers):
        assert any(f"model '{name}' changed" in str(w.message) for w in said), name
        np.testing.assert_allclose(answer, body_mean(other), rtol=1e-5, atol=1e-6)
