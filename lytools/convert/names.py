"""Module names: any stored spelling -> canonical kohya/LyCORIS name, and canonical -> diffusers names.

Every map here is derived from lytools.arch (alias_table, named_modules, diffusers_table); this
file adds only the choices convert makes on top of them:

- canonical name of a module outside the kohya tables (LyCORIS full-preset `conv_in`, norms,
  time embedding): `<kohya prefix><diffusers path with . -> _>`, except the SDXL UNet, whose
  canonical spelling is the SGM path (FORMATS.md 4.2: lytools writes SGM names for SDXL);
- a part of a fused kohya module (Flux `to_q` of `double_blocks_N_img_attn_qkv`, SD3 qkv parts)
  carries `module_rows`, the rows of the fused module it covers, at the network's shrink scale;
- a module diffusers stores with its [shift; scale] halves exchanged (`norm_out.linear`, SD3's
  last `norm1_context.linear`) carries `swap_halves`: reading swaps its rows back, writing swaps
  them again (lytools.convert.fuse.swap_halves).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from typing import Mapping

from lytools.arch import ENCODERS, NetworkArch, alias_table, arch_from_metadata, detect_network, diffusers_table
from lytools.arch.keymap import NETWORK_ARCHS, UNET_PREFIX, CanonicalTarget, named_modules
from lytools.arch.network import BARE_CLIP, lookup_names

Rows = tuple[int, int]
_LINEAR1_QKV = re.compile(
    r"^(?:(?:diffusion_model\.|lora_unet_)?single_blocks[._](\d+)[._]linear1_qkv|single_blocks\.(\d+)\.processor\.qkv_lora)$"
)


@dataclass(frozen=True)
class Canonical:
    """Where one stored module lands: canonical module name and the rows of it the stored module is."""

    module: str  # canonical kohya/LyCORIS module name
    component: str  # unet | te | te1 | te2 | te3
    shape: tuple[int, ...]  # full-size ΔW shape of the stored module (its rows only, for a part)
    module_rows: Rows | None  # full-size rows of the canonical module (None: the whole module)
    in_table: bool
    swap_halves: bool = False  # the stored module's output rows are the canonical one's, halves exchanged


def _unet_native(key: str) -> str:
    return "lora_unet_" + key[len(UNET_PREFIX):-len(".weight")].replace(".", "_")


def _canonical(arch: str, target: CanonicalTarget) -> Canonical:
    table = named_modules(arch)
    owner = table.get(target.module)
    module = target.module
    module_rows = None
    if owner is not None and owner.parts and target.rows is not None:
        module_rows = target.rows  # a part of a fused module that covers the whole key
    if owner is None and arch == "sdxl" and target.component == "unet" and target.key.endswith(".weight"):
        module = _unet_native(target.key)
    return Canonical(module, target.component, target.shape, module_rows, target.in_table, target.swap_halves)


@functools.cache
def _canonical_table(arch: str) -> dict[str, Canonical]:
    return {alias: _canonical(arch, target) for alias, target in alias_table(arch).items()}


def candidates(arch: str, stored: str) -> list[Canonical]:
    """Return the canonical readings of a stored module name under `arch` (several for a bare peft path)."""
    if arch not in NETWORK_ARCHS:
        return []
    table = _canonical_table(arch)
    found: list[Canonical] = []
    component, dot, rest = stored.partition(".")
    if dot and rest.startswith("base_model.model."):  # a PeftModel's state dict saved under a component
        stored = f"{component}.{rest[len('base_model.model.'):]}"
    names = list(lookup_names(stored))
    if stored.startswith("base_model.model.") or stored.startswith(BARE_CLIP):
        rest = stored.removeprefix("base_model.model.")
        names += [f"{encoder.diffusers}.{rest}" for encoder in ENCODERS[arch] if encoder.component != "unet"]
    # transformers 5 flattened CLIPTextModel (no `text_model.` level): diffusers and peft save such paths
    for name in list(names):
        component, dot, path = name.partition(".")
        if dot and path.startswith("encoder.layers.") and component.startswith("text_encoder"):
            names.append(f"{component}.text_model.{path}")
        elif name.startswith("encoder.layers."):
            names += [f"{encoder.diffusers}.text_model.{name}" for encoder in ENCODERS[arch] if encoder.component != "unet"]
    for name in names:
        hit = table.get(name)
        if hit is not None and hit not in found:
            found.append(hit)
    if not found and arch == "flux":
        qkv = _LINEAR1_QKV.match(stored)
        if qkv:  # ComfyUI's (and xlabs/USO's) name for the q;k;v rows of a single block's linear1
            module = f"lora_unet_single_blocks_{qkv.group(1) or qkv.group(2)}_linear1"
            target = named_modules(arch).get(module)
            if target is not None and target.parts:
                rows = (target.parts[0][1][0], target.parts[2][1][1])
                found.append(Canonical(module, "unet", (rows[1] - rows[0],) + target.shape[1:], rows, True))
    return found


def comfy_generic(arch: str, stored: str) -> str | None:
    """Return the generic kohya name of a ComfyUI-native module no table knows (ComfyUI's LoraSave
    writes every layer: CLIP layer norms and embeddings, UNet group norms): `<kohya prefix><path
    with . -> _>` on the path after the component's ComfyUI prefix, which lytools.arch's resolver
    places on the checkpoint key of that path. None for other spellings and unknown archs."""
    if arch not in NETWORK_ARCHS:
        return None
    for encoder in sorted(ENCODERS[arch], key=lambda e: len(e.comfy), reverse=True):
        if stored.startswith(encoder.comfy) and len(stored) > len(encoder.comfy):
            return encoder.kohya_prefix + stored[len(encoder.comfy):].replace(".", "_")
    return None


@dataclass(frozen=True)
class DiffusersPart:
    """One diffusers/peft module written for a canonical module."""

    component: str  # diffusers component: unet | transformer | text_encoder | text_encoder_2 | text_encoder_3
    path: str  # module path inside the component
    module_rows: Rows | None  # full-size rows of the canonical module (None: all of it)
    swap_halves: bool = False  # written with the two halves of its output rows exchanged

    @property
    def name(self) -> str:
        return f"{self.component}.{self.path}"


@functools.cache
def diffusers_parts(arch: str) -> dict[str, tuple[DiffusersPart, ...]]:
    """Return {canonical module: (DiffusersPart, ...)} for every module diffusers can name in `arch`."""
    table = _canonical_table(arch)
    result: dict[str, list[DiffusersPart]] = {}
    for diffusers in diffusers_table(arch):
        canonical = table.get(diffusers)
        if canonical is None:
            continue
        component, _, path = diffusers.partition(".")
        parts = result.setdefault(canonical.module, [])
        part = DiffusersPart(component, path, canonical.module_rows, canonical.swap_halves)
        if part not in parts:
            parts.append(part)
    return {
        module: tuple(sorted(parts, key=lambda p: (p.module_rows or (0, 0))[0]))
        for module, parts in result.items()
    }


def peft_path(arch: str, component: str, path: str) -> str:
    """Return a module's path inside the model a peft adapter of `component` wraps.

    transformers 5's CLIPTextModel holds its layers directly (`encoder.layers.0…`, no `text_model.`
    level), while CLIPTextModelWithProjection (SDXL te2, SD3 te1/te2) keeps `text_model.`; diffusers
    component paths always carry it. Reading accepts both spellings (candidates)."""
    encoder = next((e for e in ENCODERS.get(arch, ()) if e.diffusers == component), None)
    if encoder is not None and encoder.model_class == "CLIPTextModel" and path.startswith("text_model."):
        return path[len("text_model."):]
    return path


def component_of(arch: str, module: str) -> str | None:
    """Return the component (unet, te, te1, ...) of a canonical module name from its kohya prefix."""
    for encoder in sorted(ENCODERS.get(arch, ()), key=lambda e: -len(e.kohya_prefix)):
        if module.startswith(encoder.kohya_prefix):
            return encoder.component
    return None


def fused_rows(arch: str, module: str) -> tuple[tuple[str, Rows], ...] | None:
    """Return the named full-size row ranges of a fused kohya module (Flux qkv/linear1, SD3 qkv), or None."""
    target = named_modules(arch).get(module) if arch in NETWORK_ARCHS else None
    return target.parts if target is not None else None


def full_shape(arch: str, module: str) -> tuple[int, ...] | None:
    """Return the full-size ΔW shape of a canonical module, or None when unknown."""
    if arch not in NETWORK_ARCHS:
        return None
    target = named_modules(arch).get(module)
    if target is not None:
        return target.shape
    return _whole_shapes(arch).get(module)


@functools.cache
def _whole_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    return {c.module: c.shape for c in _canonical_table(arch).values() if c.module_rows is None}


def scale_rows(rows: Rows | None, scale: int) -> Rows | None:
    """Return rows divided by the network's shrink scale (1 for real files)."""
    if rows is None or scale == 1:
        return rows
    return (rows[0] // scale, rows[1] // scale)


def warm_tables() -> None:
    """Build the tables that detecting any network needs (every architecture's accepted names) now,
    before forking workers that all need them. The tables of one architecture (canonical names,
    diffusers parts) are left to the workers: a batch rarely needs more than one or two."""
    for arch in NETWORK_ARCHS:
        alias_table(arch)


_DETECTED: dict[tuple, NetworkArch] = {}


def detect_cached(shapes: dict[str, tuple[int, ...]], metadata: Mapping[str, str]) -> NetworkArch:
    """detect_network, remembered per key set and claimed architecture (the only part of the
    metadata it reads): the files of one batch usually share them. The result is shared: read only."""
    key = (tuple(sorted(shapes.items())), arch_from_metadata(metadata))
    found = _DETECTED.get(key)
    if found is None:
        if len(_DETECTED) >= 64:
            _DETECTED.clear()
        found = _DETECTED[key] = detect_network(shapes, metadata)
    return found  # shared by every file with these keys: read it, never change it
