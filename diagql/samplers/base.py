"""What every sampler shares: parameters kept as given, validation in fit, the size rule."""
from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from diagql.errors import BindError, DiagQLError, ExecutionError


@dataclass(frozen=True)
class SampleData:
    """What a sampler may look at: the profile's latents, true labels and predictions."""

    latents: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    n_classes: int

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def of(cls, profile) -> "SampleData":
        """What a sampler looks at of a profile (model/profile.py's Profile): the very arrays,
        so that maxmargin's kept fit is found again by them."""
        return cls(profile.latents, profile.labels, profile.predictions, profile.n_classes)


@dataclass(frozen=True)
class Sample:
    """The items one sampler call drew: sorted, distinct indices, and the seconds the draw took."""

    spec: str  # the sampler call, e.g. "stratified(0.05, random_state=0)"
    indices: np.ndarray  # int64, sorted, distinct
    seconds: float

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The disk cache's encoding (storage/store.py stores dicts of arrays)."""
        return {"indices": self.indices, "seconds": np.float64(self.seconds)}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], spec: str, n_items: int) -> "Sample":
        """Decode a cached sample, raising ValueError unless it is one of ``n_items`` items."""
        indices = arrays["indices"]
        # Sorted, distinct and in range: what fit() returns, and what the executor relies on.
        if (indices.dtype != np.int64 or indices.ndim != 1 or len(indices) == 0
                or indices[0] < 0 or indices[-1] >= n_items or np.any(np.diff(indices) <= 0)):
            raise ValueError(f"it is not a sample of {n_items:,} items")
        return cls(spec, indices, float(arrays["seconds"]))


@dataclass(frozen=True)
class Param:
    """A sampler parameter as SHOW SAMPLERS lists it."""

    name: str
    default: object
    domain: str  # human-readable range, e.g. "(0, 1] or 1..N items"


class Sampler:
    """Base class. Subclasses store their ``__init__`` arguments unchanged (sklearn style),
    declare ``_domains`` for SHOW SAMPLERS, validate in ``_check`` and select in ``_select``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    # True when every item within a stratum the predicates can name (true class, predicted
    # class) is equally likely to be drawn; accuracy estimates assume this.
    uniform: ClassVar[bool] = False
    # True when the sampler reads the true labels: data without labels cannot use it.
    needs_labels: ClassVar[bool] = False
    # True when it fits on the latents, which must then be finite (a NaN fails gmm's linear
    # algebra and silently skews maxmargin's SVM).
    reads_latents: ClassVar[bool] = True
    # True when its draws are nested by construction: with the same parameters and seed, the
    # draw of n items holds the draw of every smaller n (its items come in one priority order
    # and a draw is a prefix of it). ``Ladder`` then grows a sample through one-shot draws.
    nested: ClassVar[bool] = False
    _domains: ClassVar[dict[str, str]] = {
        "size": "a fraction in (0, 1] or a whole number of items",
        "random_state": "a whole number (defaults to SET seed)",
    }

    def __init__(self, size=0.05, random_state=None):
        self.size = size
        self.random_state = random_state

    @classmethod
    def params(cls) -> list[Param]:
        signature = inspect.signature(cls.__init__)
        return [Param(p.name, p.default, cls._domains.get(p.name, ""))
                for p in list(signature.parameters.values())[1:]]

    def get_params(self) -> dict[str, object]:
        return {p.name: getattr(self, p.name) for p in self.params()}

    def spec(self) -> str:
        """The canonical text of this sampler call, e.g. ``stratified(0.05, random_state=0)``,
        which runs again as written: a parameter left at a default of None is left out
        (``vas(0.1, bandwidth=None)`` had been refused, sweep SX7)."""
        defaults = {name: p.default for name, p in
                    inspect.signature(type(self).__init__).parameters.items()}
        parts = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                 for k, v in self.get_params().items()
                 if not (v is None and k in defaults and defaults[k] is None)]
        if parts and parts[0].startswith("size="):
            parts[0] = parts[0].removeprefix("size=")
        return f"{self.name}({', '.join(parts)})"

    def validate(self, n_items: int) -> int | None:
        """Check every parameter against a data set of ``n_items``; return the sample size
        (None for samplers without a ``size``, such as ``ebtree``, whose size is their own).

        Runs at bind time, before any forward pass, so a bad call costs nothing.
        """
        n = resolve_size(self.size, n_items) if hasattr(self, "size") else None
        _seed(self.random_state)
        self._check()
        return n

    def fit(self, data: SampleData) -> "Sampler":
        """Draw the sample; the sorted item indices land in ``indices_``."""
        n = self.validate(len(data))
        if self.reads_latents:
            _check_finite(self.name, data.latents)
            if len(data) < 2:  # gmm and latentgrid had raised sklearn's and numpy's errors
                raise ExecutionError(f"{self.name} draws from the spread of the latents, which "
                                     f"one item has not; use random, or USING FULL")
        rng = np.random.default_rng(_seed(self.random_state))
        indices = np.unique(np.asarray(self._select(data, n, rng), dtype=np.int64))
        self.indices_ = indices
        return self

    def draw_seconds(self, n_items: int, n_classes: int, width: int,
                     kept: bool = False) -> float | None:
        """About how long drawing from ``n_items`` latents of ``width`` over ``n_classes``
        takes, where that can be far more than a pass over the items (USING AUTO weighs it,
        session/auto.py); None where it is small. ``kept``: what a draw fits on these
        latents is kept from an earlier draw (``fit_kept``)."""
        return None

    def fit_kept(self, data: SampleData) -> bool:
        """Whether a fit this sampler makes of ``data``, whatever its size and seed, is kept
        from an earlier draw, so that a draw now costs its selection alone."""
        return False

    def resized(self, n: int) -> "Sampler":
        """The same sampler call with ``size`` n items (every other parameter kept)."""
        return type(self)(**{**self.get_params(), "size": int(n)})

    def _check(self) -> None:
        """Validate parameters beyond size; raise BindError(param=name) naming the parameter."""

    def _select(self, data: SampleData, n: int | None, rng: np.random.Generator) -> np.ndarray:
        """The chosen item indices (any order); ``n`` is the exact count unless it is None."""
        raise NotImplementedError


def _check_finite(name: str, latents: np.ndarray) -> None:
    # One float64 sum is finite exactly when every value is (short of an overflow, which the
    # full check then clears).
    if len(latents) and np.isfinite(np.sum(latents, dtype=np.float64)):
        return
    bad = np.flatnonzero(~np.isfinite(latents).all(axis=1))
    if len(bad):
        raise DiagQLError(f"{name} fits on the latents, which are NaN or infinite for "
                          f"{len(bad):,} of {len(latents):,} items (the first is item "
                          f"{int(bad[0])}); SET latent = another layer, or sample with random "
                          f"or stratified")


def resolve_size(size, n_items: int) -> int:
    """A fraction in (0, 1] of the data, or a whole number of items, as an item count."""
    if isinstance(size, bool) or not isinstance(size, numbers.Real):
        raise BindError(f"size must be a number, not {size!r}", param="size")
    if isinstance(size, numbers.Integral):
        if not 1 <= size <= n_items:
            raise BindError(f"size {size} is not between 1 and the {n_items} items of the data set",
                            param="size")
        return int(size)
    if not 0 < size <= 1:
        raise BindError(f"size {size} is not a fraction in (0, 1] (write a whole number for "
                        f"a count of items)", param="size")
    return max(1, int(round(size * n_items)))


def _seed(random_state) -> int | None:
    if random_state is None:
        return None
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral) \
            or random_state < 0:
        raise BindError(f"random_state must be a whole number of at least 0, not {random_state!r}",
                        param="random_state")
    return int(random_state)


class Ladder:
    """A sample that grows, each size extending the last (docs/ARCHITECTURE.md, "Samplers").

    Its items come in a priority order: those of the first draw, then what each larger draw
    adds. The sample at a size is a prefix of that order, so a larger sample holds every
    smaller one and rows computed for a smaller one serve again. For a ``nested`` sampler the
    sample at size n is exactly its one-shot draw of n items; for any other it is the union of
    its draws at every size asked so far (at least n items, and at most their sum).

    ``draw(sampler)`` gives the sorted items of a one-shot draw (the session passes one that
    keeps samples in its caches).
    """

    def __init__(self, sampler: Sampler, draw):
        if not hasattr(sampler, "size"):
            raise ValueError(f"sampler {sampler.name!r} has no size to grow")
        self.sampler = sampler
        self.draw = draw
        self.order = np.empty(0, dtype=np.int64)  # every item drawn so far, in priority order
        self.sizes: list[int] = []  # the sizes drawn, in order

    def grow(self, n: int) -> np.ndarray:
        """The sorted items of the sample at size ``n`` (not below the last size asked)."""
        if self.sizes and n < self.sizes[-1]:
            raise ValueError(f"a ladder grows: {n} is below {self.sizes[-1]}")
        drawn = np.asarray(self.draw(self.sampler.resized(n)), dtype=np.int64)
        fresh = drawn[~np.isin(drawn, self.order)]
        self.order = np.concatenate([self.order, fresh])
        self.sizes.append(n)
        return np.sort(self.order)

    def last_spec(self) -> str:
        return self.sampler.resized(self.sizes[-1]).spec()


def doubling(start: int, n_items: int) -> list[int]:
    """Sizes that double from ``start`` to every item: the rounds of a growing sample (each
    costs about as much as all before it, so stopping wastes at most half the work)."""
    sizes = [max(1, min(start, n_items))]
    while sizes[-1] < n_items:
        sizes.append(min(2 * sizes[-1], n_items))
    return sizes
