"""Every output of a study's run: the guarded output folder, NIfTI maps, DICOM Parametric Maps, QA figure, report.

``OutputFolder`` makes sure nothing but this tool's own earlier output is ever replaced and that a run
writes all or nothing; ``StudyWriter`` writes the maps, ``dicom/``, ``qa/``, ``qa.png`` and ``report.json``
once the evaluator is done.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from ignite.engine import Engine, Events
from monai.utils import convert_to_numpy
from scripts import physics
from scripts.inference import LOG, StudyInputs, fail, flag
from scripts.qa import physics_qa
from scripts.study import StudyError, write_parametric_map

#: Everything a run writes into its output folder; ``--overwrite`` replaces a folder holding only these.
OUTPUT_ENTRIES = frozenset({"T1_map.nii.gz", "T2_map.nii.gz", "PD_map.nii.gz", "mask.nii.gz", "qa", "qa.png",
                            "dicom", "report.json"})  # fmt: skip
#: ``report.json``'s ``software#name``: marks a folder as this tool's output.
SOFTWARE_NAME = "pdpe-qmri"


def refuse_overlap(output: Path, inputs: list, where: str) -> None:
    """End the run if the output folder is, contains or lies inside one of ``inputs`` (``where`` names them)."""
    for source in (Path(p).resolve() for p in inputs if p):
        if output == source or output in source.parents or source in output.parents:
            fail(f"the output folder {output} is, contains or lies inside the input {source}; "
                 f"choose an output folder outside {where}.")  # fmt: skip


class OutputFolder:
    """Outputs go to a hidden staging folder beside ``path`` and move into place only when complete.

    Checked when created, before the study is read, so that no input and no unrelated file is ever lost:

    - ``path`` may not be, contain, or lie inside any of ``inputs`` (the study folder, the user's mask);
    - an existing, non-empty ``path`` is replaced only with ``overwrite`` and only when it is a previous
      output of this tool: its ``report.json`` names this software and it holds nothing but
      ``OUTPUT_ENTRIES``; anything else is refused, naming what is there;
    - the folder that will hold ``path`` must be writable (checked by creating the staging folder).

    A run that fails leaves no output folder behind that could pass for a complete one. A staging
    folder left by a killed run is removed, and said so in ``warnings`` (they go to the report).
    """

    def __init__(self, path: str | None, overwrite: bool | str = False, inputs: list | None = None) -> None:
        overwrite = flag(overwrite, "--overwrite")
        if not path:
            fail("no output folder given: pass --output_dir <folder>.")
        self.path = Path(path).resolve()
        self.warnings: list[str] = []
        refuse_overlap(self.path, inputs or [], "the study")
        if self.path.exists() and not self.path.is_dir():
            fail(f"{self.path} exists and is not a folder.")
        if self.path.is_dir() and any(self.path.iterdir()):
            self._check_replaceable(overwrite)
        self.staging = self.path.parent / f".{self.path.name}.partial"
        if self.staging.exists():
            self.warnings.append(f"removed {self.staging}, the unfinished output of an earlier interrupted run")
            LOG.warning(self.warnings[-1])
        try:
            self.start()
        except OSError as err:
            fail(f"cannot write the output folder {self.path}: {err.strerror or err}.")
        self.discard()

    def _check_replaceable(self, overwrite: bool) -> None:
        """Refuse a non-empty ``path`` unless ``overwrite`` and it is this tool's previous output."""
        foreign = sorted(p.name for p in self.path.iterdir() if p.name not in OUTPUT_ENTRIES)
        try:
            ours = json.loads((self.path / "report.json").read_text())["software"]["name"] == SOFTWARE_NAME
        except (OSError, ValueError, KeyError, TypeError):
            ours = False
        if foreign or not ours:
            what = f"it holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}" if foreign else (
                "it has no report.json of this tool")  # fmt: skip
            fail(f"{self.path} is not empty and is not a previous output of {SOFTWARE_NAME} ({what}); "
                 "nothing was changed. Choose a new or empty output folder.")  # fmt: skip
        if not overwrite:
            fail(f"{self.path} holds a previous output of {SOFTWARE_NAME}; pass --overwrite true to replace it.")

    def start(self) -> Path:
        """A fresh, empty staging folder."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        return self.staging

    def commit(self) -> None:
        """Replace ``path`` (empty, or checked at start to be this tool's output) by the staging folder."""
        if self.path.exists():
            shutil.rmtree(self.path)
        self.staging.rename(self.path)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


#: Python packages whose versions decide the maps; each goes into ``report.json``.
_PACKAGES = ("torch", "monai", "numpy", "scipy", "nibabel", "itk", "pydicom", "highdicom", "deepbet", "pytorch-ignite")


def software(version: str | None) -> dict:
    """This tool's name, bundle version and git revision (when run from a checkout), and package versions."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    def installed(name: str) -> str | None:
        try:
            return package_version(name)
        except PackageNotFoundError:
            return None

    try:
        revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                                  text=True, timeout=10).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        revision = None
    return {"name": SOFTWARE_NAME, "version": version, "revision": revision,
            "packages": {name: installed(name) for name in _PACKAGES}}  # fmt: skip


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class StudyWriter:
    """Ignite handler of the inference evaluator: writes every output of the one study it processes.

    ``<out>/T1_map.nii.gz``, ``T2_map.nii.gz`` (ms), ``PD_map.nii.gz`` (p.u.) on the maps' support (``maps_mask``:
    the brain mask grown by a margin, when the batch holds it) and the brain mask ``mask.nii.gz``, on the T1w grid;
    ``qa/`` residual maps (in the brain mask); ``dicom/`` Parametric Maps (DICOM input only); ``qa.png`` and
    ``report.json`` (inputs, choices, model, warnings, QA, timings).

    Args:
        study: the study's inputs.
        output: where to write.
        model: checkpoint file and bundle metadata, for the report.

    The physics-QA thresholds are those of ``scripts.qa``.
    """

    def __init__(
        self,
        study: StudyInputs,
        output: OutputFolder,
        checkpoint: str,
        metadata: dict | None = None,
    ) -> None:
        self.study, self.output, self.checkpoint = study, output, Path(checkpoint)
        self.metadata = metadata or {}
        self.marks: dict[str, float] = {}

    def attach(self, engine: Engine) -> None:
        for event, name in [
            (Events.STARTED, "started"),
            (Events.GET_BATCH_STARTED, "batch_started"),
            (Events.GET_BATCH_COMPLETED, "batch_completed"),
            (Events.ITERATION_COMPLETED, "iteration_completed"),
        ]:
            engine.add_event_handler(event, self._mark, name)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.write)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._failed)

    def _mark(self, _engine: Engine, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def _failed(self, _engine: Engine, err: Exception) -> None:
        self.output.discard()
        if isinstance(err, (StudyError, ValueError)):  # a problem of the input, e.g. an empty brain mask
            fail(str(err))
        raise err

    def write(self, engine: Engine) -> None:
        output, batch = engine.state.output[0], engine.state.batch[0]
        start = time.perf_counter()
        out = self.output.start()
        affine = self.study.chosen["T1w"].affine
        maps = convert_to_numpy(output["pred"])
        mask = convert_to_numpy(batch["brain_mask"])[0] > 0
        support = convert_to_numpy(batch["maps_mask"])[0] > 0 if "maps_mask" in batch else mask
        residual = convert_to_numpy(output["residual"])
        for name, values, unit in zip(physics.MAPS, maps, physics.MAP_UNITS, strict=True):
            _save_nifti(np.where(support, values, 0.0), affine, out / f"{name}_map.nii.gz", f"{name} map ({unit})")
        _save_nifti(mask.astype(np.uint8), affine, out / "mask.nii.gz", "brain mask")
        images = convert_to_numpy(output["image"])
        for series, values in zip(physics.SERIES, residual, strict=True):
            _save_nifti(np.where(mask, values, 0.0), affine, out / "qa" / f"residual_{series}.nii.gz",
                        f"{series} resynthesised - input (normalised)")  # fmt: skip
        refinement = output.get("refinement", {"enabled": False})
        delivered = refinement.get("residual_pct", {}).get("refined")  # the refinement replaced the network's maps
        qa = physics_qa(residual, images, mask, physics.SERIES, delivered)
        for warning in qa["warnings"]:
            LOG.warning(warning)
        qa_figure(images, maps, residual, mask, qa["worst_slice"], out / "qa.png", delivered is not None)
        dicom = self._write_dicom(np.where(support, maps, 0.0), out / "dicom")
        sliced = slice_warnings({name: series.volume for name, series in self.study.chosen.items()})
        for warning in sliced:
            LOG.warning(warning)
        warnings = [*self.output.warnings, *self.study.warnings, *qa["warnings"], *sliced]
        timings = self._timings(batch, time.perf_counter() - start)
        report = {**self._report(batch, qa["series"], warnings, timings), "qa_figure": {"shows": qa["worst_slice"]},
                  "physics_refinement": refinement, "dicom": dicom}  # fmt: skip
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        self.output.commit()
        LOG.info("Wrote %s", self.output.path)

    def _write_dicom(self, maps: np.ndarray, folder: Path) -> list[str] | str:
        """One Parametric Map per map in the T1w series' study and frame of reference (DICOM input only)."""
        source = self.study.chosen["T1w"]
        if not source.datasets:
            return "not written: the input is NIfTI, so there is no DICOM study to add the maps to"
        folder.mkdir()
        version = f"pdpe-qmri {self.metadata.get('version', '')}".strip()
        written = []
        for k, (name, values) in enumerate(zip(physics.MAPS, maps, strict=True), start=1):
            path = write_parametric_map(
                values.astype(np.float32),
                source,
                folder / f"{name}_map.dcm",
                quantity=name,
                series_number=(source.number or 0) * 100 + k,
                series_description=f"PDPE-Net {name} map",
                software_version=version,
            )
            written.append(str(path.relative_to(folder.parent)))
        return written

    def _timings(self, batch: dict, writing: float) -> dict:
        m = self.marks
        return {
            "read_study_s": round(self.study.seconds, 3),
            "preprocess_s": round(m["batch_completed"] - m["batch_started"], 3),
            "of_which_brain_mask_s": round(float(batch["mask_seconds"]), 3),
            "inference_and_postprocess_s": round(m["iteration_completed"] - m["batch_completed"], 3),
            "write_s": round(writing, 3),
        }

    def _report(self, batch: dict, qa: dict, warnings: list[str], timings: dict) -> dict:
        chosen = {s.uid: name for name, s in self.study.chosen.items()}
        return {
            "software": software(self.metadata.get("version")),
            "inputs": [
                {
                    "series_instance_uid": s.uid,
                    "series_number": s.number,
                    "description": s.description,
                    "TR_ms": s.tr,
                    "TE_ms": s.te,
                    "TI_ms": s.ti,
                    "used_as": chosen.get(s.uid),
                    "problem": s.problem,
                }
                for s in self.study.all_series
            ],
            "selection": self.study.reasons,
            "protocol_ms": {
                s: dict(zip(physics.SEQUENCE_PARAMETERS, map(float, row), strict=True))
                for s, row in zip(physics.SERIES, self.study.protocol, strict=True)
            },  # fmt: skip
            "model": {
                "name": self.metadata.get("name"),
                "version": self.metadata.get("version"),
                "checkpoint": str(self.checkpoint),
                "checkpoint_sha256": file_sha256(self.checkpoint),
                "training_protocol_ranges_ms": self.study.ranges,
            },
            "brain_mask": str(batch["mask_info"]),
            "units": dict(zip(physics.MAPS, physics.MAP_UNITS, strict=True)),
            "qa": qa,
            "warnings": warnings,
            "timings": timings,
        }


def slice_warnings(volumes: dict[str, np.ndarray]) -> list[str]:
    """Slices (axis 2 of each series' own grid) that are empty or constant, or whose mean signal is below a
    third or above three times that of both neighbours: a zeroed or corrupt slice, not anatomy."""
    warnings = []
    for name, volume in volumes.items():
        means = volume.mean(axis=(0, 1))
        for k in range(volume.shape[2]):
            plane = volume[:, :, k]
            if np.ptp(plane) <= 1e-6 * max(1.0, float(np.abs(plane).max())):
                warnings.append(f"{name} slice {k + 1} of {volume.shape[2]} is empty or constant.")
            elif 0 < k < volume.shape[2] - 1:
                ratio = means[k] / max(float(means[k - 1] + means[k + 1]) / 2, 1e-12)
                if not 1 / 3 <= ratio <= 3:
                    warnings.append(f"{name} slice {k + 1} of {volume.shape[2]}: mean signal {ratio:.2f} times that "
                                    "of its neighbours; a corrupt slice?")  # fmt: skip
    return warnings


def _save_nifti(values: np.ndarray, affine: np.ndarray, path: Path, description: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = nib.Nifti1Image(values.astype(values.dtype if values.dtype == np.uint8 else np.float32), affine)
    image.header.set_xyzt_units("mm")
    image.header["descrip"] = description[:79].encode()
    nib.save(image, path)


def qa_figure(
    images: np.ndarray,
    maps: np.ndarray,
    residual: np.ndarray,
    mask: np.ndarray,
    worst: dict,
    path: Path,
    refined: bool = False,
) -> None:
    """Inputs, maps (with colour bars in their units) and QA residuals on the worst slice of ``physics_qa``;
    ``refined``: the maps are the physics refinement's, the residuals the network's (titles say so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = worst["slice"] - 1
    fig, axes = plt.subplots(3, 3, figsize=(11, 10.5), constrained_layout=True)
    ranges = physics.DISPLAY_WINDOWS
    rows = [
        [(f"{s} input (normalised)", images[c], "gray", (0, 1), "") for c, s in enumerate(physics.SERIES)],
        [(f"{m} map{', refined' if refined else ''}", np.where(mask, maps[c], 0), "magma" if m != "PD" else "viridis",
          ranges[m], u)
         for c, (m, u) in enumerate(zip(physics.MAPS, physics.MAP_UNITS, strict=True))],
        [(f"{s} QA residual{', network maps' if refined else ''}", np.where(mask, residual[c], 0), "RdBu_r",
          (-0.3, 0.3), "of input")
         for c, s in enumerate(physics.SERIES)],
    ]  # fmt: skip
    for row_axes, row in zip(axes, rows, strict=True):
        for ax, (title, volume, cmap, (low, high), unit) in zip(row_axes, row, strict=True):
            shown = ax.imshow(volume[:, :, k].T, origin="lower", cmap=cmap, vmin=low, vmax=high)
            ax.set_title(title)
            ax.set_axis_off()
            fig.colorbar(shown, ax=ax, shrink=0.8, label=unit)
    fig.suptitle(f"pdpe-qmri: slice {worst['slice']} of {mask.shape[2]} of the T1w grid, the worst of the physics QA\n"
                 f"({worst['series']} residual {worst['ratio_to_neighbours']:.2f} x its neighbours'; re-synthesised "
                 "minus input near 0 is consistent)")  # fmt: skip
    fig.savefig(path, dpi=80)
    plt.close(fig)
