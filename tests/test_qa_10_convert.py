"""convert across layouts as users meet it: messages in the terms of the options they are given
(spec: CLI.md convert, FORMATS.md 3.3, 3.5, 4.3)."""

from __future__ import annotations

import pytest
import torch

from lytools.testing import build_network
from tests.shared import run_lytools


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_peft_component_errors_name_flux_t5_as_te3(tmp_path, capsys, layout):
    """Flux's T5 is diffusers' text_encoder_2 but --component te3: a message that listed
    `text_encoder_2` as present while refusing te2 sent the user round in circles."""
    source = build_network(tmp_path / "f.safetensors", "flux", factor=32, rank=2, dtype=torch.float32, layout=layout,
                           modules=["lora_unet_double_blocks_0_img_attn_proj", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                                    "lora_te3_encoder_block_0_layer_0_SelfAttention_q"])
    out = tmp_path / "a"
    code, stdout, err = run_lytools(capsys, "convert", source, "-o", out, "--to", "peft")
    assert code == 1 and stdout == "" and not out.exists()
    assert "te1 (text_encoder), te3 (text_encoder_2), unet (transformer); pick one with --component" in err
    code, stdout, err = run_lytools(capsys, "convert", source, "-o", out, "--to", "peft", "--component", "te2")
    assert code == 1 and stdout == "" and not out.exists()
    assert "no te2 modules in this flux network (it has --component te1 (text_encoder), te3 (text_encoder_2)" in err
    code, stdout, _ = run_lytools(capsys, "convert", source, "-o", out, "--to", "peft", "--component", "te3")
    assert code == 0 and (out / "adapter_model.safetensors").exists()
    from safetensors import safe_open
    with safe_open(out / "adapter_model.safetensors", "pt") as f:
        assert {k.split(".lora_")[0] for k in f.keys()} == {"base_model.model.encoder.block.0.layer.0.SelfAttention.q"}


def test_peft_component_te_and_te1_are_one_encoder_on_sd1_and_sdxl(tmp_path, capsys):
    for arch, count in (("sd1", 1), ("sdxl", 2)):
        source = build_network(tmp_path / f"{arch}.safetensors", arch, factor=32, rank=2,
                               modules=[m for m in ("lora_te_text_model_encoder_layers_0_mlp_fc1",
                                                    "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                                                    "lora_te2_text_model_encoder_layers_0_mlp_fc1")
                                        if (m.startswith("lora_te_") == (arch == "sd1"))])
        for option in ("te", "te1"):
            out = tmp_path / f"{arch}-{option}"
            code, _, err = run_lytools(capsys, "convert", source, "-o", out, "--to", "peft", "--component", option, "--arch", arch)
            assert code == 0, err
        code, _, err = run_lytools(capsys, "convert", source, "-o", tmp_path / "x", "--to", "peft", "--component", "te3",
                                   "--arch", arch)
        assert code == 1 and ("--component te (text_encoder)" if arch == "sd1" else
                              "--component te1 (text_encoder), te2 (text_encoder_2)") in err


def _split_flux_lora(path, parts, rank=4):
    """A diffusers Flux LoRA training only some of the q/k/v (and proj_mlp) parts of a fused weight, as
    diffusers' own Flux script does (to_q/k/v and to_out.0: no proj_mlp in single blocks)."""
    from lytools.io import write_safetensors

    g = torch.Generator().manual_seed(4)
    tensors = {}
    for name in parts:
        rows = 12288 if name.endswith("proj_mlp") else 3072
        tensors[f"transformer.{name}.lora_A.weight"] = (0.1 * torch.randn(rank, 3072, generator=g)).half()
        tensors[f"transformer.{name}.lora_B.weight"] = (0.1 * torch.randn(rows, rank, generator=g)).half()
    write_safetensors(path, tensors)
    return path


@pytest.mark.parametrize("fold", ["--fold", "--no-fold"])
def test_parts_a_fused_weight_was_trained_without_stay_out(tmp_path, capsys, fold):
    """diffusers → diffusers (or via kohya) wrote every part of a fused weight at the summed rank: a
    single block trained on to_q/k/v came out with a proj_mlp of zeros, each part at rank 12 not 4, and a
    double block's to_q + to_v got a to_k: 4.5 times the file, nothing of it applied."""
    from safetensors.torch import load_file

    parts = ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k",
             "single_transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v",
             "transformer_blocks.1.attn.add_k_proj"]  # (one part alone: no block structure to see, still no zero parts)
    source = _split_flux_lora(tmp_path / "d.safetensors", parts)
    out = tmp_path / "o.safetensors"
    code, _, err = run_lytools(capsys, "convert", source, "-o", out, "--to", "diffusers", fold, "--verify", "--check")
    assert code == 0, err
    original, written = load_file(source), load_file(out)
    assert set(written) == set(original)  # ranks 4, no part added
    if fold == "--no-fold":  # scale 1: a fold changes nothing either, but the flag is the contract
        assert all(torch.equal(written[k], original[k]) for k in original)
    kohya, back = tmp_path / "k.safetensors", tmp_path / "b.safetensors"
    assert run_lytools(capsys, "convert", source, "-o", kohya, "--to", "kohya")[0] == 0
    assert run_lytools(capsys, "convert", kohya, "-o", back, "--to", "diffusers", "--no-fold", "--verify")[0] == 0
    again = load_file(back)
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)


def test_part_of_zero_rows_is_kept_where_a_dora_magnitude_changes_it(tmp_path):
    """A zero-ΔW part still has its rows rescaled by DoRA: it is written, not dropped."""
    from lytools.convert.fuse import DORA, DOWN, UP, split_fused

    g = torch.Generator().manual_seed(0)
    up = torch.zeros(12, 4)
    up[0:4, 0:2] = torch.randn(4, 2, generator=g)
    up[8:12, 2:4] = torch.randn(4, 2, generator=g)
    tensors = {DOWN: torch.randn(4, 6, generator=g), UP: up}
    rows = [(0, 4), (4, 8), (8, 12)]
    plain = split_fused("m", tensors, rows)
    assert plain[1] is None and [p[DOWN].shape[0] for p in (plain[0], plain[2])] == [2, 2]
    assert torch.equal(plain[0][UP] @ plain[0][DOWN], (up @ tensors[DOWN])[0:4])
    dora = split_fused("m", {**tensors, DORA: torch.ones(12, 1)}, rows)
    assert dora[1] is not None and torch.equal(dora[1][UP] @ dora[1][DOWN], torch.zeros(4, 6))


@pytest.mark.parametrize("target", [["--to", "diffusers"], ["--to", "peft", "--component", "unet"], ["--to", "kohya", "--fold"]])
def test_fold_into_fp8_factors_that_underflow_is_refused(tmp_path, capsys, target):
    """An fp8 LoRA of alpha 1, rank 64: folding 1/64 into its fp8 factors pushed them below e4m3's smallest
    subnormal, and the default conversion wrote a file whose change was 45-66% off without a word (the
    fp8 note spoke only of non-power-of-two scales)."""
    from safetensors.torch import load_file

    from lytools.io import write_safetensors

    name = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    built = build_network(tmp_path / "b.safetensors", "sd1", factor=8, rank=64, alpha=1.0, modules=[name], dtype=torch.float32)
    tensors = {k: (0.1 * v).to(torch.float8_e4m3fn) if k.endswith(".weight") else v for k, v in load_file(built).items()}
    source = tmp_path / "f8.safetensors"
    write_safetensors(source, tensors)
    out = tmp_path / "out"
    code, stdout, err = run_lytools(capsys, "convert", source, "-o", out, *target, "--arch", "sd1")
    assert code == 1 and stdout == "" and not out.exists()
    assert "alpha/rank = 0.015625 into float8_e4m3fn factors loses" in err and "--save-dtype bf16" in err
    # what the message offers works, and keeps the change
    for extra in (["--save-dtype", "bf16"], ["--no-fold"]):
        if "--fold" in target and extra == ["--no-fold"]:
            continue
        code, _, err = run_lytools(capsys, "convert", source, "-o", tmp_path / "ok", *target, "--arch", "sd1", "--verify",
                                   "--overwrite", *extra)
        assert code == 0, err


@pytest.mark.parametrize(("arch", "width", "expected"), [("sd1", 768, "lora_te_"), ("sd2", 1024, "lora_te_"), ("flux", 768, "lora_te1_")])
def test_lycoris_text_encoder_names_get_their_kohya_names(tmp_path, capsys, arch, width, expected):
    """LyCORIS' wrapper on a CLIP text encoder writes `lycoris_text_model_…` (FORMATS.md 3.2: infer the
    component from the name). convert --to kohya kept those names, which no loader maps for text
    encoders (ComfyUI's lycoris_ map is the denoiser's), so the file converted with exit 0 and loaded nothing."""
    from safetensors import safe_open

    from lytools.io import write_safetensors

    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, rows in (("text_model_encoder_layers_0_self_attn_q_proj", width), ("text_model_encoder_layers_0_mlp_fc1", 4 * width)):
        tensors[f"lycoris_{name}.lora_down.weight"] = torch.randn(2, width, generator=g).half()
        tensors[f"lycoris_{name}.lora_up.weight"] = torch.randn(rows, 2, generator=g).half()
        tensors[f"lycoris_{name}.alpha"] = torch.tensor(1.0).half()
    source = tmp_path / "l.safetensors"
    write_safetensors(source, tensors)
    out = tmp_path / "k.safetensors"
    code, _, err = run_lytools(capsys, "convert", source, "-o", out, "--to", "kohya", "--arch", arch, "--verify", "--check")
    assert code == 0, err
    with safe_open(out, "pt") as f:
        written = {k.split(".")[0] for k in f.keys()}
    # (SD2's q/k/v/out of a layer are completed with zero modules for A1111's fused attention)
    assert {expected + n for n in ("text_model_encoder_layers_0_self_attn_q_proj", "text_model_encoder_layers_0_mlp_fc1")} <= written
    assert all(name.startswith(expected) for name in written)
