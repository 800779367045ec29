"""Bad-sample bookkeeping: every rejected sample is counted per reason and logged with
its location, or raised when the user asked for strict mode. Nothing is dropped silently."""

from __future__ import annotations

import enum
import logging
from collections import Counter
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class SkipReason(str, enum.Enum):
    MALFORMED_JSON = "malformed_json"
    INVALID_SCHEMA = "invalid_schema"
    PLACEHOLDER_MISMATCH = "placeholder_mismatch"
    MISSING_MEDIA = "missing_media"
    CORRUPT_MEDIA = "corrupt_media"
    NO_VIDEO_FRAMES = "no_video_frames"
    TOO_LONG = "too_long"


class BadSampleError(Exception):
    """A sample that cannot be used; ``location`` is ``file:line`` (or ``file[index]``)."""

    def __init__(self, reason: SkipReason, location: str, detail: str) -> None:
        super().__init__(f"{location}: {reason.value}: {detail}")
        self.reason = reason
        self.location = location
        self.detail = detail


@dataclass(frozen=True)
class Skip:
    """A picklable record of one skipped sample (travels from DataLoader workers)."""

    reason: SkipReason
    location: str
    detail: str
    group: str = ""


def handle_bad_sample(error: BadSampleError, strict: bool, group: str = "") -> Skip:
    """Raise in strict mode, otherwise log the skip and return it for counting."""
    if strict:
        raise error
    logger.warning("skipping sample %s", error)
    return Skip(error.reason, error.location, error.detail, group)


def count_by_reason(skips: list[Skip]) -> dict[str, int]:
    return dict(Counter(skip.reason.value for skip in skips))


class MediaError(Exception):
    """A media file that cannot be used; the caller adds the sample's location."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
