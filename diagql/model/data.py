"""Uniform access to the user's labelled data: a Dataset, a DataLoader or a pair (X, y)."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from diagql.errors import DiagQLError, ExecutionError

Batch = tuple[np.ndarray, object, "np.ndarray | None"]  # (item indices, model input, labels)


class ItemSource:
    """Items addressed by their index in the data set, served in batches in index order."""

    def __init__(self, data):
        self._pair = None
        self._dataset = None
        self._collate = None
        self._workers = 0
        if isinstance(data, DataLoader):
            if isinstance(data.dataset, IterableDataset):
                raise DiagQLError("an IterableDataset has no item indices; pass a map-style "
                                  "Dataset or a pair (X, y)")
            self._dataset, self._collate, self._workers = data.dataset, data.collate_fn, data.num_workers
        elif isinstance(data, IterableDataset):
            raise DiagQLError("an IterableDataset has no item indices; pass a map-style "
                              "Dataset or a pair (X, y)")
        elif isinstance(data, Dataset):
            self._dataset = data
        elif isinstance(data, (tuple, list)) and len(data) == 2:
            # (X, None) is data without labels: queries that need none still work.
            self._pair = (_as_tensor(data[0], "X"), None if data[1] is None else _as_labels(data[1]))
            if self._pair[1] is not None and len(self._pair[0]) != len(self._pair[1]):
                raise DiagQLError(f"X has {len(self._pair[0])} items but y has "
                                  f"{len(self._pair[1])} labels")
        else:
            raise DiagQLError(f"data must be a torch Dataset of (x, y), a DataLoader, or a pair "
                              f"(X, y) of tensors or arrays, not {type(data).__name__}")

    def __len__(self) -> int:
        return len(self._pair[0]) if self._pair is not None else len(self._dataset)

    def batches(self, indices: np.ndarray, batch_size: int) -> Iterator[Batch]:
        indices = np.asarray(indices, dtype=np.int64)
        if self._pair is not None:
            X, y = self._pair
            for start in range(0, len(indices), batch_size):
                idx = indices[start:start + batch_size]
                if bool(np.all(np.diff(idx) == 1)):  # a run of items (a full pass): a view
                    x = X[int(idx[0]):int(idx[-1]) + 1]
                else:
                    x = X[torch.from_numpy(idx)]
                yield idx, x, None if y is None else y[idx]
            return
        loader = DataLoader(Subset(self._dataset, indices.tolist()), batch_size=batch_size,
                            shuffle=False, num_workers=self._workers,
                            **({"collate_fn": self._collate} if self._collate else {}))
        start = 0
        for batch in loader:
            x, y = _split_item(batch)
            n = _batch_len(x)
            idx = indices[start:start + n]
            start += n
            yield idx, x, (None if y is None else _as_labels(y))


def _split_item(batch):
    """A collated batch is (x, y), [x, y], {"x"/"input", "y"/"label"} or a bare x."""
    if isinstance(batch, (tuple, list)):
        if len(batch) >= 2:
            return batch[0], batch[1]
        return batch[0], None
    if isinstance(batch, dict):
        x = next((batch[k] for k in ("x", "input", "inputs", "image", "pixel_values") if k in batch), None)
        y = next((batch[k] for k in ("y", "label", "labels", "target", "targets") if k in batch), None)
        if x is None:
            raise DiagQLError(f"cannot find the input among the batch keys {sorted(batch)}")
        return x, y
    return batch, None


def _batch_len(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.shape[0]
    if isinstance(x, (tuple, list)):
        return _batch_len(x[0])
    if isinstance(x, dict):
        return _batch_len(next(iter(x.values())))
    raise DiagQLError(f"cannot batch model inputs of type {type(x).__name__}")


def _as_tensor(X, name: str) -> torch.Tensor:
    if isinstance(X, torch.Tensor):
        return X
    try:
        return torch.as_tensor(np.asarray(X))
    except (TypeError, ValueError) as exc:
        raise DiagQLError(f"{name} cannot be turned into a tensor: {exc}") from None


def _as_labels(y) -> np.ndarray:
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1:
        y = y.reshape(len(y), -1)
        if y.shape[1] != 1:
            raise DiagQLError(f"labels must be one class index per item, got shape {y.shape}")
        y = y[:, 0]
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DiagQLError("labels must be whole class indices, found fractional values")
    elif y.dtype.kind not in "iub":
        raise DiagQLError(f"labels must be class indices, got dtype {y.dtype}")
    return y.astype(np.int64)


def to_device(x, device: torch.device, dtype: torch.dtype):
    """Move model inputs to the model's device; floating inputs take the model's dtype."""
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device, dtype) for v in x)
    if isinstance(x, dict):
        return {k: to_device(v, device, dtype) for k, v in x.items()}
    return x


def call_model(model, x):
    """Models take one input; a tuple or list of inputs is spread over the arguments.

    An exception from the user's forward becomes an ExecutionError that names it (the
    original stays chained for --debug); our own errors raised in hooks pass through.
    """
    try:
        if isinstance(x, (tuple, list)):
            return model(*x)
        return model(x)
    except DiagQLError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of user code is reported, not crashed on
        raise ExecutionError(f"the model's forward raised {type(exc).__name__}: {exc}") from exc
