"""``python -m diagql``: the same as the ``diagql`` command."""
import sys

from .cli import main

sys.exit(main())
