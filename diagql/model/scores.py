"""What a model's class scores mean: where they are in what its forward returns (``Scores``:
the user's ``scores=`` choice or the default one), how many classes they score, and each
class's probability (softmax, or a sigmoid for one logit: a binary classifier)."""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from diagql.errors import DiagQLError, ExecutionError, whole
from diagql.model.forward import batch_text

# What to pass when the default cannot decide (connect's argument, the CLI's flag).
OPTION = ("scores= (connect) or --scores (the command line: a position, a key, or "
           "MODULE:FUNCTION naming a function of the output)")


def classes_of(shape: tuple[int, ...]) -> int:
    """How many classes a model output of per-item ``shape`` scores: C scores score C
    classes; one logit (shape (1,), or () once squeezed) is a binary classifier's log-odds of
    class 1, as BCEWithLogitsLoss trains it, so it scores 2."""
    if len(shape) > 1:
        raise DiagQLError(several_vectors(shape))
    return 2 if shape in ((), (1,)) else shape[0]


# What a refusal of outputs that may be no class scores says of a model that has none.
NO_CLASSES = ("A model that scores no classes (an autoencoder's reconstruction, a VAE's or a "
              "generator's outputs) is queried through a scores= function too, any vector per "
              "item (scores=lambda out: out.flatten(1)), with data of (X, None): its layers' "
              "answers are exact, its predictions and mistakes mean nothing, so ask USING "
              "FULL or a random sample")


def several_vectors(shape: tuple[int, ...]) -> str:
    """The refusal of an output with several score vectors per item (a token-level model's,
    one per position): what it is, and how to name one vector per item."""
    if len(shape) >= 3:  # (classes, H, W): a map of scores per pixel, channels first
        return (f"the model's output has per-item shape {shape}: a map of class scores (one "
                f"per pixel, as a segmentation model gives), where DiagQL needs one vector of "
                f"class scores per item; name one with {OPTION}, e.g. scores=lambda out: "
                f"out.mean(dim=({', '.join(str(d) for d in range(2, len(shape) + 1))})) "
                f"(each class's mean score over the map). {NO_CLASSES}")
    return (f"the model's output has per-item shape {shape}: several score vectors per item "
            f"(one per position, as a token-level model gives), where DiagQL needs one vector "
            f"of class scores per item; name one with {OPTION}, e.g. scores=lambda out: "
            f"out[:, 0] (the first position; out.logits[:, 0] for a Hugging Face output)")


def one_vector(scores: torch.Tensor) -> torch.Tensor:
    """The scores as one vector per item: an output of shape (batch, 1, C) or (batch, C, 1)
    holds C scores per item, whose singleton axes say nothing, so it is (batch, C); an output
    with two axes longer than 1 per item is left as it is (``classes_of`` refuses it)."""
    if scores.ndim > 2 and sum(size > 1 for size in scores.shape[1:]) <= 1:
        return scores.reshape(scores.shape[0], -1)
    return scores


def tolerance(dtype: torch.dtype) -> float:
    """How far from 1 a row of probabilities of ``dtype`` may sum: each rounding is at most
    half an ulp of its value, so the sum's error is under eps (twice that for headroom)."""
    return max(1e-3, 2 * torch.finfo(dtype).eps) if dtype.is_floating_point else 1e-3


def are_probabilities(scores: torch.Tensor) -> bool:
    """Whether (batch, classes) scores, two classes or more, are all >= 0 with every row
    summing to 1: the output of a softmax, not logits (a batch of logits that did so would
    be a coincidence of every row)."""
    if scores.ndim != 2 or scores.shape[1] < 2 or not scores.is_floating_point():
        return False
    p = scores.detach().to(torch.float64)
    return bool((p >= 0).all() and ((p.sum(dim=1) - 1).abs() <= tolerance(scores.dtype)).all())


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Each class's probability, float64: the softmax of the scores, or for one logit
    (a binary classifier) the sigmoid's (1 - p, p), so class 1 wins where the logit is > 0."""
    logits = logits.to(torch.float64)
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=1)
    p = torch.softmax(logits, dim=1)
    top = logits == math.inf
    rows = top.any(dim=1)
    if bool(rows.any()):  # softmax makes a row with +inf all NaN: the +inf classes share it
        shares = top[rows].to(torch.float64)
        p[rows] = shares / shares.sum(dim=1, keepdim=True)
    return p


# --- where the scores are --------------------------------------------------------------------


EQUAL_WIDTHS = "the first of equal widths"  # Scores.why of a guess a warning says
# Scores.why of the one as wide as the labels need beside wider ones, which a warning names:
# the labels may hold only some of a wider head's classes (a slice of the data).
NARROWEST = "as wide as the labels need, beside wider: "


@dataclass(frozen=True)
class Scores:
    """Where the class scores are in a model's output (docs/ARCHITECTURE.md, "Data model"):
    the output itself (``at`` None), its entry ``at`` (a position of a tuple, list, dict or
    dataclass, or a key, field or attribute), or what the user's function ``pick`` makes of
    it. ``refusal``: why the default could not decide, raised when the scores are read."""

    at: int | str | None = None
    pick: Callable | None = None
    given: bool = False  # the user's choice, not the default's
    refusal: str | None = None
    why: str = ""  # how the default decided, for SHOW MODELS
    # Every probed item's scores were >= 0 and summed to 1: the model returns probabilities
    # (a softmax applied), which are their own confidence (``probabilities_of``).
    probabilities: bool = False

    @classmethod
    def of(cls, choice) -> Scores:
        """The user's ``scores=`` choice: an int position, a str key, or a callable."""
        choice = whole(choice)
        if isinstance(choice, bool) or not (isinstance(choice, (int, str)) or callable(choice)):
            raise DiagQLError(f"scores= takes a position (int), a key (str) or a function of "
                              f"the model's output, not {choice!r}")
        if isinstance(choice, str) and not choice:
            raise DiagQLError("scores= takes a key, not an empty text")
        if callable(choice) and not isinstance(choice, (int, str)):
            return cls(pick=choice, given=True)
        return cls(at=choice, given=True)

    def key(self) -> list:
        """A place as a cache key part (a function is keyed by its fingerprint instead:
        session/artifacts.py)."""
        return ["given" if self.given else "default", self.at]

    def text(self) -> str:
        """Where, as SHOW MODELS writes it: ``output``, ``output[1]``, ``output['logits']``."""
        if self.refusal is not None:
            return "undecided: pass scores="
        if self.pick is not None:
            return f"{getattr(self.pick, '__name__', type(self.pick).__name__)}(output)"
        return "output" if self.at is None else f"output[{self.at!r}]"

    def probabilities_of(self, logits: torch.Tensor) -> torch.Tensor:
        """Each class's probability, float64, from a batch's scores (batch, classes): the
        scores themselves for a model that returns probabilities (a softmax of them would
        flatten every confidence towards 1/C), else ``probabilities``. A batch whose rows are
        not probabilities after all is refused rather than read either way."""
        if not self.probabilities:
            return probabilities(logits)
        p = logits.to(torch.float64)
        bad = ~((p >= 0).all(dim=1) & ((p.sum(dim=1) - 1).abs() <= tolerance(logits.dtype)))
        bad &= ~p.isnan().any(dim=1)  # NaN scores are reported as such (SHOW PROFILE)
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise DiagQLError(f"the model's scores were probabilities (>= 0, summing to 1) for "
                              f"the probed items, but not for the {row + 1}th item of a batch "
                              f"(they sum to {float(p[row].sum()):.4g}); return logits, or pass "
                              f"scores= a function giving them")
        return p

    def read(self, output, size: int | None = None) -> torch.Tensor:
        """The class scores in one call's ``output``: (batch, classes) or (batch,); ``size``,
        where given, the batch's items, which must be the scores' rows."""
        if self.refusal is not None:
            raise DiagQLError(self.refusal)
        if self.pick is not None:
            try:
                found = self.pick(output)
            except Exception as exc:  # the user's function: say so
                raise DiagQLError(f"the scores= function failed on the model's output: "
                                  f"{type(exc).__name__}: {exc}") from exc
            what = f"the scores= function returned {_describe(found)}"
        elif self.at is None:
            found, what = output, f"the model returned {_describe(output)}"
        else:
            found = entry(output, self.at)
            what = f"output[{self.at!r}] is {_describe(found)}"
        if not isinstance(found, torch.Tensor):
            hint = "" if self.given else f"; name the scores with {OPTION}"
            raise DiagQLError(f"{what}, where DiagQL expected the class scores, a tensor{hint}")
        found = found.dequantize() if found.is_quantized else found  # a head with no DeQuantStub
        if not found.is_floating_point():
            raise DiagQLError(_not_scores(found))
        if size == 1 and (found.ndim == 0 or found.shape[0] != 1):  # .squeeze() took its axis
            return found.reshape(1, -1) if found.ndim <= 1 else found[None]
        if size is not None and size > 1 and (found.ndim == 0 or found.shape[0] != size):
            # Numpy had broadcast one row of scores to every item of a batch: each its prediction.
            n = found.shape[0] if found.ndim else 0
            rows = f"{n:,} row{'s' * (n != 1)}" if found.ndim else "one number"
            why = ("the scores= function must keep the batch's axis first" if self.pick
                   else "a model that pools over its batch gives no class scores per item"
                   if found.ndim == 0 or found.shape[0] < size else
                   f"the batch's axis must come first; name the scores with {OPTION}")
            raise ExecutionError(f"{what}: {rows} for a batch of {size:,} items, where the "
                                 f"class scores have one row per item; {why}")
        if found.ndim >= 2 and found[0].numel() == 0:  # max() over no class had raised
            raise ExecutionError(f"{what}: no score per item (shape {tuple(found.shape)}); "
                                 f"DiagQL needs at least one, a logit or a value per item, to "
                                 f"rank the items by (a model without classes: any one of its "
                                 f"outputs, e.g. scores=lambda out: out.flatten(1)[:, :1])")
        return found


def entry(output, at):
    """``output``'s entry ``at``: a position of a tuple, list, dict or dataclass, or a key,
    field or attribute. A DiagQLError names what the output holds when it has no such entry."""
    entries = _entries(output)
    if isinstance(at, int):
        if entries is not None and -len(entries) <= at < len(entries):
            return entries[at][1]
    elif isinstance(output, Mapping):
        if at in output:
            return output[at]
    elif hasattr(output, at):
        return getattr(output, at)
    if entries is None:  # one tensor (a batch's: its first axis is the items')
        shape = tuple(output.shape[1:]) if isinstance(output, torch.Tensor) else None
        what = f"one tensor of per-item shape {shape}" if shape is not None else \
            _describe(output)
        raise DiagQLError(f"scores={at!r}: the model's output is {what}, with no entries to "
                          f"choose from: leave scores= out (the output is the scores), or "
                          f"name a function of the output (MODULE:FUNCTION on the command line)")
    held = ", ".join(f"{name} {_describe(value)}" for name, value in entries) or "nothing"
    raise DiagQLError(f"scores={at!r}: the model's output ({_describe(output)}) has no entry "
                      f"{at!r}; it holds {held}")


def _entries(output) -> list[tuple[str, object]] | None:
    """(name, value) of each entry of a tuple, list, dict or dataclass output, in order."""
    if isinstance(output, Mapping):
        return [(repr(key), value) for key, value in output.items()]
    if isinstance(output, (tuple, list)):
        return [(f"[{i}]", value) for i, value in enumerate(output)]
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [(repr(f.name), getattr(output, f.name)) for f in dataclasses.fields(output)]
    return None


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _not_scores(found: torch.Tensor) -> str:
    return (f"the model's output is {str(found.dtype).removeprefix('torch.')} values of "
            f"per-item shape {tuple(found.shape[1:])}, not class scores: DiagQL needs a score "
            f"per class (logits or probabilities) to predict and to say how confident; return "
            f"them, or name them with {OPTION}")


def candidates(output, batch: int) -> list[tuple[int | str, tuple[int, ...]]]:
    """The entries of a tuple, list, dict or dataclass output that could be class scores:
    floating tensors of one vector (or one value) per item. Each as (position or key, the
    per-item shape); a dict's and a dataclass's by key, a tuple's (namedtuple too) by
    position."""
    found = []
    if isinstance(output, Mapping):
        named = list(output.items())
    elif isinstance(output, (tuple, list)):
        named = list(enumerate(output))
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        named = [(f.name, getattr(output, f.name)) for f in dataclasses.fields(output)]
    else:
        return []
    for at, value in named:
        if isinstance(value, torch.Tensor) and value.is_floating_point() \
                and not value.is_nested and value.ndim >= 1 and value.shape[0] == batch:
            shape = tuple(one_vector(value).shape[1:])
            if len(shape) <= 1:
                found.append((at, shape))
    return found


def choose(output, batch: int, label_classes: Callable[[], int | None]) -> Scores:
    """Where the default finds the scores in ``output`` (one call's, of ``batch`` items).

    A tensor is the scores; so is the ``logits`` entry of a Hugging Face output or a dict.
    Otherwise the entries that could be scores (``candidates``): one is the scores; several
    of one per-item shape (Inception's (logits, aux)) are the first, the main head by
    convention; several of different shapes are the one that scores as many classes as the
    labels need (``label_classes()``: the largest label + 1, at least 2; None without
    labels), or the first of several such of one shape. Anything else is a refusal naming
    the candidates: never a guess."""
    if isinstance(output, torch.Tensor):
        # Class indices or flags are no scores: read as logits, their argmax and confidence
        # would be made up. Refused when read, so that the layers are still listed. A
        # quantized tensor's values (read dequantized) are scores.
        return Scores() if output.is_floating_point() or output.is_quantized else \
            Scores(refusal=_not_scores(output))
    logits = output.get("logits") if isinstance(output, Mapping) else \
        getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return Scores("logits")
    found = candidates(output, batch)
    listed = "; ".join(f"output[{at!r}] of per-item shape {shape}" for at, shape in found)
    if not found:
        # No vector per item: the catalog still lists the layers; reading the scores refuses.
        return Scores(refusal=f"the model's output ({_describe(output)}) holds no vector of "
                              f"class scores per item; name them with {OPTION} (a position, "
                              f"a key, or a function of the output)")
    if len({shape for _, shape in found}) == 1:
        why = "its one vector per item" if len(found) == 1 else EQUAL_WIDTHS
        return Scores(found[0][0], why=why)
    needed = label_classes()
    if needed is not None:
        classes = max(needed, 2)
        fits = [(at, shape) for at, shape in found if classes_of(shape) == classes]
        # Fits of different shapes (a binary model's (batch,) loss beside its (batch, 2)
        # logits) are as plausible as each other: no guess.
        if fits and len({shape for _, shape in fits}) == 1:
            # Several as wide (an embedding beside (aux, main) heads): the first, as above.
            wider = ", ".join(f"output[{at!r}] ({classes_of(shape)} classes)"
                              for at, shape in found if classes_of(shape) > classes)
            why = EQUAL_WIDTHS if len(fits) > 1 else NARROWEST + wider if wider else \
                "as wide as the labels need"
            return Scores(fits[0][0], why=why)
        reason = (f"{'several are' if fits else 'none is'} as wide as the labels' {classes} "
                  f"classes")
    else:
        reason = "the data has no labels to tell them apart"
    return Scores(refusal=f"the model's output holds several vectors per item that could be "
                          f"its class scores ({listed}) and {reason}; name the scores with "
                          f"{OPTION}. {NO_CLASSES}")


def same_widths(first: tuple[int, int], now: tuple[int, int], idx, latent) -> None:
    """The scores' and the latent's widths of a batch against the first batch's: a model whose
    output changes width for some items has no one vector of class scores per item."""
    for what, was, width in (("class scores", first[0], now[0]),
                             (f"latent ({latent}) values" if latent else "latent values",
                              first[1], now[1])):
        if width != was:
            raise ExecutionError(
                f"the model gave {width} {what} per item for {batch_text(idx)}, where it gave "
                f"{was} for the first items: its output must have one width for every item")


def as_logits(logits: torch.Tensor) -> torch.Tensor:
    """The class scores read from the output as (batch, classes)."""
    logits = one_vector(logits)
    if logits.ndim == 1:  # a binary classifier's squeezed logit: one per item
        logits = logits[:, None]
    if logits.ndim != 2:
        raise ExecutionError(several_vectors(tuple(logits.shape[1:])))
    return logits
