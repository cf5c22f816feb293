"""LoKr: the Kronecker product of two halves, each whole or low-rank, Tucker second half included
(spec: ALGORITHMS.md 4)."""

from __future__ import annotations

from typing import Sequence

import torch

from lytools.algos.common import (
    ALPHA, DORA_SCALE, ModuleInfo, NetworkModule, Scalars, Shapes, expect_ndim, fail, fit_to,
    module_scale, reject_foreign, scale_from_scalars, tucker,
)

W1, W1A, W1B = "lokr_w1", "lokr_w1_a", "lokr_w1_b"
W2, W2A, W2B, T2 = "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"
SUFFIXES = (W1, W1A, W1B, W2, W2A, W2B, T2, ALPHA, DORA_SCALE)


def detect(shapes: Shapes) -> bool:
    return any(suffix in shapes for suffix in (W1, W1A, W1B, W2, W2A, W2B, T2))


def _first_half(name: str, shapes: Shapes) -> tuple[tuple[int, int], int | None]:
    """Return ((a, c), rank or None when stored whole)."""
    factored = W1A in shapes or W1B in shapes
    if W1 in shapes and factored:
        raise fail(name, f"holds both {W1} and {W1A}/{W1B}")
    if W1 in shapes:
        w1 = shapes[W1]
        expect_ndim(name, W1, w1, 2)
        return (w1[0], w1[1]), None
    if not (W1A in shapes and W1B in shapes):
        have = [s for s in (W1A, W1B) if s in shapes]
        raise fail(name, f"lokr first half missing: needs {W1} or {W1A} + {W1B} (has {', '.join(have) or 'neither'})")
    w1a, w1b = shapes[W1A], shapes[W1B]
    expect_ndim(name, W1A, w1a, 2)
    expect_ndim(name, W1B, w1b, 2)
    if w1a[1] != w1b[0]:
        raise fail(name, f"{W1A} {list(w1a)} does not chain with {W1B} {list(w1b)}")
    return (w1a[0], w1b[1]), w1b[0]


def _second_half(name: str, shapes: Shapes) -> tuple[tuple[int, ...], tuple[int, ...] | None, int | None]:
    """Return (w2 shape as rebuilt, kernel or None when unknown, rank or None when stored whole)."""
    factored = any(s in shapes for s in (W2A, W2B, T2))
    if W2 in shapes and factored:
        raise fail(name, f"holds both {W2} and {W2A}/{W2B}")
    if W2 in shapes:
        w2 = shapes[W2]
        expect_ndim(name, W2, w2, 2, 3, 4, 5)
        return tuple(w2), tuple(w2[2:]), None
    if not (W2A in shapes and W2B in shapes):
        have = [s for s in (W2A, W2B, T2) if s in shapes]
        raise fail(name, f"lokr second half missing: needs {W2} or {W2A} + {W2B} (has {', '.join(have) or 'neither'})")
    w2a, w2b = shapes[W2A], shapes[W2B]
    expect_ndim(name, W2A, w2a, 2)
    expect_ndim(name, W2B, w2b, 2)
    if T2 in shapes:
        # Tucker: t2 (r, r, kh, kw), w2_a (r, b), w2_b (r, d)
        t2 = shapes[T2]
        expect_ndim(name, T2, t2, 3, 4, 5)
        if (w2a[0], w2b[0]) != tuple(t2[:2]):
            raise fail(name, f"{W2A} {list(w2a)} / {W2B} {list(w2b)} do not chain with {T2} {list(t2)}")
        return (w2a[1], w2b[1], *t2[2:]), tuple(t2[2:]), w2b[0]
    if w2a[1] != w2b[0]:
        raise fail(name, f"{W2A} {list(w2a)} does not chain with {W2B} {list(w2b)}")
    return (w2a[0], w2b[1]), None, w2b[0]  # a conv stores w2_b flattened (r, d·K)


def describe(name: str, shapes: Shapes, scalars: Scalars) -> ModuleInfo:
    """Return factor sizes, rank and scale (alpha ignored when both halves are whole)."""
    reject_foreign(name, shapes, SUFFIXES, "lokr")
    (a, c), rank1 = _first_half(name, shapes)
    w2, kernel, rank2 = _second_half(name, shapes)
    if rank1 is not None and rank2 is not None and rank1 != rank2:
        raise fail(name, f"{W1B} rank {rank1} and {W2B} rank {rank2} differ")
    rank = rank1 if rank1 is not None else rank2
    if rank is None:
        alpha, scale = scalars.get(ALPHA), 1.0  # both halves whole: alpha carries no meaning
    else:
        alpha, scale = scale_from_scalars(shapes, scalars, rank)
    return ModuleInfo(
        name=name, algo="lokr", suffixes=tuple(sorted(shapes)), rank=rank, alpha=alpha, scale=scale,
        kernel=kernel, tucker=T2 in shapes, delta_shape=(a * w2[0], c * w2[1], *w2[2:]),
        lokr_w1=(a, c), lokr_full=(rank1 is None, rank2 is None),
    )


def delta(module: NetworkModule, target_shape: Sequence[int]) -> torch.Tensor:
    """Return ΔW = s · kron(w1, w2) reshaped to the target, s applied once."""
    w1 = module[W1] if W1 in module else module[W1A] @ module[W1B]
    if W2 in module:
        w2 = module[W2]
    elif T2 in module:
        w2 = tucker(module[T2], module[W2A], module[W2B])
    else:
        w2 = module[W2A] @ module[W2B]
    if W1 in module and W2 in module:
        scale = 1.0
    else:
        scale = module_scale(module, module[W1B].shape[0] if W1B in module else module[W2B].shape[0])
    return fit_to(module.name, kron(w1 * scale, w2), target_shape)


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Return the Kronecker product of a 2-D `w1` (a, c) and `w2` (b, d, …): (a·b, c·d, …)."""
    a, c = w1.shape
    b, d, *kernel = w2.shape
    spatial = [1] * len(kernel)
    product = w1.reshape(a, 1, c, 1, *spatial) * w2.reshape(1, b, 1, d, *kernel)
    return product.reshape(a * b, c * d, *kernel)
