"""Model hashes (FORMATS.md 5.4), computed streaming, never by loading a file whole.

| name                                  | bytes hashed                                     |
| sd-scripts sshs_model_hash / AutoV3   | the data section (after the header)              |
| sd-scripts sshs_legacy_hash / AutoV1  | 0x10000 bytes at file offset 0x100000            |
| AutoV2                                | the whole file                                   |
| modelspec.hash_sha256                 | each tensor's bytes in state-dict order, "0x"+hex|
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import hashlib
import mmap
import os
import threading
from dataclasses import dataclass
from typing import Iterable, Mapping


from lytools.io.safetensors import read_header
from lytools.io.writer import (
    LEGACY_LENGTH,
    LEGACY_OFFSET,
    LegacyWindow,
    file_order,
    header_with,
    plan_entry,
    ss_only,
    tensor_bytes,
    tensor_entries_json,
)


if TYPE_CHECKING:
    import torch

CHUNK = 8 << 20
MAPPED_PIECE = 256 << 20  # bytes hashed per call when hashing through a map (see data_sha256)
__all__ = ["LEGACY_LENGTH", "LEGACY_OFFSET", "CHUNK", "DataHashThread", "FileHashes", "data_sha256", "file_hashes",
           "sd_scripts_hashes", "with_sshs_hashes", "modelspec_hash"]


@dataclass(frozen=True)
class FileHashes:
    """The hashes users look files up by, all from one read of the file."""

    sha256: str  # whole file: AutoV2 is its first 10 hex digits
    data_sha256: str  # data section: sshs_model_hash, A1111 LoRA hash, civitai AutoV3
    legacy: str  # 8 hex digits: sshs_legacy_hash / A1111 old checkpoint hash / AutoV1

    @property
    def autov2(self) -> str:
        return self.sha256[:10]

    @property
    def autov3(self) -> str:
        return self.data_sha256[:12]

    def as_dict(self) -> dict[str, str]:
        return {
            "sha256": self.sha256,
            "autov2": self.autov2,
            "autov3": self.autov3,
            "sshs_model_hash": self.data_sha256,
            "sshs_legacy_hash": self.legacy,
        }


def file_hashes(path: str | os.PathLike) -> FileHashes:
    """Return whole-file, data-section and legacy hashes of a safetensors file in one pass."""
    header = read_header(path)
    whole, data, legacy = hashlib.sha256(), hashlib.sha256(), LegacyWindow()
    position = 0
    with open(header.path, "rb") as handle:
        while True:
            chunk = handle.read(CHUNK)
            if not chunk:
                break
            whole.update(chunk)
            legacy.feed(chunk)
            end = position + len(chunk)
            if end > header.data_start:
                data.update(chunk[max(0, header.data_start - position) :])
            position = end
    return FileHashes(whole.hexdigest(), data.hexdigest(), legacy.hexdigest())


def data_sha256(path: str | os.PathLike, data_start: int, cancelled: threading.Event | None = None) -> str | None:
    """SHA-256 of a file's bytes from `data_start` to its end (a safetensors file's AutoV3 when
    `data_start` is where its data section begins); None when `cancelled` is set before the end.

    For the background threads that hash inputs while a command works: the file is hashed through
    a read-only map, MAPPED_PIECE bytes per call, and hashlib releases the GIL for each call, so the
    thread takes the GIL back a few times per GiB rather than hundreds (8 MiB reads). On a GPU
    machine, extract of an SD1 pair took 3.8–4.0 s this way (its two inputs hashed side by side)
    against 4.1–4.2 s with one thread reading 8 MiB at a time, and 3.7 s with no hashing at all.
    A file that cannot be mapped is read in CHUNK pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size <= data_start:
            return digest.hexdigest()
        try:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError):  # a file system without maps, say
            handle.seek(data_start)
            while chunk := handle.read(CHUNK):
                if cancelled is not None and cancelled.is_set():
                    return None
                digest.update(chunk)
            return digest.hexdigest()
    with mapped:
        view = memoryview(mapped)
        try:
            for start in range(data_start, size, MAPPED_PIECE):
                if cancelled is not None and cancelled.is_set():
                    return None
                piece = view[start:start + MAPPED_PIECE]
                digest.update(piece)
                piece.release()
        finally:
            view.release()
    return digest.hexdigest()


class DataHashThread(threading.Thread):
    """data_sha256 of one file on a background thread: after join(), `digest` (None when cancelled)
    or `error` (the OSError that stopped it)."""

    def __init__(self, path: str | os.PathLike, data_start: int):
        super().__init__(name="lytools-hash", daemon=True)
        self.path, self.data_start = path, data_start
        self.digest: str | None = None
        self.error: OSError | None = None
        self._cancelled = threading.Event()

    def run(self) -> None:
        try:
            self.digest = data_sha256(self.path, self.data_start, self._cancelled)
        except OSError as exc:
            self.error = exc

    def cancel(self) -> None:
        self._cancelled.set()


def sd_scripts_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None) -> tuple[str, str]:
    """Return (sshs_model_hash, sshs_legacy_hash) as sd-scripts computes them for these tensors.

    sd-scripts hashes the bytes safetensors would write with only the `ss_*` metadata kept;
    lytools writes the same tensor order, so the model hash equals the written file's AutoV3.
    """
    entries = file_order([plan_entry(name, tensor.dtype, tensor.shape) for name, tensor in tensors.items()])
    header = header_with(tensor_entries_json(entries), ss_only(metadata))
    model, legacy = hashlib.sha256(), LegacyWindow()
    legacy.feed(header)
    for entry in entries:
        data = tensor_bytes(tensors[entry.name])
        model.update(data)
        if not legacy.done:
            legacy.feed(data)
    return model.hexdigest(), legacy.hexdigest()


def with_sshs_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """Return metadata with freshly computed sshs_model_hash / sshs_legacy_hash (never copied forward)."""
    result = {key: value for key, value in metadata.items() if not key.startswith("sshs_")}
    model, legacy = sd_scripts_hashes(tensors, result)
    result["sshs_model_hash"] = model
    result["sshs_legacy_hash"] = legacy
    return result


def modelspec_hash(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Return `0x` + SHA-256 of each tensor's bytes in the given (state-dict) order."""
    digest = hashlib.sha256()
    for _, tensor in tensors:
        digest.update(tensor_bytes(tensor))
    return "0x" + digest.hexdigest()
