"""convert and DoRA (FORMATS.md 7, quirk 7): dora_scale written 2-D/4-D in the source's orientation, the
warning for output-axis DoRA in kohya names, and --flatten-dora --base: the flattened LoRA's ΔW against
W' − W computed here from ALGORITHMS.md 7 (not through lytools' DoRA code), loaders, metadata, errors."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from lytools.arch import module_table
from lytools.convert import ConvertOptions, convert_file, load_network
from lytools.errors import UnsupportedError
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors, run_lytools

FACTOR = 8  # the tiny diffusers/LyCORIS models of test_convert_loaders have these widths
EPSILON = 1.1920929e-07  # ALGORITHMS.md 7: float32 machine epsilon added to the norm
LINEAR = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # 80 x 80
CONV = "lora_unet_down_blocks_1_resnets_0_conv1"  # 80 x 40 x 3 x 3
ONE_BY_ONE = "lora_unet_down_blocks_1_attentions_0_proj_in"  # 80 x 80 x 1 x 1
TEXT = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # 96 x 96
PLAIN = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"  # left without DoRA
DORA_MODULES = [LINEAR, CONV, ONE_BY_ONE, TEXT]
SD1 = {"ss_base_model_version": "sd_v1"}  # the modules sampled here fit sd1, sd2 and sdxl alike
LYCORIS_META = {
    "ss_base_model_version": "sd_v1", "ss_network_module": "lycoris.kohya", "ss_network_dim": "96", "ss_network_alpha": "48",
    "ss_network_args": json.dumps({"algo": "locon", "dora_wd": "True", "wd_on_output": "True", "conv_dim": "96",
                                   "conv_alpha": "48"}),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A synthetic SD1 checkpoint (UNet and CLIP-L) of the widths the networks below have."""
    return build_checkpoint(tmp_path_factory.mktemp("base") / "sd1.safetensors", "sd1", factor=FACTOR,
                            components=("unet", "clip_l"))


def dora_network(path, *, rank=96, axis="out", layout="kohya", modules=DORA_MODULES, plain=(), alpha=None, seed=1):
    """A network whose `modules` carry DoRA (`axis` out or in) and `plain` ones do not, rank `rank` (96: the
    full rank of every layer here, so a flattened module can be exact)."""
    alpha = rank / 2 if alpha is None else alpha
    source = build_network(path, "sd1", factor=FACTOR, rank=rank, alpha=alpha, modules=list(modules), layout=layout,
                           dora=True, seed=seed, metadata=LYCORIS_META if layout == "kohya" else None)
    tensors = load_file(source)
    if axis == "in":  # per input channel: (1, in[, 1, 1])
        generator = torch.Generator().manual_seed(seed)
        for key in [k for k in tensors if k.endswith(".dora_scale")]:
            down = tensors[key.replace("dora_scale", "lora_down.weight")]
            shape = (1, down.shape[1]) + (1,) * (down.dim() - 2)
            tensors[key] = 0.5 + torch.rand(shape, generator=generator)
    if plain:
        extra = build_network(path.with_name("plain.safetensors"), "sd1", factor=FACTOR, rank=4, alpha=2.0,
                              modules=list(plain), layout=layout, seed=seed + 1)
        tensors.update(load_file(extra))
    if layout == "peft":  # the scale comes from the config beside the adapter
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_dora": True,
                  "target_modules": sorted({k.split(".lora_")[0][len("base_model.model."):] for k in tensors})}
        path.with_name(path.name.replace(".safetensors", ".adapter_config.json")).write_text(json.dumps(config))
    save_file(tensors, path, metadata=LYCORIS_META if layout == "kohya" else None)
    return path


def base_weight(base_tensors, name):
    return base_tensors[module_table("sd1")[name].key].float()


def reference_change(base_tensors, module, name):
    """W' − W at strength 1 from ALGORITHMS.md 7: W* = W + s·up@down, W' = dora_scale · W* / (‖W*‖ + ε),
    the norm per output channel for a (out, 1, …) scale, per input channel for (1, in, …)."""
    weight = base_weight(base_tensors, name)
    up, down = module["lora_up.weight"].float(), module["lora_down.weight"].float()
    rank = down.shape[0]
    scale = float(module["alpha"]) / rank if "alpha" in module else 1.0
    change = (scale * up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(weight.shape)
    merged = weight + change
    magnitude = module["dora_scale"].float()
    if magnitude.shape[0] == weight.shape[0] and (magnitude.dim() == 1 or magnitude.shape[1] == 1):
        norm = merged.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
        magnitude = magnitude.reshape(norm.shape)
    else:
        norm = merged.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
        magnitude = magnitude.reshape(norm.shape)
    return magnitude * merged / (norm + EPSILON) - weight


def kohya_modules(tensors):
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        modules.setdefault(name, {})[suffix] = tensor
    return modules


def lora_change(module, shape):
    """s·up@down of a plain LoRA module, reshaped to the layer."""
    up, down = module["lora_up.weight"].float(), module["lora_down.weight"].float()
    rank = down.shape[0]
    scale = float(module["alpha"]) / rank if "alpha" in module else 1.0
    return (scale * up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(shape)


def relative(found, expected):
    return float((found.detach() - expected).norm() / expected.norm())


def reference_modules(path, layout="kohya"):
    """The input's modules in kohya names, with the peft scale and magnitude spelled as kohya's."""
    if layout == "kohya":
        return kohya_modules(read_tensors(path))
    net = load_network(path, arch="sd1")  # names and the config's scale only: the values are the file's
    return {name: dict(module.tensors) for name, module in net.modules.items()}


# -- dora_scale orientation (never 1-D) --------------------------------------------------------------------
def test_peft_magnitudes_go_to_kohya_as_output_axis_2d_and_4d(tmp_path):
    source = dora_network(tmp_path / "p.safetensors", rank=4, layout="peft", modules=[LINEAR, CONV, ONE_BY_ONE])
    stored = read_tensors(source)
    assert {tuple(t.shape) for k, t in stored.items() if k.endswith("lora_magnitude_vector")} == {(80,), (1, 80, 1, 1)}
    convert_file(source, tmp_path / "k.safetensors", ConvertOptions(target="kohya", arch="sd1"))
    written = read_tensors(tmp_path / "k.safetensors")
    assert written[f"{LINEAR}.dora_scale"].shape == (80, 1)
    assert written[f"{CONV}.dora_scale"].shape == (80, 1, 1, 1)
    assert written[f"{ONE_BY_ONE}.dora_scale"].shape == (80, 1, 1, 1)
    peft_key = "base_model.model.down_blocks.1.resnets.0.conv1.lora_magnitude_vector"
    assert torch.equal(written[f"{CONV}.dora_scale"].reshape(-1), stored[peft_key].reshape(-1))


@pytest.mark.parametrize("axis", ["out", "in"])
def test_kohya_dora_scale_keeps_its_orientation(tmp_path, axis):
    source = dora_network(tmp_path / "k.safetensors", rank=4, axis=axis)
    stored = read_tensors(source)
    convert_file(source, tmp_path / "o.safetensors", ConvertOptions(target="kohya"))
    written = read_tensors(tmp_path / "o.safetensors")
    for name in DORA_MODULES:
        key = f"{name}.dora_scale"
        assert written[key].shape == stored[key].shape and torch.equal(written[key], stored[key]), name


def test_one_dimensional_dora_scale_is_written_2d_or_4d(tmp_path):
    """A 1-D dora_scale is per output channel (ALGORITHMS.md 7); ComfyUI mis-broadcasts it, so kohya output
    gives it the layer's rank of dimensions."""
    source = dora_network(tmp_path / "k.safetensors", rank=4, modules=[LINEAR, CONV])
    tensors = load_file(source)
    flat = {k: t.reshape(-1) if k.endswith("dora_scale") else t for k, t in tensors.items()}
    save_file(flat, source, metadata=LYCORIS_META)
    convert_file(source, tmp_path / "o.safetensors", ConvertOptions(target="kohya"))
    written = read_tensors(tmp_path / "o.safetensors")
    assert written[f"{LINEAR}.dora_scale"].shape == (80, 1)
    assert written[f"{CONV}.dora_scale"].shape == (80, 1, 1, 1)
    assert torch.equal(written[f"{CONV}.dora_scale"].reshape(-1), flat[f"{CONV}.dora_scale"])


# -- the warning ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_output_axis_dora_in_kohya_names_warns_once_with_the_count(tmp_path, capsys, layout):
    source = dora_network(tmp_path / "n.safetensors", rank=4, layout=layout, plain=[PLAIN],
                          modules=[LINEAR, CONV] if layout == "peft" else DORA_MODULES)
    code, out, err = run_lytools(capsys, "convert", source, "-o", tmp_path / "o.safetensors", "--to", "kohya", "-q",
                                 "--arch", "sd1")
    assert code == 0 and out.strip().endswith("o.safetensors")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    count = 2 if layout == "peft" else 4
    assert len(warnings) == 1, err
    assert f"{count} modules carry output-axis DoRA" in warnings[0]
    assert "A1111/Forge and ComfyUI do not apply exactly" in warnings[0] and "--flatten-dora" in warnings[0]


def test_no_warning_for_input_axis_dora_or_for_diffusers(tmp_path, capsys):
    inward = dora_network(tmp_path / "i.safetensors", rank=4, axis="in")
    code, _, err = run_lytools(capsys, "convert", inward, "-o", tmp_path / "o.safetensors", "--to", "kohya")
    assert code == 0 and "warning" not in err
    outward = dora_network(tmp_path / "k.safetensors", rank=4)
    code, _, err = run_lytools(capsys, "convert", outward, "-o", tmp_path / "d.safetensors", "--to", "diffusers")
    assert code == 0 and "output-axis DoRA" not in err


# -- --flatten-dora ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis, layout, target", [
    ("out", "kohya", "kohya"), ("in", "kohya", "diffusers"), ("out", "peft", "kohya"),
])
def test_flattened_change_equals_the_dora_merge_at_full_rank(tmp_path, base, axis, layout, target):
    modules = DORA_MODULES if layout == "kohya" else [LINEAR, CONV, ONE_BY_ONE]
    source = dora_network(tmp_path / "n.safetensors", axis=axis, layout=layout, modules=modules)
    out = tmp_path / "o.safetensors"
    options = ConvertOptions(target=target, flatten_dora=True, base=base, arch="sd1", save_dtype=torch.float32)
    result = convert_file(source, out, options)
    base_tensors = read_tensors(base)
    inputs = reference_modules(source, layout)
    written = load_network(out, arch="sd1").modules if target != "kohya" else None
    written = {n: dict(m.tensors) for n, m in written.items()} if written else kohya_modules(read_tensors(out))
    for name in modules:
        assert "dora_scale" not in written[name], name
        expected = reference_change(base_tensors, inputs[name], name)
        found = lora_change(written[name], expected.shape)
        assert relative(found, expected) < 2e-5, name
        assert written[name]["lora_down.weight"].shape[0] == min(expected.shape[0], expected[0].numel())
    assert f"{len(modules)} DoRA modules flattened into LoRA" in result.notes[-1] or any(
        f"{len(modules)} DoRA modules flattened" in note for note in result.notes)
    assert any("at strength 1" in warning for warning in result.warnings)


def test_flattened_at_the_module_rank_reports_the_optimal_error(tmp_path, base):
    source = dora_network(tmp_path / "n.safetensors", rank=4, alpha=2.0)
    out = tmp_path / "o.safetensors"
    result = convert_file(source, out, ConvertOptions(target="kohya", flatten_dora=True, base=base))
    base_tensors, inputs, written = read_tensors(base), read_tensors(source), kohya_modules(read_tensors(out))
    errors = {}
    for name in DORA_MODULES:
        expected = reference_change(base_tensors, kohya_modules(inputs)[name], name)
        found = lora_change(written[name], expected.shape)
        assert written[name]["lora_down.weight"].shape[0] == 4 and float(written[name]["alpha"]) == 4.0
        sigma = torch.linalg.svdvals(expected.reshape(expected.shape[0], -1).double())
        best = float(sigma[4:].square().sum().sqrt() / sigma.square().sum().sqrt())
        errors[name] = relative(found, expected)
        assert errors[name] == pytest.approx(best, rel=1e-3, abs=1e-4), name
    line = next(note for note in result.notes if "--flatten-dora" in note)
    mean = sum(errors.values()) / len(errors)
    assert f"mean {mean:.4f}" in line and f"max {max(errors.values()):.4f}" in line
    assert max(errors, key=errors.get) in line


def test_other_modules_pass_through_bit_identical(tmp_path, base):
    source = dora_network(tmp_path / "n.safetensors", rank=4, modules=[LINEAR], plain=[PLAIN, CONV])
    convert_file(source, tmp_path / "f.safetensors", ConvertOptions(target="kohya", flatten_dora=True, base=base))
    stored, written = read_tensors(source), read_tensors(tmp_path / "f.safetensors")
    for name in (PLAIN, CONV):
        for suffix in ("lora_up.weight", "lora_down.weight", "alpha"):
            key = f"{name}.{suffix}"
            assert written[key].dtype == stored[key].dtype and torch.equal(written[key], stored[key]), key
    # the diffusers output of the untouched modules is what a plain convert writes
    convert_file(source, tmp_path / "d.safetensors", ConvertOptions(target="diffusers", flatten_dora=True, base=base))
    plain_source = build_network(tmp_path / "p.safetensors", "sd1", factor=FACTOR, rank=4, alpha=2.0,
                                 modules=[PLAIN, CONV], seed=2, metadata=SD1)
    convert_file(plain_source, tmp_path / "pd.safetensors", ConvertOptions(target="diffusers"))
    flattened, plain = read_tensors(tmp_path / "d.safetensors"), read_tensors(tmp_path / "pd.safetensors")
    assert plain and all(torch.equal(flattened[key], tensor) for key, tensor in plain.items())


def test_metadata_describes_the_flattened_network(tmp_path, base):
    source = dora_network(tmp_path / "n.safetensors", rank=4, alpha=2.0)
    convert_file(source, tmp_path / "k.safetensors", ConvertOptions(target="kohya", flatten_dora=True, base=base))
    from lytools.io import read_header

    meta = read_header(tmp_path / "k.safetensors").metadata
    args = json.loads(meta["ss_network_args"])
    assert meta["ss_network_module"] == "networks.lora"
    assert not {"dora_wd", "wd_on_output", "algo"} & set(args)
    assert meta["ss_network_alpha"] == "4.0" and args["conv_alpha"] == "4.0"  # alpha = rank: scale 1
    # a file that keeps non-DoRA LyCORIS modules keeps its module and algorithm, without the DoRA switch
    mixed = dora_network(tmp_path / "m.safetensors", rank=4, alpha=2.0, modules=[LINEAR], plain=[PLAIN])
    convert_file(mixed, tmp_path / "mk.safetensors", ConvertOptions(target="kohya", flatten_dora=True, base=base))
    meta = read_header(tmp_path / "mk.safetensors").metadata
    assert meta["ss_network_alpha"] == "Dynamic"  # the flattened module has alpha 4, the other 2
    convert_file(source, tmp_path / "p", ConvertOptions(target="peft", component="unet", flatten_dora=True, base=base))
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert config["use_dora"] is False
    assert not any(k.endswith("lora_magnitude_vector") for k in read_tensors(tmp_path / "p" / "adapter_model.safetensors"))


def test_flattened_metadata_follows_merge_rule(tmp_path, base):
    """One rule with merge (rank_metadata): conv_dim/conv_alpha said whenever kxk convs are written (added to
    arguments that lacked them), "Dynamic" where the convs differ, never silently dropped."""
    source = dora_network(tmp_path / "n.safetensors", rank=4, alpha=2.0, modules=[LINEAR, CONV])
    tensors = load_file(source)
    tensors[f"{CONV}.alpha"] = torch.tensor(1.0)  # the DoRA conv keeps its own alpha: flattened at scale 1
    extra = load_file(build_network(tmp_path / "c.safetensors", "sd1", factor=FACTOR, rank=4, alpha=1.0, seed=5,
                                    modules=["lora_unet_down_blocks_1_resnets_0_conv2"]))
    tensors.update(extra)  # a plain 3x3 conv at rank 4, alpha 1: unchanged by flattening
    metadata = dict(LYCORIS_META, ss_network_args=json.dumps({"algo": "locon", "dora_wd": "True"}))
    save_file(tensors, source, metadata=metadata)
    convert_file(source, tmp_path / "k.safetensors", ConvertOptions(target="kohya", flatten_dora=True, base=base))
    from lytools.io import read_header

    meta = read_header(tmp_path / "k.safetensors").metadata
    args = json.loads(meta["ss_network_args"])
    written = read_tensors(tmp_path / "k.safetensors")
    conv_rank = written[f"{CONV}.lora_down.weight"].shape[0]
    assert args["conv_dim"] == ("4" if conv_rank == 4 else "Dynamic")
    assert args["conv_alpha"] == "Dynamic"  # the flattened conv carries alpha = its rank, the plain one 1
    assert meta["ss_network_dim"] == str(written[f"{LINEAR}.lora_down.weight"].shape[0])
    assert meta["ss_network_alpha"] == meta["ss_network_dim"] + ".0"  # alpha = rank: scale 1


def test_file_without_dora_is_written_as_plain_convert_writes_it(tmp_path, base, capsys):
    source = build_network(tmp_path / "n.safetensors", "sd1", factor=FACTOR, rank=4, modules=[PLAIN, CONV], metadata=SD1)
    code, _, err = run_lytools(capsys, "convert", source, "-o", tmp_path / "f.safetensors", "--to", "diffusers",
                               "--flatten-dora", "--base", base)
    assert code == 0 and "no DoRA modules here" in err
    run_lytools(capsys, "convert", source, "-o", tmp_path / "p.safetensors", "--to", "diffusers")
    flattened, plain = read_tensors(tmp_path / "f.safetensors"), read_tensors(tmp_path / "p.safetensors")
    assert flattened.keys() == plain.keys() and all(torch.equal(flattened[k], plain[k]) for k in plain)


def test_batch_shares_one_base_across_files_and_jobs(tmp_path, base, capsys, monkeypatch):
    import lytools.convert.dora as dora
    import lytools.resize.flatten as flatten

    monkeypatch.setattr(dora, "_BASES", {})  # nothing opened by earlier tests
    log = tmp_path / "opened.txt"  # appended to by the parent and by the forked workers alike
    original = flatten.BaseWeights.__init__

    def counting(self, *args, **kwargs):
        with open(log, "a") as handle:
            handle.write(f"{args[0]}\n")
        original(self, *args, **kwargs)

    monkeypatch.setattr(flatten.BaseWeights, "__init__", counting)
    first = dora_network(tmp_path / "a.safetensors", rank=4, modules=[LINEAR])
    second = dora_network(tmp_path / "b.safetensors", rank=4, modules=[TEXT], seed=3)
    code, out, err = run_lytools(capsys, "convert", first, second, "--output-dir", tmp_path / "out", "--to", "kohya",
                                 "--flatten-dora", "--base", base, "-j", "2")
    assert code == 0, err
    assert log.read_text().splitlines() == [str(base)]  # once, in the parent, before the workers start (they inherit it)
    assert sorted(out.split()) == [str(tmp_path / "out" / "a.safetensors"), str(tmp_path / "out" / "b.safetensors")]
    assert err.count("warning:") == 2 and err.count("at strength 1") == 2
    for name, path in ((LINEAR, "a"), (TEXT, "b")):
        assert "dora_scale" not in kohya_modules(read_tensors(tmp_path / "out" / f"{path}.safetensors"))[name]


# -- loaders --------------------------------------------------------------------------------------------------
def test_flattened_kohya_output_loads_in_lycoris(tmp_path, base, monkeypatch):
    lycoris = pytest.importorskip("lycoris")
    import lycoris.wrapper

    from tests.test_convert_loaders import tiny_clip, tiny_unet

    source = dora_network(tmp_path / "n.safetensors", modules=[LINEAR, CONV, TEXT])
    out = tmp_path / "k.safetensors"
    convert_file(source, out, ConvertOptions(target="kohya", flatten_dora=True, base=base, save_dtype=torch.float32))
    root = torch.nn.Module()
    root.unet, root.te = tiny_unet("sd1"), torch.nn.Module()
    root.te.text_model = tiny_clip(768, 12)
    monkeypatch.setattr(lycoris.wrapper.LycorisNetwork, "LORA_PREFIX", "lora")
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    network, weights = lycoris.wrapper.create_lycoris_from_weights(1.0, str(out), root)
    network.apply_to()
    _, unexpected = network.load_state_dict(weights, strict=False)
    assert not unexpected
    found = {m.lora_name: m.get_diff_weight(multiplier=1.0)[0].detach().float() for m in network.loras}
    base_tensors, inputs = read_tensors(base), kohya_modules(read_tensors(source))
    assert set(found) == {LINEAR, CONV, TEXT}
    for name, change in found.items():
        expected = reference_change(base_tensors, inputs[name], name)
        assert relative(change.reshape(expected.shape), expected) < 1e-4, name


def test_flattened_input_axis_dora_loads_in_diffusers(tmp_path, base):
    """Input-axis DoRA has no diffusers form: flattened, it loads with load_lora_weights."""
    from tests.test_convert_loaders import lora_layers, tiny_pipeline

    source = dora_network(tmp_path / "n.safetensors", axis="in", modules=[LINEAR, CONV, TEXT])
    with pytest.raises(UnsupportedError, match="input-axis DoRA.*convert --flatten-dora --base CHECKPOINT"):
        convert_file(source, tmp_path / "x.safetensors", ConvertOptions(target="diffusers"))
    out = tmp_path / "d.safetensors"
    convert_file(source, out, ConvertOptions(target="diffusers", flatten_dora=True, base=base, save_dtype=torch.float32))
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    pipe = tiny_pipeline("sd1")
    pipe.load_lora_weights(str(out), adapter_name="x")
    found = lora_layers(pipe.unet, "x", "unet", "sd1")
    found.update(lora_layers(pipe.text_encoder, "x", "text_encoder", "sd1"))
    base_tensors, inputs = read_tensors(base), kohya_modules(read_tensors(source))
    assert set(found) == {LINEAR, CONV, TEXT}
    for name, change in found.items():
        expected = reference_change(base_tensors, inputs[name], name)
        assert relative(change.reshape(expected.shape), expected) < 1e-4, name


# -- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--to", "kohya", "--flatten-dora"], "--flatten-dora needs --to LAYOUT and --base"),
    (["--save-dtype", "fp16", "--flatten-dora", "--base", "BASE"], "--flatten-dora needs --to LAYOUT and --base"),
    (["--to", "kohya", "--base", "BASE"], "without --flatten-dora nothing reads it"),
])
def test_usage_errors(tmp_path, base, capsys, args, message):
    source = dora_network(tmp_path / "n.safetensors", rank=4, modules=[LINEAR])
    args = [str(base) if arg == "BASE" else arg for arg in args]
    code, out, err = run_lytools(capsys, "convert", source, "-o", tmp_path / "o.safetensors", *args)
    assert code == 2 and message in err and not out
    assert not (tmp_path / "o.safetensors").exists()


def test_base_of_another_architecture_is_refused_naming_both(tmp_path, capsys):
    sdxl = build_checkpoint(tmp_path / "xl.safetensors", "sdxl", factor=32, components=("unet",))
    source = dora_network(tmp_path / "n.safetensors", rank=4, modules=[LINEAR])
    code, out, err = run_lytools(capsys, "convert", source, "-o", tmp_path / "o.safetensors", "--to", "kohya",
                                 "--flatten-dora", "--base", sdxl)
    assert code == 1 and not out
    line = err.strip().splitlines()[-1]
    assert "sd1" in line and "sdxl" in line and "xl.safetensors" in line
    assert not (tmp_path / "o.safetensors").exists()


def test_base_that_is_a_network_or_the_output_is_refused(tmp_path, base, capsys):
    source = dora_network(tmp_path / "n.safetensors", rank=4, modules=[LINEAR])
    code, _, err = run_lytools(capsys, "convert", source, "-o", tmp_path / "o.safetensors", "--to", "kohya",
                               "--flatten-dora", "--base", source)
    assert code == 1 and "not a checkpoint" in err
    code, _, err = run_lytools(capsys, "convert", source, "-o", base, "--to", "kohya", "--flatten-dora", "--base", base,
                               "--overwrite")
    assert code == 1 and "would replace --base" in err
    assert read_tensors(base)  # still a checkpoint


def test_flatten_rank_bounds_follow_the_module_algorithm():
    from lytools.algos import NetworkModule, describe_module
    from lytools.convert.dora import change_rank

    def rank_of(tensors):
        module = NetworkModule("m", tensors)
        return change_rank(module, describe_module(module))

    magnitude = torch.ones(8, 1)
    assert rank_of({"lora_up.weight": torch.ones(8, 3), "lora_down.weight": torch.ones(3, 6), "dora_scale": magnitude}) == 3
    loha = {"hada_w1_a": torch.ones(8, 2), "hada_w1_b": torch.ones(2, 6), "hada_w2_a": torch.ones(8, 2),
            "hada_w2_b": torch.ones(2, 6), "dora_scale": magnitude}
    assert rank_of(loha) == 4
    lokr = {"lokr_w1": torch.ones(2, 3), "lokr_w2_a": torch.ones(4, 1), "lokr_w2_b": torch.ones(1, 2), "dora_scale": magnitude}
    assert rank_of(lokr) == 2 * 1
    assert math.isfinite(rank_of({"lokr_w1": torch.ones(2, 3), "lokr_w2": torch.ones(4, 2), "dora_scale": magnitude}))


def test_leading_singular_triplets_give_the_optimal_truncation_and_its_exact_error():
    """svd_leading (what --flatten-dora truncates with): the rank-r factors are as good as the exact SVD's,
    the error its shares imply is the measured one, and the same matrix gives the same factors."""
    from lytools.resize.factors import svd_leading, truncated_factors
    from lytools.resize.modules import Context, RankRule, _dense_spectrum

    generator = torch.Generator().manual_seed(5)
    low = torch.randn(300, 16, generator=generator) @ torch.randn(16, 900, generator=generator)
    matrix = low + 0.3 * torch.randn(300, 900, generator=generator)  # low rank plus a flat tail, as W' - W
    ctx = Context(RankRule("fixed", None, 16, 16), torch.device("cpu"), leading_only=True)
    spectrum, choice = _dense_spectrum(matrix, ctx, is_conv=False)
    up, down = truncated_factors(spectrum, 16)
    found = relative(up @ down, matrix)
    sigma = torch.linalg.svdvals(matrix.double())
    best = float(sigma[16:].square().sum().sqrt() / sigma.square().sum().sqrt())
    assert found == pytest.approx(best, rel=1e-3)
    assert math.sqrt(1 - choice.fro_kept ** 2) == pytest.approx(found, rel=1e-3)
    assert spectrum.S.numel() == 26 and choice.rank == 16 and choice.sum_kept is None
    again = svd_leading(matrix, 16, 10)
    assert torch.equal(again.U, spectrum.U) and torch.equal(again.S, spectrum.S)
    # near the full rank the exact SVD is taken: every singular value, exact shares
    ctx = Context(RankRule("fixed", None, 295, 295), torch.device("cpu"), leading_only=True)
    spectrum, choice = _dense_spectrum(matrix, ctx, is_conv=False)
    assert spectrum.S.numel() == 300 and choice.sum_kept is not None
