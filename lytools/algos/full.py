"""Full: the whole weight difference `diff` and optional bias difference `diff_b` (spec: ALGORITHMS.md 5)."""

from __future__ import annotations

from typing import Sequence

import torch

from lytools.algos.common import ModuleInfo, NetworkModule, Scalars, Shapes, fail, fit_to, reject_foreign, require

SUFFIXES = ("diff", "diff_b")


def detect(shapes: Shapes) -> bool:
    return "diff" in shapes or "diff_b" in shapes


def describe(name: str, shapes: Shapes, scalars: Scalars) -> ModuleInfo:
    """Return the ΔW shape; raise when `diff_b` does not match the output size."""
    reject_foreign(name, shapes, SUFFIXES, "full")
    require(name, shapes, "diff")
    diff = tuple(shapes["diff"])
    if not diff:
        raise fail(name, "diff is a scalar, expected a weight-shaped tensor")
    if "diff_b" in shapes and tuple(shapes["diff_b"]) != diff[:1]:
        raise fail(name, f"diff_b {list(shapes['diff_b'])} does not match diff {list(diff)}")
    return ModuleInfo(
        name=name, algo="full", suffixes=tuple(sorted(shapes)), kernel=diff[2:],
        delta_shape=diff, bias_delta="diff_b" in shapes,
    )


def delta(module: NetworkModule, target_shape: Sequence[int]) -> torch.Tensor:
    """Return ΔW = diff."""
    return fit_to(module.name, module["diff"], target_shape)


def bias_delta(module: NetworkModule) -> torch.Tensor | None:
    """Return ΔB = diff_b, or None."""
    return module.get("diff_b")
