"""Shared fixtures. Puts the bundle's ``scripts`` package on the path, as ``ConfigWorkflow.run`` does."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
sys.path.insert(0, str(BUNDLE))

#: A coarse grid keeps the cohort tiny: 56 x 64 x 24 voxels per subject.
TINY_VOXEL_SIZE = (4.0, 4.0, 8.0)
#: Overrides that make the bundle's configs train on the tiny cohort in seconds.
TINY_TRAINING = {
    "spatial_size": [64, 64],
    "network_pixdim": [4.0, 4.0, 0.0],
    "network_def#channels": [8, 16, 32],
    "network_def#embed_dim": 8,
    "slices_per_volume": 2,
    "volumes_per_batch": 2,
    "num_workers": 0,
}


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory) -> Path:
    """A 10-subject phantom cohort (7 training, 2 validation) plus the held-out families; returns its folder."""
    from scripts.phantom import generate_cohort

    out = tmp_path_factory.mktemp("cohort")
    generate_cohort(out, n_subjects=10, seed=0, voxel_size=TINY_VOXEL_SIZE, family_size=1)
    return out
