"""Synthetic checkpoints and networks built from the shipped name tables (nothing is downloaded).

Real key names; shapes either full size (benchmarks) or shrunk consistently by `factor`: every
dimension that is a multiple of 64 is divided by it, others (kernel sizes, 4 latent channels,
[1, 77] position_ids, scalars) are kept, so shapes still chain and fused row slices scale by the
same factor. Values are deterministic (seed + tensor name) and tensors are written one at a time
with lytools.io.SafetensorsWriter, never all in memory.

    checkpoint_plan(arch, factor=8, ...)      -> [PlannedTensor]        names, dtypes, shapes
    build_checkpoint(path, arch, factor=8, components=None, layout="native", prefix=None,
                     dtype=None, seed=0, in_channels=None, variant=None, release=False, metadata=None)
    build_sparse_checkpoint(path, arch, factor=1, ...)  header with real shapes, file truncated to size
    network_plan(arch, ...) / build_network(path, arch, factor=8, rank=4, alpha=None, conv_rank=None,
                     dtype=torch.float16, modules="lierla", optional=(), components=None,
                     layout="kohya", algo="lora", dora=False, seed=0, metadata=None)
    build_tuned(base, out, network, ratio=1.0, noise=0.0, seed=0) -> TunedCheckpoint
        base + ratio * ΔW(network) (+ Gaussian noise on the changed tensors): a fine-tune with a
        known low-rank change, for extract tests.

Arches: sd1, sd2, sdxl, sd3, flux (checkpoints); sd1, sd2, sdxl, flux, sd3 (networks).
Checkpoint components: unet (the denoiser), clip_l, clip_h, clip_g, t5xxl, vae, schedule;
"te" selects every text encoder.
"""

from __future__ import annotations

import math
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from lytools.arch.keymap import ENCODERS, kohya_to_diffusers, module_table
from lytools.arch.manifests import checkpoint_manifest, diffusers_names
from lytools.errors import LytoolsError
from lytools.io import SafetensorsWriter, open_file, plan_entry, read_header
from lytools.io.writer import PlannedTensor, build_header, check_output_path, file_order

UNET_PREFIX = "model.diffusion_model."
TORCH_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
TEXT_ENCODERS = ("clip_l", "clip_h", "clip_g", "t5xxl")

_COMPONENT_PREFIXES = (
    (UNET_PREFIX, "unet"),
    ("cond_stage_model.transformer.", "clip_l"),
    ("cond_stage_model.model.", "clip_h"),
    ("conditioner.embedders.0.transformer.", "clip_l"),
    ("conditioner.embedders.1.model.", "clip_g"),
    ("text_encoders.clip_l.", "clip_l"),
    ("text_encoders.clip_g.", "clip_g"),
    ("text_encoders.t5xxl.", "t5xxl"),
    ("first_stage_model.", "vae"),
    ("vae.", "vae"),
    ("model.model_sampling.", "schedule"),
)


def shrink_dim(dim: int, factor: int) -> int:
    """Return `dim // factor` for a multiple of 64, else `dim` unchanged."""
    return dim // factor if factor > 1 and dim % 64 == 0 else dim


def shrink_shape(shape: Sequence[int], factor: int) -> tuple[int, ...]:
    """Return the shape with every multiple-of-64 dimension divided by `factor`."""
    return tuple(shrink_dim(int(d), factor) for d in shape)


def component_of(key: str) -> str:
    """Return the checkpoint component of a canonical manifest key."""
    for prefix, component in _COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return component
    return "schedule" if "." not in key else "other"


def _wanted(components: Iterable[str] | None) -> set[str] | None:
    if components is None:
        return None
    wanted: set[str] = set()
    for name in components:
        wanted.update(TEXT_ENCODERS if name == "te" else (name,))
    return wanted


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF)


def synthetic_tensor(name: str, shape: Sequence[int], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Return a deterministic tensor for `name`: scaled Gaussian weights, ones-ish norms, arange ids."""
    shape = tuple(shape)
    if not dtype.is_floating_point:
        if name.endswith("position_ids"):
            return torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous()
        return torch.zeros(shape, dtype=dtype)
    generator = _generator(seed, name)
    if len(shape) == 0:
        return torch.tensor(4.6, dtype=torch.float32).to(dtype)
    values = torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        values.mul_(1.0 / math.sqrt(fan_in))
    elif name.endswith("weight") or name.endswith("scale"):
        values.mul_(0.02).add_(1.0)
    else:
        values.mul_(0.02)
    return values.to(dtype)


# -- checkpoints ------------------------------------------------------------------------------------
def _release_rules(arch: str, components: set[str] | None, prefix: str | None) -> tuple[set[str] | None, str | None, set[str]]:
    drop: set[str] = set()
    if arch == "flux":
        return {"unet"}, "" if prefix is None else prefix, drop
    if arch == "sdxl":
        wanted = (components or {"unet", "clip_l", "clip_g", "vae"}) - {"schedule"}
        return wanted, prefix, drop
    if arch == "sd3":
        drop.add("model.model_sampling.sigmas")
    return components, prefix, drop


def _diffusers_entries(arch: str, shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, str, tuple[int, int] | None, bool]]:
    """Return (diffusers tensor name, canonical key, rows, halves swapped) for a diffusers-layout denoiser."""
    entries: list[tuple[str, str, tuple[int, int] | None, bool]] = []
    if arch in ("sd1", "sd2", "sdxl"):
        source = diffusers_names("sdxl" if arch == "sdxl" else "sd1")["modules"]
        for name, entry in source.items():
            if not name.startswith("unet."):
                continue
            path = name[len("unet."):]
            entries.append((path + ".weight", entry["key"], None, False))
            if "bias" in entry:
                entries.append((path + ".bias", entry["bias"], None, False))
        return entries
    if arch in ("flux", "sd3"):
        from lytools.arch.keymap import diffusers_table

        for name, entry in diffusers_table(arch).items():
            if not name.startswith("transformer."):
                continue
            if entry.key not in shapes:
                continue  # SD3.5 modules outside the (SD3 medium) manifest
            path = name[len("transformer."):]
            entries.append((path + ".weight", entry.key, entry.key_rows, entry.swap_halves))
            bias = entry.key[: -len(".weight")] + ".bias"
            if bias in shapes:
                entries.append((path + ".bias", bias, entry.key_rows, entry.swap_halves))
        return entries
    raise LytoolsError(f"no diffusers layout for {arch}")


_BLOCK = re.compile(r"^model\.diffusion_model\.(double_blocks|single_blocks|joint_blocks)\.(\d+)\.")


def _block_index(key: str) -> int | None:
    found = _BLOCK.match(key)
    return int(found.group(2)) if found else None


@dataclass(frozen=True)
class _Source:
    """How one output tensor is made: the canonical key it copies and the rows it takes."""

    key: str
    rows: tuple[int, int] | None = None
    swap_halves: bool = False  # diffusers' [scale; shift] order of a [shift; scale] modulation


def checkpoint_plan(
    arch: str,
    *,
    factor: int = 8,
    components: Iterable[str] | None = None,
    layout: str = "native",
    prefix: str | None = None,
    dtype: torch.dtype | None = None,
    in_channels: int | None = None,
    variant: str | None = None,
    release: bool = False,
    keep_blocks: int | None = None,
) -> list[tuple[PlannedTensor, _Source]]:
    """Return the planned tensors of a synthetic checkpoint (see build_checkpoint)."""
    manifest = checkpoint_manifest(arch)
    wanted = _wanted(components)
    drop: set[str] = set()
    if release:
        wanted, prefix, drop = _release_rules(arch, wanted, prefix)
    full = {key: (tuple(value[0]), TORCH_NAMES[value[1]]) for key, value in manifest["tensors"].items()}
    if keep_blocks is not None:
        drop.update(k for k in full if _block_index(k) is not None and _block_index(k) >= keep_blocks)
    if variant == "schnell" and arch == "flux":
        drop.update(k for k in full if ".guidance_in." in k)
    elif variant is not None and not (arch == "flux" and variant == "dev"):
        raise LytoolsError(f"unknown synthetic variant {variant!r} for {arch}")
    shapes: dict[str, tuple[int, ...]] = {}
    for key, (shape, _) in full.items():
        shape = list(shape)
        if in_channels is not None:
            if key == UNET_PREFIX + "input_blocks.0.0.weight":
                shape[1] = in_channels
            elif key == UNET_PREFIX + "img_in.weight":
                shape[1] = in_channels
        shapes[key] = shrink_shape(shape, factor)

    def out_dtype(key: str) -> torch.dtype:
        stored = full[key][1]
        return dtype if dtype is not None and stored.is_floating_point else stored

    plan: list[tuple[PlannedTensor, _Source]] = []
    if layout == "diffusers":
        if wanted is not None and wanted != {"unet"}:
            raise LytoolsError("a diffusers-layout synthetic file holds the denoiser only")
        out_prefix = prefix or ""
        for name, key, rows, swapped in _diffusers_entries(arch, shapes):
            if key in drop:
                continue
            shape = shapes[key]
            if rows is not None:
                scaled = (shrink_dim(rows[0], factor) if rows[0] else 0, shrink_dim(rows[1], factor))
                shape = (scaled[1] - scaled[0],) + shape[1:]
                rows = scaled
            plan.append((plan_entry(out_prefix + name, out_dtype(key), shape), _Source(key, rows, swapped)))
        return plan
    if layout != "native":
        raise LytoolsError(f"unknown synthetic checkpoint layout {layout!r} (native, diffusers)")
    for key, shape in shapes.items():
        if key in drop:
            continue
        if wanted is not None and component_of(key) not in wanted:
            continue
        name = key
        if prefix is not None and key.startswith(UNET_PREFIX):
            name = prefix + key[len(UNET_PREFIX):]
        plan.append((plan_entry(name, out_dtype(key), shape), _Source(key)))
    return plan


def build_checkpoint(
    path: str | os.PathLike,
    arch: str,
    *,
    factor: int = 8,
    components: Iterable[str] | None = None,
    layout: str = "native",
    prefix: str | None = None,
    dtype: torch.dtype | None = None,
    seed: int = 0,
    in_channels: int | None = None,
    variant: str | None = None,
    release: bool = False,
    keep_blocks: int | None = None,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic checkpoint tensor by tensor and return its path.

    factor: shrink factor (1 = full size). components: subset (unet, clip_l, clip_h, clip_g,
    t5xxl, vae, schedule, te). layout: native (manifest keys: LDM/SGM/BFL/MMDiT) or diffusers
    (denoiser only, diffusers module names). prefix: replaces `model.diffusion_model.` ("" for bare
    Flux, "diffusion_model."). dtype: floating dtype (default: release dtypes). in_channels: conv_in
    / img_in input channels (9 = inpaint). variant: flux "schnell" drops guidance_in. release: the
    released file's key set (flux: bare transformer; sdxl: no schedule buffers). keep_blocks: keep
    only the first N Flux double/single and SD3 joint blocks (small DiT files for unit tests).
    """
    plan = checkpoint_plan(
        arch, factor=factor, components=components, layout=layout, prefix=prefix, dtype=dtype,
        in_channels=in_channels, variant=variant, release=release, keep_blocks=keep_blocks,
    )
    sources = {entry.name: source for entry, source in plan}
    entries = {entry.name: entry for entry, _ in plan}
    writer = SafetensorsWriter(path, [entry for entry, _ in plan], metadata, overwrite=overwrite)
    with writer:
        for name in writer.order:
            entry, source = entries[name], sources[name]
            tensor = _make(source, entry, seed)
            writer.write(name, tensor)
    return writer.path


def _make(source: _Source, entry: PlannedTensor, seed: int) -> torch.Tensor:
    from lytools.io.dtypes import TORCH_DTYPES

    dtype = TORCH_DTYPES[entry.dtype]
    if source.swap_halves:
        tensor = synthetic_tensor(source.key, entry.shape, dtype, seed)
        half = tensor.shape[0] // 2
        return torch.cat([tensor[half:], tensor[:half]])
    if source.rows is None:
        return synthetic_tensor(source.key, entry.shape, dtype, seed)
    # a row slice of a fused tensor: the same values the fused tensor would hold
    start, stop = source.rows
    rows_total = stop  # only rows [0, stop) are needed to take the slice
    fused = synthetic_tensor(source.key, (rows_total,) + entry.shape[1:], torch.float32, seed)
    return fused[start:stop].to(dtype)


def build_sparse_checkpoint(path: str | os.PathLike, arch: str, *, factor: int = 1, metadata: Mapping[str, str] | None = None,
                            overwrite: bool = False, **options) -> Path:
    """Write only the header (real shapes, full offsets) and truncate the file to its full size.

    The result is a valid safetensors file whose data reads as zeros (a sparse file: milliseconds
    and no disk space), for header-only tests of info and detection.
    """
    plan = [entry for entry, _ in checkpoint_plan(arch, factor=factor, **options)]
    return write_sparse(path, plan, metadata, overwrite=overwrite)


def write_sparse(path: str | os.PathLike, plan: Sequence[PlannedTensor], metadata: Mapping[str, str] | None = None,
                 *, overwrite: bool = False) -> Path:
    """Write a header for `plan` and extend the file to its full size without writing data."""
    path = check_output_path(path, overwrite)
    ordered = file_order(plan)
    header = build_header(ordered, metadata)
    total = len(header) + sum(entry.nbytes for entry in ordered)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(total)
    return path


# -- networks ---------------------------------------------------------------------------------------
def select_modules(arch: str, modules: str | Iterable[str] = "lierla", optional: Iterable[str] = (),
                   components: Iterable[str] | None = None) -> list[str]:
    """Return kohya module names: "lierla" (default set), "c3lier" (with conv modules), "all",
    or an explicit list; `optional` adds Flux/SD3 optional sets (train_t5xxl, in_dims, final_layer, embedders)."""
    table = module_table(arch)
    optional = set(optional)
    wanted_components = set(components) if components is not None else None
    if isinstance(modules, str):
        if modules not in ("lierla", "c3lier", "all"):
            raise LytoolsError(f"unknown module set {modules!r} (lierla, c3lier, all)")
        names = [
            name for name, target in table.items()
            if (modules != "lierla" or not target.c3lier)
            and (modules == "all" or target.optional is None or target.optional in optional)
        ]
    else:
        names = list(modules)
        missing = [name for name in names if name not in table]
        if missing:
            raise LytoolsError(f"not {arch} kohya modules: {', '.join(missing[:3])}")
    if wanted_components is not None:
        names = [n for n in names if table[n].component in wanted_components]
    return sorted(names)


def _factor_shapes(algo: str, shape: tuple[int, ...], rank: int) -> dict[str, tuple[int, ...]]:
    out, inp, kernel = shape[0], shape[1], shape[2:]
    if algo == "lora":
        if kernel:
            return {"lora_down.weight": (rank, inp) + kernel, "lora_up.weight": (out, rank, 1, 1)}
        return {"lora_down.weight": (rank, inp), "lora_up.weight": (out, rank)}
    if algo == "loha":
        flat_in = math.prod((inp,) + kernel)
        return {"hada_w1_a": (out, rank), "hada_w1_b": (rank, flat_in), "hada_w2_a": (out, rank), "hada_w2_b": (rank, flat_in)}
    if algo == "full":
        return {"diff": shape}
    raise LytoolsError(f"synthetic networks support lora, loha, full (not {algo!r})")


@dataclass
class NetworkPlan:
    """Tensor names, shapes and the module each belongs to."""

    entries: list[PlannedTensor] = field(default_factory=list)
    modules: dict[str, str] = field(default_factory=dict)  # written module name -> kohya module
    alphas: dict[str, float] = field(default_factory=dict)


def _layout_names(arch: str, kohya: str, layout: str) -> list[tuple[str, tuple[int, int] | None]]:
    """Return (written module name, rows of the kohya module it covers) for one kohya module."""
    if layout == "kohya":
        return [(kohya, None)]
    table = module_table(arch)
    target = table[kohya]
    if layout == "comfy":
        encoder = next(e for e in ENCODERS[arch] if e.component == target.component)
        if target.component == "unet":
            return [(encoder.comfy + target.key[len(UNET_PREFIX):-len(".weight")], None)]
        return [(encoder.comfy + target.path, None)]
    parts = kohya_to_diffusers(arch).get(kohya)
    if not parts:
        raise LytoolsError(f"{kohya}: no diffusers name for this module")
    names = []
    for part in parts:
        component, _, path = part.diffusers.partition(".")
        if layout == "diffusers":
            name = part.diffusers
        elif layout == "peft":
            name = "base_model.model." + path
        elif layout == "lycoris":
            if target.component != "unet":
                raise LytoolsError("lycoris_ names exist for the denoiser only (components=('unet',))")
            name = "lycoris_" + path.replace(".", "_")
        else:
            raise LytoolsError(f"unknown network layout {layout!r} (kohya, lycoris, diffusers, peft, comfy)")
        names.append((name, part.module_rows))
    return names


_DIFFUSERS_SUFFIX = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def network_plan(
    arch: str,
    *,
    factor: int = 8,
    rank: int = 4,
    alpha: float | None = None,
    conv_rank: int | None = None,
    conv_alpha: float | None = None,
    dtype: torch.dtype = torch.float16,
    modules: str | Iterable[str] = "lierla",
    optional: Iterable[str] = (),
    components: Iterable[str] | None = None,
    layout: str = "kohya",
    algo: str = "lora",
    dora: bool = False,
) -> NetworkPlan:
    """Return the tensors of a synthetic network (see build_network)."""
    if layout in ("diffusers", "peft") and algo != "lora":
        raise LytoolsError(f"{layout} layout is written for lora only")
    if layout == "peft" and components is not None and len(set(components)) > 1:
        raise LytoolsError("a peft adapter covers one component")
    if layout == "peft" and components is None:
        components = ("unet",)
    if layout == "lycoris" and components is None:
        components = ("unet",)
    table = module_table(arch)
    plan = NetworkPlan()
    split_names = kohya_to_diffusers(arch) if layout in ("diffusers", "peft", "lycoris") else None
    for kohya in select_modules(arch, modules, optional, components):
        if split_names is not None and kohya not in split_names:
            continue  # no diffusers name
        target = table[kohya]
        full = target.shape
        is_conv = target.kind in ("conv3x3", "conv")
        module_rank = (conv_rank or rank) if is_conv else rank
        module_alpha = (conv_alpha if conv_alpha is not None else alpha) if is_conv else alpha
        for name, rows in _layout_names(arch, kohya, layout):
            shape = full if rows is None else (rows[1] - rows[0],) + full[1:]
            shape = shrink_shape(shape, factor)
            for suffix, factor_shape in _factor_shapes(algo, shape, module_rank).items():
                if layout in ("diffusers", "peft"):
                    suffix = _DIFFUSERS_SUFFIX[suffix]
                plan.entries.append(plan_entry(f"{name}.{suffix}", dtype, factor_shape))
            if algo != "full" and layout not in ("diffusers", "peft"):
                plan.entries.append(plan_entry(f"{name}.alpha", dtype, ()))
                plan.alphas[name] = float(module_alpha if module_alpha is not None else module_rank)
            if dora:
                if layout in ("diffusers", "peft"):  # peft: [out] for linear, [1, out, 1, 1] for conv
                    magnitude = (shape[0],) if len(shape) == 2 else (1, shape[0]) + (1,) * (len(shape) - 2)
                    plan.entries.append(plan_entry(f"{name}.lora_magnitude_vector", torch.float32, magnitude))
                else:
                    plan.entries.append(plan_entry(f"{name}.dora_scale", torch.float32, (shape[0],) + (1,) * (len(shape) - 1)))
            plan.modules[name] = kohya
    return plan


def build_network(path: str | os.PathLike, arch: str, *, seed: int = 0, metadata: Mapping[str, str] | None = None,
                  overwrite: bool = False, **options) -> Path:
    """Write a synthetic network and return its path.

    One module per kohya module of `<arch>-lora-names.json` selected by `modules` ("lierla",
    "c3lier", "all" or names) and `optional` (flux: "train_t5xxl", "in_dims", "final_layer"; sd3: "embedders",
    "train_t5xxl"); `components` restricts to unet / te / te1 / te2 / te3. layout: kohya (default),
    lycoris (`lycoris_<diffusers path>`, denoiser only), diffusers (`<component>.<path>.lora_A/B`),
    peft (`base_model.model.<path>`, one component), comfy (`diffusion_model.<path>`,
    `text_encoders.<enc>.transformer.<path>`). Fused Flux/SD3 modules are split in the diffusers,
    peft and lycoris layouts. algo: lora (LoCon for convs), loha, full. Other options: network_plan.
    """
    plan = network_plan(arch, **options)
    writer = SafetensorsWriter(path, plan.entries, metadata, overwrite=overwrite)
    entries = {entry.name: entry for entry in plan.entries}
    from lytools.io.dtypes import TORCH_DTYPES

    with writer:
        for name in writer.order:
            entry = entries[name]
            dtype = TORCH_DTYPES[entry.dtype]
            module = name.rsplit(".", 2)[0] if name.endswith(".weight") else name.rsplit(".", 1)[0]
            if name.endswith(".alpha"):
                tensor = torch.tensor(plan.alphas[module], dtype=dtype)
            elif name.endswith("dora_scale") or name.endswith("lora_magnitude_vector"):
                tensor = (1.0 + 0.05 * torch.randn(entry.shape, generator=_generator(seed, name))).to(dtype)
            else:
                tensor = (0.1 * torch.randn(entry.shape, generator=_generator(seed, name))).to(dtype)
            writer.write(name, tensor)
    return writer.path


# -- a fine-tune with a known change ------------------------------------------------------------------
@dataclass(frozen=True)
class TunedCheckpoint:
    path: Path
    changed: tuple[str, ...]  # checkpoint keys that differ from the base


def _lora_delta(down: torch.Tensor, up: torch.Tensor, scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    delta = up.float().reshape(up.shape[0], -1) @ down.float().reshape(down.shape[0], -1)
    return (delta * scale).reshape(shape)


def build_tuned(base: str | os.PathLike, out: str | os.PathLike, network: str | os.PathLike, *, ratio: float = 1.0,
                noise: float = 0.0, seed: int = 0, overwrite: bool = False) -> TunedCheckpoint:
    """Write base + ratio·ΔW(network) (+ N(0, noise²) on each changed tensor), tensor by tensor.

    The network must be a kohya-layout LoRA/LoCon (build_network's default); modules are placed
    with lytools.arch.Resolver, so any of its spellings work.
    """
    from lytools.arch.resolve import Resolver

    header = read_header(base)
    resolver = Resolver(header.tensors, header.metadata)
    deltas: dict[str, list[tuple[tuple[int, int] | None, torch.Tensor]]] = {}
    with open_file(network) as net:
        modules = sorted({key.rsplit(".", 2)[0] for key in net.keys() if key.endswith(".lora_down.weight")})
        for module in modules:
            resolved = resolver.resolve(module)
            if resolved is None:
                raise LytoolsError(f"{network}: module {module} matches nothing in {base}")
            down = net.get(f"{module}.lora_down.weight")
            up = net.get(f"{module}.lora_up.weight")
            rank = down.shape[0]
            alpha = float(net.get(f"{module}.alpha").float()) if f"{module}.alpha" in net else float(rank)
            for placement in resolved.placements:
                target = header.tensors[placement.key].shape
                delta_rows = up
                if placement.module_rows is not None:
                    delta_rows = up[placement.module_rows[0]:placement.module_rows[1]]
                rows = placement.rows
                shape = tuple(target) if rows is None else (rows[1] - rows[0],) + tuple(target[1:])
                delta = _lora_delta(down, delta_rows, ratio * alpha / rank, shape)
                deltas.setdefault(placement.key, []).append((rows, delta))
    planned = [plan_entry(name, info.dtype, info.shape) for name, info in header.tensors.items()]
    writer = SafetensorsWriter(out, planned, header.metadata, overwrite=overwrite)
    with open_file(base) as source, writer:
        for name in writer.order:
            tensor = source.get(name)
            if name in deltas:
                changed = tensor.float().clone()
                for rows, delta in deltas[name]:
                    view = changed if rows is None else changed[rows[0]:rows[1]]
                    view += delta
                    if noise:
                        view += noise * torch.randn(view.shape, generator=_generator(seed, name))
                tensor = changed.to(tensor.dtype)
            writer.write(name, tensor)
    return TunedCheckpoint(writer.path, tuple(sorted(deltas)))
