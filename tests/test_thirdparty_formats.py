"""Networks written by other tools: every key maps, ΔW matches an independent reference, merge changes
exactly the right checkpoint tensors, and what lytools cannot apply is a one-line error naming it.

Key names follow what each tool writes (shrunk widths, synthetic checkpoints from lytools.testing):
sd-scripts (Flux fused and split_qkv, SD3 with T5 `lora_te3_`, A1111 `lora_te_`, SDXL te1/te2, LoCon,
full `diff`/`diff_b`, DoRA `dora_scale` on either axis), ai-toolkit / SimpleTuner (diffusers
`transformer.` + lora_A/lora_B, no alpha), BFL names with `diffusion_model.` + lora_A/B, xlabs
(`double_blocks.N.processor.qkv_lora1.down.weight`, single-block `qkv_lora`), ComfyUI LoraSave
(`diffusion_model.` / `text_encoders.` + lora_up/lora_down, no alpha, `diff_b` next to the factors),
OneTrainer (`lora_transformer_`, Flux T5 as `lora_te2_`, DoRA on split parts) and its OMI format
(`transformer.<BFL path>[.i]`, `clip_l.`, `t5.`), LyCORIS `lycoris_`, old diffusers attention
processors and `lora_linear_layer`, BFL's Flux control LoRAs (refused by name).

The reference below is written from ALGORITHMS.md (2: ΔW = alpha/rank · up @ down, scale 1 without
alpha; 5: diff / diff_b; 7: DoRA W' = dora_scale · W* / ‖W*‖ at strength 1) and the BFL / MMDiT / LDM
row layouts (Flux qkv = [q; k; v], linear1 = [q; k; v; mlp]), not from lytools' own tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lytools.convert import ConvertOptions, convert_file, load_network
from lytools.errors import LytoolsError, NetworkError, UnsupportedError
from lytools.merge import run_merge
from lytools.testing import build_checkpoint
from tests.shared import read_tensors, run_lytools

EPS = 1.1920929e-07  # ALGORITHMS.md 7
H = 192  # Flux width at factor 16
DB = "model.diffusion_model.double_blocks.0."
SB = "model.diffusion_model.single_blocks.0."
CLIP = "text_encoders.clip_l.transformer.text_model.encoder.layers.0."
T5 = "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention."
Q, K, V, MLP = (0, H), (H, 2 * H), (2 * H, 3 * H), (3 * H, 7 * H)

Delta = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]  # ΔW, or base weight -> ΔW (DoRA)


@dataclass
class Expected:
    key: str  # checkpoint key
    rows: tuple[int, int] | None
    delta: Delta


def _rand(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return 0.1 * torch.randn(*shape, generator=generator)


def _lora(mods, down: str, up: str, *, alpha: float | None = None, alpha_suffix: str = ".alpha", rank: int = 4,
          seed: int = 0) -> tuple[dict[str, torch.Tensor], list[Expected]]:
    """mods: (stored module, checkpoint key, rows, in, out). Returns (file tensors, expected changes)."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    expected = []
    for stored, key, rows, fan_in, fan_out in mods:
        d, u = _rand(generator, rank, fan_in), _rand(generator, fan_out, rank)
        tensors[stored + down], tensors[stored + up] = d, u
        scale = 1.0
        if alpha is not None:
            tensors[stored + alpha_suffix] = torch.tensor(float(alpha))
            scale = alpha / rank
        expected.append(Expected(key, rows, scale * (u @ d)))
    return tensors, expected


def _dora(up: torch.Tensor, down: torch.Tensor, scale: float, magnitude: torch.Tensor, axis: str) -> Callable:
    def delta(weight: torch.Tensor) -> torch.Tensor:
        changed = weight + scale * (up @ down)
        norm = changed.norm(dim=0, keepdim=True) if axis == "in" else changed.norm(dim=1, keepdim=True)
        return magnitude / (norm + EPS) * changed - weight
    return delta


def _write(tmp: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def _assert_merge(base: Path, network: Path, expected: list[Expected], out: Path) -> None:
    """Merge `network` into `base` at ratio 1; exactly the expected tensors change, by the expected ΔW."""
    run_merge([base, network], out, device="cpu", overwrite=True)
    before, after = read_tensors(base), read_tensors(out)
    want: dict[str, torch.Tensor] = {}
    for item in expected:
        total = want.setdefault(item.key, torch.zeros_like(before[item.key], dtype=torch.float32))
        target = total if item.rows is None else total[item.rows[0]:item.rows[1]]
        delta = item.delta
        if callable(delta):
            weight = before[item.key].float()
            delta = delta(weight if item.rows is None else weight[item.rows[0]:item.rows[1]])
        target += delta.reshape(target.shape)
    assert set(after) == set(before)
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed == set(want), f"changed {sorted(changed ^ set(want))} unexpectedly"
    for key, delta in want.items():
        torch.testing.assert_close(after[key].float() - before[key].float(), delta, rtol=1e-4, atol=2e-5, msg=key)


def _assert_all_mapped(path: Path, arch: str, unmapped: tuple[str, ...] = ()) -> None:
    """Every key is read into a module; modules outside the name tables are only the listed ones
    (kept under their stored name, which the merge resolves against the checkpoint)."""
    net = load_network(path)
    assert net.arch == arch
    assert sorted(net.unmapped) == sorted(unmapped) and not net.stray, (net.unmapped, list(net.stray))
    read = sorted(k for keys in net.sources.values() for k in keys)
    assert read == sorted(read_tensors(path)), "a key of the file was not read into a module"


# -- checkpoints --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("thirdparty")
    f32 = torch.float32
    return {
        "flux": build_checkpoint(root / "flux.safetensors", "flux", factor=16, keep_blocks=2, dtype=f32,
                                 components=["unet", "clip_l", "t5xxl"]),
        "sd1": build_checkpoint(root / "sd1.safetensors", "sd1", factor=16, dtype=f32, components=["unet", "clip_l"]),
        "sdxl": build_checkpoint(root / "sdxl.safetensors", "sdxl", factor=32, dtype=f32,
                                 components=["unet", "clip_l", "clip_g"]),
        "sd3": build_checkpoint(root / "sd3.safetensors", "sd3", factor=16, keep_blocks=2, dtype=f32,
                                components=["unet", "clip_l", "t5xxl"]),
    }


# -- Flux ---------------------------------------------------------------------------------------------
def _flux_kohya():
    return _lora([
        ("lora_unet_double_blocks_0_img_attn_qkv", DB + "img_attn.qkv.weight", None, H, 3 * H),
        ("lora_unet_double_blocks_0_txt_mod_lin", DB + "txt_mod.lin.weight", None, H, 6 * H),
        ("lora_unet_single_blocks_0_linear1", SB + "linear1.weight", None, H, 7 * H),
        ("lora_unet_single_blocks_0_linear2", SB + "linear2.weight", None, 5 * H, H),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", CLIP + "self_attn.q_proj.weight", None, 48, 48),
        ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", T5 + "q.weight", None, 256, 256),
    ], ".lora_down.weight", ".lora_up.weight", alpha=2)


def _flux_split_qkv():
    # sd-scripts split_qkv saves fused: 3 downs stacked, block-diagonal up, one alpha read as alpha / 3r
    generator = torch.Generator().manual_seed(1)
    down, up = _rand(generator, 12, H), torch.zeros(3 * H, 12)
    for i in range(3):
        up[H * i:H * (i + 1), 4 * i:4 * (i + 1)] = _rand(generator, H, 4)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    extra, more = _lora([("lora_unet_single_blocks_0_linear2", SB + "linear2.weight", None, 5 * H, H)],
                        ".lora_down.weight", ".lora_up.weight", alpha=4)
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0), **extra}
    return tensors, [Expected(DB + "img_attn.qkv.weight", None, 4.0 / 12 * (up @ down)), *more]


def _flux_ai_toolkit():
    return _lora([
        ("transformer.transformer_blocks.0.attn.to_q", DB + "img_attn.qkv.weight", Q, H, H),
        ("transformer.transformer_blocks.0.attn.to_k", DB + "img_attn.qkv.weight", K, H, H),
        ("transformer.transformer_blocks.0.attn.to_v", DB + "img_attn.qkv.weight", V, H, H),
        ("transformer.transformer_blocks.0.attn.add_k_proj", DB + "txt_attn.qkv.weight", K, H, H),
        ("transformer.transformer_blocks.0.attn.to_out.0", DB + "img_attn.proj.weight", None, H, H),
        ("transformer.transformer_blocks.0.attn.to_add_out", DB + "txt_attn.proj.weight", None, H, H),
        ("transformer.transformer_blocks.0.ff.net.0.proj", DB + "img_mlp.0.weight", None, H, 4 * H),
        ("transformer.transformer_blocks.0.ff_context.net.2", DB + "txt_mlp.2.weight", None, 4 * H, H),
        ("transformer.transformer_blocks.0.norm1.linear", DB + "img_mod.lin.weight", None, H, 6 * H),
        ("transformer.single_transformer_blocks.0.attn.to_q", SB + "linear1.weight", Q, H, H),
        ("transformer.single_transformer_blocks.0.proj_mlp", SB + "linear1.weight", MLP, H, 4 * H),
        ("transformer.single_transformer_blocks.0.proj_out", SB + "linear2.weight", None, 5 * H, H),
        ("transformer.single_transformer_blocks.0.norm.linear", SB + "modulation.lin.weight", None, H, 3 * H),
        ("transformer.context_embedder", "model.diffusion_model.txt_in.weight", None, 256, H),
        ("text_encoder.text_model.encoder.layers.0.self_attn.k_proj", CLIP + "self_attn.k_proj.weight", None, 48, 48),
    ], ".lora_A.weight", ".lora_B.weight")


def _flux_bfl_peft():
    return _lora([
        ("diffusion_model.double_blocks.0.img_attn.qkv", DB + "img_attn.qkv.weight", None, H, 3 * H),
        ("diffusion_model.single_blocks.0.linear1", SB + "linear1.weight", None, H, 7 * H),
    ], ".lora_A.weight", ".lora_B.weight")


def _flux_xlabs():
    return _lora([
        ("double_blocks.0.processor.qkv_lora1", DB + "img_attn.qkv.weight", None, H, 3 * H),
        ("double_blocks.0.processor.proj_lora1", DB + "img_attn.proj.weight", None, H, H),
        ("double_blocks.0.processor.qkv_lora2", DB + "txt_attn.qkv.weight", None, H, 3 * H),
        ("double_blocks.0.processor.proj_lora2", DB + "txt_attn.proj.weight", None, H, H),
        ("single_blocks.0.processor.qkv_lora", SB + "linear1.weight", (0, 3 * H), H, 3 * H),
    ], ".down.weight", ".up.weight")


def _flux_comfy():
    tensors, expected = _lora([
        ("diffusion_model.double_blocks.0.img_attn.qkv", DB + "img_attn.qkv.weight", None, H, 3 * H),
        ("diffusion_model.double_blocks.0.img_attn.proj", DB + "img_attn.proj.weight", None, H, H),
        ("diffusion_model.final_layer.adaLN_modulation.1", "model.diffusion_model.final_layer.adaLN_modulation.1.weight",
         None, H, 2 * H),
        ("text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj", CLIP + "self_attn.q_proj.weight",
         None, 48, 48),
        ("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q", T5 + "q.weight", None, 256, 256),
    ], ".lora_down.weight", ".lora_up.weight")
    # LoraSave with bias_diff: the bias difference next to the factors, and a norm's weight/bias as diff/diff_b
    generator = torch.Generator().manual_seed(2)
    bias, norm_w, norm_b = _rand(generator, H), _rand(generator, 48), _rand(generator, 48)
    final_bias = _rand(generator, 2 * H)
    tensors["diffusion_model.double_blocks.0.img_attn.proj.diff_b"] = bias
    tensors["diffusion_model.final_layer.adaLN_modulation.1.diff_b"] = final_bias
    expected.append(Expected("model.diffusion_model.final_layer.adaLN_modulation.1.bias", None, final_bias))
    tensors["text_encoders.clip_l.transformer.text_model.encoder.layers.0.layer_norm1.diff"] = norm_w
    tensors["text_encoders.clip_l.transformer.text_model.encoder.layers.0.layer_norm1.diff_b"] = norm_b
    expected += [Expected(DB + "img_attn.proj.bias", None, bias), Expected(CLIP + "layer_norm1.weight", None, norm_w),
                 Expected(CLIP + "layer_norm1.bias", None, norm_b)]
    return tensors, expected


def _flux_onetrainer():
    return _lora([
        ("lora_transformer_transformer_blocks_0_attn_to_q", DB + "img_attn.qkv.weight", Q, H, H),
        ("lora_transformer_transformer_blocks_0_attn_to_v", DB + "img_attn.qkv.weight", V, H, H),
        ("lora_transformer_single_transformer_blocks_0_proj_mlp", SB + "linear1.weight", MLP, H, 4 * H),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", CLIP + "self_attn.q_proj.weight", None, 48, 48),
        ("lora_te2_encoder_block_0_layer_0_SelfAttention_q", T5 + "q.weight", None, 256, 256),
    ], ".lora_down.weight", ".lora_up.weight", alpha=1)


def _flux_omi():
    return _lora([
        ("transformer.double_blocks.0.img_attn.qkv.0", DB + "img_attn.qkv.weight", Q, H, H),
        ("transformer.double_blocks.0.img_attn.qkv.2", DB + "img_attn.qkv.weight", V, H, H),
        ("transformer.double_blocks.0.txt_attn.proj", DB + "txt_attn.proj.weight", None, H, H),
        ("transformer.single_blocks.0.linear1.3", SB + "linear1.weight", MLP, H, 4 * H),
        ("transformer.single_blocks.0.linear2", SB + "linear2.weight", None, 5 * H, H),
        ("transformer.final_layer.adaLN_modulation.1", "model.diffusion_model.final_layer.adaLN_modulation.1.weight",
         None, H, 2 * H),  # OMI keeps BFL's [shift; scale] order
        ("clip_l.text_model.encoder.layers.0.self_attn.q_proj", CLIP + "self_attn.q_proj.weight", None, 48, 48),
        ("t5.encoder.block.0.layer.0.SelfAttention.q", T5 + "q.weight", None, 256, 256),
    ], ".lora_down.weight", ".lora_up.weight", alpha=2)


def _flux_lycoris():
    return _lora([
        ("lycoris_transformer_blocks_0_attn_to_k", DB + "img_attn.qkv.weight", K, H, H),
        ("lycoris_single_transformer_blocks_0_proj_out", SB + "linear2.weight", None, 5 * H, H),
    ], ".lora_down.weight", ".lora_up.weight", alpha=2)


FLUX_FORMATS = {
    "sd-scripts": _flux_kohya, "sd-scripts-split-qkv": _flux_split_qkv, "ai-toolkit": _flux_ai_toolkit,
    "bfl-peft": _flux_bfl_peft, "xlabs": _flux_xlabs, "comfy-lorasave": _flux_comfy, "onetrainer": _flux_onetrainer,
    "onetrainer-omi": _flux_omi, "lycoris": _flux_lycoris,
}


@pytest.mark.parametrize("tool", sorted(FLUX_FORMATS))
def test_flux_network_of_other_tools_merges_exactly(tool, ckpts, tmp_path):
    tensors, expected = FLUX_FORMATS[tool]()
    path = _write(tmp_path, tool, tensors)
    _assert_all_mapped(path, "flux")
    _assert_merge(ckpts["flux"], path, expected, tmp_path / "merged.safetensors")


@pytest.mark.parametrize("tool,target", [("onetrainer-omi", "kohya"), ("onetrainer-omi", "diffusers"),
                                         ("xlabs", "kohya"), ("xlabs", "diffusers"), ("comfy-lorasave", "kohya")])
def test_flux_conversion_keeps_the_change(tool, target, ckpts, tmp_path):
    tensors, expected = FLUX_FORMATS[tool]()
    source = _write(tmp_path, tool, tensors)
    out = tmp_path / f"{tool}-{target}.safetensors"
    result = convert_file(source, out, ConvertOptions(target=target))
    assert result.error is None
    _assert_merge(ckpts["flux"], out, expected, tmp_path / "merged.safetensors")


def _flux_comfy_all_biased():
    """The ComfyUI Flux file with a bias difference on every UNet module (q;k;v rows included)."""
    tensors, expected = _flux_comfy()
    tensors = {k: v for k, v in tensors.items() if "layer_norm1" not in k}  # a norm's diff: no LoRA form
    expected = [item for item in expected if "layer_norm1" not in item.key]
    qkv_bias = _rand(torch.Generator().manual_seed(9), 3 * H)
    tensors["diffusion_model.double_blocks.0.img_attn.qkv.diff_b"] = qkv_bias
    expected.append(Expected(DB + "img_attn.qkv.bias", None, qkv_bias))
    return tensors, expected


def test_comfy_bias_differences_on_some_modules_have_no_peft_spelling(tmp_path):
    """peft's lora_bias gives every lora_B of a model a bias, which it cannot merge into a layer without
    one (Flux qkv here has a bias, but the rule is per model): bias differences on only some of a
    model's modules are refused for diffusers and peft, naming the count; kohya keeps them."""
    tensors, _ = _flux_comfy()
    tensors = {k: v for k, v in tensors.items() if "layer_norm1" not in k}
    source = _write(tmp_path, "comfy", tensors)
    for target, component in (("diffusers", None), ("peft", "unet")):
        out = tmp_path / f"out-{target}.safetensors"
        with pytest.raises(UnsupportedError, match=r"bias differences \(diff_b\) on only some modules \(transformer: 2 of 5"):
            convert_file(source, out, ConvertOptions(target=target, component=component))
        assert not out.exists()
    convert_file(source, tmp_path / "k.safetensors", ConvertOptions(target="kohya"))


def test_comfy_bias_difference_becomes_lora_b_bias(ckpts, tmp_path):
    """With a bias difference on every module of a model, the diffusers and peft layouts hold them as
    peft's lora_B bias (lora_bias=True for that model only); both outputs merge to the same change as
    the ComfyUI file (final_layer's halves swapped in diffusers names) and read back as diff_b."""
    tensors, expected = _flux_comfy_all_biased()
    source = _write(tmp_path, "comfy", tensors)
    out = tmp_path / "out.safetensors"
    convert_file(source, out, ConvertOptions(target="diffusers"))
    written = read_tensors(out)
    proj = "transformer.transformer_blocks.0.attn.to_out.0.lora_B."
    assert torch.equal(written[proj + "bias"], tensors["diffusion_model.double_blocks.0.img_attn.proj.diff_b"])
    assert not any(key.endswith(".bias") for key in written if key.startswith("text_encoder"))
    with safe_open(out, "pt") as handle:
        adapter = json.loads(handle.metadata()["lora_adapter_metadata"])
    assert adapter["transformer.lora_bias"] is True and adapter["text_encoder.lora_bias"] is False
    _assert_merge(ckpts["flux"], out, expected, tmp_path / "merged.safetensors")
    back = load_network(out)
    assert {name for name, module in back.modules.items() if "diff_b" in module.tensors} == {
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj",
        "lora_unet_final_layer_adaLN_modulation_1"}
    peft_out = tmp_path / "adapter_model.safetensors"
    convert_file(source, peft_out, ConvertOptions(target="peft", component="unet"))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_bias"] is True and config["use_dora"] is False
    _assert_merge(ckpts["flux"], peft_out, [item for item in expected if item.key.startswith("model.diffusion_model.")],
                  tmp_path / "merged-peft.safetensors")


def test_dora_with_a_bias_difference_has_no_diffusers_spelling(tmp_path):
    tensors, _ = _flux_comfy()
    tensors = {k: v for k, v in tensors.items() if "layer_norm1" not in k}
    tensors["diffusion_model.double_blocks.0.img_attn.proj.dora_scale"] = torch.ones(H, 1)
    source = _write(tmp_path, "comfy", tensors)
    with pytest.raises(UnsupportedError, match=r"DoRA with a bias difference"):
        convert_file(source, tmp_path / "out.safetensors", ConvertOptions(target="diffusers"))
    assert not (tmp_path / "out.safetensors").exists()


def test_comfy_modules_outside_the_tables_get_generic_kohya_names(ckpts, tmp_path):
    """ComfyUI's LoraSave writes every layer: norms as diff/diff_b (SD1 UNet group norm in LDM names, SDXL
    OpenCLIP-bigG norm in HF names). They read as `<kohya prefix><path>`, convert to kohya and merge."""
    generator = torch.Generator().manual_seed(6)
    group_norm, big_g_norm = _rand(generator, 20), _rand(generator, 40)
    cases = {
        "sd1": ({"diffusion_model.input_blocks.1.0.in_layers.0.diff": group_norm},
                [Expected("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", None, group_norm)],
                "lora_unet_input_blocks_1_0_in_layers_0", _sd1_old_diffusers),
        "sdxl": ({"text_encoders.clip_g.transformer.text_model.encoder.layers.0.layer_norm1.diff": big_g_norm},
                 [Expected("conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight", None, big_g_norm)],
                 "lora_te2_text_model_encoder_layers_0_layer_norm1", _sdxl_diffusers),
    }
    for arch, (tensors, expected, name, more) in cases.items():
        extra, extra_expected = more()
        source = _write(tmp_path, f"comfy-{arch}", {**tensors, **extra})
        _assert_all_mapped(source, arch)
        assert name in load_network(source).modules
        out = tmp_path / f"comfy-{arch}-kohya.safetensors"
        assert convert_file(source, out, ConvertOptions(target="kohya")).error is None
        assert f"{name}.diff" in read_tensors(out)
        _assert_merge(ckpts[arch], out, expected + extra_expected, tmp_path / f"merged-{arch}.safetensors")


def test_comfy_bias_only_module_is_a_clear_error(capsys, ckpts, tmp_path):
    tensors, _ = _flux_kohya()
    tensors["diffusion_model.double_blocks.0.img_attn.proj.diff_b"] = torch.zeros(H)
    path = _write(tmp_path, "bias-only", tensors)
    code, out, err = run_lytools(capsys, "merge", ckpts["flux"], path, "-o", tmp_path / "m.safetensors")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "img_attn_proj" in err and "diff_b" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_bfl_control_lora_is_refused_by_name(capsys, ckpts, tmp_path):
    tensors, _ = _lora([("double_blocks.0.img_attn.qkv", DB + "img_attn.qkv.weight", None, H, 3 * H),
                        ("img_in", "model.diffusion_model.img_in.weight", None, 8, H)], ".lora_A.weight", ".lora_B.weight")
    tensors["img_in.lora_B.bias"] = torch.zeros(H)
    tensors["double_blocks.0.img_attn.norm.key_norm.scale"] = torch.ones(8)
    tensors["single_blocks.0.norm.query_norm.scale"] = torch.ones(8)
    path = _write(tmp_path, "canny", tensors)
    with pytest.raises(UnsupportedError, match="BFL Flux control LoRA"):
        load_network(path)
    for args in (("merge", ckpts["flux"], path, "-o", tmp_path / "m.safetensors"),
                 ("convert", path, "-o", tmp_path / "c.safetensors", "--to", "kohya")):
        code, out, err = run_lytools(capsys, *args)
        assert code == 1 and len(err.strip().splitlines()) == 1 and "BFL Flux control LoRA" in err
    code, out, err = run_lytools(capsys, "info", path)
    assert code == 0 and "BFL Flux control LoRA" in out
    assert not list(tmp_path.glob("[mc].safetensors"))


@pytest.mark.parametrize("axis", ["out", "in"])
def test_onetrainer_dora_on_split_parts(axis, ckpts, tmp_path):
    """OneTrainer DoRA on diffusers q/k/v: per-output magnitudes fuse exactly; per-input ones (normalised
    over a part's rows only) and magnitudes on only some parts have no fused form: refused by name."""
    generator = torch.Generator().manual_seed(3)
    tensors, expected = _lora([("lora_transformer_single_transformer_blocks_0_proj_out", SB + "linear2.weight", None,
                                5 * H, H)], ".lora_down.weight", ".lora_up.weight", alpha=4)
    for rows, part in zip((Q, K, V), ("to_q", "to_k", "to_v")):
        name = f"lora_transformer_transformer_blocks_0_attn_{part}"
        down, up = _rand(generator, 4, H), _rand(generator, H, 4)
        magnitude = 1 + (_rand(generator, H, 1) if axis == "out" else _rand(generator, 1, H))
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                        f"{name}.alpha": torch.tensor(2.0), f"{name}.dora_scale": magnitude})
        expected.append(Expected(DB + "img_attn.qkv.weight", rows, _dora(up, down, 0.5, magnitude, axis)))
    path = _write(tmp_path, f"dora-{axis}", tensors)
    if axis == "out":
        _assert_merge(ckpts["flux"], path, expected, tmp_path / "merged.safetensors")
    else:
        with pytest.raises(UnsupportedError, match="input-axis DoRA"):
            load_network(path)
    del tensors["lora_transformer_transformer_blocks_0_attn_to_k.dora_scale"]
    with pytest.raises(UnsupportedError, match="only some q/k/v parts"):
        load_network(_write(tmp_path, f"dora-{axis}-partial", tensors))


def test_xlabs_network_is_not_taken_for_a_checkpoint(ckpts, tmp_path):
    tensors, _ = _flux_xlabs()
    path = _write(tmp_path, "xlabs", tensors)
    result = run_merge([ckpts["flux"], path], None, dry_run=True, device="cpu")
    assert "xlabs" in " ".join(result.plan.lines())


# -- SD1 / SDXL / SD3 ---------------------------------------------------------------------------------
U1 = "model.diffusion_model.input_blocks.1.1."
TE = "cond_stage_model.transformer.text_model.encoder.layers.0."
XU = "model.diffusion_model.input_blocks.4.1."
BIGG = "conditioner.embedders.1.model.transformer.resblocks.0.attn."
J = "model.diffusion_model.joint_blocks.0."


def _sd1_old_diffusers():
    return _lora([
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
         U1 + "transformer_blocks.0.attn1.to_q.weight", None, 20, 20),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora",
         U1 + "transformer_blocks.0.attn2.to_k.weight", None, 48, 20),
        ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora",
         U1 + "transformer_blocks.0.attn1.to_out.0.weight", None, 20, 20),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer", TE + "self_attn.q_proj.weight",
         None, 48, 48),
        ("text_encoder.text_model.encoder.layers.0.self_attn.to_v_lora", TE + "self_attn.v_proj.weight", None, 48, 48),
        ("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_linear_layer", TE + "mlp.fc1.weight", None, 48, 192),
    ], ".down.weight", ".up.weight")


def _sd1_a1111():
    generator = torch.Generator().manual_seed(4)
    tensors, expected = _lora([
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", TE + "self_attn.q_proj.weight", None, 48, 48),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
         U1 + "transformer_blocks.0.attn1.to_k.weight", None, 20, 20),
    ], ".lora_down.weight", ".lora_up.weight", alpha=1)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # LoCon 3x3
    down, up = _rand(generator, 4, 20, 3, 3), _rand(generator, 20, 4, 1, 1)
    tensors.update({f"{conv}.lora_down.weight": down, f"{conv}.lora_up.weight": up, f"{conv}.alpha": torch.tensor(2.0)})
    expected.append(Expected("model.diffusion_model.input_blocks.1.0.in_layers.2.weight", None,
                             0.5 * (up.flatten(1) @ down.flatten(1))))
    full = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"  # full diff / diff_b
    diff, diff_b = _rand(generator, 20, 80), _rand(generator, 20)
    tensors.update({f"{full}.diff": diff, f"{full}.diff_b": diff_b})
    expected += [Expected(U1 + "transformer_blocks.0.ff.net.2.weight", None, diff),
                 Expected(U1 + "transformer_blocks.0.ff.net.2.bias", None, diff_b)]
    for name, key, axis, width in (
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", U1 + "transformer_blocks.0.attn1.to_q.weight",
         "in", 20),
        ("lora_te_text_model_encoder_layers_0_self_attn_k_proj", TE + "self_attn.k_proj.weight", "out", 48),
    ):
        down, up = _rand(generator, 4, width), _rand(generator, width, 4)
        magnitude = 1 + (_rand(generator, 1, width) if axis == "in" else _rand(generator, width, 1))
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(2.0),
                        f"{name}.dora_scale": magnitude})
        expected.append(Expected(key, None, _dora(up, down, 0.5, magnitude, axis)))
    return tensors, expected


def _sdxl_kohya():
    return _lora([
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
         "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", None, 24, 24),
        ("lora_te2_text_model_encoder_layers_0_self_attn_k_proj", BIGG + "in_proj_weight", (40, 80), 40, 40),
        ("lora_te2_text_model_encoder_layers_0_self_attn_out_proj", BIGG + "out_proj.weight", None, 40, 40),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", XU + "transformer_blocks.0.attn1.to_q.weight",
         None, 20, 20),
        ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k",  # OneTrainer's diffusers-path names
         XU + "transformer_blocks.0.attn1.to_k.weight", None, 20, 20),
    ], ".lora_down.weight", ".lora_up.weight", alpha=8)


def _sdxl_diffusers():
    return _lora([
        ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", XU + "transformer_blocks.0.attn1.to_q.weight",
         None, 20, 20),
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.v_proj", BIGG + "in_proj_weight", (80, 120), 40, 40),
        ("text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
         "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight", None, 24, 24),
    ], ".lora_A.weight", ".lora_B.weight")


def _sd3_kohya():
    return _lora([
        ("lora_unet_joint_blocks_0_x_block_attn_qkv", J + "x_block.attn.qkv.weight", None, 96, 288),
        ("lora_unet_joint_blocks_0_context_block_attn_proj", J + "context_block.attn.proj.weight", None, 96, 96),
        ("lora_te3_encoder_block_0_layer_0_SelfAttention_q", T5 + "q.weight", None, 256, 256),
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", CLIP + "self_attn.q_proj.weight", None, 48, 48),
    ], ".lora_down.weight", ".lora_up.weight", alpha=2)


def _sdxl_omi():
    return _lora([
        ("unet.input_blocks.4.1.transformer_blocks.0.attn1.to_q", XU + "transformer_blocks.0.attn1.to_q.weight", None, 20, 20),
        ("unet.input_blocks.4.1.proj_in", XU + "proj_in.weight", None, 20, 20),
        ("clip_l.text_model.encoder.layers.0.self_attn.q_proj",
         "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", None, 24, 24),
        ("clip_g.text_model.encoder.layers.0.self_attn.v_proj", BIGG + "in_proj_weight", (80, 120), 40, 40),
    ], ".lora_down.weight", ".lora_up.weight", alpha=2)


def _sd3_omi():
    return _lora([
        ("transformer.joint_blocks.0.x_block.attn.qkv.1", J + "x_block.attn.qkv.weight", (96, 192), 96, 96),
        ("transformer.joint_blocks.0.context_block.attn.qkv.2", J + "context_block.attn.qkv.weight", (192, 288), 96, 96),
        ("transformer.joint_blocks.0.x_block.mlp.fc1", J + "x_block.mlp.fc1.weight", None, 96, 384),
        ("t5.encoder.block.0.layer.0.SelfAttention.q", T5 + "q.weight", None, 256, 256),
    ], ".lora_down.weight", ".lora_up.weight", alpha=2)


SD_FORMATS = {
    "sdxl-onetrainer-omi": ("sdxl", _sdxl_omi), "sd3-onetrainer-omi": ("sd3", _sd3_omi),
    "sd1-old-diffusers": ("sd1", _sd1_old_diffusers), "sd1-a1111-locon-full-dora": ("sd1", _sd1_a1111),
    "sdxl-kohya": ("sdxl", _sdxl_kohya), "sdxl-diffusers": ("sdxl", _sdxl_diffusers), "sd3-kohya": ("sd3", _sd3_kohya),
}


@pytest.mark.parametrize("case", sorted(SD_FORMATS))
def test_sd_network_of_other_tools_merges_exactly(case, ckpts, tmp_path):
    arch, build = SD_FORMATS[case]
    tensors, expected = build()
    path = _write(tmp_path, case, tensors)
    _assert_all_mapped(path, arch)
    _assert_merge(ckpts[arch], path, expected, tmp_path / "merged.safetensors")


def test_simpletuner_sd3_split_parts(ckpts, tmp_path):
    tensors, expected = _lora([
        ("transformer.transformer_blocks.0.attn.to_k", J + "x_block.attn.qkv.weight", (96, 192), 96, 96),
        ("transformer.transformer_blocks.0.attn.add_v_proj", J + "context_block.attn.qkv.weight", (192, 288), 96, 96),
        ("transformer.transformer_blocks.0.attn.to_add_out", J + "context_block.attn.proj.weight", None, 96, 96),
        ("transformer.transformer_blocks.0.ff_context.net.2", J + "context_block.mlp.fc2.weight", None, 384, 96),
    ], ".lora_A.weight", ".lora_B.weight")
    path = _write(tmp_path, "simpletuner-sd3", tensors)
    _assert_merge(ckpts["sd3"], path, expected, tmp_path / "merged.safetensors")


def test_unreadable_network_is_one_line(capsys, ckpts, tmp_path):
    tensors, _ = _flux_kohya()
    tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.zeros(3 * H, 5)  # rank 5 vs 4
    path = _write(tmp_path, "broken", tensors)
    with pytest.raises((NetworkError, LytoolsError)):
        run_merge([ckpts["flux"], path], tmp_path / "m.safetensors", device="cpu")
    code, out, err = run_lytools(capsys, "merge", ckpts["flux"], path, "-o", tmp_path / "m.safetensors")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "img_attn_qkv" in err
    assert not (tmp_path / "m.safetensors").exists()


def test_peft_adapter_of_unknown_architecture_resolves_against_the_checkpoint(ckpts, tmp_path):
    """A peft adapter (`base_model.model.<path>`) whose names fit more than one architecture (Flux and SD3
    share the diffusers double-block names) is placed by the checkpoint it is merged into."""
    tensors, expected = _lora([
        ("base_model.model.transformer_blocks.0.attn.to_q", DB + "img_attn.qkv.weight", Q, H, H),
        ("base_model.model.transformer_blocks.0.attn.to_add_out", DB + "txt_attn.proj.weight", None, H, H),
    ], ".lora_A.weight", ".lora_B.weight")
    path = _write(tmp_path, "adapter_model", tensors)
    assert load_network(path).arch == "unknown"
    _assert_merge(ckpts["flux"], path, expected, tmp_path / "merged.safetensors")


def test_peft_lora_bias_is_a_scaled_bias_difference(ckpts, tmp_path):
    """peft `lora_B.bias` (lora_bias=True) changes the layer bias by scale · b, parts of fused layers too."""
    import json

    tensors, expected = _lora([
        ("transformer.single_transformer_blocks.0.attn.to_q", SB + "linear1.weight", Q, H, H),
        ("transformer.single_transformer_blocks.0.attn.to_k", SB + "linear1.weight", K, H, H),
        ("transformer.transformer_blocks.0.attn.to_out.0", DB + "img_attn.proj.weight", None, H, H),
    ], ".lora_A.weight", ".lora_B.weight")
    generator = torch.Generator().manual_seed(5)
    part_bias, bias = _rand(generator, H), _rand(generator, H)
    tensors["transformer.single_transformer_blocks.0.attn.to_q.lora_B.bias"] = part_bias
    tensors["transformer.transformer_blocks.0.attn.to_out.0.lora_B.bias"] = bias
    path = tmp_path / "bias.safetensors"
    config = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.lora_bias": True}  # scale 2
    save_file(tensors, str(path), metadata={"lora_adapter_metadata": json.dumps(config)})
    expected = [Expected(e.key, e.rows, 2 * e.delta) for e in expected]
    expected += [Expected(SB + "linear1.bias", Q, 2 * part_bias), Expected(DB + "img_attn.proj.bias", None, 2 * bias)]
    _assert_merge(ckpts["flux"], path, expected, tmp_path / "merged.safetensors")
    out = tmp_path / "kohya.safetensors"
    assert convert_file(path, out, ConvertOptions(target="kohya")).error is None
    _assert_merge(ckpts["flux"], out, expected, tmp_path / "merged2.safetensors")


def test_networks_of_several_tools_merge_into_one_exactly(ckpts, tmp_path):
    """Merge of networks (exact concatenation) across layouts, with ratios: bias differences add up and a
    module copied at a ratio scales its diff_b too; merged into the checkpoint it equals Σ ratio · ΔW."""
    ratios = {"onetrainer-omi": 1.0, "xlabs": 0.5, "ai-toolkit": -1.0, "comfy-lorasave": 0.7, "sd-scripts-split-qkv": 2.0}
    paths, expected = [], []
    for tool, ratio in ratios.items():
        tensors, changes = FLUX_FORMATS[tool]()
        paths.append(_write(tmp_path, tool, tensors))
        expected += [Expected(c.key, c.rows, ratio * c.delta) for c in changes]
    merged = tmp_path / "network.safetensors"
    run_merge(paths, merged, ratios=list(ratios.values()), device="cpu")
    _assert_merge(ckpts["flux"], merged, expected, tmp_path / "checkpoint.safetensors")


def test_copied_module_takes_its_ratio_on_the_bias_difference_too(ckpts, tmp_path):
    """ComfyUI's img_attn.proj (LoRA + diff_b) and CLIP norm (diff/diff_b) are in one input only: copied
    with the ratio folded in."""
    comfy, comfy_changes = _flux_comfy()
    kohya, kohya_changes = _flux_kohya()
    paths = [_write(tmp_path, "comfy", comfy), _write(tmp_path, "kohya", kohya)]
    run_merge(paths, tmp_path / "network.safetensors", ratios=[0.7, 1.0], device="cpu")
    expected = [Expected(c.key, c.rows, 0.7 * c.delta) for c in comfy_changes] + kohya_changes
    _assert_merge(ckpts["flux"], tmp_path / "network.safetensors", expected, tmp_path / "checkpoint.safetensors")


@pytest.mark.parametrize("fold", [True, False])
def test_lora_b_bias_output_loads_in_peft_with_the_bias_difference(tmp_path, fold):
    """peft itself (LoraConfig from our lora_adapter_metadata, lora_bias=True) adds the ComfyUI file's
    bias difference to the layer's bias when it merges, folded or not (scale alpha / r on the bias)."""
    peft = pytest.importorskip("peft")
    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    tensors, _ = _flux_comfy_all_biased()
    down = tensors["diffusion_model.double_blocks.0.img_attn.proj.lora_down.weight"]
    tensors["diffusion_model.double_blocks.0.img_attn.proj.alpha"] = torch.tensor(float(down.shape[0]) / 4)  # scale 1/4
    source = _write(tmp_path, "comfy", tensors)
    out = tmp_path / "out.safetensors"
    convert_file(source, out, ConvertOptions(target="diffusers", fold=fold))
    with safe_open(out, "pt") as handle:
        adapter = json.loads(handle.metadata()["lora_adapter_metadata"])
    config = {key.split(".", 1)[1]: value for key, value in adapter.items() if key.startswith("transformer.")}
    state = {k[len("transformer."):]: v.float() for k, v in load_file(out).items() if k.startswith("transformer.")}
    root = torch.nn.Module()
    for key, weight in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        *outer, last = key[: -len(".lora_A.weight")].split(".")
        parent = root
        for part in outer:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(last, torch.nn.Linear(weight.shape[1], state[key.replace("lora_A.weight", "lora_B.weight")].shape[0]))
    model = inject_adapter_in_model(peft.LoraConfig(**config), root)
    result = set_peft_model_state_dict(model, state)
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    changes = {}
    for path, module in model.named_modules():
        if isinstance(module, LoraLayer):
            before = module.base_layer.bias.detach().clone()
            module.merge()
            changes[path] = module.base_layer.bias.detach() - before
    expected = tensors["diffusion_model.double_blocks.0.img_attn.proj.diff_b"].float()
    torch.testing.assert_close(changes.pop("transformer_blocks.0.attn.to_out.0"), expected, rtol=1e-5, atol=1e-6)
    final = tensors["diffusion_model.final_layer.adaLN_modulation.1.diff_b"].float()
    swapped = torch.cat([final[H:], final[:H]])  # diffusers' norm_out.linear holds [scale; shift]
    torch.testing.assert_close(changes.pop("norm_out.linear"), swapped, rtol=1e-5, atol=1e-6)
    qkv = tensors["diffusion_model.double_blocks.0.img_attn.qkv.diff_b"].float()
    for index, part in enumerate(("to_q", "to_k", "to_v")):  # q;k;v rows of the fused bias
        torch.testing.assert_close(changes.pop(f"transformer_blocks.0.attn.{part}"), qkv[index * H:(index + 1) * H],
                                   rtol=1e-5, atol=1e-6)
    assert not changes


def test_lora_bias_adapter_round_trips_through_kohya(tmp_path):
    """peft lora_bias adapter -> kohya (diff_b) -> peft gives the same tensors and lora_bias back."""
    from lytools.testing import build_network

    modules = ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
               "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_ff_net_2"]
    kohya = build_network(tmp_path / "k.safetensors", "sd1", factor=16, rank=4, alpha=4.0, modules=modules)
    tensors = read_tensors(kohya)
    generator = torch.Generator().manual_seed(4)
    for name in modules:
        tensors[f"{name}.diff_b"] = _rand(generator, tensors[f"{name}.lora_up.weight"].shape[0]).to(torch.float16)
    with safe_open(kohya, "pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, kohya, metadata)
    first = tmp_path / "a" / "adapter_model.safetensors"
    first.parent.mkdir()
    convert_file(kohya, first, ConvertOptions(target="peft", component="unet", arch="sd1"))  # 2 modules: sd1 or sd2
    back = tmp_path / "back.safetensors"
    convert_file(first, back, ConvertOptions(target="kohya"))
    assert {key for key in read_tensors(back) if key.endswith(".diff_b")} == {f"{name}.diff_b" for name in modules}
    second = tmp_path / "b" / "adapter_model.safetensors"
    second.parent.mkdir()
    convert_file(back, second, ConvertOptions(target="peft", component="unet"))
    one, two = read_tensors(first), read_tensors(second)
    assert set(one) == set(two) and sum(key.endswith("lora_B.bias") for key in one) == 2
    assert all(torch.equal(one[key], two[key]) for key in one)
    assert json.loads((second.parent / "adapter_config.json").read_text())["lora_bias"] is True
