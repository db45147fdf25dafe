"""Which series is the T1w, the T2w and the FLAIR: classification from TR/TE/TI, then one choice per class.

Classification trusts the physics first: the protocol decides when it is clear, the SeriesDescription only
when the protocol is in between (e.g. TE 40 ms). Thresholds (ms), deliberately wider than the model's
training ranges, which are checked (and warned about) later:

- inversion recovery with TI >= 1200, TR >= 4000 and TE >= 50: FLAIR (fluid-nulling, T2-weighted read-out);
  inversion recovery with TE <= 30 (T1-FLAIR, MPRAGE): T1w; other IR (STIR): none;
- no inversion: TR <= 1500 and TE <= 30: T1w; TR >= 1500 and TE >= 50: T2w; TR > 1500 and TE <= 30 is
  proton-density weighted: none.

Localizers/scouts are never classified. Among several candidates of one class the choice prefers, in
order: a description that agrees, no contrast agent, an ORIGINAL (not derived) image, more slices, and
the higher SeriesNumber (a repeat is usually acquired because the first one moved).
"""

from __future__ import annotations

import re

import numpy as np

from ..physics import SERIES
from .errors import LOG, StudyError, tag_label
from .series import Series

_HINTS = (
    ("FLAIR", re.compile(r"flair|tirm|dark.?fluid", re.IGNORECASE)),
    ("T2w", re.compile(r"(?<![a-z0-9])t2(?!\s*\*|_?star)", re.IGNORECASE)),
    ("T1w", re.compile(r"(?<![a-z0-9])t1(?![0-9])|mprage", re.IGNORECASE)),
)
_LOCALIZER = re.compile(r"locali[sz]er|scout|survey|(?<![a-z])loc(?![a-z])", re.IGNORECASE)
#: Slice normals closer than this cosine (about 5 degrees) are one orientation for the coverage check.
_PARALLEL = 0.996
_CRITERIA = (
    "its description agrees",
    "it is pre-contrast",
    "it is an ORIGINAL (not derived) image",
    "it has more slices",
    "it has the higher SeriesNumber (acquired later)",
)


def description_hint(description: str) -> str | None:
    """The class a SeriesDescription names (``'t2_tse_dark-fluid'`` -> FLAIR), or None."""
    return next((name for name, pattern in _HINTS if pattern.search(description)), None)


def protocol_class(tr: float, te: float, ti: float) -> str | None:
    """From TR/TE/TI (ms) alone: T1w / T2w / FLAIR, ``'PDw'`` (proton density), or None when in between."""
    if ti > 0:
        if ti >= 1200 and tr >= 4000 and te >= 50:
            return "FLAIR"
        return "T1w" if te <= 30 else None
    if te <= 30:
        return "T1w" if tr <= 1500 else "PDw"
    return "T2w" if tr >= 1500 and te >= 50 else None


def classify(series: Series) -> str | None:
    """``'T1w'``, ``'T2w'``, ``'FLAIR'`` or None, from the declared class, TR/TE/TI, then the description."""
    if series.declared_class:
        return series.declared_class
    if _LOCALIZER.search(series.description) or "LOCALIZER" in series.image_type:
        return None
    timing = (series.tr, series.te, series.ti)
    by_protocol = None if None in timing else protocol_class(*timing)
    if by_protocol is None:
        return description_hint(series.description)
    return by_protocol if by_protocol in SERIES else None


def select_series(
    series_list: list[Series], overrides: dict[str, str | int | None] | None = None, allow_mixed: bool = False
) -> tuple[dict[str, Series], list[str]]:
    """Choose one usable series per class (``physics.SERIES``); return the choice and one reason per class.

    ``overrides`` maps a class to a SeriesInstanceUID, a SeriesNumber (int or digits) or, for NIfTI
    input, a file name; empty values are ignored. Raises StudyError when a class has no usable series
    (listing every series found), an override matches no series or an unusable one, one series would serve
    two classes, the chosen series do not share a Frame of Reference, or one of them probably lost an end
    slice (see ``_check_coverage``).
    """
    overrides = {name: value for name, value in (overrides or {}).items() if value not in (None, "")}
    unknown = set(overrides) - set(SERIES)
    if unknown:
        raise ValueError(f"unknown series class(es) in overrides: {sorted(unknown)}; expected {SERIES}")
    classes = {id(s): classify(s) for s in series_list}
    chosen, reasons, missing = {}, [], []
    for name in SERIES:
        if name in overrides:
            series = _find(series_list, overrides[name], name)
            reason = f"{name}: {series.label} ({series.protocol}) chosen by the user ({overrides[name]!r})"
            if classes[id(series)] != name:
                reason += f", although its protocol suggests {classes[id(series)] or 'none of ' + '/'.join(SERIES)}"
                LOG.warning(reason)
        else:
            candidates = [s for s in series_list if classes[id(s)] == name]
            usable = [s for s in candidates if s.problem is None]
            if not usable:
                missing.append(name)
                continue
            series, reason = _choose(name, usable)
            unusable = [s.label for s in candidates if s.problem is not None]
            if unusable:
                reason += f"; unusable {name} candidates: {', '.join(unusable)}"
            if len(candidates) > 1:  # an automatic choice the user should know of
                LOG.warning(f"automatic choice: {reason}; name another with --{name.lower()}_series")
        chosen[name] = series
        reasons.append(reason)
    if missing:
        raise StudyError(_missing_message(missing, series_list, classes))
    _check_distinct(chosen)
    _check_frame_of_reference(chosen)
    _check_coverage(chosen)
    mixed = identity_mismatches(chosen)
    if mixed and not allow_mixed:
        raise StudyError(
            f"The chosen series come from different patients or studies: {' '.join(mixed)} Maps from another "
            "patient's images are wrong maps; choose the series with --t1w_series/--t2w_series/--flair_series, "
            "or, if you know they belong together, pass --allow_mixed_study true."
        )
    for reason in reasons:
        LOG.info(reason)
    return chosen, reasons


def _find(series_list: list[Series], value: str | int, name: str) -> Series:
    text = str(value).strip()
    matches = [s for s in series_list if s.uid == text]
    if not matches and text.lstrip("-").isdigit():
        matches = [s for s in series_list if s.number == int(text)]
    if not matches:
        matches = [s for s in series_list if s.files and s.files[0].name == text]
    if len(matches) != 1:
        listed = "; ".join(f"{s.label} ({s.uid})" for s in series_list) or "none"
        raise StudyError(
            f"The {name} series was given as {value!r}, which matches {len(matches) or 'no'} series; give a "
            f"SeriesInstanceUID or a SeriesNumber that names exactly one of: {listed}."
        )
    series = matches[0]
    if series.problem is not None:
        raise StudyError(f"The {name} series given as {value!r} ({series.label}) cannot be used: {series.problem}")
    return series


def _rank(name: str, series: Series) -> tuple:
    """Selection key, compared in the order of ``_CRITERIA``."""
    return (
        description_hint(series.description) == name,
        not series.contrast_agent,
        "DERIVED" not in series.image_type,
        series.shape[2],
        -1 if series.number is None else series.number,
    )


def _choose(name: str, usable: list[Series]) -> tuple[Series, str]:
    ranked = sorted(usable, key=lambda s: _rank(name, s), reverse=True)
    best = ranked[0]
    reason = f"{name}: {best.label} ({best.protocol}, {best.shape[2]} slices)"
    if len(ranked) == 1:
        return best, reason + " is the only candidate"
    runner_up = ranked[1]
    why = next(
        (text for text, a, b in zip(_CRITERIA, _rank(name, best), _rank(name, runner_up), strict=True) if a != b),
        "it is listed first (the candidates are alike)",
    )
    others = ", ".join(s.label for s in ranked[1:])
    return best, reason + f" chosen over {others} because {why}"


def _missing_message(missing: list[str], series_list: list[Series], classes: dict[int, str | None]) -> str:
    found = []
    for s in series_list:
        text = f"{s.label} ({s.protocol}) -> {classes[id(s)] or 'unclassified'}"
        found.append(text + (f", unusable: {s.problem.rstrip('.')}" if s.problem else ""))
    return (
        f"Required series missing: {', '.join(missing)} (needed: {', '.join(SERIES)}). Found "
        f"{len(series_list)} series: {'; '.join(found) or 'none'}. If one of them is the missing series, "
        "name it explicitly by its SeriesInstanceUID or SeriesNumber."
    )


def _check_distinct(chosen: dict[str, Series]) -> None:
    names = {}
    for name, series in chosen.items():
        if id(series) in names:
            raise StudyError(f"{series.label} was chosen as both {names[id(series)]} and {name}; choose two series.")
        names[id(series)] = name


def identity_mismatches(chosen: dict[str, Series]) -> list[str]:
    """One sentence per identity attribute (PatientID, StudyInstanceUID) on which the chosen series differ."""
    sentences = []
    for keyword, attribute in (("PatientID", "patient_id"), ("StudyInstanceUID", "study_instance_uid")):
        values = {name: getattr(s, attribute) for name, s in chosen.items() if getattr(s, attribute) is not None}
        if len(set(values.values())) > 1:
            listed = "; ".join(f"{name} {chosen[name].label} ({chosen[name].files[0]}): {value!r}"
                               for name, value in values.items())  # fmt: skip
            sentences.append(f"{tag_label(keyword)} differs: {listed}.")
    return sentences


def _check_frame_of_reference(chosen: dict[str, Series]) -> None:
    """The series are aligned through their headers, which is only meaningful in one Frame of Reference."""
    frames = {name: s for name, s in chosen.items() if s.frame_of_reference_uid}
    if len({s.frame_of_reference_uid for s in frames.values()}) > 1:
        listed = "; ".join(f"{name} {s.label} ({s.files[0]}): {s.frame_of_reference_uid}" for name, s in frames.items())
        raise StudyError(
            f"The chosen series do not share a Frame of Reference ({tag_label('FrameOfReferenceUID')}): {listed}. "
            "Their positions are in different patient coordinate systems (another session, or the patient was "
            "repositioned), so they cannot be aligned by their headers; register them first or choose series "
            "of one session."
        )


def _check_coverage(chosen: dict[str, Series]) -> None:
    """A series with unreadable files in its folder and no stated slice count may have lost an end slice.

    No gap betrays a missing first or last slice, and protocols legitimately cover different extents, so
    only a like series decides: one with the same slice orientation and step that reaches half a step or
    more beyond the stack's end makes the loss probable (StudyError naming the files); otherwise a warning
    names them.
    """
    for name, series in chosen.items():
        if not series.unreadable_nearby:
            continue
        normal = _slice_normal(series)
        first, last, step = _extent(series, normal)
        beyond = []
        for other_name, other in chosen.items():
            if other is series or abs(_slice_normal(other) @ normal) < _PARALLEL:
                continue
            other_first, other_last, other_step = _extent(other, normal)
            if abs(other_step - step) > 0.01 * step:
                continue
            for end, gap in (("first", first - other_first), ("last", other_last - last)):
                if gap >= step / 2:
                    beyond.append(f"the {other_name} ({other.label}) reaches {gap:.1f} mm beyond its {end} slice")
        what = (
            f"{name} {series.label}: unreadable file(s) in its folder could be its slices, and no "
            f"{tag_label('ImagesInAcquisition')} states its slice count: {'; '.join(series.unreadable_nearby)}. "
            f"Its {series.shape[2]} slices of {step:.3g} mm cover {last - first:.1f} mm along their normal"
        )
        if beyond:
            raise StudyError(
                f"{what}; {', and '.join(beyond)} with the same slice orientation and step, so its end slice is "
                "probably missing and the maps would silently lack it. Export the series again, or remove the "
                "unreadable files if they are not its slices."
            )
        LOG.warning(f"{what}; no series of the same slice orientation and step reaches beyond it, so no end slice "
                    "seems missing.")  # fmt: skip


def _slice_normal(series: Series) -> np.ndarray:
    """Unit normal of the series' slices (mm space)."""
    normal = np.cross(series.affine[:3, 0], series.affine[:3, 1])
    return normal / np.linalg.norm(normal)


def _extent(series: Series, normal: np.ndarray) -> tuple[float, float, float]:
    """Where the series' slices begin and end along ``normal`` (mm), and their step along it."""
    count = series.shape[2]
    corners = series.affine @ np.array([[0, 0, 0, 1], [0, 0, count - 1, 1]], dtype=float).T
    step = abs(float(series.affine[:3, 2] @ normal))
    low, high = sorted(corners[:3].T @ normal)
    return float(low - step / 2), float(high + step / 2), step
