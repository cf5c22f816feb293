"""Key formats and dtypes: read any network layout, write kohya, diffusers or peft; cast networks and
checkpoints to another dtype, one file or thousands (spec: FORMATS.md 3, 4, 7; CLI.md convert).

Reading (what merge, resize and info use)

    from lytools.convert import load_network
    net = load_network(path, arch=None, config=None)
        net.modules   {canonical kohya/LyCORIS module name: lytools.algos.NetworkModule}
                      LyCORIS suffixes (lora_down.weight, lora_up.weight, alpha, dora_scale, hada_*, ...);
                      tensors on CPU, owning their memory (the file is closed).
        net.metadata  {str: str} as stored
        net.stray     {key: tensor} keys that belong to no module (text_projection, bundle_emb.*, lone alphas)
        net.sources   {canonical module: [input keys]}: every input key is in one module or in stray
        net.unmapped  stored names of modules no table knows (kept under the stored name)
        net.arch, net.layout, net.scale (shrink factor of synthetic files), net.notes, net.peft_config

    Canonical names: the kohya tables of lytools.arch (SDXL UNet in SGM names, `lora_te1_`/`lora_te2_`
    for SDXL, BFL names for Flux, MMDiT names for SD3); modules outside the tables (LyCORIS full
    preset: conv_in, norms, ...) as `<kohya prefix><diffusers path>` (SDXL UNet: SGM path).
    Scale: kohya alphas are carried; diffusers/peft inputs get an `alpha` tensor built from
    `lora_adapter_metadata` or adapter_config.json (lora_alpha, alpha_pattern, rank_pattern, rsLoRA);
    without any config the scale is 1 (alpha = rank, no tensor) and, for a peft file, a note says so.
    DoRA `lora_magnitude_vector` becomes `dora_scale` [out, 1] / [out, 1, 1, 1]. Split q/k/v parts
    (Flux/SD3 diffusers names, OneTrainer, lycoris_) are fused exactly into their kohya module:
    one shared down and rows of up when the parts share them bit for bit, else stacked down and
    block-diagonal up (differing scales folded into up first).

Writing

    convert_network(net, target, fold=None, save_dtype=None, component=None)
        -> Converted(tensors, metadata, adapter_config, notes, stray_kept, stray_dropped)
        target kohya | diffusers | peft (rules in lytools.convert.write)
    convert_file(input, output, ConvertOptions(target, save_dtype, fold, component, arch, overwrite)) -> FileResult
        one network, atomic; metadata carried (stale sshs_* recomputed, lora_adapter_metadata rebuilt,
        lytools.version/command/sources added); peft also writes adapter_config.json (peft_paths)
    cast_file(input, output, dtype, overwrite=False, keep_ema=False) -> FileResult
        any file (network or checkpoint) with floating tensors cast, streamed tensor by tensor;
        integer tensors keep their dtype; fp8 saturates; scaled-fp8 files refused
    plan_outputs(inputs, output, output_dir, target) -> [(input, output)]   naming rule (run.py)
    make_output_dir(output_dir)   creates a missing --output-dir (and parents), as mkdir -p
    remove_empty_dirs(created)    removes those of them left empty when every file failed
    run_batch(pairs, options, jobs=N, on_done=callback) -> [FileResult]     N processes, each result
        reported as it finishes; a failed file is a result with .error, the others still run

Errors: UnsupportedError for an algorithm the target cannot hold (the message names the modules
and points to `lytools resize`), MatchError for a module no name table knows when the target
needs one, OutputExistsError without --overwrite.
"""

from typing import Any

# imported on first use: the batch runner and the torch-free fast path must not pull in torch
_LAZY = {
    **dict.fromkeys(("Network", "adapter_metadata", "config_scale", "load_network", "peft_config_path"), "lytools.convert.load"),
    **dict.fromkeys(("Converted", "convert_network"), "lytools.convert.write"),
    **dict.fromkeys(("ConvertOptions", "FileResult", "cast_file", "convert_file", "make_output_dir", "output_for", "peft_paths", "plan_outputs", "remove_empty_dirs",
                     "process", "run_batch"), "lytools.convert.run"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
