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
the line of forward() (or of the user's function) that called the module; the profile pass
compares each batch's sites with the first batch's, and from the first call whose site
differs (in the same place of the sequence) on, the module's calls are not the same in every
batch (``Profile.unran``). Calls past the shorter sequence are left to the count (a call that
did not come in a batch is unran already).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch.nn.modules.module as _torch_module
from torch import nn

from diagql.model import hooks as _hooks
from diagql.model.hooks import call_name, this_thread

# Frames that are torch's module machinery or DiagQL's hook wrappers, not the model's code.
_MACHINERY = frozenset({_torch_module.__file__, _hooks.__file__, __file__})


def caller_site() -> tuple[str, int] | None:
    """(file, line) of the innermost frame outside torch's module call and DiagQL's hooks: the
    place in the model's code that called the module whose hook is running."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename in _MACHINERY:
        frame = frame.f_back
    return None if frame is None else (frame.f_code.co_filename, frame.f_lineno)


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
            reference = self.shared.reference.setdefault(name, sites)
            first = next((i for i, (a, b) in enumerate(zip(sites, reference)) if a != b), None)
            if first is not None:
                out.update(call_name(name, call) for call in range(first + 1, calls + 1))
        return out
