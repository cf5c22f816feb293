"""Safe loading of pickled checkpoints (.ckpt, .pt, .pth, .bin): weights only, never code.

Only `torch.load(..., weights_only=True)` is used (FORMATS.md 6). A pickle that asks for any
global beyond tensors and plain containers is refused with a clear message; there is no
fallback to full unpickling.
"""

from __future__ import annotations

import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path

from typing import TYPE_CHECKING

from lytools.errors import FileFormatError, UnsafeFileError
from lytools.io.dtypes import st_name
from lytools.io.safetensors import TensorInfo

if TYPE_CHECKING:
    import torch

NESTING_KEYS = ("state_dict", "model", "module", "ema", "model_state", "params")
EMA_PREFIX = "model_ema."  # LDM training checkpoints' EMA copy of the UNet (FORMATS.md 6: dropped unless asked for)


def load_pickled_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Return the tensors of a pickled checkpoint, unwrapped from `state_dict`-style nesting."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: no such file")
    from lytools.io.safetensors import READABLE, describe_foreign

    foreign = describe_foreign(path)
    if foreign:
        raise FileFormatError(f"{path}: {foreign}, not a pickled checkpoint: {READABLE}")
    mmap_ok = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_ok)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # "Unsupported global: GLOBAL builtins.eval was not..." names the global after the word GLOBAL
        found = re.search(r"(unsupported GLOBAL [^\s]+|Unsupported global: (?:GLOBAL )?[^\s]+|Unsupported class [^\s]+)", text)
        if found:
            raise UnsafeFileError(
                f"refusing to load {path}: it contains Python objects beyond tensors "
                f"({found.group(1)}); convert it with a trusted tool"
            ) from None
        detail = re.search(r"(Unsupported operand [^\n]*)", text)
        reason = f"a pickle the weights-only loader cannot read: {detail.group(1)}" if detail else "corrupt pickle"
        raise FileFormatError(f"{path}: not a readable checkpoint ({reason})") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, AttributeError, TypeError,
            struct.error) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"{path}: not a readable checkpoint ({message[:200]})") from None
    return _unwrap(path, loaded)


def _tensor_dict(candidate: object) -> dict[str, torch.Tensor] | None:
    import torch

    if not isinstance(candidate, dict):
        return None
    tensors = {key: value for key, value in candidate.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}
    return tensors or None


def _unwrap(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict) and "string_to_param" in loaded:
        raise FileFormatError(f"{path}: a textual-inversion embedding, not a checkpoint or network")
    current = loaded
    for _ in range(4):
        if not isinstance(current, dict):
            break
        nested = next((current[key] for key in NESTING_KEYS if isinstance(current.get(key), dict)), None)
        direct = _tensor_dict(current)
        if nested is not None and (direct is None or len(_tensor_dict(nested) or {}) >= len(direct)):
            current = nested
            continue
        break
    tensors = _tensor_dict(current)
    if tensors is None:
        raise FileFormatError(f"{path}: holds no tensors at the top level or under state_dict")
    return tensors


class PickledFile:
    """A pickled checkpoint behind the same interface as SafetensorsFile (no metadata)."""

    def __init__(self, path: str | os.PathLike, *, keep_ema: bool = False):
        self.path = Path(path)
        self.legacy = not zipfile.is_zipfile(self.path) if self.path.is_file() else False
        self._tensors = load_pickled_state_dict(self.path)
        # the EMA copy (model_ema.*) goes unless asked for, when the file holds the model itself too
        ema = [name for name in self._tensors if name.startswith(EMA_PREFIX)]
        self.ema_dropped = 0
        if ema and not keep_ema and len(ema) < len(self._tensors):
            for name in ema:
                del self._tensors[name]
            self.ema_dropped = len(ema)
        self.ema_count = len(ema)
        self.metadata: dict[str, str] = {}
        self._infos = {
            name: TensorInfo(name, st_name(tensor.dtype), tuple(tensor.shape)) for name, tensor in self._tensors.items()
        }

    def notes(self) -> list[str]:
        """What a user should know about how this file was read (legacy format, EMA copy dropped)."""
        found = []
        if self.legacy:
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self._tensors.values()}
            size = sum(storages.values())
            found.append(f"a legacy (torch < 1.6, non-zip) pickle cannot be mapped, so it is read "
                         f"whole into memory (about {size / 2**30:.1f} GiB); convert it to safetensors once to avoid that")
        if self.ema_dropped:
            found.append(f"its {self.ema_dropped} EMA tensor(s) (model_ema.*) are left out; "
                         f"--keep-ema keeps them")
        return found

    def __enter__(self) -> "PickledFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._tensors = {}

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise FileFormatError(f"{self.path}: no tensor named {name!r}") from None

    def infos(self):
        return iter(self._infos.values())

    def get(self, name: str) -> torch.Tensor:
        self.info(name)
        return self._tensors[name]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop]
