"""Reading and writing model files one tensor at a time.

    open_file(path)            -> SafetensorsFile | ShardedFile | PickledFile
        .keys() .info(name) .infos() .get(name) .get_rows(name, a, b) .metadata .path
    read_header(path)          -> Header (validated; no tensor data touched)
    SafetensorsWriter(out, [plan_entry(name, dtype, shape), ...], metadata, overwrite=...)
        with writer: for name in writer.order: writer.write(name, tensor)
        (or writer.write_all([raw bytes in file order]); plan_layout(entries) -> a Layout to reuse)
    write_safetensors(out, {name: tensor}, metadata, overwrite=...)
    file_hashes(path), sd_scripts_hashes(tensors, metadata), with_sshs_hashes(...)
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING


from lytools.errors import FileFormatError
from lytools.io.dtypes import parse_save_dtype, st_name
from lytools.io.hashes import FileHashes, file_hashes, modelspec_hash, sd_scripts_hashes, with_sshs_hashes
from lytools.io.safetensors import Header, MultiFileReader, SafetensorsFile, TensorInfo, parse_header, read_header
from lytools.io.writer import (
    PICKLE_SUFFIXES,
    Layout,
    PlannedTensor,
    SafetensorsWriter,
    check_output_path,
    output_file_path,
    plan_entry,
    removed_on_failure,
    plan_layout,
    same_file,
    write_safetensors,
)

if TYPE_CHECKING:
    from lytools.io.folders import DiffusersFolder
    from lytools.io.pickled import PickledFile

_LAZY = {"PickledFile", "load_pickled_state_dict"}  # lytools.io.pickled (pickle, zipfile): imported on first use


def __getattr__(name: str):
    if name in _LAZY:
        from lytools.io import pickled

        return getattr(pickled, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ShardedFile(MultiFileReader):
    """A `*.safetensors.index.json` (weight_map name -> shard) opened as one file."""

    def __init__(self, index_path: str | os.PathLike):
        self.path = Path(index_path)
        try:
            index = json.loads(self.path.read_text())
            weight_map = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FileFormatError(f"{self.path}: not a safetensors index ({type(exc).__name__})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise FileFormatError(f"{self.path}: not a safetensors index (weight_map is not an object of shard names)")
        self._shards: dict[str, SafetensorsFile] = {}
        self._where: dict[str, tuple[SafetensorsFile, str]] = {}
        # the index's own metadata is {"total_size": N}: bookkeeping, not the model's metadata
        self.metadata: dict[str, str] = {}
        try:
            self._open_shards(weight_map)
        except BaseException:
            self.close()
            raise

    def _open_shards(self, weight_map: dict[str, str]) -> None:
        for name, shard in weight_map.items():
            if shard not in self._shards:
                if Path(shard).name != shard:
                    raise FileFormatError(f"{self.path}: shard {shard!r} is not a file name beside the index")
                self._shards[shard] = SafetensorsFile(self.path.parent / shard)
            opened = self._shards[shard]
            if name not in opened:
                raise FileFormatError(f"{self.path}: index names {name!r} in {shard}, which lacks it")
            self._where[name] = (opened, name)
        for shard, opened in self._shards.items():
            for name in opened.keys():
                located = self._where.get(name)
                if located is None:
                    raise FileFormatError(f"{self.path}: shard {shard} holds {name!r}, which the index does not list")
                owner = located[0]
                if owner is not opened:
                    raise FileFormatError(f"{self.path}: tensor {name!r} is in two shards ({shard} and {owner.path.name})")
            if not self.metadata and opened.metadata:
                self.metadata = dict(opened.metadata)

    @property
    def shard_paths(self) -> list[Path]:
        return [shard.path for shard in self._shards.values()]

    @property
    def file_bytes(self) -> int:
        """Bytes of the shards (the index itself aside)."""
        return sum(shard.header.file_size for shard in self._shards.values())

    def _files(self):
        return self._shards.values()


def _safetensors_inside(path: Path) -> bool:
    """True when a file with a pickle suffix (.ckpt/.pt/...) holds safetensors (renamed files exist):
    an 8-byte header length that fits the file, then the header's opening brace."""
    try:
        with open(path, "rb") as handle:
            prefix = handle.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    if len(prefix) < 9:
        return False
    (header_len,) = struct.unpack("<Q", prefix[:8])
    return 2 <= header_len <= size - 8 and prefix[8:9] == b"{"


def open_file(path: str | os.PathLike, *, keep_ema: bool = False) -> SafetensorsFile | ShardedFile | PickledFile | DiffusersFolder:
    """Open any supported input: .safetensors, a sharded index, a weights-only pickle, or a folder
    (a diffusers folder, or a folder holding one model: lytools.io.folders). A pickle's EMA copy
    (model_ema.*) is left out unless keep_ema (FORMATS.md 6); PickledFile.notes() says so."""
    path = Path(path)
    if path.is_dir():
        from lytools.io.folders import open_folder

        return open_folder(path)
    if not path.exists():
        raise FileFormatError(f"{path}: no such file")
    if path.name.endswith(".index.json"):
        return ShardedFile(path)
    if path.suffix.lower() in PICKLE_SUFFIXES and not _safetensors_inside(path):
        from lytools.io.pickled import PickledFile

        return PickledFile(path, keep_ema=keep_ema)
    return SafetensorsFile(path)


__all__ = [
    "FileHashes",
    "Header",
    "Layout",
    "PickledFile",
    "PlannedTensor",
    "SafetensorsFile",
    "SafetensorsWriter",
    "ShardedFile",
    "TensorInfo",
    "check_output_path",
    "output_file_path",
    "removed_on_failure",
    "same_file",
    "file_hashes",
    "load_pickled_state_dict",
    "modelspec_hash",
    "open_file",
    "parse_header",
    "parse_save_dtype",
    "plan_entry",
    "plan_layout",
    "read_header",
    "sd_scripts_hashes",
    "st_name",
    "with_sshs_hashes",
    "write_safetensors",
]
