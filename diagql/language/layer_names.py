"""What a layer name that does not bind is told: the layer meant (a misspelling, a wrapper's
or a compiled model's prefix, a parameter's name) or, for a module that never runs itself,
the members of it that do."""
from __future__ import annotations

from diagql.model.layers import LayerCatalog
from diagql.suggest import did_you_mean

CONTAINERS = ("ModuleList", "ModuleDict", "ParameterList", "ParameterDict")  # no forward


def members(name: str, catalog: LayerCatalog) -> list[str]:
    """The queryable layers inside module ``name`` nearest to it (a nested list's own members,
    a shared member's calls)."""
    inside = [n for n in catalog.running_names() if n.startswith(name + ".")]
    depth = min((n.count(".") for n in inside), default=0)
    return [n for n in inside if n.count(".") == depth]


def suggestion(name: str, names: list[str]) -> str:
    """``"; did you mean 'fc1'?"`` for an unknown ``name`` among the layers ``names``, or ""."""
    return _wrapped(name, names) or did_you_mean(name, names) or _part_of(name, names)


def _wrapped(name: str, names: list[str]) -> str:
    """'1' of a model inside a wrapper ('module.1': nn.DataParallel, a .model attribute), or
    'backbone.1' of a compiled submodule ('backbone._orig_mod.1'); or, the other way,
    '_orig_mod.1' of a model compiled whole, which is read as the module it compiled."""
    bare = name.replace("._orig_mod.", ".").removeprefix("_orig_mod.")
    if bare != name and bare in names:
        return (f"; did you mean {bare!r}? (a model compiled whole is read as the module it "
                f"compiled, whose names have no '_orig_mod.')")
    found = [n for n in names if n.endswith("." + name)
             or n.replace("._orig_mod.", ".").removeprefix("_orig_mod.") == name]
    if not found or len(found) > 3:
        return ""
    if len(found) == 1:
        return f"; did you mean {found[0]!r}?"
    return "; did you mean " + ", ".join(repr(c) for c in found[:-1]) + f" or {found[-1]!r}?"


def _part_of(name: str, names: list[str]) -> str:
    """'fc1.0.weight': a parameter (or attribute) of a layer, which is what a query reads."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:end]) in names:
            return (f"; did you mean {'.'.join(parts[:end])!r}? (a query reads a module's "
                    f"output, not its {'.'.join(parts[end:])})")
    return ""
