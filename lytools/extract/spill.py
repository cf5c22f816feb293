"""An append-only store of output tensors on disk, so extraction's memory does not grow with the model.

Ranks (and which modules are stored whole) are only known after each module's SVD, while the
safetensors header must be written first. Tensors are appended to an unnamed temporary file next
to the output as they are produced, then read back through a memory map in file order by the
writer. The temporary file has no name: nothing is left behind, whatever happens.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterator

import torch

from lytools.errors import LytoolsError, os_reason
from lytools.io.writer import tensor_bytes


class SpillStore:
    """name -> tensor, held in a temporary file; `tensors()` maps them back without loading them."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        try:
            self._handle = tempfile.TemporaryFile(dir=self.folder)
        except OSError as exc:  # a read-only folder: say so, not the random name of a file never made
            raise LytoolsError(f"{self.folder}: cannot write the output's temporary file here ({os_reason(exc)})") from exc
        self._index: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        self._position = 0
        self._map: mmap.mmap | None = None

    def __enter__(self) -> "SpillStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def append(self, name: str, tensor: torch.Tensor) -> None:
        if self._map is not None:
            raise RuntimeError("spill store is sealed")
        if name in self._index:
            raise ValueError(f"output tensor {name!r} produced twice")
        tensor = tensor.detach().cpu().contiguous()
        data = tensor_bytes(tensor)
        # 8-byte alignment keeps every dtype's frombuffer view aligned
        padding = (-self._position) % 8
        with self._writing():
            if padding:
                self._handle.write(b"\0" * padding)
                self._position += padding
            self._index[name] = (self._position, tensor.dtype, tuple(tensor.shape))
            self._handle.write(data)
        self._position += len(data)

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Raise a failed write of the temporary file (a full disk) as a one-line error naming its folder."""
        try:
            yield
        except OSError as exc:
            raise LytoolsError(f"{self.folder}: writing the output's temporary file failed ({os_reason(exc)})") from exc

    def tensors(self) -> dict[str, torch.Tensor]:
        """Return every stored tensor as a read-only view of the file (no copy in memory)."""
        if self._map is None:
            with self._writing():
                self._handle.flush()
            if self._position == 0:
                return {name: torch.empty(shape, dtype=dtype) for name, (_, dtype, shape) in self._index.items()}
            self._map = mmap.mmap(self._handle.fileno(), self._position, access=mmap.ACCESS_READ)
        result = {}
        for name, (offset, dtype, shape) in self._index.items():
            count = 1
            for dim in shape:
                count *= dim
            if count == 0:
                result[name] = torch.empty(shape, dtype=dtype)
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # read-only mapping: the views are never written to
                view = torch.frombuffer(self._map, dtype=dtype, count=count, offset=offset)
            result[name] = view.reshape(shape)
        return result

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # views still alive: the mapping goes with them
            self._map = None
        self._handle.close()
