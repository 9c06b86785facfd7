"""The profile: every item's label, prediction, confidence and latent vector, from one pass."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .data import ItemSource, call_model, to_device
from .errors import DiagQLError, ExecutionError
from .hooks import Hooks, evaluation, first_tensor
from .progress import Progress


@dataclass(frozen=True)
class Profile:
    """What predicates and samplers read, so that only the items they select need activations."""

    labels: np.ndarray  # int64, the true class of each item
    predictions: np.ndarray  # int64, argmax of the model's output
    confidence: np.ndarray  # float64, softmax probability of the prediction
    latents: np.ndarray  # float32 (N, d): the latent vector of each item
    n_classes: int
    latent_layer: str  # "input of fc3", "fc2", or "output"
    seconds: float  # wall time of the pass, the basis of EXPLAIN's cost estimate

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def correct(self) -> np.ndarray:
        return self.labels == self.predictions

    def confusion_matrix(self) -> np.ndarray:
        n = max(self.n_classes, int(self.labels.max(initial=-1)) + 1)
        matrix = np.zeros((n, n), dtype=np.int64)
        np.add.at(matrix, (self.labels, self.predictions), 1)
        return matrix

    def seconds_per_item(self) -> float:
        return self.seconds / max(len(self), 1)


def compute_profile(model, source: ItemSource, *, latent: str | None, latent_is_input: bool,
                    device: torch.device, dtype: torch.dtype, batch_size: int,
                    progress: Progress) -> Profile:
    """One forward pass over every item, hooking the latent layer (its input or its output)."""
    n = len(source)
    if n == 0:
        raise DiagQLError("the data set is empty")
    labels = np.empty(n, dtype=np.int64)
    predictions = np.empty(n, dtype=np.int64)
    confidence = np.empty(n, dtype=np.float64)
    latents: np.ndarray | None = None
    captured: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> None:
        captured.append(tensor.detach().flatten(1).to("cpu", torch.float32, copy=True))

    callbacks = {} if latent is None or latent_is_input else {latent: keep}
    pre = {latent: keep} if latent is not None and latent_is_input else {}
    started = time.perf_counter()
    position = 0
    with evaluation(model), Hooks(model, callbacks, pre) as hooks, \
            progress.task("profiling the data", n) as advance:
        for idx, x, y in source.batches(np.arange(n), batch_size):
            if y is None:
                raise DiagQLError("the data has no labels: DiagQL needs (x, y) items")
            hooks.reset()
            captured.clear()
            logits = _logits(call_model(model, to_device(x, device, dtype)))
            if latent is not None:
                hooks.check_ran()
            probs = torch.softmax(logits.to(torch.float64), dim=1)
            conf, pred = probs.max(dim=1)
            batch = slice(position, position + len(idx))
            labels[batch], predictions[batch] = y, pred.cpu().numpy()
            confidence[batch] = conf.cpu().numpy()
            z = captured[0] if captured else logits.detach().to("cpu", torch.float32)
            if latents is None:
                latents = np.empty((n, z.shape[1]), dtype=np.float32)
            latents[batch] = z.numpy()
            position += len(idx)
            advance(len(idx))
    n_classes = int(logits.shape[1])
    if latent is None:
        layer = "output"
    else:
        layer = f"input of {latent}" if latent_is_input else latent
    return Profile(labels, predictions, confidence, latents, n_classes, layer,
                   time.perf_counter() - started)


def _logits(output) -> torch.Tensor:
    logits = first_tensor(output)
    if logits.ndim != 2:
        raise ExecutionError(f"the model's output has shape {tuple(logits.shape)}; DiagQL needs "
                             f"class scores of shape (batch, classes)")
    return logits
