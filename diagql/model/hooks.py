"""Forward hooks that are always removed, and a model that always gets its modes back."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from diagql.errors import ExecutionError


def first_tensor(output, name: str = "") -> torch.Tensor:
    """The activation of a module that returns more than a tensor: the first tensor in it.

    Tuples and lists are searched in order, dicts in insertion order, and objects with a
    ``logits`` or ``last_hidden_state`` attribute (Hugging Face outputs) use that.
    """
    if isinstance(output, torch.Tensor):
        return output
    for attr in ("logits", "last_hidden_state"):
        value = getattr(output, attr, None)
        if isinstance(value, torch.Tensor):
            return value
    values = output.values() if isinstance(output, dict) else output
    if isinstance(values, (tuple, list)) or isinstance(output, dict):
        for value in values:
            with contextlib.suppress(ExecutionError):
                return first_tensor(value, name)
    raise ExecutionError(f"module {name or 'output'!r} returned {type(output).__name__}, "
                         f"which holds no tensor")


class StopForward(BaseException):
    """Raised by a hook once every module a pass needs has run: the rest of forward() is
    skipped (early exit). A BaseException, so that a model's own ``except Exception`` does
    not swallow it."""


@contextlib.contextmanager
def evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode and inference mode for the duration; every module's training flag restored."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        for module, flag in flags:
            module.training = flag


class Hooks:
    """Forward hooks on named modules, each called with the module's output tensor.

    The hooks count their calls: a module that runs more than once in one forward pass (a
    shared block) has no single activation, so it is an error (see ``check_calls``).
    """

    def __init__(self, model: nn.Module, callbacks: dict[str, Callable[[torch.Tensor], None]],
                 pre: dict[str, Callable[[torch.Tensor], None]] | None = None):
        self.model = model
        self.callbacks = callbacks
        self.pre = pre or {}
        self.calls: dict[str, int] = {}
        self._handles = []

    def __enter__(self) -> "Hooks":
        modules = dict(self.model.named_modules())
        try:
            for name, callback in self.callbacks.items():
                self._handles.append(modules[name].register_forward_hook(self._hook(name, callback)))
            for name, callback in self.pre.items():
                self._handles.append(
                    modules[name].register_forward_pre_hook(self._pre_hook(name, callback)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        self.calls.clear()

    def _hook(self, name, callback):
        def hook(module, inputs, output):
            self._count(name)
            # Runs before any later in-place op (ReLU(inplace=True)) can overwrite the output.
            callback(first_tensor(output, name))
        return hook

    def _pre_hook(self, name, callback):
        def hook(module, inputs):
            self._count("<input of>" + name)
            callback(first_tensor(inputs, name))
        return hook

    def _count(self, key: str) -> None:
        count = self.calls.get(key, 0) + 1
        self.calls[key] = count
        if count > 1:
            name = key.removeprefix("<input of>")
            raise ExecutionError(
                f"module {name!r} runs more than once per forward pass (a shared block), so it "
                f"has no single activation; query a module that runs once")

    def check_ran(self) -> None:
        """Raise if a hooked module did not run in the forward pass that just finished."""
        for name in self.callbacks:
            if name not in self.calls:
                raise ExecutionError(f"layer {name!r} did not run in the model's forward pass")
        for name in self.pre:
            if "<input of>" + name not in self.calls:
                raise ExecutionError(f"layer {name!r} did not run in the model's forward pass")
