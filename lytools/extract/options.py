"""Turn the `lytools extract` command-line values into ExtractOptions, refusing combinations that
would otherwise be silently ignored (a ratio given with --mode fixed, --sparsity without
--sparse-bias, ...)."""

from __future__ import annotations

from pathlib import Path

import torch

from lytools.errors import UsageError
from lytools.extract.factor import FactorOptions
from lytools.extract.pipeline import ExtractOptions
from lytools.extract.ranks import RankRule

DEFAULT_DIM = 32
DEFAULT_SPARSITY = 0.98


class ExtractUsageError(UsageError):
    """Options that contradict each other (exit 2, like any usage error)."""


def _pair(mode: str, option: str, linear: float | None, conv: float | None) -> tuple[float, float]:
    if linear is None and conv is None:
        raise ExtractUsageError(f"--mode {mode} needs --linear-{option} and/or --conv-{option}")
    linear = conv if linear is None else linear
    conv = linear if conv is None else conv
    return float(linear), float(conv)


def _apply(names: list[str]) -> str:
    return ", ".join(names) + (" applies" if len(names) == 1 else " apply")


def build_options(
    *,
    mode: str = "fixed",
    linear_dim: int | None = None,
    conv_dim: int | None = None,
    linear_threshold: float | None = None,
    conv_threshold: float | None = None,
    linear_ratio: float | None = None,
    conv_ratio: float | None = None,
    linear_quantile: float | None = None,
    conv_quantile: float | None = None,
    max_rank: int | None = None,
    min_diff: float = 0.0,
    unet: bool = True,
    text_encoder: bool = True,
    clamp_quantile: float | None = None,
    tucker: bool = False,
    sparse_bias: bool = False,
    sparsity: float | None = None,
    full_fallback: bool = True,
    arch: str = "auto",
    device: str = "auto",
    save_dtype: torch.dtype = torch.float16,
    verify: bool = False,
    overwrite: bool = False,
    report: Path | None = None,
) -> ExtractOptions:
    """Return ExtractOptions for the CLI values; ExtractUsageError for contradictory ones."""
    given = {
        "threshold": (linear_threshold, conv_threshold),
        "ratio": (linear_ratio, conv_ratio),
        "quantile": (linear_quantile, conv_quantile),
    }
    for other, values in given.items():
        if other != mode and any(v is not None for v in values):
            raise ExtractUsageError(f"--linear-{other}/--conv-{other} apply to --mode {other}, not --mode {mode}")
    if mode != "fixed" and linear_dim is not None:
        cap = "--mode full stores whole differences" if mode == "full" else f"use --max-rank to cap --mode {mode}"
        raise ExtractUsageError(f"--linear-dim applies to --mode fixed ({cap})")
    if mode == "full":
        shaping = [name for name, on in (("--tucker", tucker), ("--clamp-quantile", clamp_quantile is not None),
                                         ("--sparse-bias", sparse_bias), ("--no-full-fallback", not full_fallback)) if on]
        if shaping:
            raise ExtractUsageError(f"{', '.join(shaping)}: shape{'s' if len(shaping) == 1 else ''} low-rank factors; "
                                    "--mode full stores whole differences")
    if mode != "fixed" and conv_dim not in (None, 0):
        raise ExtractUsageError("--conv-dim applies to --mode fixed; with other modes only --conv-dim 0 (skip kxk convs) is accepted")
    if max_rank is not None and mode in ("fixed", "full"):
        raise ExtractUsageError(f"--max-rank caps the dynamic modes (threshold, ratio, quantile), not --mode {mode}")
    if sparsity is not None and not sparse_bias:
        raise ExtractUsageError("--sparsity applies with --sparse-bias")
    if not unet and not text_encoder:
        raise ExtractUsageError("--no-unet and --no-text-encoder together leave nothing to extract")
    # kxk convs exist only in the UNet (text encoders and transformers have none): the conv options
    # would change nothing without it, or once --conv-dim 0 skips those convs (--conv-dim 0 itself asks for
    # what --no-unet gives, so it goes with it)
    conv_given = [name for name, on in (("--conv-dim", conv_dim not in (None, 0)), ("--tucker", tucker),
                                        *((f"--conv-{other}", values[1] is not None) for other, values in given.items()))
                  if on]
    if not unet and conv_given:
        raise ExtractUsageError(f"{_apply(conv_given)} to kxk convs, and --no-unet leaves none (text encoders have no "
                                "kxk convs)")
    shaping_convs = [name for name in conv_given if name != "--conv-dim"]
    if conv_dim == 0 and shaping_convs:
        raise ExtractUsageError(f"{_apply(shaping_convs)} to kxk convs, which --conv-dim 0 skips")
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise ExtractUsageError(f"--clamp-quantile {clamp_quantile}: expected a value in (0, 1]")
    if sparsity is not None and not 0 < sparsity < 1:
        raise ExtractUsageError(f"--sparsity {sparsity}: expected a value in (0, 1)")
    if min_diff < 0:
        raise ExtractUsageError(f"--min-diff {min_diff}: expected a value >= 0")
    try:
        if mode == "fixed":
            linear_value = DEFAULT_DIM if linear_dim is None else linear_dim
            conv_value = DEFAULT_DIM if conv_dim is None else conv_dim
            linear = RankRule("fixed", linear_value)
            conv = RankRule("fixed", conv_value)
        elif mode == "full":
            linear = RankRule("full")
            conv = RankRule("fixed", 0) if conv_dim == 0 else RankRule("full")
        else:
            linear_value, conv_value = _pair(mode, mode, *given[mode])
            linear = RankRule(mode, linear_value, max_rank)
            conv = RankRule("fixed", 0) if conv_dim == 0 else RankRule(mode, conv_value, max_rank)
    except ValueError as exc:
        raise ExtractUsageError(f"--mode {mode}: {exc}") from None
    if linear.skips and conv.skips:
        raise ExtractUsageError("--linear-dim 0 and --conv-dim 0 together leave nothing to extract")
    factor = FactorOptions(
        save_dtype=save_dtype, tucker=tucker, clamp_quantile=clamp_quantile, sparse_bias=sparse_bias,
        sparsity=DEFAULT_SPARSITY if sparsity is None else sparsity, full_fallback=full_fallback,
    )
    return ExtractOptions(
        linear=linear, conv=conv, factor=factor, min_diff=min_diff, unet=unet, text_encoder=text_encoder,
        arch=arch, device=device, verify=verify, overwrite=overwrite, report=report,
    )
