"""DoRA weight decomposition (`dora_scale`) on top of lora, loha, lokr, glora and oft/boft
(spec: ALGORITHMS.md 7).

With W* the algorithm's result at full strength and n its norm along the DoRA axis:

* "lycoris" (normative):  W' = W* · (m·(g − 1) + 1),  g = dora_scale / (n + ε)
* "comfy":                W' = W + m·(W*·g − W)

The two agree at m = 1 only. ε is float32's machine epsilon whatever the compute precision.
"""

from __future__ import annotations

import torch

from lytools.algos.common import DORA_SCALE, fail
from lytools.errors import UnsupportedError

SUFFIXES = (DORA_SCALE,)
DORA_MODES = ("lycoris", "comfy")
EPSILON = 1.1920929e-07  # torch.finfo(torch.float32).eps, as LyCORIS adds it


def detect(shapes) -> bool:
    return DORA_SCALE in shapes


def axis(name: str, shape: tuple[int, ...], out: int | None) -> str:
    """Return "out" (norm per output channel) or "in" (per input channel) from `dora_scale`'s shape.

    Per-output iff shape[0] == out and (1-D or shape[1] == 1); without `out`, a (n, 1, …) or 1-D
    shape is per-output and a (1, n, …) shape per-input.
    """
    if not shape:
        raise fail(name, "dora_scale is a scalar, expected (out, 1, …) or (1, in, …)")
    if out is not None:
        per_output = shape[0] == out and (len(shape) == 1 or shape[1] == 1)
    else:
        per_output = len(shape) == 1 or shape[1] == 1
    if per_output:
        if any(k != 1 for k in shape[1:]):
            raise fail(name, f"dora_scale {list(shape)} is neither (out, 1, …) nor (1, in, …)")
        return "out"
    if len(shape) < 2 or shape[0] != 1 or any(k != 1 for k in shape[2:]):
        raise fail(name, f"dora_scale {list(shape)} is neither (out, 1, …) nor (1, in, …)"
                         + ("" if out is None else f" for {out} output channels"))
    return "in"


def check_mode(mode: str) -> None:
    """Raise unless `mode` is one of DORA_MODES."""
    if mode not in DORA_MODES:
        raise UnsupportedError(f"unknown DoRA mode {mode!r}: expected {' or '.join(DORA_MODES)}")


def apply(
    name: str, weight: torch.Tensor, merged: torch.Tensor, dora_scale: torch.Tensor, ratio: float, mode: str = "lycoris"
) -> torch.Tensor:
    """Return the DoRA result from the base weight W, the full-strength result W* and the magnitudes."""
    check_mode(mode)
    side = axis(name, tuple(dora_scale.shape), merged.shape[0])
    channel_dim = 0 if side == "out" else 1
    if merged.dim() <= channel_dim or dora_scale.numel() != merged.shape[channel_dim]:
        raise fail(name, f"dora_scale {list(dora_scale.shape)} does not match target weight {list(merged.shape)}")
    reduce_dims = tuple(d for d in range(merged.dim()) if d != channel_dim)
    norm = torch.linalg.vector_norm(merged, dim=reduce_dims, keepdim=True) + EPSILON
    view = [1] * merged.dim()
    view[channel_dim] = -1
    gain = dora_scale.reshape(view) / norm
    if mode == "lycoris":
        return merged * (ratio * (gain - 1.0) + 1.0)
    return weight + ratio * (merged * gain - weight)
