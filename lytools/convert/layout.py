"""Torch-free facts shared by the general converter (write.py) and the fast path (fast.py):
target layout names, LoRA suffixes, how a scale is folded into the factors, and the peft
LoraConfig fields a diffusers/peft file carries."""

from __future__ import annotations

import collections
import math
from typing import Any, Iterable

from lytools.arch import network

TARGETS = ("kohya", "diffusers", "peft")
# the kohya/LyCORIS suffixes of a LoRA module
DOWN, UP, MID, ALPHA, DORA = network.LORA_DOWN, network.LORA_UP, network.LORA_MID, network.ALPHA, network.DORA_SCALE
FOLDED_NOTE = "scales folded into lora_A/lora_B (lora_alpha = r)"


# the components diffusers' pipeline for each architecture loads LoRA weights into (its
# `_lora_loadable_modules`); modules of another component are written but no pipeline applies them
DIFFUSERS_LOADED = {
    "sd1": ("unet", "text_encoder"), "sd2": ("unet", "text_encoder"), "sdxl": ("unet", "text_encoder", "text_encoder_2"),
    "sd3": ("transformer", "text_encoder", "text_encoder_2"), "flux": ("transformer", "text_encoder"),
}


def unloaded_note(arch: str, counts: dict[str, int]) -> str | None:
    """Return a note naming the components (with their module counts) of a diffusers-layout file of
    `arch` that diffusers' pipeline does not load (the T5 encoder of SD3 and Flux), or None."""
    loaded = DIFFUSERS_LOADED.get(arch)
    left = {component: count for component, count in counts.items() if loaded is not None and component not in loaded}
    if not left:
        return None
    named = ", ".join(f"{count} {component} (T5) modules" for component, count in sorted(left.items()))
    return (f"{named} written, but diffusers' {arch} pipeline loads LoRA only into {', '.join(loaded)} "
            f"and ComfyUI reads no T5 keys in this layout: keep --to kohya (lora_te3_) to use them")


def fold_split(scale: float) -> tuple[float, float]:
    """Return (down factor, up factor) with product `scale`: the down factor is a power of two near
    sqrt(scale), so both factors move by about the same amount and neither underflows in fp16."""
    if scale <= 0 or not math.isfinite(scale):
        return 1.0, scale
    exponent = round(math.log2(scale) / 2)
    down = 2.0 ** exponent
    return down, scale / down


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _config_path(path: str) -> str:
    # peft matches target_modules and pattern keys as a suffix at a '.' boundary: without the
    # leading `text_model.` a CLIP path matches both the classic layout and transformers 5's
    # flattened CLIPTextModel (which diffusers loads by stripping `text_model.` from the keys)
    return path[len("text_model."):] if path.startswith("text_model.") else path


def pattern_keys(paths: Iterable[str]) -> dict[str, str]:
    """Return {module path: its rank_pattern / alpha_pattern key}.

    peft reads a pattern key as a regular expression that matches a module path equal to it or
    ending with '.' + it (`get_pattern_key`), so the path of one module can also name others:
    Flux's top-level `proj_out` is the tail of every `single_transformer_blocks.N.proj_out`. Such a
    path is anchored with '^', which keeps it to the module itself; the others are written as they
    are (what diffusers and peft write)."""
    paths = list(paths)
    tails = set()
    for path in paths:
        parts = path.split(".")
        tails.update(".".join(parts[start:]) for start in range(1, len(parts)))
    return {path: "^" + path if path in tails else path for path in paths}


def lora_config(paths_ranks_alphas: Iterable[tuple[str, int, float]], use_dora: bool, lora_bias: bool = False) -> dict[str, Any]:
    """Return peft LoraConfig fields for modules (path, rank, alpha): the most common rank and
    alpha as r / lora_alpha, the others in rank_pattern / alpha_pattern (keys: pattern_keys);
    `lora_bias`: lora_B holds a bias (a bias difference)."""
    entries = [(_config_path(path), rank, alpha) for path, rank, alpha in paths_ranks_alphas]
    ranks = collections.Counter(rank for _, rank, _ in entries)
    alphas = collections.Counter(alpha for _, _, alpha in entries)
    r = ranks.most_common(1)[0][0]
    lora_alpha = alphas.most_common(1)[0][0]
    keys = pattern_keys(path for path, _, _ in entries)
    return {
        "r": r,
        "lora_alpha": _number(lora_alpha),
        "rank_pattern": {keys[path]: rank for path, rank, _ in entries if rank != r},
        "alpha_pattern": {keys[path]: _number(alpha) for path, _, alpha in entries if alpha != lora_alpha},
        "target_modules": sorted(path for path, _, _ in entries),
        "use_dora": use_dora,
        "use_rslora": False,
        "lora_bias": lora_bias,
    }
