"""lytools.testing: synthetic checkpoints and networks from the manifests."""

from __future__ import annotations

import hashlib
import time

import pytest
import torch
from safetensors.torch import load_file

from lytools import testing
from lytools.arch import checkpoint_manifest, detect_checkpoint, lora_names, module_table
from lytools.io import open_file, read_header


def test_shrink_rule():
    assert testing.shrink_shape((320, 4, 3, 3), 8) == (40, 4, 3, 3)
    assert testing.shrink_shape((1, 77), 8) == (1, 77)
    assert testing.shrink_shape((), 8) == ()
    assert testing.shrink_shape((49408, 768), 8) == (6176, 96)
    assert testing.shrink_shape((21504, 3072), 1) == (21504, 3072)


def test_sd1_shrunk_is_fast_complete_and_deterministic(tmp_path):
    start = time.perf_counter()
    path = testing.build_checkpoint(tmp_path / "a.safetensors", "sd1")
    elapsed = time.perf_counter() - start
    assert elapsed < 6.0  # ~0.4 s on an idle core
    manifest = checkpoint_manifest("sd1")["tensors"]
    loaded = load_file(path)
    assert set(loaded) == set(manifest)
    for key, (shape, dtype) in manifest.items():
        assert tuple(loaded[key].shape) == testing.shrink_shape(shape, 8), key
        assert str(loaded[key].dtype) == f"torch.{dtype}"
    ids = loaded["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert ids.shape == (1, 77) and ids[0, 76] == 76
    again = testing.build_checkpoint(tmp_path / "b.safetensors", "sd1")
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(path) == digest(again)
    other = testing.build_checkpoint(tmp_path / "c.safetensors", "sd1", seed=1, components=["unet"])
    assert not torch.equal(load_file(other)["model.diffusion_model.out.2.weight"], loaded["model.diffusion_model.out.2.weight"])


def test_components_dtype_prefix_and_release(tmp_path):
    path = testing.build_checkpoint(tmp_path / "u.safetensors", "sd1", components=["unet"], dtype=torch.bfloat16, factor=16)
    header = read_header(path)
    assert all(k.startswith("model.diffusion_model.") for k in header.tensors)
    assert {t.dtype for t in header.tensors.values()} == {"BF16"}
    flux = testing.build_checkpoint(tmp_path / "f.safetensors", "flux", release=True, factor=32, keep_blocks=2)
    found = detect_checkpoint(read_header(flux).tensors)
    assert (found.arch, found.prefix, found.scale, found.blocks) == ("flux", "", 32, {"double_blocks": 2, "single_blocks": 2})
    schnell = testing.build_checkpoint(tmp_path / "s.safetensors", "flux", prefix="diffusion_model.", variant="schnell",
                                       components=["unet"], factor=32, keep_blocks=1)
    found = detect_checkpoint(read_header(schnell).tensors)
    assert (found.variant, found.prefix) == ("schnell", "diffusion_model.")
    inpaint = testing.build_checkpoint(tmp_path / "i.safetensors", "sd2", components=["unet"], in_channels=9, factor=16)
    assert detect_checkpoint(read_header(inpaint).tensors).variant == "inpaint"


def test_fused_rows_scale_with_the_model(tmp_path):
    native = testing.build_checkpoint(tmp_path / "n.safetensors", "flux", components=["unet"], factor=32, keep_blocks=1)
    split = testing.build_checkpoint(tmp_path / "d.safetensors", "flux", layout="diffusers", factor=32, keep_blocks=1)
    with open_file(native) as a, open_file(split) as b:
        linear1 = a.get("model.diffusion_model.single_blocks.0.linear1.weight")
        assert linear1.shape == (672, 96)
        assert torch.equal(b.get("single_transformer_blocks.0.attn.to_k.weight"), linear1[96:192])
        assert torch.equal(b.get("single_transformer_blocks.0.proj_mlp.weight"), linear1[288:672])


def test_sparse_full_size_header_only(tmp_path):
    start = time.perf_counter()
    path = testing.build_sparse_checkpoint(tmp_path / "sdxl.safetensors", "sdxl", release=True)
    assert time.perf_counter() - start < 2.0
    header = read_header(path)
    release = checkpoint_manifest("sdxl")["release"]
    assert len(header.tensors) == release["tensors"]
    assert header.data_bytes == release["data_bytes"]
    assert path.stat().st_blocks * 512 < 10_000_000  # sparse: the data was never written


@pytest.mark.parametrize("arch,modules,count", [("sd1", "lierla", 264), ("sd1", "c3lier", 350), ("sd2", "lierla", 330), ("sdxl", "c3lier", 1052)])
def test_kohya_network_module_sets(tmp_path, arch, modules, count):
    path = testing.build_network(tmp_path / "n.safetensors", arch, modules=modules, rank=4, conv_rank=2, factor=16)
    tensors = load_file(path)
    names = {k.rsplit(".", 2)[0] for k in tensors if k.endswith("lora_down.weight")}
    assert len(names) == count
    table = module_table(arch)
    for name in names:
        target = table[name]
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        shape = testing.shrink_shape(target.shape, 16)
        rank = 2 if target.kind == "conv3x3" else 4
        assert down.shape[0] == rank and up.shape[0] == shape[0] and down.shape[1] == shape[1]
        assert float(tensors[f"{name}.alpha"]) == rank


def test_flux_optional_sets_and_layouts(tmp_path):
    counts = lora_names("flux")["counts"]
    default = testing.select_modules("flux")
    assert len(default) == counts["te1"] + counts["unet"]
    assert len(testing.select_modules("flux", optional=["train_t5xxl", "in_dims"])) == 552
    path = testing.build_network(tmp_path / "d.safetensors", "flux", layout="diffusers", components=["unet"], factor=32)
    keys = set(load_file(path))
    assert "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight" in keys
    assert not any(".alpha" in k for k in keys)
    peft = testing.build_network(tmp_path / "p.safetensors", "sd1", layout="peft", factor=16)
    assert any(k.startswith("base_model.model.down_blocks.0.attentions.0.proj_in.lora_A") for k in load_file(peft))
    lyco = testing.build_network(tmp_path / "l.safetensors", "sdxl", layout="lycoris", factor=16)
    assert "lycoris_down_blocks_1_attentions_0_proj_in.lora_down.weight" in load_file(lyco)
    comfy = testing.build_network(tmp_path / "c.safetensors", "sd1", layout="comfy", factor=16)
    keys = set(load_file(comfy))
    assert "diffusion_model.input_blocks.1.1.proj_in.lora_up.weight" in keys
    assert "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1.alpha" in keys


def test_tuned_is_base_plus_the_lora(tmp_path):
    base = testing.build_checkpoint(tmp_path / "base.safetensors", "sd2", components=["unet", "clip_h"], factor=16, dtype=torch.float32)
    net = testing.build_network(tmp_path / "net.safetensors", "sd2", rank=2, alpha=1.0, factor=16, dtype=torch.float32,
                                modules=["lora_te_text_model_encoder_layers_1_self_attn_k_proj", "lora_unet_mid_block_attentions_0_proj_in"])
    tuned = testing.build_tuned(base, tmp_path / "tuned.safetensors", net, ratio=0.5)
    assert tuned.changed == ("cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
                             "model.diffusion_model.middle_block.1.proj_in.weight")
    a, b, n = load_file(base), load_file(tuned.path), load_file(net)
    name = "lora_te_text_model_encoder_layers_1_self_attn_k_proj"
    expected = 0.5 * 0.5 * n[f"{name}.lora_up.weight"] @ n[f"{name}.lora_down.weight"]
    key = tuned.changed[0]
    torch.testing.assert_close(b[key][64:128] - a[key][64:128], expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(b[key][:64], a[key][:64]) and torch.equal(b[key][128:], a[key][128:])
    untouched = "model.diffusion_model.out.2.weight"
    assert torch.equal(a[untouched], b[untouched])
