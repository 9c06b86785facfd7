"""Where each call of a module that runs several times per pass comes from, batch by batch:
a call whose place in forward() is not the same in every batch of the profile pass is not the
same computation in every batch (docs/ARCHITECTURE.md, "Data model": a layer is a module or
one call of it).

``block#n`` is a module's n-th call in a batch. A branch on the data that calls the module once
more, before the others, shifts every later call's number in that batch: ``block#1`` reads the
side call there and ``block#2`` the loop's first, and both had been answered as exact over
every item (SW1: max error 0.019). The number of calls alone cannot tell that from a loop whose
length follows the batch (a GRUCell stepped over the batch's longest item), whose first calls
are the same computation in every batch: where each call came from can. Each call's site is
the chain of frames from the model's call to the module's (``caller_site``); the profile
pass compares each batch's sites with the first batch's, and from the first call whose site
differs (in the same place of the sequence) on, the module's calls are not the same in every
batch (``Profile.unran``); the parts of a pass (Ray's shards) compare their first batches'
as they join (``shifted_between``). Calls past the shorter sequence are left to the count (a
call that did not come in a batch is unran already).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch.nn.modules.module as _torch_module
from torch import nn

from diagql.model import hooks as _hooks
from diagql.model.forward import call_model
from diagql.model.hooks import call_name, this_thread

# Frames that are torch's module machinery or DiagQL's hook wrappers, not the model's code;
# the frame of DiagQL's call of the model ends a call's site.
_MACHINERY = frozenset({_torch_module.__file__, _hooks.__file__, __file__})
_MODEL_CALL = call_model.__code__


def caller_site() -> tuple:
    """Where the module whose hook is running was called from: every frame of the model's
    code (and of the libraries it goes through: nn.Sequential, torch.utils.checkpoint)
    between the model's call and the module's, each as (file, function, first line,
    instruction offset). The whole chain, not the innermost frame: a module called through
    a helper, a Sequential or a checkpoint has one innermost line for every call, and two
    calls on one line differ only in their offsets."""
    frame, chain = sys._getframe(1), []
    while frame is not None:
        code = frame.f_code
        if code is _MODEL_CALL:
            break
        if code.co_filename not in _MACHINERY:
            chain.append((code.co_filename, code.co_name, code.co_firstlineno, frame.f_lasti))
        frame = frame.f_back
    return tuple(chain)


@dataclass
class SharedCalls:
    """The modules a probe saw run several times per pass, with their calls (``calls``), and
    the first batch's call sites of each (``reference``), which every later batch of the
    pass is compared with. Picklable: a Ray shard takes its own copy, and its own first batch
    as the reference."""

    calls: dict[str, int] = field(default_factory=dict)
    reference: dict[str, list] = field(default_factory=dict)

    @classmethod
    def of(cls, catalog) -> SharedCalls:
        if catalog is None:
            return cls()
        return cls({layer.name: layer.calls for layer in catalog.layers if layer.shared})


class CallSites:
    """Forward hooks on the shared modules that note each call's site in the current batch;
    ``shifted()`` after a batch names the calls that were not where the reference's were."""

    def __init__(self, model: nn.Module, shared: SharedCalls):
        self.shared = shared
        self.batch: dict[str, list] = {}
        modules = dict(model.named_modules()) if shared.calls else {}
        self._handles = [modules[name].register_forward_hook(this_thread(self._hook(name)))
                         for name in shared.calls if name in modules]

    def __enter__(self) -> CallSites:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def hook(module, inputs, output):
            self.batch.setdefault(name, []).append(caller_site())
        return hook

    def start(self) -> None:
        self.batch.clear()

    def shifted(self) -> set[str]:
        """The layers (``module#n``) of each shared module from the first call whose site in
        this batch is not the reference's; the first batch becomes the reference."""
        out: set[str] = set()
        for name, calls in self.shared.calls.items():
            sites = self.batch.get(name, [])
            out |= _shifted(name, calls, sites, self.shared.reference.setdefault(name, sites))
        return out


def shifted_between(parts: list[SharedCalls | None]) -> set[str]:
    """The calls whose sites differ between the references of a pass's parts: each Ray shard
    takes its own first batch's, and a shard of one batch compares nothing within."""
    present = [part for part in parts if part is not None and part.calls]
    out: set[str] = set()
    for other in present[1:]:
        for name, calls in present[0].calls.items():
            out |= _shifted(name, calls, other.reference.get(name, []),
                            present[0].reference.get(name, []))
    return out


def _shifted(name: str, calls: int, sites: list, reference: list) -> set[str]:
    first = next((i for i, (a, b) in enumerate(zip(sites, reference)) if a != b), None)
    return set() if first is None else {call_name(name, call)
                                        for call in range(first + 1, calls + 1)}
