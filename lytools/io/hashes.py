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
import os
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
__all__ = ["LEGACY_LENGTH", "LEGACY_OFFSET", "CHUNK", "FileHashes", "file_hashes", "sd_scripts_hashes", "with_sshs_hashes",
           "modelspec_hash"]


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
