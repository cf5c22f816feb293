"""Networks in canonical names -> the tensors and metadata of a target layout (FORMATS.md 3.3, 7).

kohya      canonical names as they are (SGM names for the SDXL UNet, `lora_te1_`/`lora_te2_` for
           SDXL, BFL names for Flux), every LyCORIS algorithm, stray keys kept (and reported).
diffusers  `<component>.<path>.lora_A.weight` / `.lora_B.weight`, DoRA `lora_magnitude_vector`;
           fused Flux/SD3 modules split into q/k/v(/mlp) parts; the final (SD3: last context) adaLN
           modulation written with its halves in diffusers' [scale; shift] order; stray keys stripped with a note
           (diffusers refuses a kohya-looking file with one foreign key, quirk 1). By default the
           scale is folded into the factors (power-of-two split) and `lora_adapter_metadata`
           says lora_alpha = r; with fold=False the factors are kept to the bit and the metadata
           carries lora_alpha / alpha_pattern / rank_pattern so the scale is the same.
peft       `base_model.model.<path>.lora_A.weight`, one component per adapter, and the
           adapter_config.json peft needs for the scale (same fold rule); paths as the wrapped
           model names them (transformers 5's CLIPTextModel has no `text_model.` level).
Only LoRA/LoCon (with output-axis DoRA) exists in the diffusers and peft layouts: other
algorithms, Tucker `lora_mid` and input-axis DoRA are an error naming the modules.
"""

from __future__ import annotations

import collections
import json
import math
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from lytools.algos import describe_module, describe_shapes
from lytools.arch import ENCODERS
from lytools.arch.a1111 import complete_for_a1111
from lytools.convert import names
from lytools.convert.fuse import (ALPHA, BIAS, DORA, DOWN, MID, UP, alpha_tensor, halves_swap_applies, scale_of, split_fused,
                                  swap_halves)
from lytools.convert.layout import FOLDED_NOTE, fold_split, lora_config, unloaded_note
from lytools.convert.load import Network
from lytools.errors import LytoolsError, MatchError, UnsupportedError
from lytools.io.dtypes import is_float, saturating_cast
from lytools.resize.verify import ROUNDING



@dataclass
class Converted:
    """What one network becomes in the target layout."""

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    adapter_config: dict[str, Any] | None = None  # peft: the adapter_config.json document
    notes: list[str] = field(default_factory=list)
    stray_kept: list[str] = field(default_factory=list)
    stray_dropped: list[str] = field(default_factory=list)
    folded: bool = False  # every LoRA module's scale is in its factors (alpha = rank)


def cast(tensor: torch.Tensor, dtype: torch.dtype | None, *, keep_precise: bool = False) -> torch.Tensor:
    """Return the tensor in `dtype` when both are floating; integer/bool tensors keep theirs.

    keep_precise: alphas and DoRA magnitudes are not narrowed to fp8 (they stay float32), and an
    alpha that fp16/bf16 would round (bf16 holds 0.1 as 0.1001) stays float32: its module's scale is kept.
    """
    if dtype is None or not is_float(tensor.dtype) or not dtype.is_floating_point or tensor.dtype == dtype:
        return tensor
    if keep_precise and (dtype.itemsize == 1 or rounds_scalar(tensor, dtype)):
        return tensor.to(torch.float32)
    return _narrow(tensor, dtype)


def rounds_scalar(tensor: torch.Tensor, dtype: torch.dtype) -> bool:
    """True for a one-value tensor (an alpha) whose value `dtype` cannot hold exactly."""
    return tensor.numel() == 1 and float(tensor.reshape(-1)[0].to(dtype)) != float(tensor.reshape(-1)[0])


# tensors saturated by casts of the convert_network call in progress (None outside one)
_SATURATED: ContextVar[list[int] | None] = ContextVar("lytools_convert_saturated", default=None)


def _narrow(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """tensor.to(dtype), values beyond dtype's range saturated (never an inf in fp16), counted."""
    out, beyond = saturating_cast(tensor, dtype)
    counter = _SATURATED.get()
    if beyond and counter is not None:
        counter[0] += 1
    return out


def _many(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _unknown_arch(net: Network) -> str:
    """Why the network's architecture is unknown, in a few words."""
    if net.tied:
        return "its modules fit " + " and ".join(net.tied) + " equally"
    return f"architecture not recognised ({net.arch})"


# -- kohya --------------------------------------------------------------------------------------------
def to_kohya(net: Network, save_dtype: torch.dtype | None = None) -> Converted:
    """Return the network in kohya/LyCORIS names: canonical modules and stray keys, dtypes cast."""
    if net.unmapped:
        raise MatchError(
            f"{net.path}: {len(net.unmapped)} modules have no kohya name for {net.arch}: {_many(net.unmapped)}"
            + ("" if net.arch != "unknown" else f" ({_unknown_arch(net)}; say which with --arch)")
        )
    tensors: dict[str, torch.Tensor] = {}
    created = 0
    for name, module in net.modules.items():
        for suffix, tensor in module.tensors.items():
            precise = suffix in (ALPHA, DORA)
            if suffix == DORA and tensor.dim() == 1:
                tensor = _dora_not_flat(net, name, module, tensor)
            tensors[f"{name}.{suffix}"] = cast(tensor, save_dtype, keep_precise=precise)
        if DOWN in module and UP in module and ALPHA not in module:
            # kohya readers (LyCORIS among them) expect an alpha; a missing one means alpha = rank
            tensors[f"{name}.{ALPHA}"] = cast(alpha_tensor(float(module[DOWN].shape[0]), module[DOWN]), save_dtype, keep_precise=True)
            created += 1
    result = Converted(tensors, {})
    if created:
        result.notes.append(f"wrote alpha = rank for {created} modules that had no alpha (scale 1, as before)")
    _, completed = complete_for_a1111(tensors, net.arch)
    if completed:
        result.notes.append(completed)
    for key, tensor in net.stray.items():
        if key in tensors:
            raise MatchError(f"{net.path}: stray key {key} collides with a converted module key")
        tensors[key] = cast(tensor, save_dtype)
        result.stray_kept.append(key)
    if result.stray_kept:
        result.notes.append(f"kept {len(result.stray_kept)} keys that belong to no module: {_many(result.stray_kept)}")
    return result


def _dora_not_flat(net: Network, name: str, module, magnitude: torch.Tensor) -> torch.Tensor:
    """Return a 1-D `dora_scale` as (out, 1[, 1, 1]): 1-D is per output channel (ALGORITHMS.md 7), but
    ComfyUI broadcasts it against the wrong axis (FORMATS.md 7, quirk 7), so kohya output is never 1-D."""
    down = module.tensors.get(DOWN)
    if down is not None and UP in module.tensors:
        dims = down.dim()  # LoRA/LoCon: the layer's rank of dimensions
    else:
        known = names.full_shape(net.arch, name) or describe_shapes(name, module.shapes()).delta_shape or (0, 0)
        dims = len(known)
    return magnitude.reshape((magnitude.numel(),) + (1,) * (dims - 1))


# -- diffusers / peft ------------------------------------------------------------------------------------
def _check_lora_only(net: Network) -> None:
    """Raise naming every module the diffusers/peft layouts cannot hold."""
    problems: dict[str, list[str]] = collections.defaultdict(list)
    for name, module in net.modules.items():
        info = describe_shapes(name, module.shapes())  # the algorithm needs shapes only
        if info.algo != "lora":
            problems[info.algo].append(name)
        elif MID in module:
            problems["Tucker lora_mid"].append(name)
        elif info.dora == "in":
            problems["input-axis DoRA"].append(name)
        elif DORA in module and BIAS in module:
            problems["DoRA with a bias difference (peft has no lora_bias for DoRA)"].append(name)
        elif info.sparse_bias or set(module.tensors) - {DOWN, UP, ALPHA, DORA, BIAS}:
            problems["extra tensors (" + ", ".join(sorted(set(module.tensors) - {DOWN, UP, ALPHA, DORA, BIAS})) + ")"].append(name)
    if problems:
        listed = "; ".join(f"{algo}: {len(mods)} modules ({_many(mods, 2)})" for algo, mods in sorted(problems.items()))
        dora = any("DoRA" in problem for problem in problems) or any(
            DORA in net.modules[name].tensors for mods in problems.values() for name in mods)
        raise UnsupportedError(
            f"{net.path}: the target layout holds only LoRA/LoCon modules, not {listed}; "
            f"flatten them to LoRA with `lytools resize` first"
            + (" (DoRA: convert --flatten-dora --base CHECKPOINT)" if dora else "") + ", or convert --to kohya"
        )


@dataclass
class _Piece:
    component: str  # diffusers component
    path: str
    tensors: dict[str, torch.Tensor]


def _diffusers_pieces(net: Network) -> list[_Piece]:
    if net.arch not in ("sd1", "sd2", "sdxl", "sd3", "flux"):
        raise MatchError(f"{net.path}: {_unknown_arch(net)}; diffusers names need one: say which with --arch")
    if net.unmapped:
        raise MatchError(f"{net.path}: {len(net.unmapped)} modules have no {net.arch} name: {_many(net.unmapped)}")
    _check_lora_only(net)
    table = names.diffusers_parts(net.arch)
    missing = [name for name in net.modules if name not in table]
    if missing:
        raise MatchError(f"{net.path}: {len(missing)} modules have no diffusers name in {net.arch}: {_many(missing)}")
    pieces: list[_Piece] = []
    for name, module in net.modules.items():
        parts = table[name]
        if len(parts) == 1 and parts[0].module_rows is None:
            swap = parts[0].swap_halves and halves_swap_applies(module.tensors)
            tensors = swap_halves(name, module.tensors) if swap else dict(module.tensors)
            pieces.append(_Piece(parts[0].component, parts[0].path, tensors))
            continue
        rows = [names.scale_rows(p.module_rows, net.scale) for p in parts]
        out = module[UP].shape[0]
        if rows[-1][1] != out:
            raise MatchError(f"{net.path}: module {name} has {out} output rows, its parts cover {rows[-1][1]}")
        for part, tensors in zip(parts, split_fused(name, module.tensors, rows)):
            if tensors is not None:
                pieces.append(_Piece(part.component, part.path, tensors))
    return pieces


def _piece_factors(name: str, tensors: Mapping[str, torch.Tensor], fold: bool, dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], float]:
    """Return ({lora_A, lora_B, magnitude}, alpha for the config) of one piece."""
    down, up = tensors[DOWN], tensors[UP]
    rank = down.shape[0]
    out_dtype = dtype if dtype is not None and is_float(down.dtype) else down.dtype
    if fold:
        down_factor, up_factor = fold_split(scale_of(name, tensors))
        down_out = _scaled(down, down_factor, out_dtype, dtype)
        up_out = _scaled(up, up_factor, out_dtype, dtype)
        if out_dtype.is_floating_point and out_dtype.itemsize == 1:
            _check_fp8_fold(name, scale_of(name, tensors), ((down, down_factor, down_out), (up, up_factor, up_out)), out_dtype)
        alpha = float(rank)
    else:
        down_out, up_out = cast(down, dtype), cast(up, dtype)
        alpha = scale_of(name, tensors) * rank
    factors = {"lora_A.weight": down_out, "lora_B.weight": up_out}
    bias = tensors.get(BIAS)
    if bias is not None:  # peft adds lora_B's bias times the scale alpha / r: stored divided by it
        scale = alpha / rank
        bias_dtype = dtype if dtype is not None and is_float(bias.dtype) else bias.dtype
        factors["lora_B.bias"] = cast(bias, dtype) if scale == 1.0 else _narrow(bias.float() / scale, bias_dtype)
    magnitude = tensors.get(DORA)
    if magnitude is not None:
        # peft stores [out] for linear layers, [1, out, 1, 1] for convs (FORMATS.md 3.3)
        shaped = magnitude.reshape(-1) if down.dim() == 2 else magnitude.reshape(1, -1, *([1] * (down.dim() - 2)))
        factors["lora_magnitude_vector"] = cast(shaped.contiguous(), dtype, keep_precise=True)
    return factors, alpha


def _components_holding(pieces: list[_Piece], suffix: str) -> tuple[str, set[str]]:
    """Return (the components where only some modules hold `suffix`, listed as 'unet: 3 of 7 modules', or
    '' when none; the components where every module holds it): per-adapter flags of peft (lora_bias,
    use_dora) cannot describe the first kind."""
    by_component: dict[str, list[bool]] = collections.defaultdict(list)
    for piece in pieces:
        by_component[piece.component].append(suffix in piece.tensors)
    partial = {component: flags for component, flags in by_component.items() if any(flags) and not all(flags)}
    listed = ", ".join(f"{component}: {sum(flags)} of {len(flags)} modules" for component, flags in sorted(partial.items()))
    return listed, {component for component, flags in by_component.items() if all(flags)}


def _check_bias(net: Network, pieces: list[_Piece]) -> set[str]:
    """Return the components whose modules all carry a bias difference (peft's lora_bias, which
    gives every lora_B of a model a bias); raise when only some of a component's modules do: peft
    cannot merge a lora_B bias into a layer that has no bias of its own, so diffusers' fuse_lora
    and peft's merge would fail on the others."""
    partial, complete = _components_holding(pieces, BIAS)
    if partial:
        raise UnsupportedError(
            f"{net.path}: bias differences (diff_b) on only some modules ({partial}); peft's lora_bias gives "
            f"every module of a model a bias, which cannot be merged into layers that have none; "
            f"convert --to kohya keeps them"
        )
    return complete


def _check_dora(net: Network, pieces: list[_Piece]) -> None:
    """Raise when only some of a model's modules carry DoRA: peft's use_dora is one flag per adapter, so
    peft and diffusers would give the others a magnitude of their own (the base weight's norm) and apply
    them as DoRA, not as the plain LoRA they are."""
    partial, _ = _components_holding(pieces, DORA)
    if partial:
        raise UnsupportedError(
            f"{net.path}: DoRA on only some modules ({partial}); peft's use_dora applies to every module of a "
            f"model, so the others would load as DoRA; convert --flatten-dora --base CHECKPOINT, or convert --to kohya"
        )


def _check_fp8_fold(name: str, scale: float, pairs, dtype: torch.dtype) -> None:
    """Refuse a fold that fp8 cannot hold: a small alpha / rank (1/64) moves factor values below fp8's
    smallest subnormal (2^-9 in e4m3), where they round to a few levels or to zero."""
    for tensor, factor, written in pairs:
        if factor == 1.0:
            continue
        exact = tensor.float() * factor
        norm = float(exact.norm())
        error = float((written.float() - exact).norm()) / norm if norm > 0 else 0.0
        if error > ROUNDING[dtype]:
            raise UnsupportedError(
                f"module {name}: folding its scale alpha/rank = {scale:g} into {str(dtype).replace('torch.', '')} "
                f"factors loses {error:.0%} of them (values fall below fp8's smallest); write them wider "
                f"(--save-dtype bf16 or fp16) or keep the scale out of the factors with --no-fold"
            )


def _scaled(tensor: torch.Tensor, factor: float, out_dtype: torch.dtype, dtype: torch.dtype | None) -> torch.Tensor:
    """Return tensor * factor in out_dtype, computed in float32 (torch's half/bfloat16 kernels do
    the same: one rounding of the exact product), without a float32 copy when the dtype stays."""
    if factor == 1.0:
        return cast(tensor, dtype)
    if tensor.dtype == out_dtype and tensor.dtype in (torch.float16, torch.bfloat16, torch.float32):
        product = tensor * factor
        if tensor.dtype == torch.float32 or bool(torch.isfinite(product).all()):
            return product
    return _narrow(tensor.float() * factor, out_dtype)


def to_diffusers(net: Network, *, fold: bool = True, save_dtype: torch.dtype | None = None) -> Converted:
    """Return the network in diffusers names with `lora_adapter_metadata` (see the module docstring)."""
    pieces = _diffusers_pieces(net)
    tensors: dict[str, torch.Tensor] = {}
    per_component: dict[str, list[tuple[str, int, float]]] = collections.defaultdict(list)
    dora: dict[str, bool] = collections.defaultdict(bool)
    biased = _check_bias(net, pieces)
    _check_dora(net, pieces)
    for piece in pieces:
        factors, alpha = _piece_factors(f"{piece.component}.{piece.path}", piece.tensors, fold, save_dtype)
        for suffix, tensor in factors.items():
            tensors[f"{piece.component}.{piece.path}.{suffix}"] = tensor
        per_component[piece.component].append((piece.path, int(piece.tensors[DOWN].shape[0]), alpha))
        dora[piece.component] |= DORA in piece.tensors
    adapter: dict[str, Any] = {}
    for component, entries in per_component.items():
        for key, value in lora_config(entries, dora[component], component in biased).items():
            adapter[f"{component}.{key}"] = value
    result = Converted(tensors, {"lora_adapter_metadata": json.dumps(adapter, sort_keys=True)})
    if net.stray:
        result.stray_dropped = list(net.stray)
        result.notes.append(
            f"dropped {len(net.stray)} keys that belong to no module ({_many(list(net.stray))}): "
            f"diffusers refuses files that carry them"
        )
    unloaded = unloaded_note(net.arch, {component: len(entries) for component, entries in per_component.items()})
    if unloaded:
        result.notes.append(unloaded)
    result.folded = fold
    if fold:
        result.notes.append(FOLDED_NOTE)
    else:
        scaled = sum(1 for entries in per_component.values() for _, rank, alpha in entries if alpha != rank)
        if scaled:
            result.notes.append(
                f"--no-fold: the scales of {scaled} modules (alpha != rank) are only in lora_adapter_metadata, which "
                f"diffusers and peft apply; ComfyUI/Forge read these factors at scale 1 (fold them for those)")
    return result


def to_peft(net: Network, *, fold: bool = True, save_dtype: torch.dtype | None = None, component: str | None = None) -> Converted:
    """Return one component of the network as a peft adapter and its adapter_config.json."""
    pieces = _diffusers_pieces(net)
    present = sorted({p.component for p in pieces})
    # the --component value of each diffusers component (Flux's T5, text_encoder_2, is te3)
    options = {e.diffusers: e.component for e in ENCODERS.get(net.arch, ())} or {
        "unet": "unet", "transformer": "unet", "text_encoder": "te", "text_encoder_2": "te2", "text_encoder_3": "te3"}
    have = ", ".join(c if options.get(c, c) == c else f"{options[c]} ({c})" for c in present)
    if component is not None:
        if component in ("te", "te1"):
            component = next((o for o in options.values() if o in ("te", "te1")), component)
        chosen = [c for c in present if options.get(c) == component]
        if not chosen:
            raise MatchError(f"{net.path}: no {component} modules in this {net.arch} network (it has --component {have})")
        pieces = [p for p in pieces if p.component == chosen[0]]
        skipped = [c for c in present if c != chosen[0]]
    elif len(present) > 1:
        raise LytoolsError(
            f"{net.path}: a peft adapter holds one model, this network has {have}; pick one with --component"
        )
    else:
        skipped = []
    tensors: dict[str, torch.Tensor] = {}
    entries: list[tuple[str, int, float]] = []
    use_dora = False
    lora_bias = bool(_check_bias(net, pieces))
    _check_dora(net, pieces)
    for piece in pieces:
        factors, alpha = _piece_factors(f"{piece.component}.{piece.path}", piece.tensors, fold, save_dtype)
        path = names.peft_path(net.arch, piece.component, piece.path)
        for suffix, tensor in factors.items():
            tensors[f"base_model.model.{path}.{suffix}"] = tensor
        entries.append((path, int(piece.tensors[DOWN].shape[0]), alpha))
        use_dora |= DORA in piece.tensors
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
        "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "init_lora_weights": True,
        "modules_to_save": None, **lora_config(entries, use_dora, lora_bias),
    }
    result = Converted(tensors, {}, adapter_config=config, folded=fold)
    if any(names.peft_path(net.arch, p.component, p.path) != p.path for p in pieces):
        result.notes.append("text-encoder paths as transformers 5's CLIPTextModel names them (no `text_model.` level)")
    if skipped:
        result.notes.append(f"left out the {', '.join(skipped)} modules (--component {component})")
    if net.stray:
        result.stray_dropped = list(net.stray)
        result.notes.append(f"dropped {len(net.stray)} keys that belong to no module ({_many(list(net.stray))})")
    if fold:
        result.notes.append(FOLDED_NOTE)
    return result


def convert_network(net: Network, target: str, *, fold: bool | None = None, save_dtype: torch.dtype | None = None,
                    component: str | None = None) -> Converted:
    """Return the network in the target layout: kohya | diffusers | peft (fold defaults to True for
    diffusers and peft; kohya never folds). Values beyond the output dtype's range saturate, with a note."""
    counter = [0]
    token = _SATURATED.set(counter)
    try:
        converted = _convert(net, target, fold, save_dtype, component)
    finally:
        _SATURATED.reset(token)
    if converted.folded and _refolds_fp8(net, save_dtype):
        converted.notes.append("fp8 factors: folding alpha/rank rounds them to fp8 again (a few % of the change); "
                               "--no-fold keeps them bit-exact")
    if counter[0]:
        limit = f" to ±{torch.finfo(save_dtype).max:g}" if save_dtype is not None else ""
        converted.notes.append(f"{counter[0]} tensors had values beyond the output dtype's range and were saturated{limit}")
    return converted


def _refolds_fp8(net: Network, save_dtype: torch.dtype | None) -> bool:
    """True when some LoRA module keeps fp8 factors and a scale that is not a power of two: folding
    it is a second fp8 rounding (3 mantissa bits, ~3% of the change; bf16 costs ~0.2%)."""
    for name, module in net.modules.items():
        down = module.tensors.get(DOWN)
        if down is None or UP not in module.tensors or not down.is_floating_point() or down.dtype.itemsize != 1:
            continue
        if save_dtype is not None and save_dtype != down.dtype:
            continue  # cast to another dtype anyway: the fold is part of that one rounding
        scale = scale_of(name, module.tensors)
        if scale > 0 and math.isfinite(scale) and math.frexp(scale)[0] != 0.5:
            return True
    return False


def _convert(net: Network, target: str, fold: bool | None, save_dtype: torch.dtype | None,
             component: str | None) -> Converted:
    if target == "kohya":
        if fold:
            return _fold_kohya(to_kohya(net, save_dtype), net, save_dtype)
        return to_kohya(net, save_dtype)
    if target == "diffusers":
        return to_diffusers(net, fold=True if fold is None else fold, save_dtype=save_dtype)
    if target == "peft":
        return to_peft(net, fold=True if fold is None else fold, save_dtype=save_dtype, component=component)
    raise LytoolsError(f"unknown target layout {target!r} (kohya, diffusers, peft)")


def _fold_kohya(converted: Converted, net: Network, save_dtype: torch.dtype | None) -> Converted:
    """kohya output with every LoRA module's scale folded into its factors and alpha = rank."""
    for name, module in net.modules.items():
        if describe_module(module).algo != "lora" or DOWN not in module or UP not in module:
            continue
        factors, _ = _piece_factors(name, {k: v for k, v in module.tensors.items() if k != DORA}, True, save_dtype)
        converted.tensors[f"{name}.{DOWN}"] = factors["lora_A.weight"]
        converted.tensors[f"{name}.{UP}"] = factors["lora_B.weight"]
        converted.tensors[f"{name}.{ALPHA}"] = cast(alpha_tensor(float(module[DOWN].shape[0]), module.tensors.get(ALPHA, module[DOWN])),
                                                    save_dtype, keep_precise=True)
    converted.notes.append("scales folded into lora_down/lora_up (alpha = rank)")
    converted.folded = True
    return converted
