"""``python -m diagql``: the same as the ``diagql`` command."""
import sys

from diagql.shell.cli import main

sys.exit(main())
