"""Study inference glue for ``configs/inference.json``: the study's inputs, read and checked before anything runs.

The pipeline itself (resampling, brain mask, normalisation, network, QA residual, inversion to the
T1w grid) is declared in the config with MONAI transforms; what it writes is ``scripts.outputs``.
Bad input ends the run with one clear paragraph and exit status 1, not a traceback.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from monai.data import MetaTensor
from scripts import physics
from scripts.study import LOG as STUDY_LOG
from scripts.study import StudyError, identity_mismatches, load_study

LOG = logging.getLogger("scripts.inference")


def fail(message: str):
    """End the run with a one-paragraph error (exit status 1) instead of a traceback."""
    raise SystemExit(f"pdpe-qmri error: {message}")


def flag(value: bool | int | str, name: str) -> bool:
    """A yes/no option as the command line delivers it: ``--overwrite true`` arrives as the string 'true'."""
    if isinstance(value, bool | int):
        return bool(value)
    answers = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if str(value).lower() not in answers:
        fail(f"{name} takes true or false, not {value!r}.")
    return answers[str(value).lower()]


class _WarningCollector(logging.Handler):
    """Keeps the study reader's warnings (``scripts.study`` logger) for the report."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class StudyInputs:
    """The T1w, T2w and FLAIR series of a study, read, selected and checked before anything runs.

    Args:
        study_dir: DICOM study folder (or BIDS NIfTI folder).
        t1w_series, t2w_series, flair_series: optional choice by SeriesInstanceUID or SeriesNumber.
        ranges: the TR/TE/TI ranges (ms) the model was trained on, its validity domain (default
            ``physics.PROTOCOL_RANGES``); the inference config takes them from the training config.
        allow_mixed_study: accept series of different patients or studies (each difference is a warning).
    """

    def __init__(
        self,
        study_dir: str | None,
        t1w_series: str | int | None = None,
        t2w_series: str | int | None = None,
        flair_series: str | int | None = None,
        ranges: dict | None = None,
        allow_mixed_study: bool | str = False,
    ) -> None:
        allow_mixed = flag(allow_mixed_study, "--allow_mixed_study")
        if not study_dir:
            fail("no study given: pass --study_dir <folder with the DICOM files of the study>.")
        start = time.perf_counter()
        overrides = {"T1w": t1w_series, "T2w": t2w_series, "FLAIR": flair_series}
        collected = _WarningCollector()
        STUDY_LOG.addHandler(collected)
        try:
            self.chosen, self.reasons, self.all_series = load_study(study_dir, overrides, allow_mixed)
        except StudyError as err:
            fail(str(err))
        finally:
            STUDY_LOG.removeHandler(collected)
        self.seconds = time.perf_counter() - start
        self.protocol = np.array([[getattr(self.chosen[s], p.lower()) for p in physics.SEQUENCE_PARAMETERS]
                                  for s in physics.SERIES])  # fmt: skip
        self.ranges = ranges or physics.PROTOCOL_RANGES
        self.warnings = [
            f"{problem}: the model was not trained on this protocol; check the maps with care."
            for problem in physics.protocol_violations(self.protocol, self.ranges)
        ] + [f"accepted with --allow_mixed_study: {mismatch}" for mismatch in identity_mismatches(self.chosen)]
        self.warnings += collected.messages  # skipped files, automatic choices, overrides against the header
        for warning in self.warnings:
            LOG.warning(warning)

    def data(self) -> list[dict]:
        """One MONAI data dict: the three volumes (channel-first MetaTensors with RAS affines and their series'
        ``slice_thickness``, 0 where unknown) and the protocol."""
        item = {
            name: MetaTensor(
                series.volume[None],
                affine=torch.as_tensor(series.affine, dtype=torch.float64),
                meta={"slice_thickness": series.slice_thickness or 0.0},
            )
            for name, series in self.chosen.items()
        }
        item["params"] = torch.as_tensor(self.protocol, dtype=torch.float32)
        return [item]
