"""Where the shared fixtures (../shared next to the checkout, or $LYTOOLS_SHARED) live."""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path | None:
    """Return ../shared (or $LYTOOLS_SHARED), None when neither exists."""
    env = os.environ.get("LYTOOLS_SHARED")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[1].parent / "shared"
    return candidate if candidate.is_dir() else None


def read_tensors(path: str | os.PathLike) -> dict:
    """Return every tensor of a file, cloned out of its memory map."""
    from lytools.io import open_file

    with open_file(path) as handle:
        return {name: handle.get(name).clone() for name in handle.keys()}


def run_lytools(capsys, *args) -> tuple[int, str, str]:
    """Run `lytools ARGS` in this process; return (exit code, stdout, stderr)."""
    from lytools.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err
