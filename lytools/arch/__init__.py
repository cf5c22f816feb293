"""Which model a file is, and the name maps between kohya, LDM/SGM/BFL checkpoints and diffusers/peft.

Everything reads headers only ({name: shape}); all tables come from the manifests shipped in
lytools/arch/data (copies of ../shared/fixtures/manifests) and are built lazily, once per process.

Checkpoints (detect.py)
    detect_checkpoint(header | {name: TensorInfo | tensor | shape}, metadata=None) -> CheckpointArch
        .arch      sd1 | sd2 | sdxl | sd3 | flux | chroma | unknown
        .layout    ldm | sgm | diffusers | bfl | mmdit | unknown
        .prefix    denoiser wrapper prefix ("model.diffusion_model.", "diffusion_model.", "") or None
        .variant   base | refiner | inpaint | instruct-pix2pix | dev | schnell | fill | medium | ...
        .components {unet|clip_l|clip_h|clip_g|t5xxl|vae|schedule|...: key prefix}
        .prediction epsilon | v | unknown (metadata / marker keys only)
        .text_encoder_only, .in_channels, .context_dim, .blocks, .scale (synthetic shrink), .notes
    arch_from_metadata(metadata) -> arch claimed by modelspec / ss_* keys, or None
    shapes_of(anything above) -> {name: shape}

Networks (network.py)
    split_network_key(key) -> (module name, suffix in LyCORIS spelling) | None
        (kohya, lycoris_, diffusers lora_A/B and lora.down/up, old processor names, peft, comfy, xlabs)
    group_network_keys(keys) -> ({module: {suffix: key}}, stray keys) ; layout_of_module(name)
    module_shapes({suffix: key}, shapes) -> {suffix: shape} (peft magnitudes in dora_scale orientation)
    detect_network(header | shapes, metadata=None) -> NetworkArch
        .arch (sd1 | sd2 | sdxl | sd3 | flux | unknown), .layout (kohya | lycoris | diffusers | peft |
        comfy | xlabs | mixed | unknown), .layouts, .components {unet|te|te1..: modules},
        .modules {module: {suffix: key}}, .stray, .matched, .scale, .notes,
        .tied (the architectures the modules fit equally when no metadata picks one; arch is then
        unknown and the note says so without advice: each command adds its own)

Key maps (keymap.py; sd1, sd2, sdxl, flux from the manifests, sd3 by rule from its checkpoint table)
    module_table(arch) -> {kohya module name: ModuleTarget(key, kind, shape, rows, fused_shape, parts,
                           component, part, c3lier, rank_from, optional, path)}
        key is the canonical checkpoint key (manifest spelling, `model.diffusion_model.` prefix);
        rows = row slice of a fused tensor (SD2/SDXL-te2 q/k/v); parts = named rows of a fused
        module (Flux qkv/linear1, SD3 qkv).
    diffusers_table(arch) -> {diffusers name: DiffusersTarget(diffusers, kohya, key, key_rows,
                              module_rows, shape, swap_halves)}   (sd1/sd2/sdxl: every UNet module,
        not only kohya's; swap_halves: diffusers' [scale; shift] order of a [shift; scale] modulation,
        Flux/SD3 `norm_out.linear` and SD3's last `norm1_context.linear`)
    key_table(arch) -> {canonical key: ((kohya module, rows | None), ...)}   (the way back from a key)
    kohya_to_diffusers(arch) -> {kohya: (DiffusersTarget, ...)} ; diffusers_to_kohya(arch, name)
    alias_table(arch) -> {every accepted spelling: CanonicalTarget(module, key, rows, shape, kind,
                          component, in_table, swap_halves)}
    text_encoder_path(rest, style), openclip_key(hf_path, width), kind_of(shape)

Resolution against a real checkpoint (resolve.py)
    r = Resolver(checkpoint_header_or_shapes, metadata=None, arch=None)
    r.checkpoint -> CheckpointArch ; r.resolve(name) -> Resolved | None
        Resolved(name, module, shape, kind, component, placements, in_table); .key, .rows
        placements: (Placement(key, rows, module_rows), ...): ΔW[module_rows] goes to key[rows]
        (one placement except for a fused kohya module on a diffusers-layout Flux/SD3 file, and
        the two crossed halves of a swapped modulation named in the other order than the file's).
    Unknown architectures: every `<path>.weight` of the file answers to `lora_unet_<path with . -> _>`
    (path without the denoiser wrapper prefix), `<key without .weight>` and `diffusion_model.<path>`.

Data
    checkpoint_manifest(arch), lora_names(arch), diffusers_names(arch)
"""

from lytools.arch.detect import CheckpointArch, arch_from_metadata, detect_checkpoint, shapes_of
from lytools.arch.keymap import (
    ENCODERS,
    CanonicalTarget,
    DiffusersTarget,
    Encoder,
    ModuleTarget,
    alias_table,
    diffusers_table,
    diffusers_to_kohya,
    key_table,
    kind_of,
    kohya_to_diffusers,
    module_table,
    openclip_key,
    text_encoder_path,
)
from lytools.arch.manifests import checkpoint_manifest, diffusers_names, lora_names
from lytools.arch.network import (
    NetworkArch,
    detect_network,
    group_network_keys,
    layout_of_module,
    module_shapes,
    split_network_key,
)
from lytools.arch.resolve import Placement, Resolved, Resolver

__all__ = [
    "ENCODERS",
    "CanonicalTarget",
    "CheckpointArch",
    "DiffusersTarget",
    "Encoder",
    "ModuleTarget",
    "NetworkArch",
    "Placement",
    "Resolved",
    "Resolver",
    "alias_table",
    "arch_from_metadata",
    "checkpoint_manifest",
    "detect_checkpoint",
    "detect_network",
    "diffusers_names",
    "diffusers_table",
    "diffusers_to_kohya",
    "key_table",
    "kind_of",
    "group_network_keys",
    "kohya_to_diffusers",
    "layout_of_module",
    "module_shapes",
    "lora_names",
    "module_table",
    "openclip_key",
    "shapes_of",
    "split_network_key",
    "text_encoder_path",
]
