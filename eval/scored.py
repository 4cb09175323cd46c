"""One example's score, as every metric returns it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Scored:
    score: float  # in [0, 1]
    format_failure: str = ""  # why the reply could not be read as the asked form ("" = it could)
    details: dict = dataclasses.field(default_factory=dict)  # metric-specific parts of the score
