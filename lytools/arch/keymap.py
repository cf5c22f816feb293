"""Name maps: kohya module name <-> checkpoint key (+ rows of fused tensors) <-> diffusers/peft path.

Everything here is a table lookup built from the shipped manifests (FORMATS.md 4.6): a module
name is never split on `_`. Tables are built once per architecture (functools.cache).

Vocabulary
- canonical key: a checkpoint key as the manifests spell it (LDM/SGM/BFL/MMDiT names with
  `model.diffusion_model.`, the release's text-encoder prefixes).
- module path: a module's dotted path inside its component (`down_blocks.0.attentions.0.proj_in`,
  `text_model.encoder.layers.0.self_attn.q_proj`, `double_blocks.0.img_attn.qkv`).
- diffusers name: component + module path (`unet.down_blocks.0...`, `text_encoder_2.text_model...`,
  `transformer.single_transformer_blocks.0.attn.to_q`); a peft key drops the component inside a
  single-component adapter and adds `base_model.model.`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Callable, Mapping

from lytools.arch.manifests import checkpoint_manifest, diffusers_names, lora_names

Rows = tuple[int, int]
UNET_PREFIX = "model.diffusion_model."
NETWORK_ARCHS = ("sd1", "sd2", "sdxl", "sd3", "flux")


@dataclass(frozen=True)
class Encoder:
    """How one network component (kohya prefix) sits in the canonical checkpoint."""

    component: str  # unet | te | te1 | te2 | te3
    kohya_prefix: str  # lora_unet_ | lora_te_ | lora_te1_ ...
    key_prefix: str  # canonical checkpoint prefix of the component's keys
    style: str  # ldm | sgm | bfl | mmdit (denoisers); hf | openclip | t5 (text encoders)
    diffusers: str  # diffusers pipeline component: unet, transformer, text_encoder, ...
    comfy: str  # ComfyUI-native prefix: diffusion_model., text_encoders.clip_l.transformer., ...
    model_class: str = ""  # the diffusers/transformers class the pipeline loads the component as


def _unet(style: str, diffusers: str, model_class: str) -> Encoder:
    return Encoder("unet", "lora_unet_", UNET_PREFIX, style, diffusers, "diffusion_model.", model_class)


_CLIP, _CLIP_PROJ, _T5 = "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel"


ENCODERS: dict[str, tuple[Encoder, ...]] = {
    "sd1": (
        _unet("ldm", "unet", "UNet2DConditionModel"),
        Encoder("te", "lora_te_", "cond_stage_model.transformer.", "hf", "text_encoder", "text_encoders.clip_l.transformer.", _CLIP),
    ),
    "sd2": (
        _unet("ldm", "unet", "UNet2DConditionModel"),
        Encoder("te", "lora_te_", "cond_stage_model.model.", "openclip", "text_encoder", "text_encoders.clip_h.transformer.", _CLIP),
    ),
    "sdxl": (
        _unet("sgm", "unet", "UNet2DConditionModel"),
        Encoder("te1", "lora_te1_", "conditioner.embedders.0.transformer.", "hf", "text_encoder", "text_encoders.clip_l.transformer.", _CLIP),
        Encoder("te2", "lora_te2_", "conditioner.embedders.1.model.", "openclip", "text_encoder_2", "text_encoders.clip_g.transformer.", _CLIP_PROJ),
    ),
    "sd3": (
        _unet("mmdit", "transformer", "SD3Transformer2DModel"),
        Encoder("te1", "lora_te1_", "text_encoders.clip_l.transformer.", "hf", "text_encoder", "text_encoders.clip_l.transformer.", _CLIP_PROJ),
        Encoder("te2", "lora_te2_", "text_encoders.clip_g.transformer.", "hf", "text_encoder_2", "text_encoders.clip_g.transformer.", _CLIP_PROJ),
        Encoder("te3", "lora_te3_", "text_encoders.t5xxl.transformer.", "t5", "text_encoder_3", "text_encoders.t5xxl.transformer.", _T5),
    ),
    "flux": (
        _unet("bfl", "transformer", "FluxTransformer2DModel"),
        Encoder("te1", "lora_te1_", "text_encoders.clip_l.transformer.", "hf", "text_encoder", "text_encoders.clip_l.transformer.", _CLIP),
        Encoder("te3", "lora_te3_", "text_encoders.t5xxl.transformer.", "t5", "text_encoder_2", "text_encoders.t5xxl.transformer.", _T5),
    ),
}


@dataclass(frozen=True)
class ModuleTarget:
    """Where a kohya module lands in the canonical checkpoint.

    key: canonical checkpoint weight key. rows: [start, stop) of `key` when the module is a row
    slice of a fused tensor (SD2/SDXL-te2 q/k/v of `in_proj_weight`, SD3 qkv parts), else None.
    shape: the module's weight shape (the slice's shape when `rows` is set) = LoRA out x in (x k x k).
    fused_shape: full shape of `key` when the module is or covers a fused tensor.
    parts: for a module covering a whole fused tensor (Flux qkv/linear1): ((name, (start, stop)), ...).
    part: q/k/v when the module is one slice. component: unet | te | te1 | te2 | te3.
    """

    key: str
    kind: str  # linear | conv1x1 | conv3x3 | conv | norm | embedding | other
    shape: tuple[int, ...]
    rows: Rows | None = None
    fused_shape: tuple[int, ...] | None = None
    parts: tuple[tuple[str, Rows], ...] | None = None
    component: str = "unet"
    part: str | None = None
    c3lier: bool = False
    rank_from: str | None = None  # network_dim | conv_dim
    optional: str | None = None  # flux: train_t5xxl | in_dims | final_layer; sd3: embedders | train_t5xxl
    path: str | None = None  # module path inside the component (HF names for text encoders)


def kind_of(shape: tuple[int, ...]) -> str:
    """Return linear | conv1x1 | conv3x3 | conv | norm | embedding | other from a weight shape."""
    if len(shape) == 2:
        return "linear"
    if len(shape) == 4:
        if shape[2:] == (1, 1):
            return "conv1x1"
        return "conv3x3" if shape[2:] == (3, 3) else "conv"
    if len(shape) == 1:
        return "norm"
    return "other"


# -- text-encoder path rules (FORMATS.md 4.3) ---------------------------------------------------
_CLIP_LAYER = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12]|layer_norm[12])$")
_T5_LAYER = re.compile(r"^encoder_block_(\d+)_layer_(\d+)_(SelfAttention_(q|k|v|o)|DenseReluDense_(wi_0|wi_1|wo)|layer_norm)$")
_CLIP_SUB = {
    "self_attn_q_proj": "self_attn.q_proj", "self_attn_k_proj": "self_attn.k_proj",
    "self_attn_v_proj": "self_attn.v_proj", "self_attn_out_proj": "self_attn.out_proj",
    "mlp_fc1": "mlp.fc1", "mlp_fc2": "mlp.fc2", "layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2",
}
_CLIP_TOP = {
    "text_model_final_layer_norm": "text_model.final_layer_norm",
    "text_model_embeddings_token_embedding": "text_model.embeddings.token_embedding",
    "text_model_embeddings_position_embedding": "text_model.embeddings.position_embedding",
    "text_projection": "text_projection",
}
_T5_TOP = {"shared": "shared", "encoder_final_layer_norm": "encoder.final_layer_norm"}


def text_encoder_path(rest: str, style: str) -> str | None:
    """Return the HF/T5 dotted module path for a kohya text-encoder name without its prefix."""
    if style == "t5":
        found = _T5_LAYER.match(rest)
        if found:
            block, layer, sub = found.group(1), found.group(2), found.group(3)
            if sub.startswith("SelfAttention_"):
                sub = "SelfAttention." + sub[len("SelfAttention_"):]
            elif sub.startswith("DenseReluDense_"):
                sub = "DenseReluDense." + sub[len("DenseReluDense_"):]
            return f"encoder.block.{block}.layer.{layer}.{sub}"
        return _T5_TOP.get(rest)
    found = _CLIP_LAYER.match(rest)
    if found:
        return f"text_model.encoder.layers.{found.group(1)}.{_CLIP_SUB[found.group(2)]}"
    return _CLIP_TOP.get(rest)


_OPENCLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "layer_norm1": "ln_1", "layer_norm2": "ln_2",
}
_QKV_INDEX = {"q": 0, "k": 1, "v": 2}


def openclip_key(hf_path: str, width: int) -> tuple[str, Rows | None] | None:
    """Return (open_clip key relative to the encoder prefix, rows) for an HF CLIP module path.

    q/k/v projections are row slices of the fused `attn.in_proj_weight` ([q; k; v], `width`
    rows each); `positional_embedding` and `text_projection` are bare parameters.
    """
    found = re.match(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$", hf_path)
    if found:
        layer, sub = found.group(1), found.group(2)
        qkv = re.match(r"^self_attn\.([qkv])_proj$", sub)
        if qkv:
            index = _QKV_INDEX[qkv.group(1)]
            return f"transformer.resblocks.{layer}.attn.in_proj_weight", (index * width, (index + 1) * width)
        if sub in _OPENCLIP_LAYER:
            return f"transformer.resblocks.{layer}.{_OPENCLIP_LAYER[sub]}.weight", None
        return None
    top = {
        "text_model.final_layer_norm": "ln_final.weight",
        "text_model.embeddings.token_embedding": "token_embedding.weight",
        "text_model.embeddings.position_embedding": "positional_embedding",
    }
    if hf_path in top:
        return top[hf_path], None
    return None


def openclip_to_hf(rel: str) -> list[tuple[str, Rows | None]]:
    """Return the HF module paths (and rows of `rel` each covers) for an open_clip weight key."""
    found = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", rel)
    if found:
        layer, sub = found.group(1), found.group(2)
        base = f"text_model.encoder.layers.{layer}."
        if sub == "attn.in_proj_weight":
            return [(base + f"self_attn.{p}_proj", None) for p in "qkv"]  # rows filled by the caller
        for hf, oc in _OPENCLIP_LAYER.items():
            if sub == f"{oc}.weight":
                return [(base + hf, None)]
        return []
    top = {
        "ln_final.weight": "text_model.final_layer_norm",
        "token_embedding.weight": "text_model.embeddings.token_embedding",
        "positional_embedding": "text_model.embeddings.position_embedding",
    }
    return [(top[rel], None)] if rel in top else []


# -- the kohya tables ----------------------------------------------------------------------------
def _encoder_of(arch: str, kohya_name: str) -> Encoder:
    for encoder in ENCODERS[arch]:
        if kohya_name.startswith(encoder.kohya_prefix):
            return encoder
    raise KeyError(kohya_name)


def _tuple(value) -> tuple[int, ...] | None:
    return tuple(int(v) for v in value) if value is not None else None


def _module_path(arch: str, encoder: Encoder, name: str, key: str) -> str | None:
    rest = name[len(encoder.kohya_prefix):]
    if encoder.component != "unet":
        return text_encoder_path(rest, encoder.style)
    return key[len(UNET_PREFIX):-len(".weight")] if key.endswith(".weight") else None


@functools.cache
def module_table(arch: str) -> dict[str, ModuleTarget]:
    """Return {kohya module name: ModuleTarget} for sd1, sd2, sdxl, flux (manifests) and sd3 (by rule).

    For sd1/sd2 UNet modules `path` is the LDM path of the key (kohya names use diffusers
    paths; `diffusers_table` joins them).
    """
    if arch == "sd3":
        return _sd3_table()
    if arch not in ("sd1", "sd2", "sdxl", "flux"):
        raise KeyError(f"no module table for architecture {arch!r}")
    table: dict[str, ModuleTarget] = {}
    for name, entry in lora_names(arch)["modules"].items():
        encoder = _encoder_of(arch, name)
        qkv = entry.get("qkv")
        rows = parts = fused = part = None
        if qkv is not None:
            fused = _tuple(qkv["fused_shape"])
            if "part" in qkv:
                part, rows = qkv["part"], tuple(qkv["rows"])
            else:
                parts = tuple((p, tuple(r)) for p, r in zip(qkv["parts"], qkv["rows"]))
        table[name] = ModuleTarget(
            key=entry["key"],
            kind=entry["kind"],
            shape=_tuple(entry["shape"]),
            rows=rows,
            fused_shape=fused,
            parts=parts,
            component=encoder.component,
            part=part,
            c3lier=bool(entry.get("c3lier", False)),
            rank_from=entry.get("rank_from"),
            optional=entry.get("optional"),
            path=_module_path(arch, encoder, name, entry["key"]),
        )
    if arch == "flux":
        table.update(_flux_final_layer())
    return table


_FLUX_FINAL_LAYER = ("final_layer.linear", "final_layer.adaLN_modulation.1")


def _flux_final_layer() -> dict[str, ModuleTarget]:
    """Flux `final_layer` modules by rule (optional "final_layer"): sd-scripts' default targets leave
    them out, but kohya-style files name them and diffusers' kohya-Flux converter reads them."""
    tensors = checkpoint_manifest("flux")["tensors"]
    table: dict[str, ModuleTarget] = {}
    for path in _FLUX_FINAL_LAYER:
        key = f"{UNET_PREFIX}{path}.weight"
        shape = _tuple(tensors[key][0])
        table["lora_unet_" + path.replace(".", "_")] = ModuleTarget(
            key=key, kind=kind_of(shape), shape=shape, optional="final_layer", path=path,
        )
    return table


@functools.cache
def key_table(arch: str) -> dict[str, tuple[tuple[str, Rows | None], ...]]:
    """Return {canonical checkpoint key: ((kohya module, rows or None), ...)}: the way back from a key.

    A fused OpenCLIP `in_proj_weight` lists its q, k, v modules with their rows; every other key
    has one module.
    """
    result: dict[str, list[tuple[str, Rows | None]]] = {}
    for name, target in module_table(arch).items():
        result.setdefault(target.key, []).append((name, target.rows))
    return {key: tuple(sorted(modules, key=lambda m: (m[1] or (0, 0))[0])) for key, modules in result.items()}


_SD3_TARGETS = re.compile(r"^joint_blocks\.\d+\.(x_block|context_block)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2|adaLN_modulation\.1|attn2\.qkv|attn2\.proj)$")
_SD3_OPTIONAL = ("x_embedder.proj", "context_embedder", "t_embedder.mlp.0", "t_embedder.mlp.2",
                 "y_embedder.mlp.0", "y_embedder.mlp.2", "final_layer.linear", "final_layer.adaLN_modulation.1")
_CLIP_TARGET = re.compile(r"^text_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
_T5_TARGET = re.compile(r"^encoder\.block\.\d+\.layer\.\d+\.(SelfAttention\.[qkvo]|DenseReluDense\.(wi_0|wi_1|wo))$")


def _sd3_table() -> dict[str, ModuleTarget]:
    """SD3 kohya table by rule (sd-scripts lora_sd3): MMDiT block linears, CLIP-L/G and T5 linears."""
    tensors = checkpoint_manifest("sd3")["tensors"]
    table: dict[str, ModuleTarget] = {}
    for key, (shape, _dtype) in tensors.items():
        if not key.endswith(".weight"):
            continue
        for encoder in ENCODERS["sd3"]:
            if not key.startswith(encoder.key_prefix):
                continue
            path = key[len(encoder.key_prefix):-len(".weight")]
            optional = None
            if encoder.component == "unet":
                if path in _SD3_OPTIONAL:
                    optional = "embedders"
                elif not _SD3_TARGETS.match(path):
                    break
            elif encoder.style == "t5":
                if not _T5_TARGET.match(path):
                    break
                optional = "train_t5xxl"
            elif not _CLIP_TARGET.match(path):
                break
            full = _tuple(shape)
            parts = fused = None
            if path.endswith("attn.qkv") or path.endswith("attn2.qkv"):
                third = full[0] // 3
                fused = full
                parts = tuple((p, (i * third, (i + 1) * third)) for i, p in enumerate("qkv"))
            table[encoder.kohya_prefix + path.replace(".", "_")] = ModuleTarget(
                key=key, kind=kind_of(full), shape=full, fused_shape=fused, parts=parts,
                component=encoder.component, optional=optional, path=path,
            )
            break
    return dict(sorted(table.items()))


@functools.cache
def named_modules(arch: str) -> dict[str, ModuleTarget]:
    """Return every kohya module the name maps know: `module_table(arch)` and, for sd3, the SD3.5 block
    linears outside SD3 medium's manifest (`_sd35_blocks`, optional "sd35"). The diffusers and alias
    tables are built from this; module_table stays the manifest's (builders, extract walk it)."""
    table = module_table(arch)
    if arch != "sd3":
        return table
    return dict(sorted({**table, **_sd35_blocks(table)}.items()))


SD35_BLOCKS = 38  # SD3.5 large's joint blocks (the last, 37, pre-only); SD3 / SD3.5 medium have 24
_SD35_PARTS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")


def _sd35_blocks(table: dict[str, ModuleTarget]) -> dict[str, ModuleTarget]:
    """SD3.5 block linears SD3 medium's manifest lacks, by rule (optional "sd35", shapes at medium's width):
    `x_block.attn2.{qkv,proj}` of every block (SD3.5 medium's dual-attention blocks), block 23's full
    context block, blocks 24-37 as block 0, block 37's context block pre-only (qkv + 2·width adaLN)."""
    template = {t.path.split(".", 2)[2]: t for t in table.values()
                if t.path is not None and t.path.startswith("joint_blocks.0.")}
    width = template["x_block.attn.proj"].shape[0]
    wanted: dict[str, tuple[int, ...]] = {}
    for block in range(SD35_BLOCKS):
        wanted[f"joint_blocks.{block}.x_block.attn2.qkv"] = (3 * width, width)
        wanted[f"joint_blocks.{block}.x_block.attn2.proj"] = (width, width)
        if block < 23:
            continue
        for side in ("x_block", "context_block"):
            for part in _SD35_PARTS:
                sub = f"{side}.{part}"
                if block == SD35_BLOCKS - 1 and side == "context_block":
                    if part == "attn.qkv":
                        wanted[f"joint_blocks.{block}.{sub}"] = template[sub].shape
                    elif part == "adaLN_modulation.1":
                        wanted[f"joint_blocks.{block}.{sub}"] = (2 * width, width)
                    continue
                wanted[f"joint_blocks.{block}.{sub}"] = template[sub].shape
    result: dict[str, ModuleTarget] = {}
    for path, shape in wanted.items():
        name = "lora_unet_" + path.replace(".", "_")
        if name in table:
            continue  # SD3 medium's own entry (block 23's pre-only context adaLN keeps its 2·width rows)
        parts = fused = None
        if path.endswith("qkv"):
            third = shape[0] // 3
            fused = shape
            parts = tuple((p, (i * third, (i + 1) * third)) for i, p in enumerate("qkv"))
        result[name] = ModuleTarget(key=f"{UNET_PREFIX}{path}.weight", kind=kind_of(shape), shape=shape, fused_shape=fused,
                                    parts=parts, component="unet", optional="sd35", path=path)
    return result


# -- diffusers names --------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusersTarget:
    """A diffusers/peft module and the kohya module it belongs to.

    module_rows: rows of the kohya module's weight this diffusers module is (Flux q/k/v/mlp
    parts of a fused kohya module; SD3 qkv parts), None when they are the same module.
    key/key_rows: the canonical checkpoint key and its rows.
    swap_halves: the diffusers weight holds the key's rows with its two halves exchanged
    (adaLN modulations diffusers stores as [scale; shift] where SD3/BFL store [shift; scale]:
    Flux/SD3 `final_layer.adaLN_modulation.1` = `norm_out.linear`, SD3's last
    `context_block.adaLN_modulation.1` = `norm1_context.linear`; FORMATS.md 2.1).
    """

    diffusers: str
    kohya: str | None
    key: str
    key_rows: Rows | None
    module_rows: Rows | None
    shape: tuple[int, ...]
    swap_halves: bool = False


_SD3_DIFFUSERS = {
    ("x_block", "attn.proj"): "attn.to_out.0",
    ("context_block", "attn.proj"): "attn.to_add_out",
    ("x_block", "mlp.fc1"): "ff.net.0.proj",
    ("x_block", "mlp.fc2"): "ff.net.2",
    ("context_block", "mlp.fc1"): "ff_context.net.0.proj",
    ("context_block", "mlp.fc2"): "ff_context.net.2",
    ("x_block", "adaLN_modulation.1"): "norm1.linear",
    ("context_block", "adaLN_modulation.1"): "norm1_context.linear",
    ("x_block", "attn2.proj"): "attn2.to_out.0",
}
# denoiser modules outside the blocks: BFL/MMDiT path -> diffusers path (diffusers' single-file
# converters); the adaLN modulation of the final layer is stored with its halves swapped
_SD3_OUTER = {
    "x_embedder.proj": "pos_embed.proj", "context_embedder": "context_embedder",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_FLUX_OUTER = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_SWAPPED_OUTER = "final_layer.adaLN_modulation.1"
_SD3_QKV = {("x_block", "attn"): ("attn.to_q", "attn.to_k", "attn.to_v"),
            ("context_block", "attn"): ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
            ("x_block", "attn2"): ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


@functools.cache
def diffusers_table(arch: str) -> dict[str, DiffusersTarget]:
    """Return {diffusers name: DiffusersTarget} for every kohya module of `arch` (and, for
    sd1/sd2/sdxl UNets, every other module with a weight: conv_in, norms, time_embedding)."""
    table: dict[str, DiffusersTarget] = {}
    kohya = named_modules(arch)
    if arch in ("sd1", "sd2", "sdxl"):
        source = diffusers_names("sdxl" if arch == "sdxl" else "sd1")["modules"]
        shapes = {k: _tuple(v[0]) for k, v in checkpoint_manifest(arch)["tensors"].items()}
        for name, entry in source.items():
            if name.startswith("text_encoder") and arch == "sd2":
                continue  # sd2's OpenCLIP-H encoder: by rule below
            key = entry["key"]
            rows = tuple(entry["rows"]) if "rows" in entry else None
            shape = shapes.get(key)
            if shape is None:
                continue
            if rows:
                shape = (rows[1] - rows[0],) + shape[1:]
            table[name] = DiffusersTarget(name, entry.get("kohya"), key, rows, None, shape)
    # text encoders by rule: every kohya TE module -> <component>.<HF path>
    for name, target in kohya.items():
        if target.component == "unet" or target.path is None:
            continue
        encoder = _encoder_of(arch, name)
        diffusers = f"{encoder.diffusers}.{target.path}"
        if diffusers not in table:
            table[diffusers] = DiffusersTarget(diffusers, name, target.key, target.rows, None, target.shape)
    if arch == "flux":
        for path, entry in lora_names("flux")["diffusers_names"].items():
            name = "transformer." + path
            target = kohya[entry["kohya"]]
            rows = tuple(entry["rows"]) if "rows" in entry else None
            table[name] = DiffusersTarget(name, entry["kohya"], entry["key"], rows, rows, _tuple(entry["shape"]))
    if arch in ("flux", "sd3"):
        outer = _FLUX_OUTER if arch == "flux" else _SD3_OUTER
        for name, target in kohya.items():
            if target.component == "unet" and target.path in outer:
                diffusers = "transformer." + outer[target.path]
                table[diffusers] = DiffusersTarget(diffusers, name, target.key, None, None, target.shape,
                                                   swap_halves=target.path == _SWAPPED_OUTER)
    if arch == "sd3":
        for name, target in kohya.items():
            if target.component != "unet" or target.path is None:
                continue
            found = re.match(r"^joint_blocks\.(\d+)\.(x_block|context_block)\.(.+)$", target.path)
            if not found:
                continue
            block, side, sub = found.groups()
            base = f"transformer.transformer_blocks.{block}."
            if sub.endswith(".qkv"):
                for (part, rows), diffusers_sub in zip(target.parts, _SD3_QKV[(side, sub[:-4])]):
                    shape = (rows[1] - rows[0],) + target.shape[1:]
                    table[base + diffusers_sub] = DiffusersTarget(base + diffusers_sub, name, target.key, rows, rows, shape)
            elif (side, sub) in _SD3_DIFFUSERS:
                diffusers = base + _SD3_DIFFUSERS[(side, sub)]
                # a pre-only (last) block's context modulation only shifts and scales (2·width rows):
                # diffusers swaps its halves (SD3 medium's block 23, SD3.5 large's block 37)
                swap = (side, sub) == ("context_block", "adaLN_modulation.1") and target.shape[0] == 2 * target.shape[1]
                table[diffusers] = DiffusersTarget(diffusers, name, target.key, None, None, target.shape, swap_halves=swap)
    return table


@functools.cache
def kohya_to_diffusers(arch: str) -> dict[str, tuple[DiffusersTarget, ...]]:
    """Return {kohya module: (DiffusersTarget, ...)}: one for plain modules, the q/k/v(/mlp)
    parts (with module_rows) for a fused Flux/SD3 kohya module."""
    result: dict[str, list[DiffusersTarget]] = {}
    for target in diffusers_table(arch).values():
        if target.kohya is not None:
            result.setdefault(target.kohya, []).append(target)
    return {
        name: tuple(sorted(targets, key=lambda t: (t.module_rows or (0, 0))[0]))
        for name, targets in result.items()
    }


def diffusers_to_kohya(arch: str, diffusers: str) -> DiffusersTarget | None:
    """Return the DiffusersTarget of a diffusers module name (`unet.…`, `transformer.…`, `text_encoder.…`)."""
    return diffusers_table(arch).get(diffusers)


# -- every accepted spelling of a module name -----------------------------------------------------
@dataclass(frozen=True)
class CanonicalTarget:
    """A network module name resolved to the canonical checkpoint (before a real file is seen)."""

    module: str  # kohya module name (for table modules) or a generic `lora_unet_…` name
    key: str  # canonical key
    rows: Rows | None  # rows of `key` the named module covers (None: all)
    shape: tuple[int, ...]
    kind: str
    component: str
    in_table: bool  # True when `module` is in the kohya module table
    swap_halves: bool = False  # the named module's rows are `key`'s with the two halves exchanged


def _underscored(text: str) -> str:
    return text.replace(".", "_")


@functools.cache
def alias_table(arch: str) -> dict[str, CanonicalTarget]:
    """Return {accepted module name: CanonicalTarget} for `arch` (see _build_alias_table); the
    tables of the network architectures come from the disk cache when it has them (table_cache)."""
    if arch in NETWORK_ARCHS:
        return _network_alias_tables()[arch]
    return _build_alias_table(arch)


@functools.cache
def _network_alias_tables() -> dict[str, dict[str, CanonicalTarget]]:
    from lytools.arch.table_cache import cached

    return cached("alias-tables", lambda: {arch: _build_alias_table(arch) for arch in NETWORK_ARCHS})


def _build_alias_table(arch: str) -> dict[str, CanonicalTarget]:
    """Return {accepted module name: CanonicalTarget} for `arch` from the manifests alone.

    Spellings: kohya (`lora_unet_…`, `lora_te*_…`, `oft_unet_…`), SDXL diffusers-path kohya names,
    LDM/SGM-path kohya names (A1111's fallback), `lycoris_<diffusers path>`, OneTrainer
    `lora_transformer_<diffusers path>`, diffusers/peft dotted names (`unet.…`, `transformer.…`,
    `text_encoder*.…`, bare UNet/transformer paths), ComfyUI-native `diffusion_model.<path>` and
    `text_encoders.<enc>.transformer.<HF path>`.
    """
    table: dict[str, CanonicalTarget] = {}
    ambiguous: set[str] = set()

    def add(alias: str, target: CanonicalTarget) -> None:
        if alias in ambiguous:
            return
        old = table.get(alias)
        if old is not None and (old.key, old.rows, old.swap_halves) != (target.key, target.rows, target.swap_halves):
            del table[alias]
            ambiguous.add(alias)
            return
        if old is None or (target.in_table and not old.in_table):
            table[alias] = target

    kohya = named_modules(arch)
    encoders = {e.component: e for e in ENCODERS[arch]}
    unet = encoders["unet"]
    for name, target in kohya.items():
        canonical = CanonicalTarget(name, target.key, target.rows, target.shape, target.kind, target.component, True)
        add(name, canonical)
        encoder = encoders[target.component]
        if target.component == "unet":
            add("oft_unet_" + name[len("lora_unet_"):], canonical)
            native = target.key[len(UNET_PREFIX):-len(".weight")]
            add("lora_unet_" + _underscored(native), canonical)  # LDM/SGM/BFL path spelling
            add(unet.comfy + native, canonical)
        elif target.path is not None:
            add(encoder.comfy + target.path, canonical)
    for diffusers, entry in diffusers_table(arch).items():
        component, _, path = diffusers.partition(".")
        encoder = next((e for e in ENCODERS[arch] if e.diffusers == component), None)
        if encoder is None:
            continue
        owner = kohya.get(entry.kohya) if entry.kohya else None
        if owner is not None and owner.rows == entry.key_rows and entry.module_rows is None:
            module, in_table = entry.kohya, True
        elif owner is not None:
            module, in_table = entry.kohya, True  # a part of a fused kohya module
        else:
            module, in_table = encoder.kohya_prefix + _underscored(path), False
        canonical = CanonicalTarget(module, entry.key, entry.key_rows, entry.shape, kind_of(entry.shape), encoder.component,
                                    in_table, entry.swap_halves)
        add(diffusers, canonical)
        if encoder.component == "unet":
            add(path, canonical)  # bare peft UNet/transformer adapter
            add("lycoris_" + _underscored(path), canonical)
            add(encoder.kohya_prefix + _underscored(path), canonical)
            if arch in ("flux", "sd3"):
                add("lora_transformer_" + _underscored(path), canonical)
        else:
            add(encoder.kohya_prefix + _underscored(path), canonical)
            # LyCORIS' own wrapper names a text encoder's modules the same way (FORMATS.md 3.2); two
            # encoders with one path (SDXL's, SD3's CLIPs) make the name ambiguous, and add() drops it
            add("lycoris_" + _underscored(path), canonical)
            if arch == "flux" and encoder.component == "te3":
                add("lora_te2_" + _underscored(path), canonical)  # OneTrainer names T5 te2 for Flux
    if arch == "sdxl":
        for alias, sgm in lora_names("sdxl")["diffusers_named_aliases"].items():
            add(alias, table[sgm])
    if arch in _OMI:
        _add_omi_aliases(arch, add, kohya)
    return table


# OneTrainer's OMI format (OMI-Model-Standards `convert_<arch>_lora`): the denoiser under one prefix with
# its native (BFL / MMDiT / SGM) paths, a part of a fused layer as `<path>.<i>` (Flux/SD3 qkv.0/1/2 =
# q/k/v, Flux linear1.3 = the MLP rows), text encoders `clip_l.` / `clip_g.` / `t5.` + HF paths.
# Renames: Flux `x_embedder` is `transformer.img_in.proj` there.
@dataclass(frozen=True)
class _OmiNames:
    denoiser: str
    encoders: dict[str, str]
    renames: dict[str, str]


_OMI = {
    "flux": _OmiNames("transformer.", {"te1": "clip_l.", "te3": "t5."}, {"img_in": "img_in.proj"}),
    "sd3": _OmiNames("transformer.", {"te1": "clip_l.", "te2": "clip_g.", "te3": "t5."}, {}),
    "sdxl": _OmiNames("unet.", {"te1": "clip_l.", "te2": "clip_g."}, {}),
}


def _add_omi_aliases(arch: str, add: Callable[[str, CanonicalTarget], None], kohya: Mapping[str, ModuleTarget]) -> None:
    """OMI spellings of every kohya module, parts of fused layers included; for Flux also the bare BFL
    path (`double_blocks.0.img_attn.qkv`: BFL's own control LoRAs and bare peft adapters)."""
    omi = _OMI[arch]
    for name, target in kohya.items():
        canonical = CanonicalTarget(name, target.key, target.rows, target.shape, target.kind, target.component, True)
        if target.component != "unet":
            prefix = omi.encoders.get(target.component)
            if prefix and target.path is not None:
                add(prefix + target.path, canonical)
            continue
        native = target.key[len(UNET_PREFIX):-len(".weight")]
        if arch == "flux":
            add(native, canonical)
        path = omi.denoiser + omi.renames.get(native, native)
        add(path, canonical)
        for index, (_, rows) in enumerate(target.parts or ()):
            shape = (rows[1] - rows[0],) + tuple(target.shape[1:])
            add(f"{path}.{index}", CanonicalTarget(name, target.key, rows, shape, target.kind, target.component, True))
