"""Which modules of BASE and TUNED pair up, from the two headers alone.

Known architectures (sd1, sd2, sdxl, sd3, flux) use the kohya module table of lytools.arch:
every module of the table that resolves in both files is extracted under its kohya name
(`lora_unet_*`, `lora_te_*`, `lora_te1_*`, `lora_te2_*`, `lora_te3_*`); OpenCLIP's fused
`in_proj_weight` gives the three q/k/v modules from its row slices, Flux's fused qkv/linear1
stay one module as kohya trains them. Either file may use any layout the resolver reads
(LDM/SGM/BFL single file with or without the wrapper prefix, diffusers UNet/transformer).

Unknown architectures (generic naming): every `<path>.weight` tensor of 2 or 4 dimensions that
both files hold with the same shape becomes module `lora_unet_<path with . -> _>`, where `path`
is the key without `.weight` and without a leading `model.diffusion_model.` or `diffusion_model.`
wrapper. Loaders that build their name table from the model's own keys (ComfyUI, A1111's last
resort, lytools merge) resolve those names back.

SD3 by rule as well: the table is SD3 medium's (24 joint blocks, no `attn2`); an MMDiT-layout
block linear it lacks that sd-scripts' lora_sd3 targets (SD3.5 `x_block.attn2.*`, SD3.5 large's
blocks 24-37 and the full `context_block` of its block 23) is extracted under its kohya name too.

A module that only one file has, or whose shapes differ, is reported as skipped; two files of
different architectures, or with nothing in common, are an error.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from lytools.arch import CheckpointArch, Placement, Resolver, detect_checkpoint
from lytools.arch.keymap import named_modules
from lytools.arch.keymap import _SD3_TARGETS as SD3_RULE  # sd-scripts lora_sd3's block targets
from lytools.arch.keymap import NETWORK_ARCHS
from lytools.errors import MatchError, UnsupportedError
from lytools.extract.factor import ModuleRecord

Shape = tuple[int, ...]
GENERIC_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
ARCH_CHOICES = ("auto", "sd1", "sd2", "sdxl", "sd3", "flux")


@dataclass(frozen=True)
class PairedModule:
    """One module to extract: its output name and where its weight sits in each file."""

    name: str
    component: str  # unet | te | te1 | te2 | te3
    kind: str  # linear | conv1x1 | conv3x3 | conv
    shape: Shape
    base: tuple[Placement, ...]
    tuned: tuple[Placement, ...]

    @property
    def kxk(self) -> bool:
        return len(self.shape) == 4 and math.prod(self.shape[2:]) > 1

    @property
    def nbytes32(self) -> int:
        return 4 * math.prod(self.shape)


@dataclass
class ExtractPlan:
    arch: str  # the architecture the names follow, "unknown" for generic naming
    base_arch: CheckpointArch
    tuned_arch: CheckpointArch
    modules: list[PairedModule] = field(default_factory=list)
    skipped: list[ModuleRecord] = field(default_factory=list)

    @property
    def generic(self) -> bool:
        return self.arch not in NETWORK_ARCHS


def _skip(name: str, component: str, shape: Shape, reason: str) -> ModuleRecord:
    kind = "linear" if len(shape) == 2 else ("conv3x3" if len(shape) == 4 and math.prod(shape[2:]) > 1 else "conv1x1")
    return ModuleRecord(name, component, kind, tuple(shape), "skipped", reason=reason)


def _check_same_arch(base_path: Path, tuned_path: Path, base: CheckpointArch, tuned: CheckpointArch) -> None:
    if base.arch != tuned.arch:
        raise MatchError(
            f"{base_path.name} is {base.arch} by its keys but {tuned_path.name} is {tuned.arch}: "
            "different architectures cannot be extracted"
        )


def plan_extraction(
    base_shapes: Mapping[str, Shape],
    tuned_shapes: Mapping[str, Shape],
    *,
    base_path: Path,
    tuned_path: Path,
    base_metadata: Mapping[str, str] | None = None,
    tuned_metadata: Mapping[str, str] | None = None,
    arch: str = "auto",
    unet: bool = True,
    text_encoder: bool = True,
) -> ExtractPlan:
    """Return the modules to extract and those skipped (one file only, shapes differ)."""
    if arch not in ARCH_CHOICES:
        raise UnsupportedError(f"--arch {arch}: expected one of {', '.join(ARCH_CHOICES)}")
    from lytools.merge.inputs import looks_like_network

    for path, shapes in ((base_path, base_shapes), (tuned_path, tuned_shapes)):
        if not shapes:
            raise MatchError(f"{path.name}: holds no tensors")
        if looks_like_network(shapes):
            raise MatchError(f"{path.name} is a network (LoRA/LyCORIS), not a checkpoint: extract takes BASE and TUNED "
                             "checkpoints (merge applies a network to a checkpoint)")
    base_arch = detect_checkpoint(base_shapes, base_metadata)
    tuned_arch = detect_checkpoint(tuned_shapes, tuned_metadata)
    if arch == "auto":
        _check_same_arch(base_path, tuned_path, base_arch, tuned_arch)
        chosen = base_arch.arch
    else:
        for path, found in ((base_path, base_arch), (tuned_path, tuned_arch)):
            if found.arch in NETWORK_ARCHS and found.arch != arch:
                raise MatchError(f"{path.name} is {found.arch} by its keys, not {arch}: with --arch {arch} its modules "
                                 f"would get {arch} names and most would be missed (leave --arch auto)")
        chosen = arch
    if chosen in NETWORK_ARCHS:
        plan = _plan_known(chosen, base_shapes, tuned_shapes, base_metadata, tuned_metadata, base_path, tuned_path)
    else:
        plan = _plan_generic(base_shapes, tuned_shapes)
    plan.base_arch, plan.tuned_arch = base_arch, tuned_arch
    wanted = {"unet"} if unet else set()
    if text_encoder:
        wanted |= {"te", "te1", "te2", "te3"}
    plan.modules = [m for m in plan.modules if m.component in wanted]
    plan.skipped = [r for r in plan.skipped if r.component in wanted]
    if not plan.modules and not plan.skipped:
        what = " and ".join(name for name, on in (("UNet/transformer", unet), ("text encoder", text_encoder)) if on)
        raise MatchError(f"{base_path.name} and {tuned_path.name}: no {what or 'selected'} modules to extract")
    return plan


def _plan_known(arch: str, base_shapes, tuned_shapes, base_metadata, tuned_metadata,
                base_path: Path, tuned_path: Path) -> ExtractPlan:
    base_resolver = Resolver(base_shapes, base_metadata, arch=arch)
    tuned_resolver = Resolver(tuned_shapes, tuned_metadata, arch=arch)
    plan = ExtractPlan(arch, base_resolver.checkpoint, tuned_resolver.checkpoint)
    table = named_modules(arch)  # sd3: SD3.5's attn2 and blocks 23-37 too, in either layout
    names = [(name, target.component) for name, target in table.items()]
    if arch == "sd3":
        names += [(name, "unet") for name in _sd3_rule_names((base_resolver.checkpoint, base_shapes),
                                                             (tuned_resolver.checkpoint, tuned_shapes), table=table)]
    for name, component in names:
        in_base = base_resolver.resolve(name)
        in_tuned = tuned_resolver.resolve(name)
        if in_base is None and in_tuned is None:
            continue
        if in_base is None or in_tuned is None:
            only = tuned_path.name if in_base is None else base_path.name
            shape = (in_tuned or in_base).shape
            plan.skipped.append(_skip(name, component, shape, f"only in {only}"))
            continue
        if tuple(in_base.shape) != tuple(in_tuned.shape):
            plan.skipped.append(_skip(name, component, in_base.shape,
                                      f"shape {list(in_base.shape)} in {base_path.name}, {list(in_tuned.shape)} in {tuned_path.name}"))
            continue
        if len(in_base.shape) not in (2, 4):
            continue
        plan.modules.append(PairedModule(name, component, in_base.kind, tuple(in_base.shape),
                                         in_base.placements, in_tuned.placements))
    if arch == "sd3":
        plan.skipped += _sd3_unnamed((base_resolver.checkpoint, base_shapes, "base"),
                                     (tuned_resolver.checkpoint, tuned_shapes, "tuned"), modules=plan.modules)
    if not plan.modules:
        raise MatchError(
            f"{base_path.name} and {tuned_path.name}: no {arch} module is present in both files "
            f"({len(plan.skipped)} in one file only): different architectures or not {arch} checkpoints"
        )
    return plan


def _sd3_rule_names(*files: tuple[CheckpointArch, Mapping[str, Shape]], table: Mapping[str, object]) -> list[str]:
    """Kohya names of the MMDiT block linears lora_sd3 targets that the (SD3 medium) table lacks."""
    found: set[str] = set()
    for checkpoint, shapes in files:
        prefix = checkpoint.components.get("unet")
        if prefix is None or checkpoint.layout != "mmdit":
            continue  # diffusers-layout SD3.5 files: only the table's modules
        for key in shapes:
            if key.startswith(prefix) and key.endswith(".weight"):
                path = key[len(prefix):-len(".weight")]
                name = "lora_unet_" + path.replace(".", "_")
                if name not in table and SD3_RULE.match(path):
                    found.add(name)
    return sorted(found)


# diffusers-layout SD3 block linears (what the MMDiT rule targets, in diffusers names)
_SD3_DIFFUSERS_RULE = re.compile(r"^transformer_blocks\.\d+\.(attn2?\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)"
                                 r"|ff(_context)?\.net\.(0\.proj|2)|norm1(_context)?\.linear)\.weight$")


def _sd3_unnamed(*files: tuple[CheckpointArch, Mapping[str, Shape], str], modules: list[PairedModule]) -> list[ModuleRecord]:
    """Skipped records for diffusers-layout SD3 block linears the tables cannot name (blocks beyond SD3.5
    large's 38): said in the report and the summary instead of left out silently."""
    placed = {p.key for m in modules for p in (*m.base, *m.tuned)}
    found: dict[str, ModuleRecord] = {}
    for checkpoint, shapes, which in files:
        prefix = checkpoint.components.get("unet")
        if prefix is None or checkpoint.layout != "diffusers":
            continue
        for key, shape in shapes.items():
            path = key[len(prefix):] if key.startswith(prefix) else None
            if path and key not in placed and path not in found and _SD3_DIFFUSERS_RULE.match(path):
                found[path] = _skip(path[:-len(".weight")], "unet", tuple(shape),
                                    f"no kohya name for this SD3.5 module in a diffusers-layout file ({which}): "
                                    "extract from the single-file (MMDiT) checkpoints")
    return [found[path] for path in sorted(found)]


def generic_module_name(key: str) -> str | None:
    """Return the generic module name of a weight key (`lora_unet_<path>`), or None for non-weights."""
    if not key.endswith(".weight"):
        return None
    path = key[: -len(".weight")]
    for prefix in GENERIC_PREFIXES:
        if path.startswith(prefix):
            path = path[len(prefix):]
            break
    return "lora_unet_" + path.replace(".", "_")


def _plan_generic(base_shapes: Mapping[str, Shape], tuned_shapes: Mapping[str, Shape]) -> ExtractPlan:
    unknown = CheckpointArch("unknown", "unknown")
    plan = ExtractPlan("unknown", unknown, unknown)
    names: dict[str, list[str]] = {}
    for key in sorted(set(base_shapes) | set(tuned_shapes)):
        shape = base_shapes.get(key, tuned_shapes.get(key))
        name = generic_module_name(key)
        if name is None or len(shape) not in (2, 4):
            continue
        names.setdefault(name, []).append(key)
    for name, keys in sorted(names.items()):
        shape = tuple(base_shapes.get(keys[0], tuned_shapes.get(keys[0])))
        if len(keys) > 1:
            plan.skipped.append(_skip(name, "unet", shape, f"ambiguous: keys {', '.join(keys)} give the same name"))
            continue
        key = keys[0]
        if key not in base_shapes or key not in tuned_shapes:
            plan.skipped.append(_skip(name, "unet", shape, f"{key} only in {'BASE' if key in base_shapes else 'TUNED'}"))
            continue
        if tuple(base_shapes[key]) != tuple(tuned_shapes[key]):
            plan.skipped.append(_skip(name, "unet", shape,
                                      f"{key}: shape {list(base_shapes[key])} in BASE, {list(tuned_shapes[key])} in TUNED"))
            continue
        kind = "linear" if len(shape) == 2 else ("conv1x1" if math.prod(shape[2:]) == 1 else "conv3x3" if shape[2:] == (3, 3) else "conv")
        plan.modules.append(PairedModule(name, "unet", kind, shape, (Placement(key),), (Placement(key),)))
    if not plan.modules:
        raise MatchError("BASE and TUNED have no 2-D or 4-D weight tensor in common: different architectures")
    return plan
