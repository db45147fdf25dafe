"""Study input: read MR series from DICOM (classic and Enhanced MR) or BIDS NIfTI, classify, select; write DICOM.

Public API: :func:`read_study`, :func:`load_study`, :func:`classify` (with :func:`protocol_class`,
:func:`description_hint`), :func:`select_series`, :class:`Series`,
:class:`StudyError`; synthetic inputs (sample study, tests): :class:`Study`, :func:`write_classic_mr_series`,
:func:`write_enhanced_mr_series`; the real output: :func:`write_parametric_map`.
Warnings go to the ``scripts.study`` logger.
"""

from .errors import LOG, StudyError
from .parametric_map import write_parametric_map
from .reader import load_study, read_study
from .select import classify, description_hint, identity_mismatches, protocol_class, select_series
from .series import Series
from .synthetic import Study, write_classic_mr_series, write_enhanced_mr_series

__all__ = [
    "LOG",
    "Series",
    "Study",
    "StudyError",
    "classify",
    "description_hint",
    "identity_mismatches",
    "load_study",
    "protocol_class",
    "read_study",
    "select_series",
    "write_classic_mr_series",
    "write_enhanced_mr_series",
    "write_parametric_map",
]
