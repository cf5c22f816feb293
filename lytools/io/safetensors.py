"""Streaming safetensors reader: validate the whole header first, then map tensors one at a time.

The reader never trusts an offset before the header has been checked against the file size
(FORMATS.md 1.3), and each tensor is a view of a private memory map, so reading a 7 GB
checkpoint costs page cache, not process memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import mmap
import os
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from fractions import Fraction

from lytools.errors import FileFormatError
from lytools.io.dtypes import ITEM_SIZES, byte_size, torch_dtype_of


if TYPE_CHECKING:
    import torch

MAX_HEADER_LEN = 100_000_000


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from the header alone."""

    name: str
    dtype: str  # safetensors dtype name: "F16", "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]
    begin: int = 0  # offsets relative to the data buffer; (0, 0) for pickled inputs
    end: int = 0

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def nbytes(self) -> int:
        return int(byte_size(self.dtype, self.shape))

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return torch_dtype_of(self.dtype)


@dataclass
class Header:
    """A parsed and validated safetensors header."""

    path: Path
    header_len: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    extra_fields: dict[str, list[str]] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


def _fail(path: Path, problem: str) -> FileFormatError:
    return FileFormatError(f"{path}: {problem}")


def duplicate_key_hook(path: Path):
    """Return a json object_pairs_hook that refuses a key given twice in one object (naming `path`)."""

    def hook(pairs: list[tuple[str, object]]) -> dict:
        result = dict(pairs)
        if len(result) != len(pairs):
            seen: set[str] = set()
            duplicate = next(key for key, _ in pairs if key in seen or seen.add(key))
            raise _fail(path, f"duplicate key {duplicate!r} in the safetensors header")
        return result

    return hook


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{size} B"
        value /= 1000
    return f"{size} B"


# First bytes of model formats lytools does not read (none can start a safetensors file: read as a
# header length they all exceed MAX_HEADER_LEN).
_FOREIGN_MAGIC = (
    (b"GGUF", "a GGUF file (llama.cpp / ComfyUI-GGUF quantized model)"),
    (b"GGML", "a GGML file (old llama.cpp model)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras/TensorFlow weights)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"Rar!", "a RAR archive"),
)


READABLE = ("lytools reads .safetensors files, their *.safetensors.index.json, diffusers folders and weights-only "
            ".ckpt/.pt/.pth/.bin")  # said when a file is in a format it does not read


def foreign_format(prefix: bytes) -> str | None:
    """Name the known non-safetensors format whose magic starts `prefix`, else None."""
    for magic, name in _FOREIGN_MAGIC:
        if prefix.startswith(magic):
            return name
    return None


def describe_foreign(path: Path) -> str | None:
    """Name the format of a file that is neither safetensors nor a torch checkpoint (the magics
    above, a tar archive, a zip archive that is no torch.save zip), else None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except OSError:
        return None
    foreign = foreign_format(head)
    if foreign:
        return foreign
    if head[257:262] == b"ustar" and not head.startswith(b"sys_info\0"):  # torch's legacy tar begins with sys_info
        return "a tar archive"
    if head[:4] == b"PK\x03\x04":
        import zipfile

        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
        if not any(name.endswith("data.pkl") for name in names):  # torch.save writes <name>/data.pkl
            return "a zip archive"
    return None


def read_header(path: str | os.PathLike) -> Header:
    """Return the validated header of a safetensors file; raise FileFormatError naming the problem."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"not a safetensors file: {file_size} bytes is shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_LEN or header_len > file_size - 8:
                foreign = describe_foreign(path)  # a gzip's or tar's first bytes can read as a small length
                if foreign:
                    raise _fail(path, f"{foreign}, not safetensors: {READABLE}")
            if header_len > MAX_HEADER_LEN:
                if prefix.lstrip()[:1] in (b"{", b"["):  # model_index.json, config.json, adapter_config.json...
                    raise _fail(path, f"a JSON file, not weights: {READABLE}; for a diffusers folder or a peft adapter, "
                                      f"name its folder ({path.parent})")
                if prefix[:2] == b"PK" or prefix[:1] == b"\x80":
                    raise _fail(path, "not a safetensors file (it looks like a pickled checkpoint; use a .ckpt/.pt name)")
                raise _fail(path, f"not a safetensors file: header length {header_len} exceeds the 100 MB limit")
            if header_len > file_size - 8:
                raise _fail(
                    path,
                    f"truncated or not a safetensors file: header length {header_len} exceeds file size {_human(file_size)}",
                )
            raw = handle.read(header_len)
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise FileFormatError(f"{path}: is a directory, not a file") from None
    except PermissionError:
        raise FileFormatError(f"{path}: permission denied") from None
    if len(raw) != header_len:
        raise _fail(path, "truncated: the file ended inside the header")
    if not raw.lstrip()[:1] == b"{":  # no JSON object: maybe an archive whose first bytes read as a fitting length
        foreign = describe_foreign(path)
        if foreign:
            raise _fail(path, f"{foreign}, not safetensors: {READABLE}")
    return parse_header(path, raw, file_size)


def parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    """Return the validated header whose JSON bytes (after the 8-byte length) are `raw`, in a file
    of `file_size` bytes; raise FileFormatError naming the problem."""
    header_len = len(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _fail(path, "not a safetensors file: header is not UTF-8 text") from None
    try:
        parsed = json.loads(text, object_pairs_hook=duplicate_key_hook(path))
    except FileFormatError:
        raise
    except (json.JSONDecodeError, RecursionError) as exc:
        raise _fail(path, f"not a safetensors file: header is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(parsed, dict):
        raise _fail(path, "not a safetensors file: header is not a JSON object")
    return _validate(path, header_len, file_size, parsed)


_WHOLE_BYTE_SIZES = {name: int(size) for name, size in ITEM_SIZES.items() if size.denominator == 1}


def _plain_entry(name: str, entry: object) -> TensorInfo | None:
    """Return the TensorInfo of an entry with exactly dtype/shape/data_offsets, a whole-byte dtype,
    non-negative int dims and offsets spanning exactly its bytes; None for anything else."""
    if type(entry) is not dict or len(entry) != 3 or not name or "\x00" in name:
        return None
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    item = _WHOLE_BYTE_SIZES.get(dtype) if type(dtype) is str else None
    if item is None or type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return None
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or begin < 0:
        return None
    count = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            return None
        count *= dim
    if end - begin != item * count:
        return None
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def _validate(path: Path, header_len: int, file_size: int, parsed: dict) -> Header:
    metadata: dict[str, str] = {}
    raw_meta = parsed.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict):
            raise _fail(path, "__metadata__ is not a JSON object")
        for key, value in raw_meta.items():
            if not isinstance(value, str):
                raise _fail(path, f"metadata {key!r} is not a string (safetensors metadata is str -> str)")
            metadata[key] = value
    tensors: dict[str, TensorInfo] = {}
    extra: dict[str, list[str]] = {}
    for name, entry in parsed.items():
        info = _plain_entry(name, entry)
        if info is not None:  # the common case, checked in one go; anything else gets the detailed checks
            tensors[name] = info
            continue
        if not name or "\x00" in name:
            raise _fail(path, f"invalid tensor name {name!r}")
        if not isinstance(entry, dict):
            raise _fail(path, f"tensor {name!r}: header entry is not an object")
        missing = [field_name for field_name in ("dtype", "shape", "data_offsets") if field_name not in entry]
        if missing:
            raise _fail(path, f"tensor {name!r}: header entry lacks {', '.join(missing)}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in ITEM_SIZES:
            raise _fail(path, f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise _fail(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        ):
            raise _fail(path, f"tensor {name!r}: data_offsets {offsets!r} is not a pair of non-negative integers")
        begin, end = offsets
        if end < begin:
            raise _fail(path, f"tensor {name!r}: data_offsets end {end} before begin {begin}")
        size = byte_size(dtype, tuple(shape))
        if isinstance(size, Fraction):
            raise _fail(path, f"tensor {name!r}: {dtype} shape {shape} is not a whole number of bytes")
        if end - begin != size:
            raise _fail(
                path,
                f"tensor {name!r}: shape {shape} {dtype} needs {int(size)} bytes but data_offsets span {end - begin}",
            )
        others = sorted(set(entry) - {"dtype", "shape", "data_offsets"})
        if others:
            extra[name] = others
        tensors[name] = TensorInfo(name, dtype, tuple(shape), begin, end)
    data_len = file_size - 8 - header_len
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < position:
            raise _fail(path, f"tensor {info.name!r}: data_offsets [{info.begin}, {info.end}] overlap the previous tensor")
        if info.begin > position:
            raise _fail(path, f"tensor {info.name!r}: gap of {info.begin - position} bytes before its data")
        if info.end > data_len:
            raise _fail(
                path,
                f"truncated: tensor {info.name!r} ends at byte {info.end} of the data but only {data_len} bytes follow the header",
            )
        position = info.end
    if position != data_len:
        raise _fail(path, f"{data_len - position} trailing bytes after the last tensor (file not fully covered)")
    return Header(path, header_len, file_size, tensors, metadata, extra)


class SafetensorsFile:
    """An open safetensors file: header known, tensors mapped on demand.

    `get` returns a CPU tensor that views a private (copy-on-write) memory map: reading costs
    page cache only. Callers must treat it as read-only or `.clone()` it.
    """

    def __init__(self, path: str | os.PathLike):
        self.header = read_header(path)
        self.path = self.header.path
        self._mmap: mmap.mmap | None = None
        self._handle = None

    # -- context management -------------------------------------------------------------
    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                # tensors still view the map; the OS unmaps it once they are gone
                pass
            self._mmap = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    # -- header access --------------------------------------------------------------------
    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.header.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.header.tensors[name]
        except KeyError:
            raise FileFormatError(f"{self.path}: no tensor named {name!r}") from None

    def infos(self) -> Iterator[TensorInfo]:
        return iter(self.header.tensors.values())

    # -- tensor access --------------------------------------------------------------------
    def _map(self) -> mmap.mmap:
        if self._mmap is None:
            self._handle = open(self.path, "rb")
            self._mmap = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mmap

    def _mapped(self, info: TensorInfo) -> mmap.mmap:
        """Return the map, checked to hold the tensor: the file may have shrunk since its header was read (cut
        or copied over in place while a batch runs). The map keeps its length, but touching its pages past the
        file's new end kills the process with SIGBUS, leaving the output's temporary file behind: the file's
        current size is checked before each tensor (one fstat), which closes all but a short window."""
        mapped = self._map()
        end = self.header.data_start + info.end
        size = min(len(mapped), os.fstat(self._handle.fileno()).st_size)
        if end > size:
            raise FileFormatError(f"{self.path}: the file changed while being read: tensor {info.name!r} ends at byte "
                                  f"{end} but the file now has {size} bytes")
        return mapped

    def raw_bytes(self, name: str) -> memoryview:
        """Return the stored bytes of one tensor (a view of the map)."""
        info = self.info(name)
        start = self.header.data_start + info.begin
        return memoryview(self._mapped(info))[start : start + info.nbytes]

    def get(self, name: str) -> torch.Tensor:
        import torch

        """Return one tensor (CPU, stored dtype) viewing the file's memory map."""
        info = self.info(name)
        dtype = info.torch_dtype
        if dtype is None:
            raise FileFormatError(f"{self.path}: tensor {name!r} has dtype {info.dtype}, which torch cannot load")
        shape = info.shape
        if info.dtype == "F4":
            shape = shape[:-1] + (shape[-1] // 2,) if shape else shape
        if info.nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        item = torch.empty((), dtype=dtype).element_size()
        tensor = torch.frombuffer(
            self._mapped(info), dtype=dtype, count=info.nbytes // item, offset=self.header.data_start + info.begin
        )
        return tensor.reshape(shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Return rows [start, stop) of a tensor's first axis without touching the others."""
        return self.get(name)[start:stop]


class MultiFileReader:
    """Several open weight files read as one (a sharded index, a diffusers folder).

    A subclass fills `_where` (each name -> the open file holding it and the tensor's name there)
    and lists its files in `_files()`; reading by name, close() and the context manager are shared.
    """

    path: Path
    _where: dict[str, tuple[Any, str]]

    def _files(self) -> Iterable[Any]:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._files():
            handle.close()

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _locate(self, name: str) -> tuple[Any, str]:
        try:
            return self._where[name]
        except KeyError:
            raise FileFormatError(f"{self.path}: no tensor named {name!r}") from None

    def info(self, name: str) -> TensorInfo:
        handle, key = self._locate(name)
        info = handle.info(key)
        return info if key == name else replace(info, name=name)

    def infos(self) -> Iterator[TensorInfo]:
        return (self.info(name) for name in self._where)

    def get(self, name: str) -> torch.Tensor:
        handle, key = self._locate(name)
        return handle.get(key)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop]
