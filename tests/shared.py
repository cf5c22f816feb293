"""Where the shared fixtures (../shared next to the checkout, or $LYTOOLS_SHARED) live."""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path | None:
    """Return ../shared (or $LYTOOLS_SHARED), None when neither exists."""
    env = os.environ.get("LYTOOLS_SHARED")
    if env:
        return Path(env)
    candidate = Path(__file__).resolve().parents[1].parent / "shared"
    return candidate if candidate.is_dir() else None


def read_tensors(path: str | os.PathLike) -> dict:
    """Return every tensor of a file, cloned out of its memory map."""
    from lytools.io import open_file

    with open_file(path) as handle:
        return {name: handle.get(name).clone() for name in handle.keys()}


def run_lytools(capsys, *args) -> tuple[int, str, str]:
    """Run `lytools ARGS` in this process; return (exit code, stdout, stderr)."""
    from lytools.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def spectrum_factors(out: int, inp: int, sigma: list[float], seed: int, dtype=None):
    """Return (up (out, r), down (r, inp)) whose product has exactly the singular values `sigma`
    (float32 unless `dtype`), mixed so the factors are not already its SVD."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    rank = len(sigma)
    q_out, _ = torch.linalg.qr(torch.randn(out, rank, generator=gen, dtype=torch.float64))
    q_in, _ = torch.linalg.qr(torch.randn(inp, rank, generator=gen, dtype=torch.float64))
    mix = torch.randn(rank, rank, generator=gen, dtype=torch.float64) + 3 * torch.eye(rank, dtype=torch.float64)
    up = q_out @ torch.diag(torch.tensor(sigma, dtype=torch.float64)) @ mix
    down = torch.linalg.solve(mix, q_in.T)
    return up.to(dtype or torch.float32), down.to(dtype or torch.float32)


def lycoris_modules(unet, tensors: dict) -> dict:
    """Load kohya `lora_unet_*` tensors into `unet` with LyCORIS's standalone loader; return its
    modules by kohya name. (That loader names modules `lycoris_<path>`; the kohya wrapper's
    constructor builds its default modules first, so the tensors are handed over under that prefix.)"""
    import warnings

    import lycoris

    weights = {"lycoris_" + key[len("lora_unet_"):]: value for key, value in tensors.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network, _ = lycoris.create_lycoris_from_weights(1.0, None, unet, weights_sd=weights)
    return {"lora_unet_" + module.lora_name[len("lycoris_"):]: module for module in network.loras}


SMALL_MODULES = ["lora_unet_down_blocks_1_attentions_0_proj_in", "lora_te_text_model_encoder_layers_0_mlp_fc1"]


def small_models(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(base, lora, tuned): a tiny SD1 checkpoint, a rank-4 LoRA of two modules (one UNet, one text encoder)
    and the base with that LoRA merged in, for tests of what commands do around their outputs."""
    from lytools.testing import build_checkpoint, build_network, build_tuned

    base = build_checkpoint(tmp_path / "base.safetensors", "sd1", factor=16)
    lora = build_network(tmp_path / "lora.safetensors", "sd1", factor=16, rank=4, modules=SMALL_MODULES)
    tuned = build_tuned(base, tmp_path / "tuned.safetensors", lora).path
    return base, lora, tuned
