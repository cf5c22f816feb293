"""Rank selection for extraction (ALGORITHMS.md §15, as LyCORIS's extractor defines it).

| mode      | parameter | rank r                                                   |
| fixed     | dim       | r = dim                                                  |
| threshold | t ≥ 0     | r = #{i : σ_i > t}                  (strict)             |
| ratio     | 0 ≤ q ≤ 1 | r = #{i : σ_i > q·σ_1}              (strict)             |
| quantile  | 0 ≤ q ≤ 1 | r = #{i : σ_1+…+σ_i < q·Σσ}         (σ, not σ²; strict)   |
| full      | –         | the whole difference is stored (`diff`)                  |

Then in this order: r = max(1, r); r = min(r, out, in·k·k); r = min(r, max_rank) when given.
A low-rank pair with r ≥ out/2 is no smaller than the difference itself: LyCORIS stores such a
module whole (kxk convs with a Tucker core excepted); `stores_full` says when.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MODES = ("fixed", "threshold", "ratio", "quantile", "full")
DYNAMIC_MODES = ("threshold", "ratio", "quantile")


@dataclass(frozen=True)
class RankRule:
    """How one class of modules (linear or kxk conv) picks its rank."""

    mode: str
    value: float = 0.0  # dim (fixed), t (threshold), q (ratio, quantile); unused for full
    max_rank: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"rank mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "fixed" and (self.value < 0 or self.value != int(self.value)):
            raise ValueError(f"fixed rank must be a whole number >= 0, not {self.value}")
        if self.mode == "threshold" and self.value < 0:
            raise ValueError(f"threshold must be >= 0, not {self.value}")
        if self.mode in ("ratio", "quantile") and not 0 <= self.value <= 1:
            raise ValueError(f"{self.mode} must be within [0, 1], not {self.value}")
        if self.max_rank is not None and self.max_rank < 1:
            raise ValueError(f"max rank must be >= 1, not {self.max_rank}")

    @property
    def needs_spectrum(self) -> bool:
        """True when the rank depends on the singular values (threshold, ratio, quantile)."""
        return self.mode in DYNAMIC_MODES

    @property
    def skips(self) -> bool:
        """True for `fixed` with dim 0: the class of modules is not extracted (e.g. --conv-dim 0)."""
        return self.mode == "fixed" and int(self.value) == 0

    def describe(self) -> str:
        if self.mode == "full":
            return "full"
        text = f"{self.mode} {int(self.value) if self.mode == 'fixed' else self.value:g}"
        return text + (f" (max rank {self.max_rank})" if self.max_rank and self.mode != "fixed" else "")


def raw_rank(sigma: torch.Tensor | None, rule: RankRule) -> int:
    """Return the rank the mode's own rule gives, before clamping (σ descending, any float dtype)."""
    if rule.mode == "fixed":
        return int(rule.value)
    if sigma is None:
        raise ValueError(f"{rule.mode} mode needs the singular values")
    sigma = sigma.double()
    if rule.mode == "threshold":
        return int((sigma > rule.value).sum())
    if rule.mode == "ratio":
        top = float(sigma[0]) if sigma.numel() else 0.0
        return int((sigma > rule.value * top).sum())
    if rule.mode == "quantile":
        cumulative = torch.cumsum(sigma, dim=0)
        return int((cumulative < rule.value * float(sigma.sum())).sum())
    raise ValueError(f"mode {rule.mode!r} has no rank")


def select_rank(sigma: torch.Tensor | None, rule: RankRule, out_features: int, flat_in: int) -> int:
    """Return the rank for one module: the mode's rank, then max(1, ·), min(out, in·k·k), max_rank."""
    rank = max(1, raw_rank(sigma, rule))
    rank = min(rank, out_features, flat_in)
    if rule.max_rank is not None:
        rank = min(rank, rule.max_rank)
    return rank


def stores_full(rank: int, out_features: int, kxk_conv: bool, tucker: bool) -> bool:
    """True when LyCORIS would store the module whole: r ≥ out/2 (not for Tucker kxk convs)."""
    if kxk_conv and tucker:
        return False
    return rank >= out_features / 2
