"""Bad records in data loaders: counted skips, a per-split summary, and errors that stop silent data loss.

Every loader that can meet a bad record (an unreadable image or audio file, a malformed annotation, a bad CSV row)
reports it to one :class:`BadRecords` ledger instead of crashing mid-epoch or dropping it silently:

- :meth:`BadRecords.skip` counts the record under its split and reason and warns (:class:`BadRecordWarning`) naming
  the file;
- :meth:`BadRecords.check` runs when a split is set up, before training starts: a split with no usable item is a
  ``ValueError``, and so is a split whose share of *bad* records (unreadable, corrupt; not records a filter such as
  ``max_duration`` removes on purpose) is above ``max_skip_fraction``; otherwise one summary line is logged;
- a bad record found only while reading (a JPEG truncated after its header) is skipped the same way, and the ceiling
  is checked again at once against the split's size (per process: each DataLoader worker counts its own skips).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections import Counter

log = logging.getLogger(__name__)

DEFAULT_MAX_SKIP_FRACTION = 0.05


class DataWarning(UserWarning):
    """Something in the data that is likely a mistake but still usable (a duplicate timestamp, a gap)."""


class BadRecordWarning(DataWarning):
    """A record (file, row, annotation) was skipped; the message names it and why."""


def check_skip_fraction(value: object) -> float:
    """``max_skip_fraction`` must be a number in [0, 1]; returns it as a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"max_skip_fraction must be a number in [0, 1], got {value!r} of type {type(value).__name__}")
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"max_skip_fraction must be a number in [0, 1], got {value!r}")
    return float(value)


class BadRecords:
    """The ledger of skipped records of one data source, per split and reason.

    Args:
        source: what the records come from (a folder, a file), named in every message.
        max_skip_fraction: the largest share of bad records a split may lose before :meth:`check` raises.
    """

    def __init__(self, source: str, max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION) -> None:
        self.source = source
        self.max_skip_fraction = check_skip_fraction(max_skip_fraction)
        self.counts: dict[str, Counter[str]] = {}
        self.bad: Counter[str] = Counter()  # per split: skips that count against the ceiling
        self.dropped: Counter[str] = Counter()  # per split: skips that removed a whole record
        self.first: dict[str, list[str]] = {}  # per split: the first few bad records, for error messages
        self.totals: dict[str, int] = {}

    def skip(
        self, split: str, reason: str, record: str, detail: str = "", bad: bool = True, whole: bool = True
    ) -> None:
        """Count ``record`` of ``split`` as skipped for ``reason`` and warn naming it. ``bad=False`` for records a
        filter removes on purpose (they do not count against ``max_skip_fraction``); ``whole=False`` for a part of
        a record that stays usable (a box of an image: counted and named, but the image is not lost). Once
        :meth:`check` has seen the split's size, the ceiling is enforced at every bad skip."""
        self.counts.setdefault(split, Counter())[reason] += 1
        self.bad[split] += int(bad)
        self.dropped[split] += int(whole)
        first = self.first.setdefault(split, [])
        if bad and len(first) < 3:
            first.append(record)
        warnings.warn(
            f"{self.source}: skipping {record} in the {split} split ({reason}{': ' + detail if detail else ''})",
            BadRecordWarning,
            stacklevel=2,
        )
        if bad and split in self.totals:
            self._check_ceiling(split, self.totals[split])

    def skipped(self, split: str | None = None) -> dict[str, int]:
        """Skips by reason, of one split or (``None``) of all splits together."""
        if split is not None:
            return dict(self.counts.get(split, Counter()))
        total: Counter[str] = Counter()
        for counts in self.counts.values():
            total.update(counts)
        return dict(total)

    def _describe(self, split: str) -> str:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.counts.get(split, Counter()).items()))
        return f"skipped: {reasons or 'none'}; first: {', '.join(self.first.get(split, [])) or '-'}"

    def _check_ceiling(self, split: str, total: int) -> None:
        bad = self.bad[split]
        if total > 0 and bad / total > self.max_skip_fraction:
            raise ValueError(
                f"{self.source}: {bad} of {total} records of the {split} split are unreadable or malformed "
                f"({bad / total:.1%} > max_skip_fraction={self.max_skip_fraction}); {self._describe(split)}. "
                "Fix or remove them, or raise max_skip_fraction to accept the loss"
            )

    def check(self, split: str, total: int) -> int:
        """Call once a split's records have been screened: ``total`` records were found, the skipped ones among
        them. Raises ValueError when none is usable or too many are bad; logs the split's summary. Returns the
        number of usable records."""
        self.totals[split] = total
        usable = total - self.dropped[split]
        if usable <= 0:
            raise ValueError(
                f"{self.source}: the {split} split has no usable records ({total} found; {self._describe(split)})"
            )
        self._check_ceiling(split, total)
        if split in self.counts:
            log.warning("%s: %s split: %d of %d usable; %s", self.source, split, usable, total, self._describe(split))
        return usable

    def summary(self) -> str:
        """One line per split that lost records."""
        return "\n".join(
            f"{self.source}: {split}: {self._describe(split)}" for split in sorted(self.counts) if self.counts[split]
        )
