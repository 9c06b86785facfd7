"""Class names: where a connection finds them (``connect(..., classes=)``, the data's Hugging
Face ClassLabel feature or torchvision-style ``classes``, the model's ``config.id2label``),
and a statement's ``class = 'cat'`` resolved to the class's index before it is bound
(docs/ARCHITECTURE.md, "Data model")."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import replace

from diagql.errors import DiagQLError, warn, whole
from diagql.language import ast
from diagql.language.binder import _error
from diagql.model.data_forms import unlabelled_items
from diagql.model.labels import LABEL_KEYS


def given_names(classes) -> list[str] | None:
    """``connect(..., classes=)``: names in class order, or a mapping of indices to names."""
    if classes is None:
        return None
    if hasattr(classes, "tolist") and not isinstance(classes, Mapping):  # an array of names
        classes = classes.tolist()
    if isinstance(classes, Mapping):  # {np.int64(i): name} from np.unique(y) too
        # A config's id2label read from JSON has its indices as text: {"0": "cat", ...}.
        classes = {int(k) if isinstance(k, str) and k.isdecimal() else whole(k): name
                   for k, name in classes.items()}
        if not all(isinstance(k, int) and k >= 0 for k in classes) or \
                sorted(classes) != list(range(len(classes))):
            raise DiagQLError("classes= as a mapping takes every class index 0..n-1 to its name")
        classes = [classes[i] for i in range(len(classes))]
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise DiagQLError(f"classes= takes the class names in class order, not "
                          f"{type(classes).__name__}")
    names = [str(name) for name in classes]
    if not names:
        raise DiagQLError("classes= names no class")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise DiagQLError(f"classes= names two classes {twice[0]!r}")
    return names


def name_classes(conn, classes, data, label_key: str | None) -> None:
    """A new connection's class names: those given (``classes=``), else the data's (as
    built: a factory's) or the models'; ``checked`` sees that they fit at the first
    statement."""
    conn.class_names = given_names(classes)
    conn.names_given, conn.names_fit = classes is not None, False
    if conn.class_names is None:
        conn.class_names = found_names(data, label_key,
                                       [e.architecture() for e in conn.models.values()])


def checked(conn) -> list[str] | None:
    """The connection's class names once they are known to fit every model's classes (the
    first statement that has them checks): names given with ``classes=`` that do not are
    refused, since ``class = 'seven'`` would pick another class; names found on the data or
    a model that do not are warned of and dropped."""
    from diagql.session.changes import watching  # a statement's span: its probe is read

    names = conn.class_names
    if names is None or conn.names_fit:
        return names
    for entry in conn.models.values():
        try:
            with watching(conn):
                count = entry.n_classes
        except DiagQLError:  # the statement that needs the model says what is wrong with it
            return names
        if count != len(names):
            whose = f"model {entry.name!r}" if len(conn.models) > 1 else "the model"
            if conn.names_given:
                raise DiagQLError(f"{len(names)} class names were given, but {whose} scores "
                                  f"{count} classes: give one name per class, in class order")
            warn(f"the {len(names)} class names the data or a model carries do not "
                 f"fit {whose}'s {count} classes: classes are numbered, not named")
            conn.class_names = None
            return None
    conn.names_fit = True
    return names


def found_names(data, label_key: str | None, models: Sequence) -> list[str] | None:
    """The class names the data or a model carries: a Hugging Face dataset's ClassLabel feature
    on its label column, a ``classes`` list (torchvision's datasets: ImageFolder, CIFAR10, ...)
    on the data or the datasets under it (a DataLoader, a Subset), else the first model's
    ``config.id2label`` that is not the default LABEL_0, LABEL_1, ..."""
    holders = []
    # (dataset, None): the dataset's names, its labels unread (model/data_forms.py).
    holder = data[0] if unlabelled_items(data) else data
    while holder is not None and len(holders) < 4:  # DataLoader(Subset(dataset)), ...
        holders.append(holder)
        holder = getattr(holder, "dataset", None)
    for holder in holders:
        features = getattr(holder, "features", None)
        if isinstance(features, Mapping):
            for key in ([label_key] if label_key else list(LABEL_KEYS)):
                names = getattr(features.get(key), "names", None)
                if _names(names):
                    return list(names)
        names = getattr(holder, "classes", None)
        if _names(names):
            return list(names)
    for model in models:
        labels = getattr(getattr(model, "config", None), "id2label", None)
        if not isinstance(labels, Mapping) or not labels or \
                not all(str(k).isdigit() for k in labels):
            continue
        if sorted(int(k) for k in labels) == list(range(len(labels))):
            names = [str(labels[k]) for k in sorted(labels, key=int)]
            if not all(re.fullmatch(r"LABEL_\d+", name) for name in names):
                return names
    return None


def _names(names) -> bool:
    return isinstance(names, (list, tuple)) and len(names) > 0 and \
        all(isinstance(name, str) for name in names)


def resolved(statement, names: list[str] | None):
    """``statement`` with every class name in its WHERE replaced by the class's index."""
    if isinstance(statement, ast.Explain):
        return replace(statement, query=resolved(statement.query, names))
    where = getattr(statement, "where", None)
    if where is None or not any(isinstance(value, str) for node in ast.walk(where)
                                for value in _values(node)):
        return statement
    return replace(statement, where=_rebuilt(where, lambda node: _resolve(node, names)))


def _values(node) -> tuple:
    if isinstance(node, ast.Compare):
        return (node.value,)
    if isinstance(node, ast.Member):
        return node.values
    return ()


def _resolve(node, names: list[str] | None):
    strings = [value for value in _values(node) if isinstance(value, str)]
    if not strings:
        return node
    if isinstance(node, ast.Compare) and node.op not in ("=", "!="):
        raise _error(f"a class name compares with =, != or IN, not {node.op}", node.span)
    if names is None:
        # Labels given as names ('dog') are refused once read, classes= or not (SW2): said
        # here too, or following this advice led to that refusal.
        raise _error(f"{node.field} {strings[0]!r}: the classes have no names here; compare "
                     f"class indices (class = 3), or name the classes with "
                     f"connect(..., classes=[...]) or --classes (names for the indices the "
                     f"labels hold: labels given as names are numbered 0..C-1 first, in the "
                     f"order of the model's outputs)", node.span)
    index = {name: i for i, name in enumerate(names)}

    def of(value):
        if not isinstance(value, str):
            return value
        if value in index:
            return index[value]
        from diagql.suggest import did_you_mean, name_list

        raise _error(f"unknown class {value!r}{did_you_mean(value, names)}", node.span,
                     hint=f"classes are {name_list(names)}")

    if isinstance(node, ast.Compare):
        return replace(node, value=of(node.value))
    return replace(node, values=tuple(of(value) for value in node.values))


def _rebuilt(pred, fix):
    """The predicate with ``fix`` applied to each comparison, rebuilt bottom up without
    recursion (a predicate may nest as deep as the parser allows)."""
    done: dict[int, object] = {}
    stack = [(pred, False)]
    while stack:
        node, ready = stack.pop()
        if isinstance(node, (ast.And, ast.Or, ast.Not)) and not ready:
            stack.append((node, True))
            stack.extend((child, False) for child in ast.children(node))
            continue
        if isinstance(node, (ast.And, ast.Or)):
            done[id(node)] = replace(node, left=done[id(node.left)], right=done[id(node.right)])
        elif isinstance(node, ast.Not):
            done[id(node)] = replace(node, operand=done[id(node.operand)])
        else:
            done[id(node)] = fix(node)
    return done[id(pred)]
