"""The bad-records ledger shared by every data loader (moezoo.tasks.records)."""

from __future__ import annotations

import pytest

from moezoo.tasks.records import BadRecords, BadRecordWarning


def test_counts_warn_summary_and_the_two_errors():
    records = BadRecords("corpus", max_skip_fraction=0.1)
    with pytest.warns(BadRecordWarning, match=r"corpus: skipping a.wav in the train split \(bad_audio: truncated\)"):
        records.skip("train", "bad_audio", "a.wav", "truncated")
    with pytest.warns(BadRecordWarning):
        records.skip("train", "too_long", "b.wav", bad=False)  # a filter: not against the ceiling
    assert records.check("train", 10) == 8
    assert records.skipped("train") == {"bad_audio": 1, "too_long": 1} and records.skipped("val") == {}
    assert records.summary() == "corpus: train: skipped: bad_audio 1, too_long 1; first: a.wav"
    with pytest.warns(BadRecordWarning), pytest.raises(ValueError, match=r"2 of 10 records of the train split"):
        records.skip("train", "bad_audio", "c.wav")  # found while reading: the ceiling is checked at once
    with pytest.warns(BadRecordWarning), pytest.raises(ValueError, match="the val split has no usable records"):
        records.skip("val", "too_long", "d.wav", bad=False)
        records.check("val", 1)


@pytest.mark.parametrize("value,error", [(-0.1, ValueError), (float("nan"), ValueError), ("5%", TypeError)])
def test_max_skip_fraction_is_checked(value, error):
    with pytest.raises(error, match="max_skip_fraction must be a number in"):
        BadRecords("x", value)
