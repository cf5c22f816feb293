"""BOFT: butterfly products of block-diagonal Cayley rotations of the output channels
(spec: ALGORITHMS.md 10)."""

from __future__ import annotations

import torch

from lytools.algos.common import (
    ALPHA, DORA_SCALE, ModuleInfo, NetworkModule, Scalars, Shapes, cayley, fail, reject_foreign,
    require, toward_identity,
)
from lytools.algos.oft import check_rescale, constraint_radius, rescaled

SUFFIXES = ("oft_blocks", "rescale", ALPHA, DORA_SCALE)


def detect(shapes: Shapes) -> bool:
    return "oft_blocks" in shapes and len(shapes["oft_blocks"]) == 4


def describe(name: str, shapes: Shapes, scalars: Scalars) -> ModuleInfo:
    """Return (stages M, blocks n, block size b) and the constraint coefficient."""
    reject_foreign(name, shapes, SUFFIXES, "boft")
    require(name, shapes, "oft_blocks")
    stages, count, size, size2 = shapes["oft_blocks"]
    if size != size2 or size % 2 or count & (count - 1) or count < 1:
        raise fail(name, f"oft_blocks {[stages, count, size, size2]}: needs square blocks of even size and a power-of-two block count")
    if stages < 1 or 2 ** (stages - 1) > count:
        raise fail(name, f"oft_blocks {[stages, count, size, size2]}: {stages} butterfly stages do not fit {count} blocks")
    check_rescale(name, shapes, count * size)
    constraint = scalars.get(ALPHA) if ALPHA in shapes else 0.0
    return ModuleInfo(
        name=name, algo="boft", suffixes=tuple(sorted(shapes)), blocks=(stages, count, size),
        constraint=constraint, additive=False, needs_weight=True,
    )


def merge(module: NetworkModule, weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Return W after every butterfly stage (R applied untransposed), then rescaled.

    Stage t pairs rows h = 2^t·b/2 apart: viewing the row index as (g, s, j) with sizes
    (out/(2h), 2, h), the rows reordered to (g, j, s) fall into the n blocks of b rows that R[t]
    rotates; the reorder is undone afterwards.
    """
    blocks = module["oft_blocks"]
    stages, count, size = blocks.shape[0], blocks.shape[1], blocks.shape[2]
    out = weight.shape[0]
    if out != count * size:
        raise fail(module.name, f"boft has {count}x{size} output channels, target weight is {list(weight.shape)}")
    rotations = toward_identity(cayley(blocks, constraint_radius(module, out)), ratio)
    rows = weight.reshape(out, -1)
    columns = rows.shape[1]
    for stage in range(stages):
        half = (2 ** stage) * size // 2
        grouped = rows.reshape(out // (2 * half), 2, half, columns).transpose(1, 2)
        rotated = torch.matmul(rotations[stage], grouped.reshape(count, size, columns))
        rows = rotated.reshape(out // (2 * half), half, 2, columns).transpose(1, 2).reshape(out, columns)
    return rescaled(module, rows.reshape(weight.shape))
