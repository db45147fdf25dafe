"""Make the bundle's ``scripts`` package importable, as ``ConfigWorkflow.run`` does for a bundle."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
sys.path.insert(0, str(BUNDLE))
