"""The disk cache of name tables: same tables, read without running anything, never in the way."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from lytools.arch import keymap, table_cache

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("LYTOOLS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LYTOOLS_NO_CACHE", raising=False)
    return tmp_path / "cache"


def counting(value):
    calls = []

    def build():
        calls.append(1)
        return value

    return build, calls


def test_tables_are_built_once_then_read(folder):
    build, calls = counting({"sd1": {"a": 1}})
    assert table_cache.cached("t", build) == {"sd1": {"a": 1}}
    assert table_cache.cached("t", build) == {"sd1": {"a": 1}}
    assert len(calls) == 1 and [p.name for p in folder.iterdir()] == [f"t-{table_cache.fingerprint()}.pickle"]


def test_the_cached_alias_tables_are_the_built_ones(folder):
    """A fresh process reads what another wrote; both equal tables built from the manifests."""
    script = ("from lytools.arch import keymap\n"
              "print(sum(len(keymap.alias_table(a)) for a in keymap.NETWORK_ARCHS))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    counts = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
              for _ in range(2)]
    assert counts[0] == counts[1] and int(counts[0]) > 10_000
    assert len(list(folder.glob("alias-tables-*.pickle"))) == 1
    stored = table_cache.cached("alias-tables", lambda: pytest.fail("the file should have been read"))
    for arch in keymap.NETWORK_ARCHS:
        assert stored[arch] == keymap._build_alias_table(arch), arch


@pytest.mark.parametrize("damage", ["truncated", "junk", "foreign-class"])
def test_a_damaged_or_foreign_file_is_rebuilt_and_nothing_in_it_runs(folder, tmp_path, damage):
    build, calls = counting({"x": 1})
    table_cache.cached("t", build)
    path = folder / f"t-{table_cache.fingerprint()}.pickle"
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path.write_bytes({"truncated": path.read_bytes()[:-3], "junk": b"\x00not a pickle",
                      "foreign-class": pickle.dumps({"x": Payload()})}[damage])
    assert table_cache.cached("t", build) == {"x": 1}
    assert len(calls) == 2 and not marker.exists()
    assert pickle.loads(path.read_bytes()) == {"x": 1}  # written again


def test_switched_off_or_unwritable_means_built_each_time(folder, tmp_path, monkeypatch):
    build, calls = counting([1, 2])
    monkeypatch.setenv("LYTOOLS_NO_CACHE", "1")
    assert table_cache.cached("t", build) == [1, 2] and table_cache.cached("t", build) == [1, 2]
    assert len(calls) == 2 and not folder.exists()
    monkeypatch.delenv("LYTOOLS_NO_CACHE")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LYTOOLS_CACHE_DIR", str(blocker / "cache"))  # cannot be created
    assert table_cache.cached("t", build) == [1, 2] and len(calls) == 3


def test_old_versions_files_are_cleared_after_a_week(folder):
    folder.mkdir()
    old, recent = folder / "t-0000.pickle", folder / "t-1111.pickle"
    for path in (old, recent):
        path.write_bytes(pickle.dumps(0))
    week = table_cache.STALE_SECONDS + 60
    os.utime(old, (old.stat().st_atime - week, old.stat().st_mtime - week))
    table_cache.cached("t", lambda: 1)
    assert not old.exists() and recent.exists()


def test_no_cache_when_the_table_sources_cannot_be_read(folder, monkeypatch, tmp_path):
    """Without the package's files (a zipped install, say) there is no safe name for the file."""
    monkeypatch.setattr(table_cache, "__file__", str(tmp_path / "elsewhere" / "table_cache.py"))
    table_cache.fingerprint.cache_clear()
    try:
        build, calls = counting({"y": 2})
        assert table_cache.cached("t", build) == {"y": 2} and table_cache.cached("t", build) == {"y": 2}
        assert len(calls) == 2 and not folder.exists()
    finally:
        table_cache.fingerprint.cache_clear()
