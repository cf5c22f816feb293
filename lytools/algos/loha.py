"""LoHa: the Hadamard product of two low-rank products, Tucker form included (spec: ALGORITHMS.md 3)."""

from __future__ import annotations

from typing import Sequence

import torch

from lytools.algos.common import (
    ALPHA, DORA_SCALE, ModuleInfo, NetworkModule, Scalars, Shapes, expect_ndim, fail, fit_to,
    module_scale, reject_foreign, require, scale_from_scalars, tucker,
)

FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
CORES = ("hada_t1", "hada_t2")
SUFFIXES = (*FACTORS, *CORES, ALPHA, DORA_SCALE)


def detect(shapes: Shapes) -> bool:
    return any(suffix in shapes for suffix in (*FACTORS, *CORES))


def describe(name: str, shapes: Shapes, scalars: Scalars) -> ModuleInfo:
    """Return rank, scale and ΔW shape; raise on missing halves or factors that do not chain."""
    reject_foreign(name, shapes, SUFFIXES, "loha")
    require(name, shapes, *FACTORS)
    for suffix in FACTORS:
        expect_ndim(name, suffix, shapes[suffix], 2)
    tucker = any(core in shapes for core in CORES)
    if tucker:
        require(name, shapes, *CORES)
    w1a, w1b, w2a, w2b = (shapes[s] for s in FACTORS)
    rank = w1b[0]
    if tucker:
        t1, t2 = shapes["hada_t1"], shapes["hada_t2"]
        expect_ndim(name, "hada_t1", t1, 3, 4, 5)
        if t2 != t1:
            raise fail(name, f"hada_t1 {list(t1)} and hada_t2 {list(t2)} differ")
        # Tucker layout: w_a is (r, out), w_b is (r, in), t is (r, r, kh, kw)
        for wa, wb, half in ((w1a, w1b, 1), (w2a, w2b, 2)):
            if (wa[0], wb[0]) != tuple(t1[:2]):
                raise fail(name, f"hada_w{half}_a {list(wa)} / hada_w{half}_b {list(wb)} do not chain with hada_t{half} {list(t1)}")
        if w1a[1] != w2a[1] or w1b[1] != w2b[1]:
            raise fail(name, "the two Hadamard halves have different shapes")
        kernel = tuple(t1[2:])
        delta_shape = (w1a[1], w1b[1], *kernel)
    else:
        for wa, wb, half in ((w1a, w1b, 1), (w2a, w2b, 2)):
            if wa[1] != wb[0]:
                raise fail(name, f"hada_w{half}_a {list(wa)} does not chain with hada_w{half}_b {list(wb)}")
        if w1a[0] != w2a[0] or w1b[1] != w2b[1]:
            raise fail(name, f"the two Hadamard halves have different shapes ({w1a[0]}x{w1b[1]} vs {w2a[0]}x{w2b[1]})")
        kernel = None  # conv factors are stored flattened (out, in·K)
        delta_shape = (w1a[0], w1b[1])
    alpha, scale = scale_from_scalars(shapes, scalars, rank)
    return ModuleInfo(
        name=name, algo="loha", suffixes=tuple(sorted(shapes)), rank=rank, alpha=alpha, scale=scale,
        kernel=kernel, tucker=tucker, delta_shape=delta_shape,
    )


def delta(module: NetworkModule, target_shape: Sequence[int]) -> torch.Tensor:
    """Return ΔW = s · (w1_a w1_b) ⊙ (w2_a w2_b), s applied once (the forward path's convention)."""
    w1a, w1b, w2a, w2b = (module[s] for s in FACTORS)
    scale = module_scale(module, w1b.shape[0])
    w1a = w1a * scale  # the scale enters once, on the smallest factor
    if "hada_t1" in module:
        first = tucker(module["hada_t1"], w1a, w1b)
        second = tucker(module["hada_t2"], w2a, w2b)
    else:
        first, second = w1a @ w1b, w2a @ w2b
    return fit_to(module.name, first.mul_(second), target_shape)
