"""Shared benchmark plumbing: run a contender in a child process and record wall time and
peak anonymous memory (RssAnon: heap and tensors; file pages an mmap reader maps do not count).

Usage from a benchmark script:
    from benchmarks.common import measure, stream_copy, human_bytes
    result = measure("lytools copy", stream_copy, src, dst)      # runs in a child process
    print(result.line())
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.2f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.2f} TiB"


def _read_status(pid: int) -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "VmHWM", "VmRSS"):
                    values[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


@dataclass
class Measurement:
    label: str
    seconds: float
    peak_anon: int
    peak_rss: int
    result: Any = None

    def line(self) -> str:
        return (
            f"{self.label:<34} {self.seconds:9.2f} s   peak RssAnon {human_bytes(self.peak_anon):>11}"
            f"   peak RSS {human_bytes(self.peak_rss):>11}"
        )


def _child(queue, func, args, kwargs):
    start = time.perf_counter()
    try:
        result = func(*args, **kwargs)
        queue.put(("ok", time.perf_counter() - start, result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put(("error", time.perf_counter() - start, f"{type(exc).__name__}: {exc}"))


def measure(label: str, func: Callable, *args, **kwargs) -> Measurement:
    """Run func(*args) in a fresh child process; return wall time and sampled peak RssAnon."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(queue, func, args, kwargs))
    process.start()
    peak_anon = 0
    peak_rss = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_anon, peak_rss
        while not stop.is_set():
            status = _read_status(process.pid)
            peak_anon = max(peak_anon, status.get("RssAnon", 0))
            peak_rss = max(peak_rss, status.get("VmHWM", 0))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    outcome = queue.get()
    stop.set()
    sampler.join()
    process.join()
    state, seconds, result = outcome
    if state != "ok":
        raise RuntimeError(f"{label} failed: {result}")
    return Measurement(label, seconds, peak_anon, peak_rss, result)


def drop_file_cache(path: Path) -> None:
    """Ask the kernel to forget a file's cached pages (best effort), so runs start cold alike."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    except (OSError, AttributeError):
        pass


def stream_copy(src: str, dst: str) -> int:
    """The I/O floor: read every tensor with lytools.io and write it with the atomic writer."""
    from lytools.io import SafetensorsWriter, open_file, plan_entry

    with open_file(src) as source:
        entries = [plan_entry(info.name, info.dtype, info.shape) for info in source.infos()]
        writer = SafetensorsWriter(dst, entries, source.metadata, overwrite=True)
        with writer:
            for name in writer.order:
                writer.write(name, source.get(name))
    return os.path.getsize(dst)


def load_save_copy(src: str, dst: str) -> int:
    """The plain route: safetensors.torch.load_file then save_file (the whole model in memory)."""
    import safetensors
    import safetensors.torch

    with safetensors.safe_open(src, framework="pt") as handle:
        metadata = handle.metadata()
    tensors = safetensors.torch.load_file(src)
    safetensors.torch.save_file(tensors, dst, metadata)
    return os.path.getsize(dst)
