"""Block auxiliaries (docs/ARCHITECTURE.md, "Data model" and "Estimates"): for each of the
model's top-level blocks, its output's leading principal directions and every item's projection
on them, kept by the profile pass so that a sample query on a block predicts its unsampled items
with known coefficients."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from diagql.model import view_aliases
from diagql.model.same_rows import by_layer
from diagql.model.views import SEQUENCE, ModuleCall, View

# Measured (benchmarks/block_auxiliaries.py, maxmargin at 5%): on the demo's conv1, 8, 16, 32
# and 64 components took S2 from 0.034 to 0.031, 0.024, 0.019 and 0.012 (the ResNet's stem alike,
# 0.040 to 0.009 at 64); 256 bytes per item and block.
DIMS = 64
# The directions are fitted on this many items spread over the data (spread_items), whose
# rows are held until then.
FIT_ITEMS = 2000
HOLD_BUDGET = 256 * 1024 ** 2  # bytes of held rows, all blocks together
# A wider block keeps no auxiliary: its basis (width × DIMS float32) would outweigh the rest of
# the profile (50,000 neurons: 6.4 MB).
MAX_WIDTH = 50_000
# A module holding more than this share of the parameters is a trunk, not a block: its children
# are the blocks (a transformer's encoder and its ModuleList of layers).
TRUNK_SHARE = 0.5
# At most this many blocks keep an auxiliary, spread evenly over the model's order (the first
# and the last kept): each costs the profile pass its projection of every batch and a fit
# (a ModuleList of 300 small blocks took the profile 9.4 s against a 0.16 s forward pass); a
# query on a block left out takes the nearest kept one's, as a layer beside a block does.
MAX_BLOCKS = 48
# A sequence block's other token views (``_views``) as (reduction, position), most often
# queried first (its last token, max, first token), and the bytes their z rows may take
# together: at 100,000 items, ten of them.
OTHER_VIEWS = (("token", -1), ("max", None), ("token", 0))
EXTRA_BUDGET = 256 * 1024 ** 2


@dataclass(frozen=True)
class Auxiliary:
    """One block's projections: y ≈ mean + basis @ z for its default view's row y."""

    key: str  # the view's key (View.key): the layer and, for a sequence, its reduction
    layer: str
    mean: np.ndarray  # (width,) float32, over the items the directions were fitted on
    # (width, k) float32, orthonormal columns; None: the identity (a view the profile holds,
    # z its own rows: engine/covariates.py, ``_held``)
    basis: np.ndarray | None
    z: np.ndarray  # (N, k) float32: every item's projection basisᵀ(y − mean)
    fitted_on: int  # items the directions were fitted on

    @property
    def spans(self) -> bool:
        """Whether the directions span the whole view (a block no wider than DIMS, fitted on
        at least as many items): every item's row is then mean + basis @ z, to float32
        rounding, and the profile holds it as surely as the latent's (``Rebuilt``)."""
        width, k = self.basis.shape
        return k >= width


class Rebuilt:
    """Every item's rows of a view its block's directions span (``Auxiliary.spans``), read as
    an array of them is: ``rows[items]`` or ``rows[a:b]`` gives mean + z[items] @ basisᵀ,
    float32, made for the rows asked for only (the N × width whole is never held)."""

    def __init__(self, auxiliary: Auxiliary):
        self.auxiliary = auxiliary
        self.shape = (len(auxiliary.z), auxiliary.basis.shape[0])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, items) -> np.ndarray:
        a = self.auxiliary
        return a.mean + a.z[items] @ a.basis.T


def blocks(model: torch.nn.Module, catalog, n: int = 0, latent: str | None = None,
           latent_is_input: bool = False) -> list[View]:
    """The views of the model's blocks (``_views``): its top-level children that hold parameters,
    and, recursively, the children of a trunk: a container that is not a layer (a ModuleList),
    or a child holding more than TRUNK_SHARE of them whose own children have children (a
    transformer's encoder; not a Sequential of Linear, BatchNorm and ReLU). A trunk that is a
    layer stays a block itself (a small ResNet's last stage may hold most of its weights). Only
    layers that run once per pass, read per item, at most MAX_WIDTH neurons wide; at most
    MAX_BLOCKS of them, spread evenly over the model's order. A wrapper
    (a module with no parameters of its own whose parameters are all one child's, and that child
    has children: ``self.inner = model``, a LightningModule's ``self.model``) is seen through:
    the blocks are those of what it wraps, as if that were the model. ``n``: the data's items,
    which the extra views' z rows must fit (``_views``). The block whose output is the latent
    (``holder``, and the chain of its last children: ``_opened``), which the profile holds
    whole and keeps no projections of, is opened: its children with parameters are blocks
    (an MLP's ``enc = Sequential(Linear, ReLU, Linear, ReLU)`` before its head had left its
    inner layers fitted on the latent alone and checked on its minor components, which missed
    their bias under maxmargin: coverage 0.70-0.76 on a rare class, sweep OO1)."""
    total = sum(p.numel() for p in model.parameters()) or 1
    found: list = []  # (LayerInfo, whether only an opened container's child)
    opened = _opened(model, holder(model, catalog, latent, latent_is_input))

    def visit(prefix: str, module: torch.nn.Module, extra: bool = False) -> None:
        for name, child in module.named_children():
            qualified = f"{prefix}{name}"
            weight = sum(p.numel() for p in child.parameters())
            if weight == 0:
                continue
            layer = _layer(catalog, qualified)
            if layer is not None and 0 < layer.neurons <= MAX_WIDTH:
                found.append((layer, extra))
            nested = any(any(True for _ in c.children()) for c in child.children())
            regular = (layer is None and any(True for _ in child.children())) or \
                (nested and weight > TRUNK_SHARE * total)
            if regular or qualified in opened:
                visit(qualified + ".", child, extra or not regular)

    prefix, root = "", model
    while not any(p.numel() for p in root.parameters(recurse=False)):
        held = [(name, child) for name, child in root.named_children()
                if any(p.numel() for p in child.parameters())]
        if len(held) != 1 or not any(True for _ in held[0][1].children()):
            break
        prefix, root = f"{prefix}{held[0][0]}.", held[0][1]
    visit(prefix, root)
    if len(found) > MAX_BLOCKS:
        # The model's own blocks first, the opened containers' children in the slots left: a
        # chain of 100 Linears opened had pushed the stem's blocks out (an exact one among
        # them: review RR1).
        base = [i for i, (_, extra) in enumerate(found) if not extra]
        more = [i for i, (_, extra) in enumerate(found) if extra]
        keep = _spread(base, MAX_BLOCKS) + _spread(more, max(MAX_BLOCKS - len(base), 0))
        found = [found[i] for i in sorted(keep)]
    return _views([layer for layer, _ in found], n)


def _spread(indices: list[int], k: int) -> list[int]:
    """At most ``k`` of ``indices``, evenly over them, the first and the last kept."""
    if len(indices) <= k:
        return list(indices)
    if k <= 0:
        return []
    chosen = np.unique(np.round(np.linspace(0, len(indices) - 1, k)).astype(int))
    return [indices[i] for i in chosen.tolist()]


def holder(model: torch.nn.Module, catalog, latent: str | None,
           latent_is_input: bool) -> str | None:
    """The module whose output is the latent: ``latent`` itself, or for the input of a layer
    (the head's) the module it was fed by, through modules that pass it on unchanged in eval
    mode (Identity, Dropout, a Flatten of each item's row: ``LayerCatalog.upstream``); None
    when unknown. A pooling between them makes the latent another tensor: no module holds
    it."""
    if latent is None or catalog is None:
        return None
    if not latent_is_input:
        return latent
    modules = dict(model.named_modules())
    for name in catalog.upstream(latent):
        module = modules.get(name)
        if module is None or not _passing(module):
            return None if module is None else name
    return None


def _passing(module: torch.nn.Module) -> bool:
    """Whether a module's output in eval mode holds each item's input row as it was: Identity,
    Dropout, and a Flatten of everything after the batch axis (the row flattened in C order,
    as the latent's own row is)."""
    if isinstance(module, torch.nn.Flatten):
        return module.start_dim == 1 and module.end_dim == -1
    return isinstance(module, (torch.nn.Identity, torch.nn.modules.dropout._DropoutNd))


def _opened(model: torch.nn.Module, name: str | None) -> set[str]:
    """The holder and, inside it, the chain of last children with parameters that have
    children of their own (a backbone's ``enc``, a Sequential's nested last Sequential):
    where a container returns its last such child's output, the latent is that child's too
    (a backbone's ``enc.0`` had stayed fitted on the latent alone: review QQ1). A last child
    that is not what the container returns is opened all the same: its layers are blocks,
    which cost the profile pass their projections, and take only the slots (MAX_BLOCKS) the
    model's own blocks leave."""
    if name is None:
        return set()
    modules = dict(model.named_modules())
    chain, module = {name}, modules.get(name)
    while module is not None:
        held = [(child_name, child) for child_name, child in module.named_children()
                if any(True for _ in child.parameters())]
        if not held or not any(True for _ in held[-1][1].children()):
            break
        name = f"{name}.{held[-1][0]}"
        chain.add(name)
        module = held[-1][1]
    return chain


def _views(layers: list, n: int) -> list[View]:
    """The blocks' views that keep an auxiliary: each one's default view, and a sequence
    block's other token views (its last token, max and first over its real tokens), which are
    no linear function of the mean that the latent and the default view hold: a GRU's TOKENS
    MAX under maxmargin(0.05), fitted on the mean's and the embedding's directions alone, had
    covered its exact means 0.17-0.33, its TOKEN -1 0.84 (benchmarks/README.md,
    "2026-12-04 (twentieth session)"). The other views' z rows take EXTRA_BUDGET at most
    (n × DIMS float32 each), given in that order from the last block back."""
    room = EXTRA_BUDGET // max(1, n * DIMS * 4)
    sequences = [layer for layer in reversed(layers) if layer.layout == SEQUENCE]
    extra = set([(layer.name, other) for other in OTHER_VIEWS for layer in sequences][:room])
    views = []
    for layer in layers:
        views.append(View(layer))
        views += [View(layer, reduction=reduction, position=position)
                  for reduction, position in OTHER_VIEWS
                  if (layer.name, (reduction, position)) in extra]
    return views


def _layer(catalog, name: str):
    try:
        layer = catalog[name]
    except (KeyError, TypeError):
        return None
    # A sequence's length may change with the batch (data padded per batch): its views reduce
    # its real tokens to one row of its hidden units all the same (a BERT's or GPT-2's
    # layers, left out, had their inner layers fitted on the latent alone: covered 0.03-0.8
    # under gmm, vas and weighted; benchmarks/README.md, "twenty-third session"), but not
    # where its padding counts, whose rows depend on the batch (a block's spanning them would
    # call the profile pass's batches' answer exact).
    if layer is None or layer.shape is None or layer.shared or layer.calls != 1 or \
            (layer.varies and (layer.layout != SEQUENCE or layer.batch_padded)):
        return None
    return layer


def principal(rows: torch.Tensor, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, basis): the rows' mean and their k leading principal directions (width × k,
    orthonormal, float64), by a seeded randomised range finder with two power iterations
    (Halko et al. 2011); exact for a layer no wider than k + 10. The range is found in float32
    (half the time of float64 on the demo's conv1, where it was most of the profile pass): any
    fixed basis keeps the estimator honest, and a rounded one only slightly less apt. Rows are
    scaled to at most 1 (x xᵀ q squares them: about 1e18 had overflowed, the block dropped)."""
    mean = rows.to(torch.float64).mean(dim=0)
    width = rows.shape[1]
    k = min(k, width, len(rows))
    if width <= k + 10 or len(rows) <= k + 10:
        _, _, vt = torch.linalg.svd(rows.to(torch.float64) - mean, full_matrices=False)
        return mean, vt[:k].T.contiguous()
    x = rows.to(torch.float32) - mean.to(torch.float32)
    top = float(x.abs().max())
    x = x / top if 0 < top < float("inf") else x
    generator = torch.Generator().manual_seed(seed)
    omega = torch.randn(width, k + 10, generator=generator, dtype=torch.float32)
    q, _ = torch.linalg.qr(x @ omega)
    for _ in range(2):
        q, _ = torch.linalg.qr(x @ (x.T @ q))
    _, _, vt = torch.linalg.svd((q.T @ x).to(torch.float64), full_matrices=False)
    return mean, vt[:k].T.contiguous()


def spread_items(n: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` of ``n`` items spread over the whole data set, in index order: one drawn at
    random (seeded: the same for every pass and engine) from each of ``count`` equal runs of
    consecutive items; every item when ``count >= n``. On data sorted by class (an
    ImageFolder, most Hugging Face splits) each class gets its share, where the first items
    would be one or two classes; the draw within each run keeps a periodic order (classes in
    turn) from lining up with an even stride."""
    if count >= n:
        return np.arange(n, dtype=np.int64)
    bounds = np.arange(count + 1, dtype=np.int64) * n // count  # runs of at least one item
    return np.random.default_rng(seed).integers(bounds[:-1], bounds[1:])


class BlockProjector:
    """The profile pass's part: each block's rows are held for the pass's first items (up to
    FIT_ITEMS and HOLD_BUDGET), its directions fitted on them, and every item projected.
    The profile pass runs one over the spread items alone (``profile_pass.fit_part``), then one
    given its ``fits`` (``fitted()``) over the rest, which only projects with those
    directions (``profile.projected_part``); a block without one is dropped."""

    def __init__(self, views: list[View], n: int, dims: int = DIMS, fits: dict | None = None,
                 pairs: list | tuple = ()):
        # The layers compared with a block's view while the directions are fitted
        # (model/view_aliases.py): what survives is ``aliases()``.
        self.equal = view_aliases.EqualViews(list(pairs)) if pairs else None
        # By the view's key: a sequence block keeps several views of one layer (``_views``).
        self.views = {view.key: view for view in views}
        width = sum(view.width for view in views) or 1
        self.fit_items = max(1, min(FIT_ITEMS, n, HOLD_BUDGET // (4 * width)))
        self.n, self.dims = n, dims
        self.batch: dict[str, torch.Tensor] = {}
        self.held: dict[str, list[torch.Tensor]] = {key: [] for key in self.views}
        self.fits: dict[str, tuple[torch.Tensor, ...]] = {}  # mean, basis; float32 for the pass
        self.z: dict[str, np.ndarray] = {}
        self.position = 0
        for key in list(self.views) if fits is not None else ():
            if key not in fits:
                self.drop(key)
                continue
            self.held.pop(key)
            self._set_fit(key, *fits[key])

    def aliases(self) -> dict:
        """The layers that equalled a block view on every item so far (view_aliases.Alias),
        by view key (``joined`` keeps those whose block view keeps an auxiliary)."""
        return self.equal.found() if self.equal is not None else {}

    def fitted(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each block's directions fitted so far (mean, basis; float64), by view key."""
        return {key: fit[:2] for key, fit in self.fits.items()}

    def callbacks(self) -> dict:
        """One hook callback per layer, keeping each of its views' rows (and the compared
        layers' rows, ``equal``)."""
        return by_layer([*((view.layer.name, self._keep(key)) for key, view in self.views.items()),
                         *(self.equal.callbacks() if self.equal is not None else ())])

    def _keep(self, key: str):
        def keep(call: ModuleCall) -> None:
            view = self.views.get(key)
            if view is None:
                return
            try:  # read now: a later in-place op may overwrite it
                rows = view.finish(view.rows(call)).detach()
                fit = self.fits.get(key)
                if fit is not None:  # projected where the rows are: only z leaves the device
                    basis, offset = fit[2].to(rows.device), fit[3].to(rows.device)
                    self.batch[key] = (rows.to(torch.float32) @ basis - offset).cpu()
                else:
                    self.batch[key] = rows.to("cpu", torch.float32, copy=True)
            except Exception:  # noqa: BLE001 - read otherwise than the probe saw: no auxiliary
                self.drop(key)
        return keep

    def drop_layer(self, name: str) -> None:
        """Drop every view of the layer ``name`` (it ran more than once in a batch)."""
        for key in [key for key, view in self.views.items() if view.layer.name == name]:
            self.drop(key)
        if self.equal is not None:
            self.equal.drop_layer(name)

    def drop(self, key: str) -> None:
        for table in (self.views, self.held, self.fits, self.z, self.batch):
            table.pop(key, None)

    def after_batch(self, size: int) -> None:
        """Take the batch's rows of every block (a block that did not run is dropped)."""
        start = self.position
        self.position += size
        if self.equal is not None:
            self.equal.after_batch(size, self.batch)
        for key in list(self.views):
            rows = self.batch.pop(key, None)
            if rows is None or len(rows) != size:
                self.drop(key)
                continue
            if key in self.fits:
                self._keep_z(key, rows, start)
                continue
            self.held[key].append(rows)
            if self.position >= self.fit_items:
                self._fit(key)

    def _fit(self, key: str) -> None:
        rows = torch.cat(self.held.pop(key))
        if not torch.isfinite(rows).all():  # NaN or inf rows: a block DiagQL cannot summarise
            self.drop(key)
            return
        try:
            mean, basis = principal(rows[:self.fit_items], self.dims)
        except RuntimeError:  # a decomposition that did not converge: the block has none
            self.drop(key)
            return
        self._set_fit(key, mean, basis)
        self._keep_z(key, rows @ self.fits[key][2] - self.fits[key][3], 0)

    def _set_fit(self, key: str, mean: torch.Tensor, basis: torch.Tensor) -> None:
        # Projected in float32 as basisᵀy − basisᵀμ: the pass's cost is this one product
        # (float64 took 2.5 times as long), and z is kept in float32 anyway.
        self.fits[key] = (mean, basis, basis.to(torch.float32),
                          (mean @ basis).to(torch.float32))
        self.z[key] = np.empty((self.n, basis.shape[1]), dtype=np.float32)

    def _keep_z(self, key: str, z: torch.Tensor, start: int) -> None:
        if not torch.isfinite(z).all():  # NaN or inf rows: a block DiagQL cannot summarise
            self.drop(key)
            return
        self.z[key][start:start + len(z)] = z.numpy()

    def finish(self) -> None:
        """Fit the blocks whose rows are still held (fewer items than ``fit_items`` came);
        ``joined`` then makes their Auxiliaries from ``fitted()`` and ``z``."""
        for key in list(self.held):
            if self.held[key]:
                self._fit(key)


def joined(views: list[View], fits: dict, z: dict[str, np.ndarray], fitted_on: int,
           exclude: tuple[str, ...] = (), aliases: dict | None = None) -> Auxiliaries:
    """The Auxiliaries of a pass: each block's directions (``fits``, fitted once:
    ``BlockProjector.fitted``) and its z rows (every item's, in item order), by view key; a
    block without them (a part of the pass dropped it), or whose view is in ``exclude``, has
    none. ``aliases`` (``BlockProjector.aliases``): those of layers not in ``exclude`` whose
    block view has one."""
    out = []
    for view in views:
        key = view.key
        if key not in fits or key in exclude or key not in z:
            continue
        mean, basis = fits[key]
        out.append(Auxiliary(key, view.layer.name, mean.numpy().astype(np.float32),
                             basis.numpy().astype(np.float32), z[key], fitted_on))
    kept = {a.key for a in out}
    return Auxiliaries(out, aliases={key: alias for key, alias in (aliases or {}).items()
                                     if alias.target in kept and key not in exclude})


class Auxiliaries:
    """A profile's block auxiliaries by view key: held in memory (the pass that made them), or
    only named, each read on first use through ``load`` and then held (docs/ARCHITECTURE.md,
    "Storage": each block's own cache entry, so a query reads only its block's).

    ``load(key, layer)`` gives the auxiliaries it found: the one asked for, or every block's
    when it had to make them again; a key it cannot give is remembered as absent."""

    def __init__(self, held: Iterable[Auxiliary] = (), names: Iterable[tuple[str, str]] = (),
                 load: Callable[[str, str], Iterable[Auxiliary]] | None = None,
                 aliases: dict | None = None):
        self._held: dict[str, Auxiliary | None] = {a.key: a for a in held}
        self.names: tuple[tuple[str, str], ...] = \
            tuple((a.key, a.layer) for a in self._held.values()) or tuple(names)
        self._load = load
        # The layers whose rows equal a block's view (view_aliases.Alias), by view key.
        self.aliases: dict = dict(aliases or {})

    def get(self, key: str) -> Auxiliary | None:
        """The auxiliary of the view with this key, read now if it is named but not held."""
        if key in self._held:
            return self._held[key]
        layer = next((layer for name, layer in self.names if name == key), None)
        if layer is None or self._load is None:
            return None
        for found in self._load(key, layer):
            self._held.setdefault(found.key, found)
        return self._held.setdefault(key, None)

    def held(self) -> tuple[Auxiliary, ...]:
        """Those in memory, read or made (what the pass that made them stores)."""
        return tuple(a for a in self._held.values() if a is not None)

    def __iter__(self) -> Iterator[Auxiliary]:
        """Every block's auxiliary, in the pass's order (reading those not yet held)."""
        return (a for a in (self.get(key) for key, _ in self.names) if a is not None)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        held = [key for key, a in self._held.items() if a is not None]
        return f"<Auxiliaries of {[layer for _, layer in self.names]}, held: {held}>"


def to_arrays(auxiliaries: Auxiliaries) -> dict[str, np.ndarray]:
    """The profile entry's part: the blocks' names only; each block's own entry holds its
    arrays (``entry_arrays``)."""
    return {"aux_names": np.array(list(auxiliaries.names), dtype=np.str_).reshape(-1, 2),
            "aux_aliases": np.str_(view_aliases.encode(auxiliaries.aliases))}


def from_arrays(arrays, load: Callable[[str, str], Iterable[Auxiliary]] | None
                ) -> Auxiliaries:
    """Decode ``to_arrays``: the blocks named, each read through ``load`` on first use."""
    if "aux_names" not in arrays:
        return Auxiliaries()
    names = np.asarray(arrays["aux_names"])
    if names.ndim != 2 or names.shape[1] != 2:
        raise ValueError("its block names are not (key, layer) pairs")
    aliases = view_aliases.decode(str(arrays["aux_aliases"])) if "aux_aliases" in arrays else {}
    return Auxiliaries(names=[(str(key), str(layer)) for key, layer in names.tolist()],
                       load=load, aliases=aliases)


def entry_arrays(a: Auxiliary) -> dict[str, np.ndarray]:
    """One block's cache entry (arrays, no pickle)."""
    return {"key": np.str_(a.key), "layer": np.str_(a.layer), "mean": a.mean,
            "basis": a.basis, "z": a.z, "fitted": np.int64(a.fitted_on)}


def from_entry(arrays, key: str, layer: str, n_items: int) -> Auxiliary:
    """Decode ``entry_arrays``, raising ValueError unless it is the block ``key`` of ``layer``
    and describes ``n_items`` items."""
    a = Auxiliary(str(arrays["key"]), str(arrays["layer"]), arrays["mean"], arrays["basis"],
                  arrays["z"], int(arrays["fitted"]))
    if (a.key, a.layer) != (key, layer):
        raise ValueError(f"it holds the auxiliary of {a.layer}, not of {layer}")
    if a.basis.ndim != 2 or a.z.shape != (n_items, a.basis.shape[1]) \
            or a.mean.shape != (a.basis.shape[0],) or a.z.dtype != np.float32 \
            or a.basis.dtype != np.float32 or a.mean.dtype != np.float32:
        raise ValueError(f"its auxiliary of {layer} does not describe {n_items:,} items")
    return a
