"""Damaged files never escape as anything but StudyError: random byte flips and truncations of a valid study."""

import shutil

import numpy as np
import pytest
from scripts.study import StudyError, load_study
from test_study import write_study

CASES = 30
#: pydicom warns about the damage it reads past; the reader's own verdict is what is tested
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    write_study(root)
    return root


def damage(path, rng):
    """Flip a few bytes (mostly in the header, where parsing can go wrong) and/or truncate the file."""
    data = bytearray(path.read_bytes())
    if rng.random() < 0.7:
        header = min(len(data), 3000)
        for _ in range(rng.integers(1, 12)):
            at = rng.integers(0, header if rng.random() < 0.8 else len(data))
            data[at] ^= 1 << int(rng.integers(0, 8))
    if rng.random() < 0.4:
        data = data[: rng.integers(0, len(data))]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", range(CASES))
def test_damaged_study_raises_only_study_error(template, tmp_path, case):
    rng = np.random.default_rng(case)
    study = tmp_path / "study"
    shutil.copytree(template, study)
    files = sorted(p for p in study.rglob("*") if p.is_file())
    for index in rng.choice(len(files), size=int(rng.integers(1, 3)), replace=False):
        damage(files[index], rng)
    try:
        chosen, _, _ = load_study(study)
    except StudyError as err:
        assert str(err)
        return
    assert set(chosen) == {"T1w", "T2w", "FLAIR"}
    assert all(np.isfinite(s.volume).all() and s.volume.ndim == 3 for s in chosen.values())
