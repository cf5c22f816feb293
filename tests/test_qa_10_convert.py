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
