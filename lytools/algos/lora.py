"""LoRA / LoCon, including Tucker conv (`lora_mid`) and DyLoRA files (spec: ALGORITHMS.md 2, 12.1).

A `diff_b` next to the factors is the layer's bias difference, as ComfyUI's LoRA extraction (LoraSave,
`bias_diff`) writes it on every layer with a bias: B' = B + m·diff_b, no alpha (like full's `diff_b`).
"""

from __future__ import annotations

from typing import Sequence

import torch

from lytools.algos import sparse
from lytools.algos.common import (
    ALPHA, DORA_SCALE, ModuleInfo, NetworkModule, Scalars, Shapes, expect_ndim, fail, fit_to,
    flat2, module_scale, reject_foreign, require, scale_from_scalars, tucker,
)
from lytools.arch.network import LORA_DOWN, LORA_MID, LORA_UP

UP, DOWN, MID = LORA_UP, LORA_DOWN, LORA_MID
BIAS = "diff_b"
SUFFIXES = (UP, DOWN, MID, ALPHA, DORA_SCALE, BIAS, *sparse.SUFFIXES)


def detect(shapes: Shapes) -> bool:
    return UP in shapes or DOWN in shapes or MID in shapes


def describe(name: str, shapes: Shapes, scalars: Scalars) -> ModuleInfo:
    """Return rank, scale, kernel and ΔW shape; raise on factors that do not chain."""
    reject_foreign(name, shapes, SUFFIXES, "lora")
    if UP in shapes and DOWN not in shapes:
        raise fail(name, f"{UP} without {DOWN}")
    if DOWN in shapes and UP not in shapes:
        raise fail(name, f"{DOWN} without {UP}")
    require(name, shapes, UP, DOWN)
    up, down = shapes[UP], shapes[DOWN]
    expect_ndim(name, UP, up, 2, 3, 4, 5)
    expect_ndim(name, DOWN, down, 2, 3, 4, 5)
    rank = down[0]
    if up[1] != rank or any(k != 1 for k in up[2:]):
        raise fail(name, f"{UP} {list(up)} does not chain with {DOWN} {list(down)} (rank {rank})")
    kernel = tuple(down[2:])
    if MID in shapes:
        mid = shapes[MID]
        expect_ndim(name, MID, mid, 3, 4, 5)
        if tuple(mid[:2]) != (rank, rank) or any(k != 1 for k in down[2:]):
            raise fail(name, f"{MID} {list(mid)} does not chain with {DOWN} {list(down)} (rank {rank})")
        kernel = tuple(mid[2:])
    if sparse.detect(shapes):
        sparse.check(name, shapes)
    if BIAS in shapes and tuple(shapes[BIAS]) != (up[0],):
        raise fail(name, f"{BIAS} {list(shapes[BIAS])} does not match the {up[0]} output rows of {UP}")
    alpha, scale = scale_from_scalars(shapes, scalars, rank)
    return ModuleInfo(
        name=name, algo="lora", suffixes=tuple(sorted(shapes)), rank=rank, alpha=alpha, scale=scale,
        kernel=kernel, tucker=MID in shapes, delta_shape=(up[0], down[1], *kernel),
        sparse_bias=sparse.detect(shapes), bias_delta=BIAS in shapes,
    )


def bias_delta(module: NetworkModule) -> torch.Tensor | None:
    """Return ΔB = diff_b (no alpha), or None."""
    return module.get(BIAS)


def delta(module: NetworkModule, target_shape: Sequence[int]) -> torch.Tensor:
    """Return ΔW = s · up @ down (through `lora_mid` for Tucker), plus any sparse correction."""
    up, down = flat2(module[UP]), flat2(module[DOWN])
    scale = module_scale(module, down.shape[0])
    up = up * scale  # scaling the (out, r) factor is cheaper than scaling the product
    mid = module.get(MID)
    if mid is None:
        product = up @ down
    else:
        product = tucker(mid, up.T, down)
    weight_delta = fit_to(module.name, product, target_shape)
    if sparse.detect(module.tensors):
        weight_delta = weight_delta + sparse.delta(module, target_shape)
    return weight_delta
