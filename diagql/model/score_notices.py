"""What the profile warns of about a model's class scores (model/scores.py): scores that look
like probabilities read as logits, a config's problem type they do not fit, predictions beyond
every label, a narrower head or a first-of-equal-widths guess that agrees with the labels no
better than chance; each a notice SHOW PROFILE and the profile's warning give."""
from __future__ import annotations

import math

import numpy as np
import torch

from diagql.model.scores import EQUAL_WIDTHS, NARROWEST, NO_CLASSES, OPTION, Scores, tolerance


def sigmoid_applied(logits) -> str | None:
    """A notice when every score lies in [0, 1]: one score per item (a binary classifier's
    logit) is then most likely a probability (a sigmoid applied), which read as a logit
    predicts class 1 for every item above 0; several whose rows do not sum to 1 (a sigmoid
    per class: softmax-applied probabilities sum to 1 and are read as such) give confidences
    squeezed towards 1/C by the softmax over them. Not refused: logits may all lie there.
    None otherwise."""
    if logits is None or logits.ndim != 2 or not len(logits):
        return None
    if logits.shape[1] == 1 and logits.max() <= 0 and logits.min() < 0:
        return ("the model's one score per item is <= 0 for every item: DiagQL reads it as a "
                "logit, and predicts class 0 for every item; if it is a log-probability "
                "(logsigmoid applied), pass scores=lambda out: out - torch.log1p(-out.exp())")
    if not (logits.min() >= 0 and logits.max() <= 1):
        return None
    if logits.shape[1] == 1:
        return ("the model's one score per item lies in [0, 1] for every item: DiagQL reads it "
                "as a logit (class 1 where it is > 0); if it is a probability (a sigmoid "
                "applied), pass scores=lambda out: torch.logit(out)")
    # Rows that sum to 1 are a softmax's probabilities, read as such (``Scores``); in the
    # widest tolerance, a bfloat16 model's.
    if abs(logits.sum(axis=1) - 1).max() <= tolerance(torch.bfloat16):
        return None
    classes = logits.shape[1]
    return (f"the model's {classes} scores per item lie in [0, 1] for every item: DiagQL reads "
            f"them as logits, its confidence their softmax (here at most "
            f"{math.e / (math.e + classes - 1):.2f}); if they are probabilities of a sigmoid per "
            f"class, pass scores=lambda out: torch.logit(out) (logits that lie there, as a "
            f"pooled ReLU map's may, need nothing)")


def problem_type(model, what: str = "the model") -> str | None:
    """A notice when a Hugging Face config says the outputs are no class's scores (its
    ``problem_type``; unset with one label, a regression to transformers), whose raw logits
    trip no other notice (``sigmoid_applied``) of what the default reading makes. Or None."""
    config = getattr(model, "config", None)
    kind = getattr(config, "problem_type", None)
    meaning = ("DiagQL reads its outputs as class scores (one output as a binary classifier's "
               "logit, class 1 where > 0), so its predictions, confidence and correctness, "
               "and the samplers weighted by them, mean nothing for a regression; a query "
               "over all items reads its activations as they are")
    if kind is None and hasattr(config, "problem_type") and getattr(config, "num_labels", 0) == 1:
        return (f"the config of {what} has one label and no problem_type, which transformers "
                f"trains as a regression; if it is one, {meaning}")
    if kind == "regression":
        return f"the config of {what} says problem_type='regression': {meaning}"
    return None if kind != "multi_label_classification" else (
        f"the config of {what} says problem_type='multi_label_classification': DiagQL reads "
        f"one class per item (the argmax, its confidence a softmax), not a sigmoid per label; "
        f"to diagnose one label k, pass scores=lambda out: out.logits[:, k] (a binary "
        f"classifier's logit) with that label's 0 or 1 as the items' labels")


BEYOND_LABELS = 0.25  # the share of items predicted beyond every label that is warned of


def beyond_labels(labels: np.ndarray | None, predictions: np.ndarray,
                  n_classes: int) -> str | None:
    """A notice when the model predicts, for at least BEYOND_LABELS of the items, a class
    beyond the largest label: its outputs may be no class scores at all (an autoencoder's
    reconstruction read as scores of as many classes as it has values), which every
    prediction, confidence and WHERE correct would then be made of. Not refused: a
    classifier of more classes than the data holds (an ImageNet model on ten of its classes)
    is one. None otherwise, and without labels."""
    known = labels[labels >= 0] if labels is not None else ()
    if not len(known) or not len(predictions):
        return None
    top = int(known.max())
    share = float(np.mean(predictions > top))
    if n_classes <= top + 1 or share < BEYOND_LABELS:
        return None
    return (f"the model predicts a class beyond the largest label ({top}) for {share:.0%} of "
            f"the items: its {n_classes} outputs per item may be no class scores (a "
            f"reconstruction, an embedding); if so, name the scores with {OPTION}, or "
            f"connect the data without labels, (X, None)")


def unscored(confidence: np.ndarray) -> str | None:
    """A notice when some items' scores are NaN: the profile keeps them (their layers' NaN,
    per query), but their prediction is no class the model chose. None otherwise."""
    missing = np.flatnonzero(np.isnan(confidence))
    if not len(missing):
        return None
    return (f"{len(missing):,} of {len(confidence):,} items have NaN class scores (the first "
            f"is item {int(missing[0])}; or every score -inf): their predictions are arbitrary "
            f"(torch.argmax's: the first NaN's class, else class 0), yet counted by WHERE and "
            f"GROUP BY predicted, correct and incorrect; WHERE confidence >= 0 leaves them out")


def narrower_head(scores: Scores, labels: np.ndarray | None,
                  predictions: np.ndarray) -> str | None:
    """A notice when the default read the one vector as wide as the labels need beside wider
    ones (``NARROWEST``) and it agrees with the labels no more than twice as often as chance:
    the labels may be some of a wider head's classes (a slice of the data), which that
    head's predictions would get right. None otherwise: a trained (features, logits) model's
    scores agree far more."""
    if not scores.why.startswith(NARROWEST) or labels is None or not len(labels):
        return None
    accuracy, classes = _agreement(labels, predictions)
    accuracy = 1.0 if accuracy is None else accuracy
    if accuracy > 2 / classes:
        return None
    return (f"the model's output holds several vectors per item that could be its class "
            f"scores: DiagQL reads output[{scores.at!r}], as wide as the labels need, but it "
            f"agrees with the labels for only {accuracy:.0%} of the items, and "
            f"{scores.why.removeprefix(NARROWEST)} scores more classes, of which the labels "
            f"may be some; if it is the scores, name it with {OPTION}")


def _agreement(labels: np.ndarray, predictions: np.ndarray) -> tuple[float | None, int]:
    """The share of the items with a known label that the predictions get right (None where
    no label is known), and the classes the labels need (the largest + 1, at least 2)."""
    known = labels >= 0
    accuracy = float(np.mean(predictions[known] == labels[known])) if known.any() else None
    return accuracy, max(int(labels.max()) + 1, 2)


def guess_at_chance(scores: Scores, labels: np.ndarray | None,
                    predictions: np.ndarray) -> str | None:
    """A notice when the default took the first of several vectors of one width
    (``EQUAL_WIDTHS``) and its predictions agree with the labels no better than chance (within
    a tenth of the way to all): another vector may be the scores, or none is (a VAE's mu
    as wide as the labels' classes, beside its log-variance), and every WHERE correct and
    GROUP BY predicted would be read from codes. None otherwise."""
    if scores.why != EQUAL_WIDTHS or labels is None or not len(labels):
        return None
    accuracy, classes = _agreement(labels, predictions)
    if accuracy is None:
        return None
    chance = 1 / classes
    if accuracy > chance + 0.1 * (1 - chance):
        return None
    return (f"DiagQL reads output[{scores.at!r}] as the class scores (the first of several "
            f"vectors of one width), and its predictions agree with the labels for "
            f"{accuracy:.0%} of the items, as chance would ({classes} classes): if another "
            f"vector is the scores, name it with {OPTION}. {NO_CLASSES}")


def notices(logits, labels: np.ndarray | None, predictions: np.ndarray,
            n_classes: int, confidence: np.ndarray | None = None,
            scores: Scores | None = None) -> list[str]:
    """What the profile warns of (each session that reads it), and SHOW PROFILE notes, about
    the scores it read (``scores``: where, for ``narrower_head``)."""
    found = (None if confidence is None else unscored(confidence), sigmoid_applied(logits),
             beyond_labels(labels, predictions, n_classes),
             None if scores is None else narrower_head(scores, labels, predictions),
             None if scores is None else guess_at_chance(scores, labels, predictions))
    return [notice for notice in found if notice is not None]


def profile_notices(profile, scores: Scores | None = None) -> list[str]:
    """``notices`` of a Profile."""
    return notices(profile.logits, profile.labels if profile.has_labels else None,
                   profile.predictions, profile.n_classes, profile.confidence, scores)
