"""The LyCORIS extractor's sparse weight correction next to a LoRA (spec: ALGORITHMS.md 12.3).

`bias_indices` (int16, (2, nnz)), `bias_values` ((nnz,)) and `bias_size` (int16, (2,) = (out, in·K))
store a sparse residual R of the low-rank approximation. Despite the name it corrects the
weight: ΔW += reshape(dense(R), W.shape), with no alpha, times the ratio like the rest of ΔW.
"""

from __future__ import annotations

from typing import Sequence

import torch

from lytools.algos.common import NetworkModule, Shapes, expect_ndim, fail, fit_to

SUFFIXES = ("bias_indices", "bias_values", "bias_size")


def detect(shapes: Shapes) -> bool:
    return any(suffix in shapes for suffix in SUFFIXES)


def check(name: str, shapes: Shapes) -> None:
    """Raise unless the three keys are all present and their shapes agree."""
    missing = [s for s in SUFFIXES if s not in shapes]
    if missing:
        raise fail(name, f"sparse weight correction incomplete: missing {', '.join(missing)}")
    indices, values, size = shapes["bias_indices"], shapes["bias_values"], shapes["bias_size"]
    expect_ndim(name, "bias_indices", indices, 2)
    if indices[0] != 2 or tuple(values) != (indices[1],) or tuple(size) != (2,):
        raise fail(
            name,
            f"sparse weight correction shapes do not agree: bias_indices {list(indices)}, "
            f"bias_values {list(values)}, bias_size {list(size)}",
        )


def _unsigned(index: torch.Tensor) -> torch.Tensor:
    # the extractor stores positions as int16; past 32767 they wrap negative
    index = index.to(torch.int64)
    return torch.where(index < 0, index + 65536, index)


def delta(module: NetworkModule, target_shape: Sequence[int]) -> torch.Tensor:
    """Return the dense correction reshaped to the target weight (dtype of `bias_values`)."""
    values = module["bias_values"]
    indices = _unsigned(module["bias_indices"])
    rows, cols = (int(v) for v in _unsigned(module["bias_size"]).tolist())
    if indices.numel() and (int(indices[0].max()) >= rows or int(indices[1].max()) >= cols):
        raise fail(module.name, f"sparse weight correction index outside its size {rows}x{cols}")
    dense = torch.zeros(rows, cols, dtype=values.dtype, device=values.device)
    dense.index_put_((indices[0], indices[1]), values, accumulate=True)
    return fit_to(module.name, dense, target_shape)
