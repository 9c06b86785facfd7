"""Explicable boundary tree: a boundary tree (Mathy et al., 2015) over the latents, labelled by
the model's predictions (Wu et al., 2017/2018); the sample is the tree's nodes.

Items arrive in a random order and the first becomes the root. Each later item descends the
tree greedily: at a node, the candidates are its children plus the node itself (the node itself
only while it has fewer than ``max_children`` children); the nearest candidate is taken, and the
descent stops when that is the node itself. If the node reached predicts another class than the
item, the item becomes its child. So the nodes are the items near the model's decision
boundaries, and how many there are is the tree's decision, not the caller's.
"""
from __future__ import annotations

import numbers
from typing import ClassVar

import numpy as np

from diagql.errors import BindError

from .base import SampleData, Sampler
from .space import fit_space


class EBTreeSampler(Sampler):
    name = "ebtree"
    description = ("explicable boundary tree over the latents, labelled by the model's "
                   "predictions; the sample is the tree's nodes (its size is the tree's)")
    _domains = {
        "max_children": "a whole number ≥ 2 of children per node (default: unbounded)",
        "random_state": Sampler._domains["random_state"],
    }

    # Wider latents are standardised and projected on this many principal components (see
    # fit_space): every step of a descent is a product with the node's children.
    fit_dims: ClassVar[int] = 128

    def __init__(self, max_children=None, random_state=None):
        self.max_children = max_children
        self.random_state = random_state

    def _check(self) -> None:
        k = self.max_children
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
            raise BindError(f"max_children must be a whole number of at least 2, not {k!r}",
                            param="max_children")
        if k == 1:
            # A node with its one child is no longer a candidate, so every query would run to
            # the end of a single chain: the "tree" is a list of label changes, built in O(N²).
            raise BindError("max_children=1 makes the tree a single chain that every query "
                            "runs to the end of; use 2 or more", param="max_children")

    def _select(self, data: SampleData, n: None, rng: np.random.Generator) -> np.ndarray:
        self.space_ = fit_space(data.latents, self.fit_dims)
        X = self.space_(data.latents)
        predictions = np.asarray(data.predictions)
        tree = BoundaryTree(self.max_children)
        items = []
        for item in rng.permutation(len(X)):
            if tree.train(X[item], predictions[item]):
                items.append(item)
        self.nodes_ = np.asarray(items, dtype=np.int64)
        self.parent_ = np.asarray(tree.parent, dtype=np.int64)
        self.node_predictions_ = predictions[self.nodes_]
        self.tree_ = tree
        return self.nodes_

    def apply(self, latents: np.ndarray) -> np.ndarray:
        """The node (a position in ``nodes_``) where each row of ``latents`` ends its descent of
        the fitted tree, mapped to the same space as the fitted data."""
        X = self.space_(latents)
        return np.array([self.tree_.descend(x) for x in X], dtype=np.int64)


class BoundaryTree:
    """A boundary tree whose nodes are numbered 0, 1, ... in insertion order (0 is the root).

    Each node keeps its children's latents in one array (rebuilt when a child joins, which is
    rare next to descents) so a step of the descent is one small matrix-vector product.
    Squared Euclidean distances are computed as ‖c‖² − 2c·x: the ‖x‖² term is common to every
    candidate and cannot change which is nearest.
    """

    def __init__(self, max_children: int | None = None):
        self.max_children = max_children
        self.latents: list[np.ndarray] = []
        self.norms: list[float] = []
        self.labels: list[object] = []
        self.parent: list[int] = []
        self.children: list[list[int]] = []
        self.child_latents: list[np.ndarray | None] = []
        self.child_norms: list[np.ndarray | None] = []

    def train(self, x: np.ndarray, label) -> bool:
        """Descend with ``x``; if the node reached has another label, add ``x`` as its child.
        True if ``x`` became a node (the first point always does: it is the root)."""
        if not self.parent:
            self._add(x, label, parent=-1)
            return True
        node = self.descend(x)
        if self.labels[node] == label:
            return False
        self._add(x, label, parent=node)
        return True

    def descend(self, x: np.ndarray) -> int:
        """The node where the greedy descent of ``x`` from the root stops."""
        node = 0
        while True:
            children = self.children[node]
            if not children:
                return node
            scores = self.child_norms[node] - 2.0 * (self.child_latents[node] @ x)
            best = int(scores.argmin())
            full = self.max_children is not None and len(children) >= self.max_children
            # A full node is no longer a candidate itself; otherwise ties stay at the node:
            # a child must be strictly nearer to pull the query down.
            if not full and self.norms[node] - 2.0 * (self.latents[node] @ x) <= scores[best]:
                return node
            node = children[best]

    def _add(self, x: np.ndarray, label, parent: int) -> None:
        node = len(self.parent)
        self.latents.append(np.array(x, dtype=np.float64))  # a copy: not a view into the data
        self.norms.append(float(x @ x))
        self.labels.append(label)
        self.parent.append(parent)
        self.children.append([])
        self.child_latents.append(None)
        self.child_norms.append(None)
        if parent >= 0:
            siblings = self.children[parent]
            siblings.append(node)
            self.child_latents[parent] = np.stack([self.latents[c] for c in siblings])
            self.child_norms[parent] = np.array([self.norms[c] for c in siblings])
