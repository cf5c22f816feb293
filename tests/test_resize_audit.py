"""Audit of `lytools resize` as a kohya/LyCORIS user tests it: the dynamic rank rules of current
sd-scripts, figures reported against an independent torch.linalg.svd, metadata that tells the
truth about the written ranks, degenerate modules, flattened conv kernels (spec: ALGORITHMS.md 16,
CLI.md resize, FORMATS.md 5.3)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lytools.io import open_file, write_safetensors
from lytools.resize import ResizeOptions, resize_file, select_rank
from tests.shared import run_lytools


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with open_file(path) as reader:
        return {key: reader.get(key).clone() for key in reader.keys()}, dict(reader.metadata)


def factors_with_spectrum(out: int, inp: int, sigma: list[float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return float32 (up, down) whose product has exactly the singular values `sigma` (not already an SVD)."""
    gen = torch.Generator().manual_seed(seed)
    rank = len(sigma)
    q_out, _ = torch.linalg.qr(torch.randn(out, rank, generator=gen, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(inp, rank, generator=gen, dtype=torch.float64))
    mix = torch.randn(rank, rank, generator=gen, dtype=torch.float64) + 3 * torch.eye(rank, dtype=torch.float64)
    up = q_out @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ mix
    down = torch.linalg.solve(mix, q_in.T)
    return up.float(), down.float()


def module_change(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Return s · up @ down flattened to (out, in·K), float64, Tucker cores contracted, from the raw tensors."""
    up = tensors[f"{name}.lora_up.weight"].double()
    down = tensors[f"{name}.lora_down.weight"].double()
    rank = down.shape[0]
    alpha = tensors.get(f"{name}.alpha")
    scale = 1.0 if alpha is None or float(alpha) == 0 else float(alpha) / rank
    if f"{name}.lora_mid.weight" in tensors:
        mid = tensors[f"{name}.lora_mid.weight"].double()
        down = torch.einsum("ijhw,jc->ichw", mid, down.reshape(rank, -1))
    return scale * up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)


# -- rank rules: current sd-scripts (networks/resize_lora.py after PR #2194) ---------------------------------------
@pytest.mark.parametrize("method,param,expected", [
    # σ = 8, 4, 2, 1: Σσ = 15, Σσ² = 85
    ("sv_ratio", 3.0, 2),        # kept: σ > 8/3 -> 8, 4
    ("sv_ratio", 8.0, 3),        # σ > 1 (strict) -> 8, 4, 2
    ("sv_ratio", 1.0, 1),        # σ > 8: none -> clamped to 1
    ("sv_cumulative", 0.79, 2),  # shares 8/15 = 0.53, 12/15 = 0.8: two values reach 0.79
    ("sv_cumulative", 0.81, 3),
    ("sv_fro", 0.8, 1),          # 64/85 = 0.753 >= 0.64
    ("sv_fro", 0.9, 2),          # 80/85 = 0.941 >= 0.81
    ("sv_fro", 0.99, 3),         # 84/85 = 0.988 >= 0.9801
])
def test_dynamic_rules_keep_the_smallest_prefix(method, param, expected):
    sigma = torch.tensor([8.0, 4.0, 2.0, 1.0])
    assert select_rank(sigma, 16, method, param, None).rank == expected
    # the cap (--rank / --max-rank) applies after the rule
    assert select_rank(sigma, 16, method, param, 1).rank == 1


def test_sv_fro_rank_keeps_at_least_the_asked_frobenius_share(tmp_path):
    """sv_fro t writes the smallest rank whose kept share of ‖ΔW‖_F reaches t, checked on the written file."""
    sigma = [1.0, 0.7, 0.45, 0.3, 0.2, 0.12, 0.08, 0.05]
    up, down = factors_with_spectrum(40, 56, sigma, seed=3)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "n.safetensors"
    write_safetensors(path, {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(4.0)})
    values = torch.tensor(sigma, dtype=torch.float64)
    shares = (values.square().cumsum(0) / values.square().sum()).sqrt()
    for target in (0.8, 0.9, 0.95, 0.99):
        out = tmp_path / f"o{target}.safetensors"
        summary = resize_file(path, out, ResizeOptions(method="sv_fro", method_param=target))
        rank = read_all(out)[0][f"{name}.lora_down.weight"].shape[0]
        smallest = int((shares < target).sum()) + 1
        assert rank == smallest, target
        assert summary.modules[0].fro_kept >= target
