"""moezoo.io: writes are all-or-nothing and leave no temporary file behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from moezoo.io import copy_file_atomic, temporary_beside, write_json_atomic, write_text_atomic


def test_write_json_atomic_round_trip(tmp_path: Path) -> None:
    path = write_json_atomic(tmp_path / "sub" / "m.json", {"b": 1, "a": [1.5]})
    assert json.loads(path.read_text()) == {"a": [1.5], "b": 1}
    assert path.read_text().endswith("\n")
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = write_text_atomic(tmp_path / "f.txt", "old")
    with pytest.raises(RuntimeError), temporary_beside(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_copy_and_permissions(tmp_path: Path) -> None:
    src = write_text_atomic(tmp_path / "a.txt", "x")
    dest = copy_file_atomic(src, tmp_path / "b.txt")
    assert dest.read_text() == "x"
    umask = os.umask(0)
    os.umask(umask)
    assert dest.stat().st_mode & 0o777 == 0o666 & ~umask


def test_remove_stale_temporaries_deletes_only_what_temporary_beside_leaves(tmp_path):
    """A SIGKILL inside temporary_beside leaves its ".<name>.*.part" (found by the soak, tests/tasks/test_soak.py);
    the next fit removes such files and nothing else."""

    import subprocess
    import sys

    from moezoo.io import remove_stale_temporaries, temporary_beside

    (tmp_path / "a" / "b").mkdir(parents=True)
    dest = tmp_path / "a" / "b" / "val.json"
    # what a killed writer leaves: a process that exits inside temporary_beside, whose finally never runs
    leave = (
        "import os, sys; from moezoo.io import temporary_beside; "
        "writer = temporary_beside(sys.argv[1]); print(writer.__enter__(), flush=True); os._exit(0)"
    )
    stale = Path(
        subprocess.run(
            [sys.executable, "-c", leave, str(dest)], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    assert stale.is_file() and stale.parent == dest.parent
    others = [tmp_path / "a" / "keep.part", tmp_path / "a" / ".hidden.json", dest.with_name("val.json")]
    for path in others:
        path.write_text("{}")
    with temporary_beside(dest) as live:  # a writer that still runs (this process) keeps its file
        assert remove_stale_temporaries(tmp_path) == [stale]
        assert live.exists()
    assert not stale.exists() and all(p.exists() for p in others)
    assert remove_stale_temporaries(tmp_path / "missing") == []
