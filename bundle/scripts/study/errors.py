"""The study reader's single error type, its logger and the tag labels its messages use."""

from __future__ import annotations

import logging

from pydicom.datadict import tag_for_keyword
from pydicom.tag import Tag

#: Every module of the study package logs here, so a caller can collect warnings for its report.
LOG = logging.getLogger("scripts.study")


class StudyError(Exception):
    """A study cannot be used as input: the message is one paragraph naming the file and tag or problem."""


def tag_label(keyword: str) -> str:
    """``'RepetitionTime'`` -> ``'RepetitionTime (0018,0080)'``: messages name the keyword and the tag."""
    tag = tag_for_keyword(keyword)
    return keyword if tag is None else f"{keyword} {Tag(tag)}"
