"""Networks and model folders as the current diffusers / transformers / peft write them, through
lytools' merge, extract, convert and resize (spec: FORMATS.md 2.1, 3.3, 4.3; CLI.md merge, extract)."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file

from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors, run_lytools

CLIP_PREFIX = "cond_stage_model.transformer."


def _flat_clip_pipeline(root, factor: int = 16):
    """An SD1 diffusers folder whose text encoder is saved as transformers 5 saves CLIPTextModel:
    `encoder.layers.N…`, `embeddings.…`, `final_layer_norm.…`, without the `text_model.` level."""
    unet = load_file(build_checkpoint(root / "u.safetensors", "sd1", factor=factor, layout="diffusers", dtype=torch.float32))
    clip = load_file(build_checkpoint(root / "c.safetensors", "sd1", factor=factor, components=["clip_l"], dtype=torch.float32))
    flat = {}
    for key, tensor in clip.items():
        path = key[len(CLIP_PREFIX):]
        if path.startswith("text_model."):
            flat[path[len("text_model."):]] = tensor
    assert any(k.startswith("encoder.layers.0.self_attn.q_proj") for k in flat)
    folder = root / "base"
    for component, tensors, name, config in (("unet", unet, "diffusion_pytorch_model.safetensors", {}),
                                             ("text_encoder", flat, "model.safetensors",
                                              {"architectures": ["CLIPTextModel"]})):
        (folder / component).mkdir(parents=True)
        (folder / component / "config.json").write_text(json.dumps(config))
        save_file(tensors, folder / component / name)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "text_encoder": ["transformers", "CLIPTextModel"]}))
    return folder


def test_text_encoder_saved_by_transformers_5_takes_kohya_te_modules(tmp_path, capsys):
    """A folder saved with transformers 5 (`pipe.save_pretrained`) holds the CLIP-L text encoder without
    `text_model.`: merge refused every lora_te_ module as matching no tensor, and extract between two such
    folders dropped every text-encoder change without a word."""
    base = _flat_clip_pipeline(tmp_path)
    net = build_network(tmp_path / "n.safetensors", "sd1", factor=16, rank=4, alpha=2.0, components=["te"],
                        dtype=torch.float32)
    merged = tmp_path / "merged"
    code, _, err = run_lytools(capsys, "merge", base, net, "-o", merged)
    assert code == 0, err
    before = load_file(base / "text_encoder" / "model.safetensors")
    after = load_file(merged / "text_encoder" / "model.safetensors")
    tensors = read_tensors(net)
    modules = {key.split(".", 1)[0] for key in tensors}
    assert len(modules) == 72
    for module in modules:
        path = module[len("lora_te_text_model_"):]
        layer, rest = path[len("encoder_layers_"):].split("_", 1)
        key = f"encoder.layers.{layer}.{rest.replace('self_attn_', 'self_attn.').replace('mlp_', 'mlp.')}.weight"
        up, down = tensors[f"{module}.lora_up.weight"].double(), tensors[f"{module}.lora_down.weight"].double()
        expected = float(tensors[f"{module}.alpha"]) / down.shape[0] * up @ down
        torch.testing.assert_close(after[key].double() - before[key].double(), expected, rtol=1e-5, atol=1e-6)
    assert {k for k in before if not torch.equal(before[k], after[k])} == {
        k for k in before if k.endswith("proj.weight") or ".mlp.fc" in k and k.endswith(".weight")}
    # and back: extract between the two folders names the change by its kohya text-encoder modules
    extracted = tmp_path / "x.safetensors"
    code, _, err = run_lytools(capsys, "extract", base, merged, extracted, "--linear-dim", "4", "--no-unet")
    assert code == 0, err
    assert {key.split(".", 1)[0] for key in load_file(extracted)} == modules
    # resize --base reads the same folder for DoRA modules ("no weight for module lora_te_..." before)
    dora = build_network(tmp_path / "dora.safetensors", "sd1", factor=16, rank=4, components=["te"], dora=True,
                         dtype=torch.float32)
    code, _, err = run_lytools(capsys, "resize", dora, tmp_path / "r.safetensors", "--rank", "4", "--base", base, "--verify")
    assert code == 0, err
    assert len({key.split(".", 1)[0] for key in load_file(tmp_path / "r.safetensors")}) == 72


def test_diffusers_network_of_a_transformers_5_clip_counts_its_text_encoder(tmp_path, capsys):
    """diffusers' save_lora_weights of a transformers 5 CLIPTextModel names its modules
    `text_encoder.encoder.layers.N…`: info left them out of every component and called them foreign,
    and a text-encoder-only file matched no architecture at all."""
    path = build_network(tmp_path / "d.safetensors", "sdxl", factor=16, rank=4, layout="diffusers", dtype=torch.float32)
    tensors = load_file(path)
    flat = {key.replace("text_encoder.text_model.", "text_encoder.", 1): t for key, t in tensors.items()}
    assert any(key.startswith("text_encoder.encoder.layers.") for key in flat)
    save_file(flat, tmp_path / "flat.safetensors")
    code, out, err = run_lytools(capsys, "info", "--json", tmp_path / "flat.safetensors")
    assert code == 0, err
    report = json.loads(out)[0]
    assert report["architecture"] == "sdxl"
    counts = report["network"]["components"]
    assert counts["te1"] == sum(1 for key in flat if key.startswith("text_encoder.") and key.endswith("lora_A.weight"))
    assert not [note for note in report["notes"] if "not in the" in note]
    # text encoder alone: a CLIP-L module fits several architectures, as with the `text_model.` spelling
    only_te = {key: t for key, t in flat.items() if key.startswith("text_encoder.")}
    save_file(only_te, tmp_path / "te.safetensors")
    code, out, err = run_lytools(capsys, "info", "--json", tmp_path / "te.safetensors")
    assert code == 0, err
    assert "sd1" in json.loads(out)[0]["architecture_candidates"]


def test_info_reads_the_scale_of_diffusers_adapter_metadata(tmp_path, capsys):
    """diffusers' save_lora_weights writes lora_adapter_metadata flat (`unet.r`, `unet.lora_alpha`, ...): info
    read only a nested form, so it showed no note and "alpha = rank, scale 1" for a file whose loaders
    (diffusers, and lytools convert) apply lora_alpha / r."""
    path = build_network(tmp_path / "d.safetensors", "sd1", factor=16, rank=4, layout="diffusers", components=["unet"],
                         dtype=torch.float32)
    config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"to_k": 2}, "rank_pattern": {}, "use_rslora": False,
              "target_modules": ["to_q", "to_k"]}
    flat = {f"unet.{field}": value for field, value in config.items()}
    save_file(load_file(path), tmp_path / "m.safetensors", {"lora_adapter_metadata": json.dumps(flat), "format": "pt"})
    code, out, err = run_lytools(capsys, "info", "--json", tmp_path / "m.safetensors")
    assert code == 0, err
    report = json.loads(out)[0]
    network = report["network"]
    assert network["modules_without_alpha"] == 0
    assert (network["scale"]["min"], network["scale"]["max"]) == (0.5, 2.0)
    assert any("r=4, lora_alpha=8" in note for note in report["notes"])
    # the same figures as the kohya file convert writes from it (alpha tensors)
    code, _, err = run_lytools(capsys, "convert", tmp_path / "m.safetensors", "-o", tmp_path / "k.safetensors", "--to", "kohya")
    assert code == 0, err
    code, out, err = run_lytools(capsys, "info", "--json", tmp_path / "k.safetensors")
    assert json.loads(out)[0]["network"]["scale"] == network["scale"]
    assert json.loads(out)[0]["network"]["alpha"] == network["alpha"]


def test_diffusers_kohya_export_of_a_transformers_5_clip_merges_and_converts(tmp_path, capsys):
    """diffusers' convert_state_dict_to_kohya names a transformers 5 CLIPTextModel's modules
    `lora_te1_encoder_layers_N_…` (no `text_model_`): merge refused all of them as matching no tensor. They are
    read as the kohya modules they are, and convert --to kohya writes the names A1111 and ComfyUI look up."""
    net = build_network(tmp_path / "n.safetensors", "sdxl", factor=16, rank=4, alpha=2.0, components=["te1"],
                        dtype=torch.float32)
    tensors = {key.replace("lora_te1_text_model_", "lora_te1_", 1): t for key, t in load_file(net).items()}
    save_file(tensors, tmp_path / "flat.safetensors")
    code, out, err = run_lytools(capsys, "info", "--json", tmp_path / "flat.safetensors")
    assert code == 0, err
    report = json.loads(out)[0]
    assert report["network"]["components"] == {"te1": 72} and not [n for n in report["notes"] if "not in the" in n]
    base = build_checkpoint(tmp_path / "b.safetensors", "sdxl", factor=16, components=["unet", "clip_l", "clip_g"],
                            dtype=torch.float32)
    code, _, err = run_lytools(capsys, "merge", base, tmp_path / "flat.safetensors", "-o", tmp_path / "m.safetensors")
    assert code == 0, err
    before, after = load_file(base), load_file(tmp_path / "m.safetensors")
    key = "conditioner.embedders.0.transformer.text_model.encoder.layers.3.mlp.fc2.weight"
    up, down = tensors["lora_te1_encoder_layers_3_mlp_fc2.lora_up.weight"], tensors["lora_te1_encoder_layers_3_mlp_fc2.lora_down.weight"]
    torch.testing.assert_close(after[key] - before[key], 0.5 * up @ down, rtol=1e-5, atol=1e-6)
    assert sum(not torch.equal(before[k], after[k]) for k in before) == 72
    code, _, err = run_lytools(capsys, "convert", tmp_path / "flat.safetensors", "-o", tmp_path / "k.safetensors", "--to", "kohya",
                               "--arch", "sdxl")  # CLIP-L alone also fits sd3 and flux
    assert code == 0, err
    assert {k.split(".", 1)[0] for k in load_file(tmp_path / "k.safetensors")} == {k.split(".", 1)[0] for k in load_file(net)}


def test_text_encoder_state_dict_saved_without_a_component_prefix_converts(tmp_path, capsys):
    """`get_peft_model_state_dict(text_encoder)` saved as it is: bare `text_model.encoder.layers.N…` (SDXL's
    CLIPTextModelWithProjection) matched no architecture and had no kohya name even with --arch."""
    net = build_network(tmp_path / "n.safetensors", "sdxl", factor=16, rank=4, layout="diffusers", components=["te2"],
                        dtype=torch.float32)
    tensors = load_file(net)
    bare = {key.removeprefix("text_encoder_2."): t for key, t in tensors.items()}
    assert all(key.startswith("text_model.encoder.layers.") for key in bare)
    save_file(bare, tmp_path / "bare.safetensors")
    code, out, err = run_lytools(capsys, "info", "--json", tmp_path / "bare.safetensors")
    assert code == 0, err
    assert "sdxl" in json.loads(out)[0]["architecture_candidates"]
    code, _, err = run_lytools(capsys, "convert", tmp_path / "bare.safetensors", "-o", tmp_path / "k.safetensors",
                               "--to", "kohya", "--arch", "sdxl")
    assert code == 0, err
    written = load_file(tmp_path / "k.safetensors")
    for key, down in bare.items():
        if key.endswith(".lora_A.weight"):
            module = "lora_te2_" + key[: -len(".lora_A.weight")].replace(".", "_")
            up = bare[key.replace("lora_A", "lora_B")]
            new_down = written[f"{module}.lora_down.weight"]
            scale = float(written[f"{module}.alpha"]) / new_down.shape[0]
            torch.testing.assert_close(scale * written[f"{module}.lora_up.weight"] @ new_down, up @ down, rtol=1e-5, atol=1e-6)
