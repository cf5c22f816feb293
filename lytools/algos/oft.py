"""Diagonal OFT: block-diagonal Cayley rotations of the output channels, and the legacy
`oft_diag` form that stores the rotation blocks themselves (spec: ALGORITHMS.md 9)."""

from __future__ import annotations

import torch

from lytools.algos.common import (
    ALPHA, DORA_SCALE, ModuleInfo, NetworkModule, Scalars, Shapes, cayley, expect_ndim, fail,
    read_scalar, reject_foreign, toward_identity,
)

SUFFIXES = ("oft_blocks", "oft_diag", "rescale", ALPHA, DORA_SCALE)


def detect(shapes: Shapes) -> bool:
    return "oft_diag" in shapes or ("oft_blocks" in shapes and len(shapes["oft_blocks"]) != 4)


def check_rescale(name: str, shapes: Shapes, out: int) -> None:
    """Raise unless `rescale` (when present) is (out, 1, ...)."""
    rescale = shapes.get("rescale")
    if rescale is not None and (not rescale or rescale[0] != out or any(k != 1 for k in rescale[1:])):
        raise fail(name, f"rescale {list(rescale)} does not match {out} output channels")


def describe(name: str, shapes: Shapes, scalars: Scalars) -> ModuleInfo:
    """Return block count and size, and the constraint coefficient (stored alpha)."""
    reject_foreign(name, shapes, SUFFIXES, "oft")
    legacy = "oft_diag" in shapes
    key = "oft_diag" if legacy else "oft_blocks"
    if legacy and "oft_blocks" in shapes:
        raise fail(name, "holds both oft_blocks and oft_diag")
    blocks = tuple(shapes[key])
    expect_ndim(name, key, blocks, 3)
    if blocks[1] != blocks[2]:
        raise fail(name, f"{key} {list(blocks)} blocks are not square")
    check_rescale(name, shapes, blocks[0] * blocks[1])
    constraint = None if legacy else (scalars.get(ALPHA) if ALPHA in shapes else 0.0)
    return ModuleInfo(
        name=name, algo="oft", suffixes=tuple(sorted(shapes)), blocks=blocks[:2], constraint=constraint,
        variant="legacy" if legacy else None, additive=False, needs_weight=True,
    )


def constraint_radius(module: NetworkModule, out: int) -> float:
    """Return c = alpha · out (LyCORIS's radius; 0 = unconstrained)."""
    alpha = module.get(ALPHA)
    return 0.0 if alpha is None else read_scalar(module.name, ALPHA, alpha) * out


def rescaled(module: NetworkModule, weight: torch.Tensor) -> torch.Tensor:
    """Return rescale · W (row scale) when the module has `rescale`, else W."""
    rescale = module.get("rescale")
    return weight if rescale is None else weight * rescale.reshape(-1, *([1] * (weight.dim() - 1)))


def merge(module: NetworkModule, weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """Return W' with W'[k, j] = Σ_i R_k[i, j] W[k, i] per block (R transposed), then rescaled."""
    legacy = "oft_diag" in module
    blocks = module["oft_diag" if legacy else "oft_blocks"]
    count, size = blocks.shape[0], blocks.shape[1]
    if weight.shape[0] != count * size:
        raise fail(module.name, f"oft has {count}x{size} output channels, target weight is {list(weight.shape)}")
    rotation = blocks if legacy else cayley(blocks, constraint_radius(module, weight.shape[0]))
    rotation = toward_identity(rotation, ratio)
    # W'[k, j] = Σ_i R_k[i, j] W[k, i]: each block's rows multiplied by R_kᵀ
    rotated = torch.matmul(rotation.transpose(-1, -2), weight.reshape(count, size, -1))
    return rescaled(module, rotated.reshape(weight.shape))
