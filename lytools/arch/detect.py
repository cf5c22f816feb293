"""Which model a checkpoint is, from its header alone (FORMATS.md 2.1-2.2).

Key names first, shapes second; metadata only fills in what weights cannot tell (prediction
type) and is reported when it contradicts them. A file matching no rule is `unknown`.

Synthetic test models shrink every dimension that is a multiple of 64 by a factor (lytools.testing);
detection reads the factor from a dimension every family fixes (model channels, hidden size) and
compares the other widths after scaling them back, so shrunk and full-size files detect alike.
`CheckpointArch.scale` is 1 for real files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

Shape = tuple[int, ...]
SCALES = (1, 2, 4, 8, 16, 32, 64)

# denoiser wrapper prefixes, most specific first ("" = bare keys)
DENOISER_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.", "unet.", "transformer.", "")

# text encoders and VAEs by key prefix: (prefix, component)
ENCODER_PREFIXES = (
    ("cond_stage_model.transformer.", "clip_l"),
    ("cond_stage_model.model.", "clip_h"),
    ("conditioner.embedders.0.transformer.", "clip_l"),
    ("conditioner.embedders.0.model.", "clip_g"),  # SDXL refiner: bigG alone
    ("conditioner.embedders.1.model.", "clip_g"),
    ("text_encoders.clip_l.", "clip_l"),
    ("text_encoders.clip_g.", "clip_g"),
    ("text_encoders.clip_h.", "clip_h"),
    ("text_encoders.t5xxl.", "t5xxl"),
    ("text_encoder.", "text_encoder"),
    ("text_encoder_2.", "text_encoder_2"),
    ("text_encoder_3.", "text_encoder_3"),
)
VAE_PREFIXES = ("first_stage_model.", "vae.")
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod")

_LDM_TO_K = re.compile(r"^input_blocks\.(\d+)\.1\.transformer_blocks\.0\.attn2\.to_k\.weight$")
_DIFFUSERS_TO_K = re.compile(r"^down_blocks\.(\d+)\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.weight$")
_BLOCK_INDEX = re.compile(r"^(double_blocks|single_blocks|joint_blocks|transformer_blocks|single_transformer_blocks)\.(\d+)\.")


@dataclass(frozen=True)
class CheckpointArch:
    """What a checkpoint file is.

    arch: sd1 | sd2 | sdxl | sd3 | flux | chroma | unknown
    layout: ldm | sgm | diffusers | bfl (Flux/Chroma single file) | mmdit (SD3 single file) | unknown
    prefix: wrapper prefix of the denoiser keys ("model.diffusion_model.", "diffusion_model.",
        "" for bare Flux / diffusers files); None when the file holds no denoiser.
    variant: base | refiner | inpaint | instruct-pix2pix | dev | schnell | fill | control |
        medium | 3.5-medium | 3.5-large ... (None when plain or unknown)
    components: component name (unet, clip_l, clip_h, clip_g, t5xxl, vae, schedule, ...) -> key prefix
    prediction: epsilon | v | unknown (only from metadata or marker keys, never guessed)
    scale: shrink factor of a synthetic test model (1 for real files)
    """

    arch: str
    layout: str
    prefix: str | None = None
    variant: str | None = None
    components: dict[str, str] = field(default_factory=dict)
    in_channels: int | None = None
    context_dim: int | None = None
    prediction: str = "unknown"
    text_encoder_only: bool = False
    blocks: dict[str, int] = field(default_factory=dict)
    scale: int = 1
    notes: tuple[str, ...] = ()

    @property
    def known(self) -> bool:
        return self.arch != "unknown"

    def as_dict(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "layout": self.layout,
            "prefix": self.prefix,
            "variant": self.variant,
            "components": dict(self.components),
            "in_channels": self.in_channels,
            "context_dim": self.context_dim,
            "prediction": self.prediction,
            "text_encoder_only": self.text_encoder_only,
            "blocks": dict(self.blocks),
            "scale": self.scale,
            "notes": list(self.notes),
        }


def shapes_of(tensors: Any) -> dict[str, Shape]:
    """Return {name: shape} from a Header, a file object, {name: TensorInfo|tensor|shape}."""
    if hasattr(tensors, "tensors") and isinstance(getattr(tensors, "tensors"), Mapping):
        tensors = tensors.tensors
    elif hasattr(tensors, "infos") and callable(tensors.infos):
        return {info.name: tuple(info.shape) for info in tensors.infos()}
    result: dict[str, Shape] = {}
    for name, value in tensors.items():
        shape = getattr(value, "shape", value)
        result[name] = tuple(int(d) for d in shape)
    return result


def _scale_from(dim: int, full_sizes: tuple[int, ...]) -> int | None:
    """Return the shrink factor that turns `dim` into one of `full_sizes`, or None."""
    for scale in SCALES:
        if dim * scale in full_sizes:
            return scale
    return None


def _block_counts(rel: Mapping[str, Shape]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for key in rel:
        found = _BLOCK_INDEX.match(key)
        if found:
            kind, index = found.group(1), int(found.group(2))
            counts[kind] = max(counts.get(kind, 0), index + 1)
    return counts


def _strip(shapes: Mapping[str, Shape], prefix: str) -> dict[str, Shape]:
    if not prefix:
        return dict(shapes)
    n = len(prefix)
    return {key[n:]: shape for key, shape in shapes.items() if key.startswith(prefix)}


@dataclass
class _Denoiser:
    arch: str
    layout: str
    prefix: str
    variant: str | None = None
    in_channels: int | None = None
    context_dim: int | None = None
    blocks: dict[str, int] = field(default_factory=dict)
    scale: int = 1
    notes: list[str] = field(default_factory=list)


def _detect_flux(rel: Mapping[str, Shape], prefix: str) -> _Denoiser | None:
    if "double_blocks.0.img_attn.qkv.weight" not in rel or "single_blocks.0.linear1.weight" not in rel:
        return None
    hidden = rel["double_blocks.0.img_attn.qkv.weight"][1]
    scale = _scale_from(hidden, (3072,)) or 1
    blocks = _block_counts(rel)
    if "distilled_guidance_layer.in_proj.weight" in rel:
        found = _Denoiser("chroma", "bfl", prefix, None, blocks=blocks, scale=scale)
    else:
        variant = "dev" if "guidance_in.in_layer.weight" in rel else "schnell"
        found = _Denoiser("flux", "bfl", prefix, variant, blocks=blocks, scale=scale)
    img_in = rel.get("img_in.weight")
    if img_in is not None and len(img_in) == 2:
        channels = img_in[1] * scale
        found.in_channels = channels
        if channels == 384:
            found.variant = f"{found.variant}-fill" if found.variant else "fill"
        elif channels == 128:
            found.variant = f"{found.variant}-control" if found.variant else "control"
        elif channels != 64:
            found.notes.append(f"img_in takes {channels} channels (plain Flux: 64)")
    if hidden * scale != 3072:
        found.notes.append(f"hidden size {hidden} (FLUX.1: 3072)")
    return found


def _detect_flux_diffusers(rel: Mapping[str, Shape], prefix: str) -> _Denoiser | None:
    if "transformer_blocks.0.attn.add_k_proj.weight" not in rel:
        return None
    blocks = _block_counts(rel)
    hidden = rel["transformer_blocks.0.attn.add_k_proj.weight"][1]
    if "single_transformer_blocks.0.proj_mlp.weight" in rel:
        scale = _scale_from(hidden, (3072,)) or 1
        variant = None  # a transformer file without its time embedders cannot tell
        if "time_text_embed.guidance_embedder.linear_1.weight" in rel:
            variant = "dev"
        elif "time_text_embed.timestep_embedder.linear_1.weight" in rel:
            variant = "schnell"
        found = _Denoiser("flux", "diffusers", prefix, variant, blocks=blocks, scale=scale)
        x_embedder = rel.get("x_embedder.weight")
        if x_embedder is not None and len(x_embedder) == 2:
            found.in_channels = x_embedder[1] * scale
        return found
    scale = _scale_from(hidden, (1536, 2432, 2048)) or 1
    found = _Denoiser("sd3", "diffusers", prefix, blocks=blocks, scale=scale)
    depth = blocks.get("transformer_blocks", 0)
    found.variant = _sd3_variant(depth, any(".attn2." in key for key in rel))
    return found


def _sd3_variant(depth: int, has_attn2: bool) -> str | None:
    if has_attn2:
        return "3.5-medium"
    return {24: "medium", 38: "3.5-large"}.get(depth)


def _detect_sd3(rel: Mapping[str, Shape], prefix: str) -> _Denoiser | None:
    qkv = rel.get("joint_blocks.0.x_block.attn.qkv.weight")
    if qkv is None:
        return None
    blocks = _block_counts(rel)
    depth = blocks.get("joint_blocks", 0)
    hidden = qkv[1]
    scale = _scale_from(hidden, (64 * depth,)) or 1
    found = _Denoiser("sd3", "mmdit", prefix, blocks=blocks, scale=scale)
    found.variant = _sd3_variant(depth, any(".x_block.attn2." in key for key in rel))
    x_embedder = rel.get("x_embedder.proj.weight")
    if x_embedder is not None and len(x_embedder) == 4:
        found.in_channels = x_embedder[1]
    return found


def _unet_family(
    conv_in: Shape, context: int | None, label_emb: bool, proj_in: Shape | None, layout: str, prefix: str
) -> _Denoiser:
    """Classify an SD1/SD2/SDXL UNet from conv_in, cross-attention width and SDXL's label_emb."""
    channels, in_channels = conv_in[0], conv_in[1] if len(conv_in) > 1 else None
    found = _Denoiser("unknown", layout, prefix, in_channels=in_channels)
    if context is None:
        found.notes.append("UNet without cross-attention: not a Stable Diffusion UNet")
        return found
    if label_emb:
        scale = _scale_from(channels, (320, 384))
        full_context = context * scale if scale else None
        if full_context == 2048:
            found.arch, found.variant = "sdxl", "base"
        elif full_context == 1280:
            found.arch, found.variant = "sdxl", "refiner"
        else:
            found.notes.append(f"UNet with label_emb and context width {context}: unknown SDXL-like model")
    else:
        scale = _scale_from(channels, (320,))
        full_context = context * scale if scale else None
        if full_context == 768:
            found.arch = "sd1"
        elif full_context == 1024:
            found.arch = "sd2"
        else:
            found.notes.append(f"UNet with context width {context}: not SD1 (768) or SD2 (1024)")
    if found.arch == "sdxl" and layout == "ldm":
        found.layout = "sgm"
    found.scale = scale or 1
    found.context_dim = full_context
    if proj_in is not None and found.arch in ("sd1", "sd2"):
        expected = 4 if found.arch == "sd1" else 2
        if len(proj_in) != expected:
            found.notes.append(f"proj_in is {len(proj_in)}-D; {found.arch} has a {expected}-D proj_in")
    variant = {9: "inpaint", 8: "instruct-pix2pix"}.get(in_channels or 0)
    if variant:
        found.variant = variant if found.variant in (None, "base") else f"{found.variant}-{variant}"
    elif in_channels not in (None, 4):
        found.notes.append(f"conv_in takes {in_channels} channels")
    return found


def _detect_ldm_unet(rel: Mapping[str, Shape], prefix: str) -> _Denoiser | None:
    conv_in = rel.get("input_blocks.0.0.weight")
    if conv_in is None or "out.2.weight" not in rel and "middle_block.0.in_layers.2.weight" not in rel:
        return None
    context = None
    for key in sorted(rel, key=lambda k: (len(k), k)):
        if _LDM_TO_K.match(key):
            context = rel[key][1]
            break
    proj_in = next((rel[k] for k in sorted(rel) if re.match(r"^input_blocks\.\d+\.1\.proj_in\.weight$", k)), None)
    return _unet_family(conv_in, context, "label_emb.0.0.weight" in rel, proj_in, "ldm", prefix)


def _detect_diffusers_unet(rel: Mapping[str, Shape], prefix: str) -> _Denoiser | None:
    conv_in = rel.get("conv_in.weight")
    if conv_in is None or "down_blocks.0.resnets.0.conv1.weight" not in rel:
        return None
    context = None
    for key in sorted(rel):
        if _DIFFUSERS_TO_K.match(key):
            context = rel[key][1]
            break
    proj_in = next((rel[k] for k in sorted(rel) if re.match(r"^down_blocks\.\d+\.attentions\.0\.proj_in\.weight$", k)), None)
    return _unet_family(conv_in, context, "add_embedding.linear_1.weight" in rel, proj_in, "diffusers", prefix)


_DETECTORS = (_detect_flux, _detect_sd3, _detect_ldm_unet, _detect_flux_diffusers, _detect_diffusers_unet)


def _find_denoiser(shapes: Mapping[str, Shape]) -> _Denoiser | None:
    prefixes = {p for p in DENOISER_PREFIXES if p == "" or any(k.startswith(p) for k in shapes)}
    for prefix in DENOISER_PREFIXES:
        if prefix not in prefixes:
            continue
        rel = _strip(shapes, prefix)
        for detector in _DETECTORS:
            found = detector(rel, prefix)
            if found is not None:
                return found
    return None


def _find_components(shapes: Mapping[str, Shape], denoiser: _Denoiser | None) -> dict[str, str]:
    components: dict[str, str] = {}
    if denoiser is not None:
        components["unet"] = denoiser.prefix
    keys = list(shapes)
    for prefix, component in ENCODER_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            name = component
            if name in components:  # SDXL refiner bigG at embedders.0 vs base: keep the first
                continue
            components[name] = prefix
    for prefix in VAE_PREFIXES:
        if any(k.startswith(prefix) for k in keys):
            components["vae"] = prefix
            break
    if any(k in shapes for k in SCHEDULE_KEYS):
        components["schedule"] = ""
    if denoiser is None and not components:
        # bare component files: diffusers/transformers single-component layouts
        if "text_model.encoder.layers.0.self_attn.q_proj.weight" in shapes:
            width = shapes["text_model.encoder.layers.0.self_attn.q_proj.weight"][1]
            components[{768: "clip_l", 1024: "clip_h", 1280: "clip_g"}.get(width, "clip")] = ""
        elif "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes:
            components["t5xxl"] = ""
        elif any(k.startswith("encoder.conv_in.") for k in keys) and any(k.startswith("decoder.") for k in keys):
            components["vae"] = ""
    return components


def _arch_from_encoders(components: Mapping[str, str]) -> str:
    prefixes = set(components.values())
    if "conditioner.embedders.1.model." in prefixes or "conditioner.embedders.0.model." in prefixes:
        return "sdxl"
    if "cond_stage_model.model." in prefixes:
        return "sd2"
    if "cond_stage_model.transformer." in prefixes:
        return "sd1"
    if "text_encoders.t5xxl." in prefixes:
        if "text_encoders.clip_g." in prefixes:
            return "sd3"
        if "text_encoders.clip_l." in prefixes:
            return "flux"
    return "unknown"


def _prediction(shapes: Mapping[str, Shape], metadata: Mapping[str, str]) -> tuple[str, list[str]]:
    notes: list[str] = []
    votes: set[str] = set()
    spec = metadata.get("modelspec.prediction_type", "").strip().lower()
    if spec in ("epsilon", "eps"):
        votes.add("epsilon")
    elif spec in ("v", "v_prediction", "v-prediction"):
        votes.add("v")
    if metadata.get("ss_v_parameterization", "").lower() == "true":
        votes.add("v")
    base = metadata.get("ss_base_model_version", "")
    if base.endswith("_v"):
        votes.add("v")
    if metadata.get("modelspec.architecture", "").split("/")[0].endswith("-v"):
        votes.add("v")
    if "v_pred" in shapes:
        votes.add("v")
    if "ztsnr" in shapes:
        notes.append("zero-terminal-SNR marker key present")
    if len(votes) > 1:
        notes.append("metadata disagrees about the prediction type")
        return "unknown", notes
    return (votes.pop() if votes else "unknown"), notes


_METADATA_ARCH = (
    ("stable-diffusion-xl", "sdxl"),
    ("stable-diffusion-v2", "sd2"),
    ("stable-diffusion-v1", "sd1"),
    ("stable-diffusion-3", "sd3"),
    ("flux", "flux"),
    ("chroma", "chroma"),
)


def arch_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """Return the architecture the metadata claims (modelspec / ss_*), or None."""
    spec = metadata.get("modelspec.architecture", "")
    for marker, arch in _METADATA_ARCH:
        if spec.startswith(marker):
            return arch
    base = metadata.get("ss_base_model_version", "")
    if base.startswith("sdxl"):
        return "sdxl"
    if base.startswith("sd_v2"):
        return "sd2"
    if base.startswith("sd_v1"):
        return "sd1"
    if base.startswith("flux"):
        return "flux"
    if base.startswith("chroma"):
        return "chroma"
    if base in ("medium", "5-large", "5-medium"):
        return "sd3"
    if metadata.get("ss_v2", "").lower() == "true":
        return "sd2"
    return None


def detect_checkpoint(tensors: Any, metadata: Mapping[str, str] | None = None) -> CheckpointArch:
    """Return what a checkpoint is from its tensor names and shapes (plus metadata for ties)."""
    shapes = shapes_of(tensors)
    metadata = dict(metadata or {})
    denoiser = _find_denoiser(shapes)
    components = _find_components(shapes, denoiser)
    prediction, notes = _prediction(shapes, metadata)
    if denoiser is not None:
        arch, layout, prefix = denoiser.arch, denoiser.layout, denoiser.prefix
        notes = denoiser.notes + notes
        text_encoder_only = False
    else:
        arch, layout, prefix = _arch_from_encoders(components), "unknown", None
        text_encoder_only = any(c not in ("vae", "schedule") for c in components)
        if arch != "unknown":
            layout = {"sd1": "ldm", "sd2": "ldm", "sdxl": "sgm", "sd3": "mmdit", "flux": "bfl"}[arch]
        elif components:
            notes.append("no denoiser; components: " + ", ".join(sorted(components)))
    scale_keys = [k for k in shapes if k == "scaled_fp8" or k.endswith((".scale_weight", ".weight_scale"))]
    if scale_keys:
        notes.append(f"scaled fp8 checkpoint: {len(scale_keys)} per-tensor scale keys (true weight = fp8 x scale)")
    claimed = arch_from_metadata(metadata)
    if claimed and arch != "unknown" and claimed != arch:
        notes.append(f"metadata says {claimed} but the weights are {arch}; trusting the weights")
    return CheckpointArch(
        arch=arch,
        layout=layout,
        prefix=prefix,
        variant=denoiser.variant if denoiser else None,
        components=components,
        in_channels=denoiser.in_channels if denoiser else None,
        context_dim=denoiser.context_dim if denoiser else None,
        prediction=prediction,
        text_encoder_only=text_encoder_only,
        blocks=denoiser.blocks if denoiser else {},
        scale=denoiser.scale if denoiser else 1,
        notes=tuple(notes),
    )
