"""Which rank a module keeps, by the rules of kohya's resize tool (spec: ALGORITHMS.md 16).

The `+1` in both the index and the rank is kohya's convention; lytools keeps it, as the spec
says, so that the same parameters pick the same ranks as the sd-scripts most files were resized
with. (sd-scripts' PR #2194, merged in 2026, dropped it: current versions keep one or two values
fewer for the same parameter.) `sigma` may be only the non-zero part of the spectrum (the
r_old values of a low-rank core): `full_length` is the length kohya's dense SVD would have,
min(out, in·k·k), and the missing values count as zeros.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")
DYNAMIC_METHODS = METHODS[1:]
# below this largest singular value a module is treated as zero and kept at rank 1 (kohya: MIN_SV)
MIN_SINGULAR_VALUE = 1e-6


@dataclass(frozen=True)
class RankChoice:
    """The rank a rule picks and the figures reported for it."""

    rank: int  # the rank kohya's rule gives (may exceed the number of non-zero singular values)
    sum_kept: float | None  # share of Σσ kept by the first `rank` values (None: unknown, the spectrum is partial)
    fro_kept: float  # share of ‖·‖_F kept: sqrt(Σ_{i≤r} σ_i²) / sqrt(Σσ²)
    max_ratio: float  # σ_1 / σ_r (inf when σ_r is zero)
    zero: bool  # σ_1 below MIN_SINGULAR_VALUE: treated as a zero matrix


def _clamp_index(index: int, full_length: int) -> int:
    return max(1, min(index, full_length - 1))


def _count_below(cumulative: torch.Tensor, target: float, full_length: int) -> int:
    """Return searchsorted(c, target) on the zero-padded spectrum's cumulative shares."""
    # the padded zeros keep c at its last value, so a target above it lands past every entry
    index = int(torch.searchsorted(cumulative, torch.tensor([target], dtype=cumulative.dtype))[0])
    return full_length if index >= cumulative.numel() else index


def rule_rank(sigma: torch.Tensor, full_length: int, method: str, param: float | None, new_rank: int | None) -> int:
    """Return kohya's new rank for descending singular values `sigma` (before the zero check)."""
    if method == "fixed":
        if new_rank is None:
            raise ValueError("fixed method needs a rank")
        return new_rank
    if param is None:
        raise ValueError(f"{method} needs a parameter")
    values = sigma.to(torch.float64)
    if method == "sv_ratio":
        index = int((values > values[0] / param).sum())
    elif method == "sv_cumulative":
        cumulative = torch.cumsum(values, 0) / values.sum()
        index = _count_below(cumulative, param, full_length) + 1
    elif method == "sv_fro":
        squared = values.square()
        cumulative = torch.cumsum(squared, 0) / squared.sum()
        index = _count_below(cumulative, param * param, full_length) + 1
    else:
        raise ValueError(f"unknown method {method!r}")
    return _clamp_index(index, full_length) + 1


def select_rank(
    sigma: torch.Tensor, full_length: int, method: str = "fixed", param: float | None = None, new_rank: int | None = None
) -> RankChoice:
    """Return the rank kohya's resize picks for `sigma`, and the shares it keeps.

    `new_rank` is the rank of the fixed method and the cap of the dynamic ones (None: no cap).
    """
    values = sigma.detach().to("cpu", torch.float64).flatten()
    if values.numel() == 0:
        raise ValueError("no singular values")
    largest = float(values[0])
    zero = largest < MIN_SINGULAR_VALUE
    if zero:
        rank = 1
    else:
        rank = rule_rank(values, full_length, method, param, new_rank)
        if new_rank is not None:
            rank = min(rank, new_rank)
    kept = values[:rank]
    total = float(values.sum())
    total_sq = float(values.square().sum())
    sum_kept = float(kept.sum()) / total if total > 0 else 1.0
    fro_kept = math.sqrt(float(kept.square().sum()) / total_sq) if total_sq > 0 else 1.0
    smallest = float(values[rank - 1]) if rank <= values.numel() else 0.0
    max_ratio = largest / smallest if smallest > 0 else math.inf
    return RankChoice(rank=rank, sum_kept=sum_kept, fro_kept=fro_kept, max_ratio=max_ratio, zero=zero)
