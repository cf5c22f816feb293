"""OpenCLIP attention layers (SD2's text encoder, SDXL's second) that a network holds only in part
are completed with zero modules in every kohya file lytools writes: AUTOMATIC1111 applies such a
layer only when q, k, v and out are all there (lytools.arch.a1111)."""

from __future__ import annotations

import torch

from lytools.arch.a1111 import missing_attention_parts
from lytools.cli import main
from lytools.convert import load_network
from lytools.io import open_file
from lytools.testing import build_checkpoint, build_network, build_tuned

LAYER = "lora_te_text_model_encoder_layers_{}_self_attn_{}_proj"
PARTIAL = [LAYER.format(0, "q"), LAYER.format(0, "v"), LAYER.format(1, "q"), LAYER.format(1, "k"), LAYER.format(1, "v"),
           LAYER.format(1, "out"), "lora_te_text_model_encoder_layers_2_mlp_fc1"]
ADDED = {LAYER.format(0, "k"), LAYER.format(0, "out")}


def test_missing_parts_are_named_for_open_clip_encoders_only():
    assert missing_attention_parts("sd2", PARTIAL) == {LAYER.format(0, "k"): LAYER.format(0, "q"),
                                                       LAYER.format(0, "out"): LAYER.format(0, "q")}
    assert missing_attention_parts("sd1", PARTIAL) == {}  # SD1's CLIP-L: A1111 applies each linear on its own
    sdxl = ["lora_te2_text_model_encoder_layers_3_self_attn_q_proj", "lora_te1_text_model_encoder_layers_3_self_attn_q_proj"]
    assert set(missing_attention_parts("sdxl", sdxl)) == {
        f"lora_te2_text_model_encoder_layers_3_self_attn_{p}_proj" for p in ("k", "v", "out")}


def _deltas(path) -> dict[str, torch.Tensor]:
    net = load_network(path)
    out = {}
    for name, module in net.modules.items():
        up, down = module["lora_up.weight"].float(), module["lora_down.weight"].float()
        alpha = float(module["alpha"]) if "alpha" in module else down.shape[0]
        out[name] = (up.flatten(1) @ down.flatten(1)) * alpha / down.shape[0]
    return out


def _assert_completed(source, output, captured_err: str) -> None:
    before, after = _deltas(source), _deltas(output)
    assert set(after) == set(before) | ADDED
    for name in ADDED:
        assert not after[name].any() and after[name].shape == after[LAYER.format(0, "q")].shape
    assert "added 2 zero modules" in captured_err and "AUTOMATIC1111" in captured_err


def test_convert_resize_and_merge_complete_partial_layers(tmp_path, capsys):
    source = build_network(tmp_path / "partial.safetensors", "sd2", rank=4, alpha=2.0, modules=PARTIAL)
    capsys.readouterr()
    main(["convert", str(source), "-o", str(tmp_path / "k.safetensors"), "--to", "kohya"])
    _assert_completed(source, tmp_path / "k.safetensors", capsys.readouterr().err)
    for name, change in _deltas(source).items():
        assert torch.equal(_deltas(tmp_path / "k.safetensors")[name], change)

    main(["resize", str(source), str(tmp_path / "r.safetensors"), "--rank", "4"])
    _assert_completed(source, tmp_path / "r.safetensors", capsys.readouterr().err)

    main(["merge", str(source), str(source), "-o", str(tmp_path / "m.safetensors"), "--ratios", "0.5", "0.5"])
    _assert_completed(source, tmp_path / "m.safetensors", capsys.readouterr().err)

    # diffusers layout: nothing added (diffusers applies each module on its own)
    main(["convert", str(source), "-o", str(tmp_path / "d.safetensors"), "--to", "diffusers"])
    assert "zero modules" not in capsys.readouterr().err
    with open_file(tmp_path / "d.safetensors") as converted:
        assert not any("layers.0.self_attn.k_proj" in key for key in converted.keys())


def test_extract_completes_a_layer_whose_out_proj_did_not_change(tmp_path, capsys):
    base = build_checkpoint(tmp_path / "base.safetensors", "sd2", factor=16)
    change = build_network(tmp_path / "change.safetensors", "sd2", factor=16, rank=2, modules=PARTIAL)
    build_tuned(base, tmp_path / "tuned.safetensors", change)
    out = tmp_path / "x.safetensors"
    capsys.readouterr()
    main(["extract", str(base), str(tmp_path / "tuned.safetensors"), str(out), "--linear-dim", "2", "--no-unet", "--verify"])
    err = capsys.readouterr().err
    assert "added 2 zero modules" in err
    with open_file(out) as lora:
        names = {key.split(".")[0] for key in lora.keys()}
        assert set(PARTIAL) | ADDED <= names
        assert not lora.get(LAYER.format(0, "out") + ".lora_up.weight").any()


def test_info_names_the_layers_a1111_would_skip(tmp_path):
    from lytools.info import inspect_file

    source = build_network(tmp_path / "partial.safetensors", "sd2", rank=4, modules=PARTIAL)
    notes = inspect_file(source)["notes"]
    assert any("AUTOMATIC1111 skips" in note and "2 modules missing" in note for note in notes)
    complete = build_network(tmp_path / "whole.safetensors", "sd2", rank=4)
    assert not any("AUTOMATIC1111" in note for note in inspect_file(complete)["notes"])
