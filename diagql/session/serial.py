"""One statement at a time per process (docs/ARCHITECTURE.md, "Session")."""
from __future__ import annotations

import threading

# A statement's passes hook the user's modules and set their training flags for the pass,
# which another thread's pass over the same modules would see and undo: its hooks fed the
# other's rows, a model left in train mode ran so (BatchNorm's statistics moved), a probe's
# call counts doubled and cached. A second thread's statement waits; one statement's own
# calls (the profile and catalog it reads) are re-entrant.
STATEMENTS = threading.RLock()
