"""Name tables kept on disk between runs.

Building every architecture's table of accepted module names from the manifests takes about
0.2 s, which each command that detects a network pays once (a batch of small files feels it).
The built tables are kept in the user cache folder ($LYTOOLS_CACHE_DIR, else
$XDG_CACHE_HOME/lytools, else ~/.cache/lytools), in a file named by a hash of the code and data
they are built from, so a changed lytools never reads a file an older one wrote.

The files are pickles read by an unpickler that accepts the table classes and nothing else: a
file holding anything else, or damaged, is ignored and rebuilt, and nothing in it runs. A
folder that cannot be written only means the tables are built again next time.
LYTOOLS_NO_CACHE=1 turns the cache off.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, TypeVar

T = TypeVar("T")

ALLOWED_CLASSES = frozenset({("lytools.arch.keymap", "CanonicalTarget")})
STALE_SECONDS = 7 * 24 * 3600  # other versions' files untouched this long are removed


class _TableUnpickler(pickle.Unpickler):
    """Builds the table classes and plain data only: no other global can be named."""

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_CLASSES:
            raise pickle.UnpicklingError(f"{module}.{name} is not a name-table class")
        return super().find_class(module, name)


def cache_dir() -> Path | None:
    """Return the folder the tables are kept in, or None when the cache is off."""
    if os.environ.get("LYTOOLS_NO_CACHE", "") not in ("", "0"):
        return None
    explicit = os.environ.get("LYTOOLS_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if base.startswith("~"):
        return None  # no home folder to keep it in
    return Path(base) / "lytools"


@functools.cache
def fingerprint() -> str:
    """Return a hash of what the tables are built from: this package's code and data, and Python."""
    package = Path(__file__).resolve().parent
    sources = sorted([*package.glob("*.py"), *(package / "data").glob("*.json.gz")])
    if not any(path.name == "keymap.py" for path in sources):
        raise OSError(f"the sources of the name tables are not files under {package}")  # e.g. a zipped install
    digest = hashlib.sha256(f"{sys.version}|{pickle.HIGHEST_PROTOCOL}".encode())
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:24]


def cached(kind: str, build: Callable[[], T]) -> T:
    """Return the tables `build` makes, read from the cache folder when this code wrote them there."""
    folder = cache_dir()
    if folder is None:
        return build()
    try:
        path = folder / f"{kind}-{fingerprint()}.pickle"
    except OSError:  # the package's own files cannot be read: no reliable name for the file
        return build()
    try:
        with open(path, "rb") as handle:
            return _TableUnpickler(handle).load()
    except FileNotFoundError:
        pass
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError):
        pass  # damaged or not ours: built and written again below
    value = build()
    _store(folder, path, kind, value)
    return value


def _store(folder: Path, path: Path, kind: str, value: object) -> None:
    """Write `value` to `path` atomically; on any OS error leave things as they were."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{kind}-", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                pickle.dump(value, stream, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(temp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        now = time.time()
        for other in folder.glob(f"{kind}-*.pickle"):  # other versions' tables, long unused
            with contextlib.suppress(OSError):
                if other != path and now - other.stat().st_mtime > STALE_SECONDS:
                    other.unlink()
    except OSError:
        pass
