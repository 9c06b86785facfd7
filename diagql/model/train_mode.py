"""What DiagQL says of a model left in train mode, as a training loop leaves it: its queries
are answered as in eval mode (model/hooks.py, ``evaluation``), and its modules' modes are
left as they were."""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from diagql.errors import warn


def say_train_mode(module: nn.Module, what: str) -> None:
    """Warn where eval mode changes the model's outputs (``_differs``: dropout off,
    BatchNorm's running statistics): the model in train mode, or in eval mode with some of
    its modules in train mode (dropout left on for Monte Carlo dropout), which are named."""
    training = {name: m for name, m in module.named_modules() if m.training and _differs(m)}
    if not training:
        return
    kinds: dict[str, set[str]] = {"dropout off": set(), "running statistics": set()}
    for m in training.values():
        kinds["running statistics" if isinstance(m, _BatchNorm) else "dropout off"].add(
            type(m).__name__)
    changes = "; ".join(f"{', '.join(sorted(types))}: {change}"
                        for change, types in kinds.items() if types)
    names = [repr(name) for name in list(training)[:3]]
    if len(training) > 3:
        names.append(f"… ({len(training) - 3} more)")
    where, them = ("is in train mode", "it") if module.training else (
        f"is in eval mode but {len(training)} of its modules "
        f"{'is' if len(training) == 1 else 'are'} in train mode ({', '.join(names)})", "them")
    warn(f"{what} {where}; DiagQL answers {them} as in eval mode, as inference runs {them} "
         f"({changes}), and leaves {them} in train mode (call .eval() before connecting to "
         f"silence this)")


def _differs(module: nn.Module) -> bool:
    """Whether eval mode changes what the module computes: dropout, in its own module or in
    an attention's or a recurrent net's between layers, and BatchNorm's statistics."""
    if isinstance(module, (_BatchNorm, _DropoutNd)):
        return True
    return isinstance(module, (nn.MultiheadAttention, nn.RNNBase)) and module.dropout > 0
