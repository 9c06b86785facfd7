"""Where the class scores are in a model's output (model/scores.py): the default's choice and
the user's ``scores=``, checked against predictions, confidence and correctness computed by
hand from the right tensor in plain torch."""
from __future__ import annotations

import collections
import dataclasses
import json
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import diagql
from diagql.errors import DiagQLError, DiagQLWarning
from tests import models

N, D, WIDE, CLASSES = 120, 6, 16, 5
Pair = collections.namedtuple("Pair", ["features", "logits"])


@dataclasses.dataclass
class Out:
    features: torch.Tensor
    scores: torch.Tensor


class TwoHeads(nn.Module):
    """Features (WIDE per item) and logits (CLASSES per item), returned in form ``form``."""

    def __init__(self, form: str = "features-logits"):
        super().__init__()
        torch.manual_seed(0)
        self.body, self.head = nn.Linear(D, WIDE), nn.Linear(WIDE, CLASSES)
        self.form = form

    def forward(self, x):
        f = torch.relu(self.body(x))
        z = self.head(f)
        return {"features-logits": lambda: (f, z), "logits-features": lambda: [z, f],
                "dict": lambda: {"emb": f, "out": z}, "namedtuple": lambda: Pair(f, z),
                "dataclass": lambda: Out(f, z)}[self.form]()


def data(labels: bool = True):
    torch.manual_seed(1)
    X = torch.randn(N, D)
    return X, (torch.arange(N) % CLASSES if labels else None)


def by_hand(model: TwoHeads, X: torch.Tensor, y: torch.Tensor, scores: torch.Tensor = None):
    """Predictions, confidence and correctness from the head's logits, by plain torch."""
    with torch.no_grad():
        z = model.head(torch.relu(model.body(X))) if scores is None else scores
    p = torch.softmax(z.double(), dim=1)
    return p.argmax(1).numpy(), p.max(1).values.numpy(), (p.argmax(1) == y).numpy()


def check(conn, truth) -> None:
    predictions, confidence, correct = truth
    profile = conn.profile
    assert np.array_equal(profile.predictions, predictions)
    np.testing.assert_allclose(profile.confidence, confidence, rtol=1e-6)
    assert np.array_equal(profile.correct, correct)
    assert conn.n_classes == CLASSES


@pytest.mark.parametrize("form", ["features-logits", "logits-features", "dict", "namedtuple",
                                  "dataclass"])
def test_the_default_takes_the_vector_as_wide_as_the_labels_need(form):
    model, (X, y) = TwoHeads(form), data()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    check(conn, by_hand(model, X, y))
    # WHERE on correctness counts the items the head gets right, not the features' argmax.
    result = conn.query("AVG NEURONS IN head WHERE correct USING FULL")
    assert result.n_items == int(by_hand(model, X, y)[2].sum())
    place = {"features-logits": "output[1]", "logits-features": "output[0]",
             "dict": "output['out']", "namedtuple": "output['logits']",
             "dataclass": "output['scores']"}[form]
    assert conn.query("SHOW MODELS").rows[0][6].startswith(f"{place}: {CLASSES} classes")


@pytest.mark.parametrize("choice", [1, "logits", lambda out: out.logits],
                         ids=["position", "key", "function"])
def test_scores_given_as_a_position_a_key_or_a_function(choice):
    model, (X, y) = TwoHeads("namedtuple"), data(labels=False)  # no labels: the default refuses
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False, scores=choice)
    predictions, confidence, _ = by_hand(model, X, torch.zeros(N))
    assert np.array_equal(conn.profile.predictions, predictions)
    np.testing.assert_allclose(conn.profile.confidence, confidence, rtol=1e-6)
    assert "(scores=)" in conn.query("SHOW MODELS").rows[0][6]


def test_a_given_choice_may_be_what_the_default_would_not_take():
    model, (X, y) = TwoHeads(), data()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False, scores=0)
    with torch.no_grad():
        features = torch.relu(model.body(X))
    assert conn.n_classes == WIDE
    assert np.array_equal(conn.profile.predictions, features.double().argmax(1).numpy())


def test_several_candidates_and_nothing_to_decide_is_refused_naming_them():
    model, (X, _) = TwoHeads(), data(labels=False)
    conn = diagql.connect(model, (X, None), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError) as info:
        conn.query("AVG NEURONS IN head")
    message = str(info.value)
    assert f"output[0] of per-item shape ({WIDE},)" in message
    assert f"output[1] of per-item shape ({CLASSES},)" in message and "scores=" in message
    assert conn.query("SHOW LAYERS").rows  # the layers are still listed
    # Labels that no candidate is as wide as decide nothing either.
    few = diagql.connect(model, (X, torch.arange(N) % 3), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="none is as wide as the labels' 3 classes"):
        _ = few.profile


@pytest.mark.parametrize("choice, message", [
    (5, r"scores=5: the model's output \(a tuple\) has no entry 5; it holds \[0\] a tensor"),
    ("logits", "has no entry 'logits'"),
    (lambda out: out[0].tolist(), "the scores= function returned a list"),
    (True, "scores= takes a position"),
])
def test_a_choice_that_does_not_fit_the_output_is_refused(choice, message):
    X, y = data()
    with pytest.raises(DiagQLError, match=message):
        _ = diagql.connect(TwoHeads(), (X, y), cache_dir=False, progress=False,
                           scores=choice).profile


def test_a_position_in_a_one_tensor_output_says_there_are_no_entries():
    """scores=5 of a model returning one tensor had said "the model's output (a tensor of
    shape (3, 4)) has no entry 5; it holds nothing": a probe batch's shape, and no way on."""
    X, y = data()
    model = nn.Linear(X.shape[1], 4)
    with pytest.raises(DiagQLError, match=r"^scores=5: the model's output is one tensor of "
                                          r"per-item shape \(4,\), with no entries to choose "
                                          r"from: leave scores= out"):
        _ = diagql.connect(model, (X, y), cache_dir=False, progress=False, scores=5).profile


def test_a_cached_profile_is_not_reused_under_another_choice(tmp_path):
    model, (X, y) = TwoHeads(), data()
    with torch.no_grad():
        features = torch.relu(model.body(X))
    for _ in range(2):  # the second round reads both from the cache
        for choice, truth in ((0, features), (1, None), (lambda out: -out[1], None)):
            conn = diagql.connect(model, (X, y), cache_dir=tmp_path, progress=False,
                                  scores=choice)
            if callable(choice):
                with torch.no_grad():
                    truth = -model.head(features)
            predictions = by_hand(model, X, y, truth)[0]
            assert np.array_equal(conn.profile.predictions, predictions)
            conn.cache.flush()


def test_the_command_line_takes_scores_as_a_position_or_a_key(capsys):
    from diagql.shell.cli import main

    args = ["--model", "tests.test_scores:named", "--data", "tests.test_scores:data",
            "--no-cache", "--no-progress", "--format", "json", "-e", "SHOW MODELS"]
    for flag, place in (("1", "output[1]"), ("logits", "output['logits']")):
        assert main([*args[:4], "--scores", flag, *args[4:]]) == 0
        shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert shown["rows"][0][shown["columns"].index("scores")].startswith(f"{place}: {CLASSES} classes (scores=)")


def test_the_command_line_takes_scores_as_a_function_of_the_output(capsys):
    """A causal LM's last-token logits need a function of the output, which the command
    line could not name: --scores MODULE:FUNCTION imports one."""
    from diagql.shell.cli import main

    X, y = data()
    model = named()
    with torch.no_grad():
        logits = model.head(torch.relu(model.body(X)))
    predicted = (-logits).argmax(1)  # what the function's scores predict
    chosen = predicted == int(predicted.mode().values)
    args = ["--model", "tests.test_scores:named", "--data", "tests.test_scores:data",
            "--no-cache", "--no-progress", "--format", "json", "-e",
            f"AVG NEURONS IN head WHERE predicted = {int(predicted.mode().values)}"]
    assert main([*args[:4], "--scores", "tests.test_scores:negated_logits", *args[4:]]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    np.testing.assert_allclose(shown["values"], logits[chosen].double().mean(0).numpy(),
                               rtol=1e-5, atol=1e-6)
    assert main([*args[:4], "--scores", "tests.test_scores:CLASSES", *args[4:]]) == 1
    assert "--scores 'tests.test_scores:CLASSES' is int, not a function" in \
        capsys.readouterr().err


def negated_logits(out) -> torch.Tensor:
    return -out.logits


def named() -> TwoHeads:
    return TwoHeads("namedtuple")


class Shaped(nn.Module):
    """A head whose logits come back with a singleton axis: (N, 1, C) or (N, C, 1)."""

    def __init__(self, axis: int):
        super().__init__()
        torch.manual_seed(0)
        self.head, self.axis = nn.Linear(D, CLASSES), axis

    def forward(self, x):
        return self.head(x).unsqueeze(self.axis)


@pytest.mark.parametrize("axis", [1, 2], ids=["N,1,C", "N,C,1"])
def test_scores_with_a_singleton_axis_are_one_vector_per_item(axis):
    model, (X, y) = Shaped(axis), data()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with torch.no_grad():
        truth = by_hand(model, X, y, model.head(X))
    check(conn, truth)


@pytest.mark.parametrize("post, scores, says", [
    (lambda z: z.mean(0, keepdim=True), None, "1 row for a batch of 3 items"),
    (lambda z: z.mean(), None, "one number for a batch of 3 items"),
    (lambda z: z, lambda out: out[:1], "1 row .* scores= function must keep the batch's axis"),
    (lambda z: z.t(), None, "5 rows for a batch of 3 items.* axis must come first"),
], ids=["pooled", "scalar", "first-row", "transposed"])
def test_scores_without_a_row_per_item_are_refused(post, scores, says):
    """Numpy broadcast one row of scores to every item of the batch: a model pooling over its
    batch, or a scores= function keeping the first row, gave each batch its first item's
    prediction, and SHOW PROFILE an accuracy."""
    model, (X, y) = Post(post), data()
    with pytest.raises(DiagQLError, match=says):
        diagql.connect(model, (X, y), scores=scores, cache_dir=False,
                       progress=False).query("SHOW PROFILE")


@pytest.mark.parametrize("width", [1, CLASSES])
def test_batches_of_one_of_a_squeezing_forward_read_one_item_each(width):
    """batch_size=1 and a forward ending in .squeeze(): the binary model's 0-d scores were
    refused as 'several score vectors per item', and a multi-class model's (C,) failed with
    numpy's 'could not broadcast' (GG2)."""
    X, y = data()
    model = Post(lambda z: z.squeeze(), width=width).eval()
    y = (y % 2) if width == 1 else y
    conn = diagql.connect(model, (X, y), batch_size=1, cache_dir=False, progress=False)
    with torch.no_grad():
        out = model.head(X)
    predicted = (out[:, 0] > 0).long() if width == 1 else out.argmax(1)
    wrong = (predicted != y).numpy()
    answer = conn.query("AVG NEURONS IN head WHERE incorrect")
    assert answer.n_items == int(wrong.sum())
    np.testing.assert_allclose(answer.values, out[wrong].double().mean(0).numpy(), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("kind, says", [
    ("regression", "the config of the model says problem_type='regression': DiagQL reads its "
                   "outputs as class scores"),
    ("multi_label_classification", "not a sigmoid per label; to diagnose one label k"),
    (None, "has one label and no problem_type, which transformers trains as a regression"),
])
def test_a_hugging_face_config_of_no_single_class_is_warned_of(kind, says):
    """transformers' config.problem_type says the outputs are a regression's or a sigmoid per
    label: DiagQL read them as one class's scores (the argmax, a softmax's confidence), and
    SHOW PROFILE gave an accuracy with no word; a scores= of the user's says nothing."""
    import types

    model, (X, _) = Post(lambda z: z), data()
    model.config = types.SimpleNamespace(problem_type=kind, num_labels=1 if kind is None else 5)
    with pytest.warns(DiagQLWarning, match=says):
        diagql.connect(model, (X, None), cache_dir=False, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        conn = diagql.connect(model, (X, None), scores=lambda out: out[:, 0], cache_dir=False,
                              progress=False)
        model.config.problem_type = "single_label_classification"
        diagql.connect(model, (X, None), cache_dir=False, progress=False)
    np.testing.assert_allclose(conn.query("AVG NEURONS IN head").values,
                               model.head(X).detach().double().mean(0).numpy(), rtol=1e-5)


class Post(nn.Module):
    """A head followed by ``post`` in forward: a softmax, a log-softmax, a sigmoid."""

    def __init__(self, post, width: int = CLASSES, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.head, self.post = nn.Linear(D, width).to(dtype), post

    def forward(self, x):
        return self.post(self.head(x))


@pytest.mark.parametrize("post, dtype", [
    (lambda z: torch.softmax(z, 1), torch.float32), (lambda z: torch.softmax(z, 1), torch.float16),
    (lambda z: torch.softmax(z, 1), torch.bfloat16), (lambda z: torch.log_softmax(z, 1), torch.float32),
], ids=["softmax", "softmax-float16", "softmax-bfloat16", "log-softmax"])
def test_probabilities_and_log_probabilities_give_the_models_own_confidence(post, dtype):
    """A softmax of probabilities would flatten every confidence towards 1/C; a softmax of
    log-probabilities gives them back."""
    model, (X, y) = Post(post, dtype=dtype), data()
    conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
    with torch.no_grad():  # the model's own probabilities, as its dtype holds them
        out = model.post(model.head(X.to(dtype))).double()
    p = out.exp() if out.max() <= 0 else out
    check(conn, (p.argmax(1).numpy(), p.max(1).values.numpy(), (p.argmax(1) == y).numpy()))


def test_probabilities_on_the_probe_and_logits_later_are_refused():
    class Sly(Post):
        def forward(self, x):  # the probe's batches have at most 3 items
            z = self.head(x)
            return torch.softmax(z, 1) if len(x) <= 3 else z

    X, y = data()
    conn = diagql.connect(Sly(None), (X, y), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match="were probabilities .* for the probed items, but not"):
        _ = conn.profile


def test_one_score_in_zero_one_is_noticed_and_read_as_a_probability_when_asked():
    model, (X, _) = Post(torch.sigmoid, width=1), data()
    y = torch.arange(N) % 2
    with pytest.warns(diagql.DiagQLWarning, match=r"lies in \[0, 1\] for every item"):
        conn = diagql.connect(model, (X, y), cache_dir=False, progress=False)
        _ = conn.profile
    assert any("torch.logit" in note for note in conn.query("SHOW PROFILE").notes)
    asked = diagql.connect(model, (X, y), cache_dir=False, progress=False,
                           scores=lambda out: torch.logit(out))
    with torch.no_grad():
        p = torch.sigmoid(model.head(X)).double()[:, 0]
    predicted = (p > 0.5).long()
    assert np.array_equal(asked.profile.predictions, predicted.numpy())
    np.testing.assert_allclose(asked.profile.confidence, torch.where(predicted == 1, p, 1 - p),
                               rtol=1e-5)
    assert not any("torch.logit" in note for note in asked.query("SHOW PROFILE").notes)


def test_one_squeezed_score_of_a_sigmoid_head_chosen_by_scores_is_noticed():
    """A multi-label head's sigmoids, one label read with scores=lambda out: out[:, 2] as the
    refusal of multi-hot labels advises: its probabilities were read as logits (every item
    predicted 1) unwarned, as the squeezed score's logits were not kept (sweep SS9)."""
    model, (X, _) = Post(torch.sigmoid, width=5), data()
    y = torch.arange(N) % 2
    with pytest.warns(diagql.DiagQLWarning, match=r"lies in \[0, 1\] for every item"):
        conn = diagql.connect(model, (X, y), cache_dir=False, progress=False,
                              scores=lambda out: out[:, 2])
        _ = conn.profile
    with torch.no_grad():
        score = torch.sigmoid(model.head(X))[:, 2].numpy()
    np.testing.assert_allclose(conn.profile.logits[:, 0], score, rtol=1e-6)


def test_a_sigmoid_per_class_is_noticed_and_softmax_probabilities_are_not():
    X, y = data()
    with pytest.warns(diagql.DiagQLWarning, match=rf"{CLASSES} scores per item lie in \[0, 1\]"):
        conn = diagql.connect(Post(torch.sigmoid), (X, y), cache_dir=False, progress=False)
        _ = conn.profile
    assert any("torch.logit" in note for note in conn.query("SHOW PROFILE").notes)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagql.DiagQLWarning)
        probabilities = diagql.connect(Post(lambda z: torch.softmax(z, 1)), (X, y),
                                       cache_dir=False, progress=False)
        _ = probabilities.profile  # rows that sum to 1 are read as probabilities: no notice
    assert not any("torch.logit" in note for note in probabilities.query("SHOW PROFILE").notes)


def test_an_autoencoders_reconstruction_read_as_scores_is_warned_of():
    """An autoencoder given class labels: its reconstruction's values were read as scores of
    as many classes, unwarned, so every prediction was a pixel. Warned of with the share of
    items predicted beyond the largest label (plain torch's argmax); a classifier of more
    classes than the labels use, predicting within them, is not."""
    import warnings

    torch.manual_seed(0)
    X = torch.rand(300, 32)
    y = torch.randint(0, 4, (300,))
    autoencoder = nn.Sequential(nn.Linear(32, 8), nn.ReLU(), nn.Linear(8, 32)).eval()
    with torch.no_grad():
        beyond = (autoencoder(X).argmax(1) > 3).float().mean().item()
    assert beyond > 0.5
    with pytest.warns(diagql.DiagQLWarning, match=rf"beyond the largest label \(3\) for "
                                                  rf"{beyond:.0%} of the items: its 32 outputs"):
        conn = diagql.connect(autoencoder, (X, y), cache_dir=False, progress=False)
        _ = conn.profile
    assert any("(X, None)" in note for note in conn.query("SHOW PROFILE").notes)
    classifier = nn.Linear(32, 10).eval()
    with torch.no_grad():
        classifier.bias[4:] -= 0.6  # classes 4-9 predicted for some items, not for most
        beyond = (classifier(X).argmax(1) > 3).float().mean().item()
    assert 0 < beyond < 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("error", diagql.DiagQLWarning)
        _ = diagql.connect(classifier, (X, y), cache_dir=False, progress=False).profile


@pytest.mark.parametrize("post", [lambda z: z.argmax(1), lambda z: z > 0],
                         ids=["class-indices", "flags"])
def test_an_output_of_integers_or_flags_is_no_class_scores(post):
    """Read as logits, class indices 0/1 would pass for a binary classifier's log-odds."""
    X, _ = data()
    conn = diagql.connect(Post(post), (X, torch.arange(N) % 2), cache_dir=False,
                          progress=False)
    assert conn.query("SHOW LAYERS").rows  # the layers are still listed
    with pytest.raises(DiagQLError, match="per-item shape .*, not class scores"):
        _ = conn.profile


def test_two_candidates_that_both_fit_the_labels_are_refused():
    """A binary model's per-item loss (one value: a logit's shape) beside its two logits."""
    class LossFirst(Post):
        def forward(self, x):
            z = self.head(x)
            return torch.nn.functional.cross_entropy(z, z.argmax(1), reduction="none"), z

    X, _ = data()
    model = LossFirst(None, width=2)
    conn = diagql.connect(model, (X, torch.arange(N) % 2), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match=r"output\[0\] of per-item shape \(\); output\[1\] of "
                                          r"per-item shape \(2,\)\) and several are as wide"):
        _ = conn.profile
    chosen = diagql.connect(model, (X, torch.arange(N) % 2), cache_dir=False, progress=False,
                            scores=1)
    with torch.no_grad():
        assert np.array_equal(chosen.profile.predictions, model.head(X).argmax(1).numpy())


def test_a_datasets_labels_are_read_once_to_decide():
    model, (X, y) = TwoHeads(), data()
    items = models.CountedItems(X, y)  # labels DiagQL can only know by reading every item
    conn = diagql.connect(model, items, cache_dir=False, progress=False)
    check(conn, by_hand(model, X, y))
    # At most two probes (the profile's own, then the catalog's) of 1 + 2 + 3 items, the
    # first 3 items read again, 2 + 3 + 3 times (model/repeatable.py), and the second and
    # third once more to run alone, three spread items together and each alone, and six
    # items twice in order and once reversed (model/row_order.py), and the last item alone
    # (model/probing.py ``_last_alone``); every label once, the profile's pass: the second
    # probe reads no label again.
    assert items.reads <= 2 * (6 + 8 + 2 + 6 + 18 + 1) + 2 * N


class AuxFirst(nn.Module):
    """An auxiliary head returned before the main one, both CLASSES wide."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.aux, self.main = nn.Linear(D, CLASSES), nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.aux(x), self.main(x)


def test_the_first_of_equal_widths_is_taken_and_said_to_be(tmp_path):
    """A convention (Inception's (logits, aux)) is a guess: it is said, each connection."""
    X, y = data()
    for _ in range(2):  # the second reads the catalog from disk: still said
        with pytest.warns(diagql.DiagQLWarning, match=r"several vectors of class scores of one "
                                                      r"width; DiagQL reads output\[0\]"):
            conn = diagql.connect(AuxFirst(), (X, y), cache_dir=tmp_path, progress=False)
            conn.query("AVG NEURONS IN main WHERE correct")
    named = diagql.connect(AuxFirst(), (X, y), cache_dir=tmp_path, progress=False, scores=1)
    with torch.no_grad():
        main = AuxFirst().main(X)
    check(named, by_hand(None, X, y, main))


class Codes(nn.Module):
    """A VAE's encoder: (mu, log-variance), as wide as the labels' classes, scoring none."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.mu, self.logvar = nn.Linear(D, CLASSES), nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.mu(x), self.logvar(x)


def test_a_guessed_vector_that_agrees_with_the_labels_as_chance_would_is_said_to():
    """A VAE's mu, taken for class scores beside its log-variance, had read as a classifier
    at chance without a word that it may score no classes at all."""
    X, y = data()
    with torch.no_grad():
        predicted = Codes().mu(X).argmax(1)
    chance = (torch.arange(N) * 7 + 3) % CLASSES  # labels the codes do not predict
    chance[predicted == chance] = (chance[predicted == chance] + 1) % CLASSES
    for labels, said in ((chance, True), (predicted, False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            conn = diagql.connect(Codes(), (X, labels), cache_dir=False, progress=False)
            conn.query("AVG NEURONS IN mu")
        told = [str(w.message) for w in caught if "as chance would" in str(w.message)]
        if said:
            assert len(told) == 1 and "agree with the labels for 0% of the items" in told[0]
            assert "A model that scores no classes" in told[0]
        else:
            assert not told


class EmbeddingThenHeads(nn.Module):
    """An embedding returned before (aux, main) heads, both as wide as the labels need."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.aux, self.main = nn.Linear(D, WIDE), nn.Linear(D, CLASSES), \
            nn.Linear(D, CLASSES)

    def forward(self, x):
        return self.embed(x), self.aux(x), self.main(x)


def test_several_heads_as_wide_as_the_labels_beside_a_wider_entry_are_a_guess_said():
    """(embedding, aux, main): two entries as wide as the labels need were taken as decided,
    the first without a word (every prediction the auxiliary head's)."""
    X, y = data()
    with pytest.warns(diagql.DiagQLWarning, match=r"several vectors of class scores of one "
                                                  r"width; DiagQL reads output\[1\]"):
        conn = diagql.connect(EmbeddingThenHeads(), (X, y), cache_dir=False, progress=False)
        conn.query("AVG NEURONS IN main")
    named = diagql.connect(EmbeddingThenHeads(), (X, y), cache_dir=False, progress=False,
                           scores=2)
    with torch.no_grad():
        main = EmbeddingThenHeads().main(X)
    check(named, by_hand(None, X, y, main))


class PerPosition(nn.Module):
    """A token-level model's output: CLASSES scores at each of 4 positions per item."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(D, 4 * CLASSES)

    def forward(self, x):
        return self.body(x).reshape(len(x), 4, CLASSES)


def test_an_output_with_a_vector_per_position_names_the_way_to_pick_one():
    X, y = data()
    conn = diagql.connect(PerPosition(), (X, y), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError) as refused:
        _ = conn.profile
    assert refused.value.message.startswith(
        f"the model's output has per-item shape (4, {CLASSES}): several score vectors per item")
    assert "scores=lambda out: out[:, 0]" in refused.value.message
    # The way it names works: the first position's scores, against plain torch.
    picked = diagql.connect(PerPosition(), (X, y), cache_dir=False, progress=False,
                            scores=lambda out: out[:, 0])
    with torch.no_grad():
        first = PerPosition()(X)[:, 0]
    np.testing.assert_array_equal(picked.profile.predictions, first.argmax(1).numpy())


def test_an_autoencoder_follows_the_way_the_refusal_names():
    """A model that scores no classes, a convolutional autoencoder over unlabelled images: its
    reconstruction was refused as "a map of class scores" with no word for it. The refusal now
    names the way (a scores= function, (X, None), USING FULL or a random sample), which answers
    its layers exactly (plain torch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, 2, 1), nn.ReLU(),
                          nn.ConvTranspose2d(4, 1, 4, 2, 1)).eval()
    X = torch.randn(40, 1, 8, 8)
    conn = diagql.connect(model, (X, None), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError) as refused:
        conn.query("AVG NEURONS IN 1 USING FULL")
    assert "an autoencoder's reconstruction" in refused.value.message
    assert "with data of (X, None)" in refused.value.message
    way = diagql.connect(model, (X, None), cache_dir=False, progress=False,
                         scores=lambda out: out.mean(dim=(2, 3)))
    with torch.no_grad():
        truth = model[:2](X).flatten(1).double().mean(dim=0).numpy()
    np.testing.assert_allclose(way.query("AVG NEURONS IN 1 USING FULL").values, truth,
                               rtol=1e-6, atol=1e-7)
    assert way.query("AVG NEURONS IN 1 USING SAMPLE random(0.5)").estimate is not None


class _Vae(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.mu, self.logvar = nn.Linear(D, 16), nn.Linear(16, 4), nn.Linear(16, 4)
        self.dec = nn.Linear(4, D)

    def forward(self, x):
        hidden = torch.relu(self.enc(x))
        mu = self.mu(hidden)
        return self.dec(mu), mu, self.logvar(hidden)


def test_a_vae_follows_the_way_the_refusal_of_several_vectors_names():
    """A VAE's (reconstruction, mu, logvar): which is the scores was refused with no word for
    a model that has none; the refusal now names the way, which answers exactly (plain torch)."""
    X, _ = data()
    conn = diagql.connect(_Vae().eval(), (X, None), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError) as refused:
        conn.query("AVG NEURONS IN enc USING FULL")
    assert "could be its class scores" in refused.value.message
    assert "A model that scores no classes" in refused.value.message
    way = diagql.connect(_Vae().eval(), (X, None), cache_dir=False, progress=False,
                         scores=lambda out: out[1])
    with torch.no_grad():
        truth = _Vae().mu(torch.relu(_Vae().enc(X))).double().mean(dim=0).numpy()
    np.testing.assert_allclose(way.query("AVG NEURONS IN mu USING FULL").values, truth,
                               rtol=1e-6, atol=1e-7)


class PerPixel(nn.Module):
    """A segmentation model's output: a map of CLASSES scores per item, channels first."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(D, CLASSES * 9)

    def forward(self, x):
        return self.body(x).reshape(len(x), CLASSES, 3, 3)


def test_a_map_of_scores_per_pixel_names_a_way_that_works():
    X, y = data()
    conn = diagql.connect(PerPixel(), (X, y), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError) as refused:
        _ = conn.profile
    assert "a map of class scores (one per pixel" in refused.value.message
    assert "scores=lambda out: out.mean(dim=(2, 3))" in refused.value.message
    picked = diagql.connect(PerPixel(), (X, y), cache_dir=False, progress=False,
                            scores=lambda out: out.mean(dim=(2, 3)))
    with torch.no_grad():
        mean = PerPixel()(X).mean(dim=(2, 3))
    np.testing.assert_array_equal(picked.profile.predictions, mean.argmax(1).numpy())


@pytest.mark.parametrize("labels, shown", [
    (lambda y: torch.stack([y, (y + 1) % CLASSES, torch.full_like(y, -100)], dim=1),
     "got class indices of shape (3,) per item (one per token, as for token classification, "
     "or a multi-label item's classes)"),
    # A binary mask per image, 0 and 1: it was called multi-hot labels, with a per-label hint.
    (lambda y: (torch.arange(16).reshape(1, 4, 4) < y.reshape(-1, 1, 1) * 3).long(),
     "got class indices of shape (4, 4) per item (one per pixel, as for segmentation)"),
    (lambda y: y.double() + 0.25, "labels must be whole class indices, found 0.25: DiagQL "
                                  "diagnoses classifiers, and a regression model's continuous "
                                  "targets name no class; give the data without them, "
                                  "(X, None), to query its layers"),
    # A float's nearest whole number is no class either; the label shown is the one held.
    (lambda y: y.double() + 2e-16 * (y == 1), "found 1.0000000000000002: DiagQL"),
    (lambda y: torch.stack([(y == c).long() | (y == (c + 1) % CLASSES).long()
                            for c in range(CLASSES)], dim=1),
     "not one-hot: DiagQL compares one predicted class with one true class, so multi-hot or "
     "soft labels have no such class; diagnose one label at a time as a binary classifier, "
     "(X, Y[:, k]) with scores=lambda out: out[:, k] (its logit)"),
    # A multi-output regression's targets: told as such, where the binary-label advice it had
    # been given was refused again (sweep SY12).
    (lambda y: torch.stack([y.double() * 1.5, -y.double() - 0.25], dim=1),
     "got 2 continuous values per item (shape (2,)), as a multi-output regression's targets: "
     "they name no class; give the data without them, (X, None)"),
])
def test_labels_that_name_no_class_per_item_say_what_they_look_like(labels, shown):
    X, y = data()
    with pytest.raises(DiagQLError) as refused:
        diagql.connect(TwoHeads("tuple"), (X, labels(y)), cache_dir=False, progress=False)
    assert shown in refused.value.message


class MainAndAux(nn.Module):
    """(logits over 10 classes, an auxiliary head over 5): the data's labels are the main
    head's own predictions, so it is right on every item."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.main, self.aux = nn.Linear(D, 10), nn.Linear(D, 5)

    def forward(self, x):
        return self.main(x), self.aux(x)


def test_a_slice_of_the_classes_is_not_read_from_the_narrower_head_unwarned(tmp_path):
    model = MainAndAux()
    torch.manual_seed(4)
    X = torch.randn(600, D)
    with torch.no_grad():
        y = model.main(X).argmax(1)
    X, y = X[y < 5], y[y < 5]  # the labels need 5 classes: the aux head is as wide
    assert len(y) > 100
    conn = diagql.connect(model, (X, y), cache_dir=tmp_path, progress=False)
    said = r"reads output\[1\], as wide as the labels need, but it agrees with the labels " \
           r"for only \d+% of the items, and output\[0\] \(10 classes\) scores more classes"
    with pytest.warns(DiagQLWarning, match=said):
        conn.query("AVG NEURONS IN main")
    assert any(re.search(said, note) for note in conn.query("SHOW PROFILE").notes)
    # A new process reading the profile back is told too.
    again = diagql.connect(model, (X, y), cache_dir=tmp_path, progress=False)
    with pytest.warns(DiagQLWarning, match=said):
        again.query("AVG NEURONS IN main")
    # SHOW MODELS first, the statement that says where the scores were found: its profile,
    # made before any catalog, had left the warning out, and no later statement gave it.
    shown = diagql.connect(model, (X, y), cache_dir=False, progress=False).query("SHOW MODELS")
    assert any(re.search(said, note) for note in shown.notes)
    named = diagql.connect(model, (X, y), cache_dir=tmp_path, progress=False, scores=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagQLWarning)
        assert (named.profile.predictions == y.numpy()).all()
    # The full data's labels need the main head's 10: it is read, unwarned.
    X = torch.randn(600, D)
    with torch.no_grad():
        every = model.main(X).argmax(1)
    assert int(every.max()) == 9
    whole = diagql.connect(model, (X, every), cache_dir=False, progress=False)
    assert whole.catalog.scores.at == 0


class TokenTagger(nn.Module):
    """A logit per token, (batch, T, 1): a per-token binary tagger's output."""

    def __init__(self, head_width: int = 1):
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Embedding(20, 8)
        self.head = nn.Linear(8, head_width)

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_a_logit_per_token_is_no_class_per_position():
    """(batch, 12, 1) had read as one vector of 12 class scores per item: GROUP BY predicted
    made twelve groups of token positions, with no word of it."""
    ids, y = torch.randint(0, 20, (60, 12)), torch.arange(60) % 2
    db = diagql.connect(TokenTagger(), (ids, y), cache_dir=False, progress=False)
    with pytest.raises(DiagQLError, match=r"per-item shape \(12, 1\): several score vectors per "
                                          r"item \(one per position"):
        db.query("AVG NEURONS IN embed GROUP BY predicted")
    # Named, as the message says: the first position's logit, a binary classifier.
    named = diagql.connect(TokenTagger(), (ids, y), cache_dir=False, progress=False,
                           scores=lambda out: out[:, 0])
    with torch.no_grad():
        first = TokenTagger()(ids)[:, 0, 0]
    assert (named.profile.predictions == (first > 0).long().numpy()).all()


class _Fixed(nn.Module):
    """A head that returns the scores it is given with its items (the item's own row)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Identity()

    def forward(self, x):
        return self.body(x)


def test_confidence_is_compared_at_the_scores_precision_and_nan_scores_predict_as_argmax():
    """Sweep SX10: a head of float32 probabilities gives 0.7 as 0.699999988, and
    confidence >= 0.7 had left those items out (torch's own comparison counts them); NaN
    scores had predicted class 0 where the notice and torch.argmax say the first NaN's."""
    rows = [[0.7, 0.2, 0.1]] * 5 + [[0.05, 0.9, 0.05]] * 5
    probs = torch.tensor(rows, dtype=torch.float32)
    conn = diagql.connect(_Fixed().eval(), (probs, probs.argmax(1)), cache_dir=False,
                          progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagQLWarning)
        for where, count in (("confidence >= 0.7", 10), ("confidence = 0.7", 5),
                             ("confidence < 0.9", 5), ("confidence >= 0.9", 5)):
            assert conn.query(f"AVG NEURONS IN body WHERE {where}").n_items == count, where
    logits = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    logits[0, 1] = logits[1, 3] = float("nan")
    logits[2] = float("-inf")
    truth = logits.argmax(1)
    with pytest.warns(DiagQLWarning, match=r"3 of 40 items have NaN class scores \(the first "
                                           r"is item 0; or every score -inf\).*torch.argmax's"):
        conn = diagql.connect(_Fixed().eval(), (logits, truth), cache_dir=False,
                              progress=False)
        predicted = conn.profile.predictions
    assert predicted.tolist() == truth.tolist() and predicted[:3].tolist() == [1, 3, 0]


def test_items_with_per_token_labels_are_read_without_them_as_items_none():
    """A token classifier's dict items carry per-token labels: refused as labels, the advice
    (X, None) had failed for a loader and for items alike (sweep SY12). (items, None) reads the
    same items, their label entries left out, and answers as a pair of their inputs does."""
    torch.manual_seed(0)
    embed = nn.Embedding(20, 6)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.head = embed, nn.Linear(6, 3)

        def forward(self, input_ids, attention_mask):
            return self.head(self.embed(input_ids).mean(dim=1))

    model = Tagger().eval()
    ids = torch.randint(0, 20, (12, 5))
    items = [{"input_ids": ids[i], "attention_mask": torch.ones(5, dtype=torch.long),
              "labels": torch.randint(0, 3, (5,))} for i in range(12)]
    with pytest.raises(DiagQLError, match=r"or \(dataset, None\) whose items' labels are then "
                                          r"left unread"):
        _ = diagql.connect(model, items, cache_dir=False, progress=False).profile
    for data in (items, torch.utils.data.DataLoader(items, batch_size=4)):
        conn = diagql.connect(model, (data, None), cache_dir=False, progress=False)
        got = conn.query("AVG NEURONS IN embed USING FULL").values
        with torch.no_grad():
            truth = model.embed(ids).double().mean(dim=1).mean(dim=0).numpy()
        np.testing.assert_allclose(got, truth, atol=1e-6)
        assert not conn.profile.has_labels
    with pytest.raises(DiagQLError, match="label_key 'labels' names a key of mapping data"):
        diagql.connect(model, (items, None), label_key="labels", cache_dir=False,
                       progress=False)


def test_items_none_keeps_a_pairs_meaning_and_refuses_items_of_two_parts(tmp_path):
    """Review SY13: a list of tuples of numbers (a cursor's rows) with None is X's rows, as
    before; a Dataset of two-part items with None had passed their first part alone."""
    rows = [(0.5, 1.0, 2.0), (1.5, -1.0, 0.0), (2.0, 0.0, 1.0), (0.0, 3.0, 1.0)]
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    conn = diagql.connect(model, (rows, None), cache_dir=False, progress=False)
    with torch.no_grad():
        truth = model[0](torch.tensor(rows)).double().mean(dim=0).numpy()
    np.testing.assert_allclose(conn.query("AVG NEURONS IN 0").values, truth, atol=1e-6)
    # A TensorDataset of the inputs alone yields one-part items: those inputs, on disk too.
    alone = torch.utils.data.TensorDataset(torch.tensor(rows))
    conn = diagql.connect(model, (alone, None), cache_dir=tmp_path, progress=False)
    np.testing.assert_allclose(conn.query("AVG NEURONS IN 0").values, truth, atol=1e-6)
    assert any((tmp_path / "profile").iterdir())  # its data was fingerprinted, so stored
    pairs = torch.utils.data.TensorDataset(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(DiagQLError, match=r"\(items, None\) reads items without labels: .* "
                                          r"these items have 2 parts"):
        _ = diagql.connect(model, (pairs, None), cache_dir=False, progress=False).profile


def test_items_none_keeps_the_datasets_class_names():
    class Named(torch.utils.data.Dataset):
        classes = ["cat", "dog"]

        def __len__(self):
            return 6

        def __getitem__(self, i):
            return {"x": torch.full((3,), float(i)), "labels": torch.tensor([i % 2, 0])}

    class Reader(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 2)

        def forward(self, x):
            return self.body(x)

    conn = diagql.connect(Reader(), (Named(), None), cache_dir=False, progress=False)
    assert conn.class_names == ["cat", "dog"]


def test_a_scores_function_of_no_class_is_refused_in_one_line():
    X, _ = data()
    model = nn.Sequential(nn.Linear(X.shape[1], 4), nn.ReLU(), nn.Linear(4, 2))
    conn = diagql.connect(model, (X, None), cache_dir=False, progress=False,
                          scores=lambda out: out[:, :0])
    with pytest.raises(DiagQLError, match=r"no score per item \(shape \(\d+, 0\)\)"):
        _ = conn.profile
