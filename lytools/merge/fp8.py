"""fp8 checkpoints: plain (the stored value is the weight) and "scaled" (ComfyUI-style: the weight
is fp8 x a per-tensor (or per-row) scale stored beside it, with a `scaled_fp8` marker key).
FORMATS.md 1.2.

Merging dequantizes to float32, adds, and requantizes with the same scale. The scale is raised
only where the merged weight would saturate fp8 (the whole scale of a per-tensor one, the rows
that need it of a per-row one; the tensor is then requantized, and it is reported). A change
smaller than fp8's step disappears on requantization: callers measure that with
`surviving_share` and report the modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

from lytools.io.dtypes import FP8_NAMES
from lytools.io.safetensors import TensorInfo

SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
INPUT_SCALE_SUFFIXES = (".scale_input", ".input_scale")
MARKER = "scaled_fp8"


@dataclass
class Fp8Layout:
    """How a checkpoint stores fp8: kind none | plain | scaled, and weight key -> scale key."""

    kind: str = "none"
    scale_of: dict[str, str] = field(default_factory=dict)
    markers: list[str] = field(default_factory=list)
    input_scales: list[str] = field(default_factory=list)

    def is_scale_or_marker(self, name: str) -> bool:
        """True for the tensors that only make sense next to scaled fp8 weights."""
        return name in self.markers or name in self.input_scales or name in set(self.scale_of.values())


def _weight_of_scale(name: str) -> str | None:
    for suffix in SCALE_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)] + ".weight"
    return None


def detect_fp8(infos: Mapping[str, TensorInfo]) -> Fp8Layout:
    """Return the fp8 layout of a checkpoint from its header."""
    layout = Fp8Layout()
    fp8_keys = {name for name, info in infos.items() if info.dtype in FP8_NAMES}
    layout.markers = [name for name in infos if name == MARKER or name.endswith("." + MARKER)]
    for name in infos:
        weight = _weight_of_scale(name)
        if weight is not None and weight in fp8_keys:
            layout.scale_of[weight] = name
        if name.endswith(INPUT_SCALE_SUFFIXES):
            layout.input_scales.append(name)
    if layout.scale_of or layout.markers:
        layout.kind = "scaled"
    elif fp8_keys:
        layout.kind = "plain"
    return layout


def dequantize(stored: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Return the true weight: stored value (x scale for scaled fp8) in `dtype`, a new tensor."""
    value = stored.to(dtype=dtype, copy=True)
    if scale is not None:
        value.mul_(scale.to(value.device, dtype).reshape(_scale_shape(scale, value)))
    return value


def _scale_shape(scale: torch.Tensor, value: torch.Tensor) -> tuple[int, ...]:
    if scale.numel() == 1:
        return (1,) * value.dim() if value.dim() else ()
    return tuple(scale.shape) + (1,) * (value.dim() - scale.dim())


@dataclass
class Requantized:
    """A requantized fp8 weight, the scale it used (None: plain fp8), whether anything saturated."""

    stored: torch.Tensor
    scale: torch.Tensor | None
    scale_raised: bool = False
    saturated: bool = False


def requantize(weight: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None) -> Requantized:
    """Return `weight` stored as fp8 `dtype` with `scale`, raising the scale where the weight would
    saturate: the one value of a per-tensor scale, or just the rows (blocks) of a per-row scale
    whose largest value no longer fits. Plain fp8 (no scale) saturates and says so."""
    limit = torch.finfo(dtype).max
    raised = False
    if scale is None:
        scaled = weight
    else:
        shaped = scale.to(weight.device, torch.float32).reshape(_scale_shape(scale, weight))
        if weight.numel():
            spread = [d for d in range(weight.dim()) if shaped.dim() and shaped.shape[d] == 1 and weight.shape[d] != 1]
            peak = weight.abs().amax(dim=spread, keepdim=True) if spread else weight.abs()
            needed = (peak / limit).reshape(shaped.shape) if shaped.dim() else peak.reshape(())
            if bool((needed > shaped).any()):
                shaped = torch.maximum(shaped, needed)
                raised = True
        scaled = weight / shaped
    # a raised scale puts the peak at the limit up to one rounding of the division: not saturation
    saturated = bool(scaled.numel()) and float(scaled.abs().max()) > limit * (1 + 2**-20)
    stored = scaled.clamp(-limit, limit).to(dtype)
    new_scale = None if scale is None else shaped.to(scale.dtype).reshape(scale.shape)
    return Requantized(stored, new_scale, raised, saturated)


def surviving_share(intended: torch.Tensor, realized: torch.Tensor) -> float:
    """Return how much of an intended change is left after requantization, 1 - |realized - intended| / |intended|."""
    norm = float(torch.linalg.vector_norm(intended))
    if norm == 0.0:
        return 1.0
    return max(0.0, 1.0 - float(torch.linalg.vector_norm(realized - intended)) / norm)


def read_weight(reader, layout: Fp8Layout, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """Return a checkpoint tensor (its rows [a, b) when given) with a scaled fp8 weight as its true
    value, fp8 x scale in float32 (a per-row scale sliced with the rows); other tensors as stored."""
    stored = reader.get(key) if rows is None else reader.get_rows(key, rows[0], rows[1])
    scale_key = layout.scale_of.get(key)
    if scale_key is None:
        return stored
    scale = reader.get(scale_key)
    if rows is not None and scale.numel() > 1:
        scale = scale[rows[0]:rows[1]]
    return dequantize(stored, scale)
