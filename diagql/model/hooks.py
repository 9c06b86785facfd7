"""Forward hooks that are always removed, a model that always gets its modes back, and errors
raised inside a hook told apart from the model's own."""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator

import torch
from torch import nn

from diagql.errors import DiagQLError, ExecutionError
from diagql.model.views import NOT_GOVERNING, ModuleCall, describe_output, first_output, \
    named_inputs, padding_argument, padding_mask


def first_tensor(output, name: str = "") -> torch.Tensor:
    """The tensor a module returns (the first of a tuple, list or dict; ``logits`` or
    ``last_hidden_state`` of a Hugging Face output), for outputs read whole (the logits)."""
    found = first_output(output)
    if not isinstance(found, torch.Tensor):
        raise ExecutionError(f"module {name or 'output'!r} returned {describe_output(output)}, "
                             f"where DiagQL expected a tensor")
    return found


def hookable(module: nn.Module, what: str = "model") -> nn.Module:
    """The module DiagQL hooks for the user's ``module``: a ``torch.compile``'d module's
    original (dynamo would trace our hooks and fail on their guards; the original computes
    the same outputs eagerly, its layers named as the user wrote them, without ``_orig_mod.``).
    TorchScript is refused: its modules take no forward hooks, or never call them; so is a
    torch.export program's ``.module()``, which calls none of its modules."""
    if isinstance(module, torch.jit.ScriptModule):
        raise DiagQLError(f"{what} is TorchScript ({type(module).__name__}), whose layers take no "
                          f"forward hooks; connect the nn.Module it was scripted or traced "
                          f"from")
    if any(cls.__name__ == "_StatefulGraphModule" for cls in type(module).__mro__):
        raise DiagQLError(f"{what} is a torch.export program's module, whose graph inlines its "
                          f"layers, so none runs as a module a forward hook sees; connect "
                          f"torch.export.unflatten(program), whose layers do (export it with "
                          f"a dynamic batch size, dynamic_shapes={{'x': {{0: Dim.DYNAMIC}}}}: "
                          f"DiagQL runs batches of several sizes), or the nn.Module it was "
                          f"exported from")
    original = compiled_original(module)
    return module if original is None else original


def compiled_original(module: nn.Module) -> nn.Module | None:
    """The module a torch.compile wrapper (torch._dynamo's OptimizedModule, told by its type's
    name: importing dynamo to test isinstance costs a second) runs; None for any other."""
    original = getattr(module, "_orig_mod", None)
    if isinstance(original, nn.Module) and type(module).__name__ == "OptimizedModule":
        return original
    return None


def this_thread(hook: Callable) -> Callable:
    """A forward (pre-)hook that acts only in the thread that made it: another thread of the
    user's running the model meanwhile (a training loop, a server) passes through untouched,
    where it had fed its batches into a pass ("module ran more than once") and had DiagQL's
    errors raised in its own forward. Every hook DiagQL registers is made so."""
    owner = threading.get_ident()

    def in_owner(*args):
        if threading.get_ident() == owner:
            return hook(*args)
        return None
    return in_owner


class StopForward(BaseException):
    """Raised by a hook once every module a pass needs has run: the rest of forward() is
    skipped (early exit). A BaseException, so that a model's own ``except Exception`` does
    not swallow it."""


class HookFailure(BaseException):
    """An exception raised by DiagQL's own code inside a hook. A BaseException, so that neither
    the model's ``except Exception`` nor call_model (which reports what it catches as the
    model's error) catches it; ``raise_error`` turns it back into a DiagQLError that names
    the layer (``Hooks`` does so as it exits, ``hook_errors`` around other calls)."""

    def __init__(self, layer: str, output, error: Exception):
        super().__init__(layer)
        self.layer = layer
        self.output = describe_output(output)
        self.error = error

    def raise_error(self):
        if isinstance(self.error, DiagQLError):
            raise self.error from None
        raise ExecutionError(
            f"DiagQL failed on the output of layer {self.layer!r} ({self.output}): "
            f"{type(self.error).__name__}: {self.error}; the error is DiagQL's, not the "
            f"model's") from self.error


@contextlib.contextmanager
def hook_errors() -> Iterator[None]:
    """Turn a HookFailure that leaves the block into the DiagQLError it stands for."""
    try:
        yield
    except HookFailure as failure:
        failure.raise_error()


# Buffers are copied before a pass and put back after it up to this many bytes in all (a
# model's buffers are its norms' statistics and small tables; past it they are left as the
# pass leaves them).
BUFFER_BYTES = 256 * 1024 ** 2


@contextlib.contextmanager
def evaluation(model: nn.Module, changed: list[str] | None = None) -> Iterator[None]:
    """Eval mode and no autograd for the duration; every module's training flag restored, and
    every buffer a forward changed in eval mode (a call counter, a running average, a
    quantization observer's range) put back as it was: the model is left as the user gave it.
    ``changed`` gets the names of the buffers that were put back.

    ``torch.no_grad``, not ``torch.inference_mode``: a tensor a module makes on its first call
    and keeps (a positional table, a rotary cache, a mask) would be an inference tensor, and
    the user's next training step would fail on it ("Inference tensors cannot be saved for
    backward"); and a forward that takes gradients itself (``torch.enable_grad()`` inside)
    runs under no_grad, not under inference mode.

    Compiled code runs eagerly within (``torch.compiler.set_stance("force_eager")``): a
    submodule the user compiled (``model.backbone = torch.compile(...)``, ``model.compile()``)
    would otherwise have dynamo trace DiagQL's hooks, and fail on their guards; the eager code
    computes the same outputs. ``hookable`` unwraps a compiled model given whole."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
    except NotImplementedError:
        # torch.export's modules refuse eval() (their graph is traced for one mode already);
        # the flags of their modules are set as eval() would.
        for module in model.modules():
            module.training = False
    kept, named = _buffers(model)
    try:
        with torch.no_grad(), _eager(model):
            yield
    finally:
        for module, flag in flags:
            module.training = flag
        restored = _restore(kept, named)
        if changed is not None:
            changed.extend(restored)


def _buffers(model: nn.Module) -> tuple[list, list]:
    """(module, name, qualified name, the buffer, a copy of it) for every buffer, and (its
    name, module, the names of its buffers) for every module, whose buffers a pass adds are
    taken out again; up to BUFFER_BYTES of buffers in all (neither past it)."""
    from torch.nn.parameter import is_lazy

    kept, size = [], 0
    named = [(prefix, module, set(module._buffers.keys())) for prefix, module
             in model.named_modules() if not isinstance(module, torch.jit.ScriptModule)]
    for prefix, module, _ in named:
        for name, buffer in module._buffers.items():
            if buffer is None or is_lazy(buffer):  # a lazy module's, made by its first call
                continue
            size += buffer.numel() * buffer.element_size()
            if size > BUFFER_BYTES:
                return [], []
            try:
                copy = buffer.detach().clone()
            except (RuntimeError, NotImplementedError):  # one no clone takes: left as it is
                continue
            kept.append((module, name, f"{prefix}.{name}" if prefix else name, buffer, copy))
    return kept, named


def _restore(kept: list[tuple], named: list[tuple]) -> list[str]:
    """Put back each buffer a pass changed, in place or by rebinding, and take out those it
    added (a rotary cache registered on first use had joined the state_dict); their names."""
    restored = []
    for prefix, module, before in named:
        for name in [name for name in module._buffers.keys() if name not in before]:
            delattr(module, name)  # out of _non_persistent_buffers_set too
            restored.append(f"{prefix}.{name}" if prefix else name)
    for module, name, qualified, buffer, copy in kept:
        try:
            moved = module._buffers.get(name) is not buffer
            same = buffer.shape == copy.shape and buffer.dtype == copy.dtype and (
                torch.equal(buffer, copy) or (buffer.is_floating_point() and torch.allclose(
                    buffer, copy, rtol=0, atol=0, equal_nan=True)))
            if not same:
                with torch.no_grad():
                    if buffer.shape == copy.shape:
                        buffer.copy_(copy)
                    else:
                        buffer.set_(copy)
            if moved:
                module._buffers[name] = buffer
        except (RuntimeError, NotImplementedError):  # a buffer that cannot be compared
            continue
        if moved or not same:
            restored.append(qualified)
    return restored


def _eager(model: nn.Module):
    """Compiled parts run their eager code (torch ≥ 2.6; before it, nothing changes). Only
    for a model that has some: the stance imports torch._dynamo, a second of every new
    process's first pass otherwise."""
    stance = getattr(torch.compiler, "set_stance", None)
    compiled = any(compiled_original(m) is not None or
                   getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())
    return stance("force_eager") if stance is not None and compiled else contextlib.nullcontext()


def scope(name: str) -> list[str]:
    """A module's name and its ancestors' names, innermost first ("" is the model)."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def call_name(module: str, call: int) -> str:
    """The layer name of a module's ``call``-th call in a forward pass: ``block.relu#2``."""
    return f"{module}#{call}"


def hooked_call(modules, layer: str) -> tuple[str, int]:
    """The module and call a layer name stands for: a module's own name (call 0: its one
    call), else ``module#n``, its n-th call (a real module name wins, as a quoted one does)."""
    if layer in modules:
        return layer, 0
    module, mark, number = layer.rpartition("#")
    if mark and number.isdigit() and int(number) >= 1 and module in modules:
        return module, int(number)
    raise ExecutionError(f"the model has no layer {layer!r}")


# Why a layer that did not run in some batch (a pass's, or the profile pass's) is refused.
SOME_BATCHES = ("it runs in some batches only, more often in some, or from another place in "
                "forward() (a branch on the data, or a loop whose length depends on the batch), "
                "so it has no single activation for every item")


class Hooks:
    """Forward hooks on named layers, each called with a ``ModuleCall``: the module's output,
    the key padding mask given to it or to a module around it (nn.TransformerEncoder and the
    like), and the batch that ``start`` announced.

    A layer is a module (``fc1``), or one call of a module that runs several times per forward
    pass (``block.relu#2``, model/layers.py): the hooks count each module's calls per batch and
    feed the n-th call's callbacks its n-th output only. A module hooked as a whole must run
    once; ``ran_again(layer, output)``, where given, is told of one that runs again in a batch
    (the profile pass's checks then drop the layer), else that is an error. Exceptions raised in
    the callbacks leave the model's forward as HookFailure and this context as DiagQLErrors.
    """

    def __init__(self, model: nn.Module, callbacks: dict[str, Callable[[ModuleCall], None]],
                 pre: dict[str, Callable[[ModuleCall], None]] | None = None,
                 ran_again: Callable[[str], None] | None = None):
        self.model = model
        self.callbacks = callbacks
        self.pre = pre or {}
        self.ran_again = ran_again
        self.calls: dict[str, int] = {}  # module -> its calls so far in this batch
        self.pre_calls: dict[str, int] = {}  # the same, counted by the input hooks
        self.ran: set[str] = set()  # the hooked layers (and "<input of>" ones) served this batch
        self.inputs = None  # the batch's model input (its attention_mask, if any)
        self.size = 0  # items in the batch
        # Off while another model of the same pass runs: a module two models share (a frozen
        # encoder) fires every Hooks registered on it, whichever model called it.
        self.active = True
        self._targets: dict[str, tuple[str, int]] = {}  # layer -> (module, call)
        self._padding: dict[str, torch.Tensor | None] = {}
        self._handles = []

    def __enter__(self) -> "Hooks":
        modules = dict(self.model.named_modules())
        self._targets = {layer: hooked_call(modules, layer) for layer in self.callbacks}
        wanted: dict[str, dict[int, list]] = {}  # module -> call -> [(layer, callback)]
        for layer, (module, call) in self._targets.items():
            wanted.setdefault(module, {}).setdefault(call, []).append(
                (layer, self.callbacks[layer]))
        owners: dict[str, list[str]] = {}  # hooked module -> modules whose padding mask covers it
        for name in wanted:
            owners[name] = [o for o in scope(name) if padding_argument(modules[o]) is not None]
        try:
            for owner in dict.fromkeys(o for names in owners.values() for o in names):
                self._handles.append(modules[owner].register_forward_pre_hook(
                    this_thread(self._padding_hook(owner)), with_kwargs=True))
            for name, calls in wanted.items():
                self._handles.append(modules[name].register_forward_hook(
                    this_thread(self._hook(name, calls, owners[name]))))
            for layer, callback in self.pre.items():
                module, call = hooked_call(modules, layer)
                self._handles.append(modules[module].register_forward_pre_hook(
                    this_thread(self._pre_hook(layer, module, call, callback))))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.remove()
        if isinstance(exc, HookFailure):
            exc.raise_error()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def start(self, inputs, size: int, peers: list["Hooks"] = ()) -> None:
        """A new batch of ``size`` items, fed to the model as ``inputs``; ``peers``: the other
        models' Hooks of the same pass, off until their own model runs."""
        for peer in peers:
            peer.active = peer is self
        self.active = True
        self.calls.clear()
        self.pre_calls.clear()
        self.ran.clear()
        self._padding.clear()
        self.inputs, self.size = named_inputs(inputs, self.model), size

    def done(self) -> bool:
        """Whether every hooked layer has run in this batch (for a module's n-th call: the
        n-th call has), so the rest of forward() may be skipped."""
        return len(self.ran) == len(self.callbacks) + len(self.pre)

    def _padding_hook(self, owner: str):
        def hook(module, args, kwargs):
            if not self.active:
                return
            mask = padding_mask(module, args, kwargs)
            if mask is NOT_GOVERNING:
                self._padding.pop(owner, None)
            else:
                self._padding[owner] = mask
        return hook

    def _hook(self, name: str, calls: dict[int, list], owners: list[str]):
        def hook(module, inputs, output):
            if not self.active:
                return
            count = self.calls.get(name, 0) + 1
            self.calls[name] = count
            served = calls.get(count, []) + (calls.get(0, []) if count == 1 else [])
            layer = name
            try:
                if count > 1 and 0 in calls and self.ran_again is not None:
                    for layer, _ in calls[0]:
                        self.ran_again(layer, output)
                elif count > 1 and 0 in calls:
                    raise ExecutionError(
                        f"module {name!r} ran more than once in one forward pass of "
                        f"{self.size} items, where the catalog's probe (batches of 1 to 3 "
                        f"items) saw it run once, so it has no single activation; a forward "
                        f"that splits its batch into pieces runs it once a piece: SET "
                        f"batch_size to at most a piece's size")
                if not served:
                    return
                # The innermost owner that governs decides, None included (views.padding_mask).
                padding = next((self._padding[o] for o in owners if o in self._padding), None)
                # Runs before any later in-place op (ReLU(inplace=True)) can overwrite the output.
                call = ModuleCall(output, padding, self.inputs, self.size, inputs)
                for layer, callback in served:
                    self.ran.add(layer)
                    callback(call)
            except Exception as exc:  # noqa: BLE001 - told apart from the model's own errors
                raise HookFailure(layer, output, exc) from exc
        return hook

    def _pre_hook(self, layer: str, name: str, call: int, callback):
        """The input of ``layer``: module ``name`` as a whole (``call`` 0, which must run once
        per forward pass) or its ``call``-th call (``head#6``: a per-step head's last)."""
        key = "<input of>" + layer

        def hook(module, inputs):
            if not self.active:
                return
            try:
                if call:
                    count = self.pre_calls.get(name, 0) + 1
                    self.pre_calls[name] = count
                    if count != call:
                        return
                elif key in self.ran:
                    raise ExecutionError(
                        f"module {name!r} runs more than once per forward pass (a shared "
                        f"block), so its input is not one vector per item")
                self.ran.add(key)
                callback(ModuleCall(inputs, None, self.inputs, self.size))
            except Exception as exc:  # noqa: BLE001 - told apart from the model's own errors
                raise HookFailure(layer, inputs, exc) from exc
        return hook

    def check_ran(self) -> None:
        """Raise if a hooked layer did not run in the forward pass that just finished."""
        for layer, (module, call) in self._targets.items():
            if layer not in self.ran:
                ran = self.calls.get(module, 0)
                detail = (f" (module {module!r} ran only {ran} time{'s' if ran != 1 else ''}"
                          f" in this batch)" if call and ran else "")
                raise ExecutionError(f"layer {layer!r} did not run in a forward pass of the "
                                     f"model{detail}, though it ran in DiagQL's probe: "
                                     f"{SOME_BATCHES}")
        for name in self.pre:  # the profile's latent, the input of a layer (by default the last)
            if "<input of>" + name not in self.ran:
                # An early exit had every statement refused naming a layer none asked for (SW1).
                raise ExecutionError(
                    f"layer {name!r}, whose input DiagQL reads as the profile's latent, did "
                    f"not run in a forward pass of {self.size} items, though it ran in "
                    f"DiagQL's probe: {SOME_BATCHES}; name a layer that runs in every batch "
                    f"as the latent: SET latent = <layer>, or latent= in connect()")
