"""``make system-deps`` on a Debian machine without contrib/non-free (a fresh CI machine): Pico and MBROLA are found
after it adds those components, once; nothing is added where apt already finds them or on another distribution.
apt-get, apt-cache, dpkg and id are stand-ins that record what they were asked."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NONFREE = ("mbrola", "libttspico")  # the packages the stand-in apt finds only with contrib/non-free configured

APT_GET = """#!/bin/sh
echo "apt-get $*" >> "$STATE/log"
if [ "$1" = update ] && [ -e "$SOURCES/moezoo-contrib-non-free.sources" ]; then touch "$STATE/nonfree"; fi
if [ "$1" = install ]; then for p in "$@"; do echo "$p" >> "$STATE/installed"; done; fi
"""
APT_CACHE = """#!/bin/sh
case "$2" in
  mbrola*|libttspico*) [ -e "$STATE/nonfree" ] && echo "  Candidate: 1.0" || echo "  Candidate: (none)";;
  *) echo "  Candidate: 1.0";;
esac
"""
DPKG = """#!/bin/sh
[ -e "$STATE/all-installed" ]
"""
ID = """#!/bin/sh
echo 0
"""


@pytest.fixture
def machine(tmp_path: Path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    bin_dir, state, sources = tmp_path / "bin", tmp_path / "state", tmp_path / "sources.list.d"
    for folder in (bin_dir, state, sources):
        folder.mkdir()
    for name, text in (("apt-get", APT_GET), ("apt-cache", APT_CACHE), ("dpkg", DPKG), ("id", ID)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    keyring = tmp_path / "debian-archive-keyring.gpg"
    keyring.write_text("")

    def run(os_release: str = "ID=debian\nVERSION_CODENAME=bookworm\n") -> str:
        (tmp_path / "os-release").write_text(os_release)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "STATE": str(state), "SOURCES": str(sources)}
        args = [f"APT_SOURCES_DIR={sources}", f"OS_RELEASE={tmp_path / 'os-release'}", f"DEBIAN_KEYRING={keyring}"]
        done = subprocess.run(["make", "-s", "-C", str(ROOT), "system-deps", *args], env=env, capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    return run, state, sources / "moezoo-contrib-non-free.sources", keyring


def _apt_packages() -> list[str]:
    lines = (ROOT / "Makefile").read_text().replace("\\\n", " ").splitlines()
    speech = next(line for line in lines if line.startswith("SPEECH_PACKAGES :=")).split(":=")[1].split()
    return ["dataset-fashion-mnist", "pocketsphinx-testdata", *speech]


def _log(state: Path) -> list[str]:
    return (state / "log").read_text().splitlines() if (state / "log").exists() else []


def test_a_fresh_debian_machine_gets_contrib_and_non_free_once(machine):
    run, state, sources, keyring = machine
    out = run()
    assert "adding Debian's contrib and non-free components" in out and "warning" not in out
    assert sources.read_text() == (
        "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm\nComponents: contrib non-free\n"
        f"Signed-By: {keyring}\n"
    )
    log = _log(state)
    assert log[:2] == ["apt-get update -qq", "apt-get update -qq"] and log[2].startswith("apt-get install")
    assert (state / "installed").read_text().split()[-len(_apt_packages()) :] == _apt_packages()
    assert any(p.startswith(NONFREE) for p in _apt_packages())
    # again (the stand-in dpkg still reports every package missing): the file is kept as it is, not added twice
    written = sources.read_text()
    out = run()
    assert "adding" not in out and sources.read_text() == written and _log(state)[3] == "apt-get update -qq"
    assert _log(state)[4].startswith("apt-get install") and len(_log(state)) == 5


def test_nothing_is_added_where_apt_finds_the_packages_or_all_are_installed(machine):
    run, state, sources, _ = machine
    (state / "nonfree").touch()  # contrib/non-free configured already (e.g. by hand)
    out = run()
    assert not sources.exists() and "adding" not in out
    assert [line.split()[1] for line in _log(state)] == ["update", "install"]
    (state / "all-installed").touch()
    (state / "log").unlink()
    assert run() == "" and _log(state) == []


def test_another_distribution_installs_what_apt_finds_and_names_the_rest(machine):
    run, state, sources, _ = machine
    out = run("ID=ubuntu\nVERSION_CODENAME=noble\n")
    assert not sources.exists()
    absent = [p for p in _apt_packages() if p.startswith(NONFREE)]
    assert f"warning: apt-get cannot find {' '.join(absent)} " in out
    installed = (state / "installed").read_text().split()
    assert "espeak-ng" in installed and not set(absent) & set(installed)
