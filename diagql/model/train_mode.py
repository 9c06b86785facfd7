"""What DiagQL says of a model left in train mode, as a training loop leaves it: its queries
are answered as in eval mode (model/hooks.py, ``evaluation``), and its modules' modes are
left as they were."""
from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd

from diagql.errors import warn


def say_train_mode(module: nn.Module, what: str) -> None:
    """Warn where eval mode changes the model's outputs (dropout off, BatchNorm's running
    statistics): the model in train mode, or in eval mode with some of its modules in train
    mode (dropout left on for Monte Carlo dropout), which are named."""
    training = {name: m for name, m in module.named_modules()
                if m.training and isinstance(m, (_BatchNorm, _DropoutNd))}
    if not training:
        return
    differ = sorted({type(m).__name__ for m in training.values()})
    changes = [change for kind, change in ((_DropoutNd, "dropout off"),
                                           (_BatchNorm, "running statistics"))
               if any(isinstance(m, kind) for m in training.values())]
    names = [repr(name) for name in list(training)[:3]]
    if len(training) > 3:
        names.append(f"… ({len(training) - 3} more)")
    where, them = ("is in train mode", "it") if module.training else (
        f"is in eval mode but {len(training)} of its modules "
        f"{'is' if len(training) == 1 else 'are'} in train mode ({', '.join(names)})", "them")
    warn(f"{what} {where}; DiagQL answers {them} as in eval mode, as inference runs "
         f"{them} ({', '.join(differ)}: {', '.join(changes)}), and leaves {them} in "
         f"train mode (call .eval() before connecting to silence this)")
