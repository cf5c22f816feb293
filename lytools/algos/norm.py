"""Norm layers: additive changes `w_norm` / `b_norm` of a LayerNorm or GroupNorm (spec: ALGORITHMS.md 11)."""

from __future__ import annotations

from typing import Sequence

import torch

from lytools.algos.common import ModuleInfo, NetworkModule, Scalars, Shapes, fail, fit_to, reject_foreign, require

SUFFIXES = ("w_norm", "b_norm")


def detect(shapes: Shapes) -> bool:
    return "w_norm" in shapes or "b_norm" in shapes


def describe(name: str, shapes: Shapes, scalars: Scalars) -> ModuleInfo:
    """Return the norm weight shape; raise when `b_norm` does not match it."""
    reject_foreign(name, shapes, SUFFIXES, "norm")
    require(name, shapes, "w_norm")
    weight = tuple(shapes["w_norm"])
    if "b_norm" in shapes and tuple(shapes["b_norm"]) != weight:
        raise fail(name, f"b_norm {list(shapes['b_norm'])} does not match w_norm {list(weight)}")
    return ModuleInfo(
        name=name, algo="norm", suffixes=tuple(sorted(shapes)), delta_shape=weight,
        bias_delta="b_norm" in shapes,
    )


def delta(module: NetworkModule, target_shape: Sequence[int]) -> torch.Tensor:
    """Return ΔW = w_norm."""
    return fit_to(module.name, module["w_norm"], target_shape)


def bias_delta(module: NetworkModule) -> torch.Tensor | None:
    """Return ΔB = b_norm, or None."""
    return module.get("b_norm")
