"""Project tooling behind main.py and the engine/benchmark entry points.

The Truss's own modules (`model-truss/model/...`) are importable from here as `model.*`.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TRUSS_DIR = REPO_ROOT / "model-truss"

if str(TRUSS_DIR) not in sys.path:
    sys.path.insert(0, str(TRUSS_DIR))
