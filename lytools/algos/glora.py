"""GLoRA: ΔW = s · (B + W·A), a low-rank term plus a low-rank mix of the base weight's input
channels; current and old (transposed) layouts (spec: ALGORITHMS.md 8)."""

from __future__ import annotations

from typing import Sequence

import torch

from lytools.algos.common import (
    ALPHA, DORA_SCALE, ModuleInfo, NetworkModule, Scalars, Shapes, expect_ndim, fail, fit_to,
    flat2, module_scale, reject_foreign, require, scale_from_scalars, tucker,
)

A1, A2, B1, B2, BM = "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"
FACTORS = (A1, A2, B1, B2)
SUFFIXES = (*FACTORS, BM, ALPHA, DORA_SCALE)


def detect(shapes: Shapes) -> bool:
    return any(suffix in shapes for suffix in (*FACTORS, BM))


def is_old_layout(shapes: Shapes) -> bool:
    """True for the older transposed layout; the current one wins when both fit (square, r == in)."""
    a1, a2, b1, b2 = (shapes[s] for s in FACTORS)
    current = b2[0] == b1[1] == a1[1] == a2[0]
    old = b2[1] == b1[0] == a1[0] == a2[1]
    return old and not current


def describe(name: str, shapes: Shapes, scalars: Scalars) -> ModuleInfo:
    """Return layout, rank, scale and ΔW shape; raise when the four factors do not fit together."""
    reject_foreign(name, shapes, SUFFIXES, "glora")
    require(name, shapes, *FACTORS)
    for suffix in (*FACTORS, BM):
        if suffix in shapes:
            expect_ndim(name, suffix, shapes[suffix], 2, 3, 4, 5)
    a1, a2, b1, b2 = (shapes[s] for s in FACTORS)
    listed = ", ".join(f"{s} {list(shapes[s])}" for s in FACTORS)
    if is_old_layout(shapes):
        if BM in shapes:
            raise fail(name, f"{BM} is not valid with the old glora layout")
        rank = a1[0]
        # a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r): ΔW = s·(b2 b1 + W a2 a1)
        if a1[1] != a2[0] or any(k != 1 for k in (*a1[2:], *a2[2:], *b2[2:])):
            raise fail(name, f"old-layout glora factors do not fit together: {listed}")
        kernel, delta_shape, variant = None, (b2[0], b1[1]), "old-layout"
    else:
        rank = a2[0]
        if not (b2[0] == b1[1] == a1[1] == a2[0]):
            raise fail(name, f"glora factors do not share one rank: {listed}")
        # a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in, kh, kw)
        if a1[0] != a2[1] or b2[1] != a1[0] or any(k != 1 for k in (*a1[2:], *a2[2:], *b1[2:])):
            raise fail(name, f"glora factors do not fit together: {listed}")
        kernel = tuple(b2[2:])
        if BM in shapes:
            bm = shapes[BM]
            if tuple(bm[:2]) != (rank, rank) or any(k != 1 for k in b2[2:]):
                raise fail(name, f"{BM} {list(bm)} does not chain with {B2} {list(b2)}")
            kernel = tuple(bm[2:])
        delta_shape, variant = (b1[0], a1[0], *kernel), None
    alpha, scale = scale_from_scalars(shapes, scalars, rank)
    return ModuleInfo(
        name=name, algo="glora", suffixes=tuple(sorted(shapes)), rank=rank, alpha=alpha, scale=scale,
        kernel=kernel, tucker=BM in shapes, delta_shape=delta_shape, variant=variant, needs_weight=True,
    )


def delta(module: NetworkModule, target_shape: Sequence[int], weight: torch.Tensor) -> torch.Tensor:
    """Return ΔW = s · (B + W·A) for the base weight `weight` (the weight before this network)."""
    a1, a2, b1, b2 = (module[s] for s in FACTORS)
    shapes = module.shapes()
    if is_old_layout(shapes):
        scale = module_scale(module, a1.shape[0])
        low_rank = flat2(b2) @ flat2(b1)
        mixed = flat2(weight) @ flat2(a2) @ flat2(a1)
        return fit_to(module.name, (low_rank + mixed) * scale, target_shape)
    scale = module_scale(module, a2.shape[0])
    bm = module.get(BM)
    if bm is None:
        low_rank = fit_to(module.name, flat2(b1) @ flat2(b2), target_shape)
    else:
        low_rank = fit_to(module.name, tucker(bm, flat2(b1).T, flat2(b2)), target_shape)
    a1, a2 = flat2(a1), flat2(a2)  # (in, r), (r, in)
    if weight.dim() < 2 or weight.shape[1] != a1.shape[0]:
        raise fail(module.name, f"glora mixes {a1.shape[0]} input channels, target weight is {list(weight.shape)}")
    # W·A contracts the input axis; through the rank (W a1) a2 costs O(out·in·r), not O(out·in²)
    mixed = torch.einsum("or...,rc->oc...", torch.einsum("oi...,ir->or...", weight, a1), a2)
    return (low_rank + mixed) * scale
