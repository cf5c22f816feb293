"""Checkpoints written by other tools as inputs of info, extract, merge and convert --save-dtype
(ComfyUI saves and diffusion-model-only files, scaled fp8, A1111 schedules, foreign formats)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from lytools.testing import build_checkpoint, build_network, build_tuned
from tests.shared import run_lytools

FOREIGN = [
    (b"GGUF" + struct.pack("<I", 3) + bytes(64), "GGUF"),
    (b"\x89HDF\r\n\x1a\n" + bytes(64), "HDF5"),
    (b"\x93NUMPY\x01\x00" + bytes(64), "NumPy"),
]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ck") / "sd1.safetensors", "sd1", factor=16)


def _info(capsys, path) -> dict:
    code, out, err = run_lytools(capsys, "info", "--json", path)
    assert code == 0, err
    return json.loads(out)[0]


@pytest.mark.parametrize("suffix", [".gguf", ".safetensors", ".pt"])
@pytest.mark.parametrize("blob,name", FOREIGN)
@pytest.mark.parametrize("command", ["info", "merge", "extract-base", "extract-tuned", "convert"])
def test_foreign_formats_named_in_one_line(tmp_path, capsys, sd1, blob, name, suffix, command):
    bad = tmp_path / f"model{suffix}"
    bad.write_bytes(blob)
    out = tmp_path / "out.safetensors"
    args = {
        "info": ["info", bad],
        "merge": ["merge", "-o", out, bad, bad],
        "extract-base": ["extract", bad, sd1, out],
        "extract-tuned": ["extract", sd1, bad, out],
        "convert": ["convert", "--save-dtype", "fp16", bad, "-o", out],
    }[command]
    code, _, err = run_lytools(capsys, *args)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and str(bad) in lines[0], err
    assert "header length" not in err and "internal error" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [bad.name]


@pytest.mark.parametrize("prefix,expected", [("", ""), ("diffusion_model.", "diffusion_model."),
                                             ("model.diffusion_model.", "model.diffusion_model.")])
def test_flux_diffusion_model_only_files(tmp_path, capsys, prefix, expected):
    path = build_checkpoint(tmp_path / "f.safetensors", "flux", factor=16, keep_blocks=2, prefix=prefix,
                            components=["unet"])
    info = _info(capsys, path)
    assert (info["kind"], info["architecture"], info["layout"]) == ("checkpoint", "flux", "bfl")
    assert info["checkpoint"]["prefix"] == expected and info["checkpoint"]["variant"] == "dev"


def test_comfyui_sd3_save_names_every_component(tmp_path, capsys):
    path = build_checkpoint(tmp_path / "sd3.safetensors", "sd3", factor=16, keep_blocks=2)
    keys = load_file(path).keys()
    assert any(k.startswith("text_encoders.t5xxl.") for k in keys)
    info = _info(capsys, path)
    assert (info["architecture"], info["layout"]) == ("sd3", "mmdit")
    assert {"unet", "clip_l", "clip_g", "t5xxl", "vae"} <= set(info["checkpoint"]["components"])
    bare = build_checkpoint(tmp_path / "sd3_dit.safetensors", "sd3", factor=16, keep_blocks=2, components=["unet"])
    assert set(_info(capsys, bare)["checkpoint"]["components"]) == {"unet"}


def _scaled_fp8(src, out):
    tensors, scaled = {}, []
    for key, value in load_file(src).items():
        if key.endswith(".weight") and value.dim() == 2 and "blocks" in key:
            scale = value.float().abs().max() / 448
            tensors[key] = (value.float() / scale).to(torch.float8_e4m3fn)
            tensors[key[:-7] + ".scale_weight"] = scale.reshape(1)
            tensors[key[:-7] + ".scale_input"] = torch.ones(1)
            scaled.append(key)
        else:
            tensors[key] = value
    tensors["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(tensors, out)
    return scaled


def test_scaled_fp8_flux_info_and_cast_refused(tmp_path, capsys):
    bare = build_checkpoint(tmp_path / "f.safetensors", "flux", factor=16, keep_blocks=1, prefix="", components=["unet"])
    fp8 = tmp_path / "f8.safetensors"
    scaled = _scaled_fp8(bare, fp8)
    info = _info(capsys, fp8)
    assert (info["architecture"], info["layout"]) == ("flux", "bfl")
    assert any("scaled fp8" in note for note in info["notes"])
    out = tmp_path / "cast.safetensors"  # a plain cast would change the true weights: refused, one line
    code, _, err = run_lytools(capsys, "convert", "--save-dtype", "fp16", fp8, "-o", out)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "scaled fp8" in err
    assert not out.exists()
    assert len(scaled) > 0


def test_a1111_save_cast_keeps_ints_and_schedule(tmp_path, capsys, sd1):
    tensors = load_file(sd1)
    tensors["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    tensors["model_ema.decay"] = torch.tensor(0.9999)
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).reshape(1, 77)
    src = tmp_path / "a1111.safetensors"
    save_file(tensors, src)
    assert _info(capsys, src)["architecture"] == "sd1"
    out = tmp_path / "half.safetensors"
    code, _, err = run_lytools(capsys, "convert", "--save-dtype", "fp16", src, "-o", out)
    assert code == 0, err
    cast = load_file(out)
    assert cast.keys() == tensors.keys()
    assert cast["model_ema.num_updates"].dtype == torch.int32
    assert cast["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64
    assert torch.equal(cast["cond_stage_model.transformer.text_model.embeddings.position_ids"], torch.arange(77).reshape(1, 77))
    assert cast["alphas_cumprod"].dtype == torch.float16


def test_merge_into_comfyui_save_changes_only_expected(tmp_path, capsys, sd1):
    net = build_network(tmp_path / "n.safetensors", "sd1", factor=16, rank=4)
    ref = build_tuned(sd1, tmp_path / "ref.safetensors", net, ratio=0.5)
    out = tmp_path / "merged.safetensors"
    code, _, err = run_lytools(capsys, "merge", "-o", out, sd1, net, "--ratios", "0.5")
    assert code == 0, err
    base, merged, reference = load_file(sd1), load_file(out), load_file(ref.path)
    assert merged.keys() == base.keys()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed == set(ref.changed)
    for key in base:
        assert merged[key].dtype == base[key].dtype
        torch.testing.assert_close(merged[key].float(), reference[key].float(), atol=2e-3, rtol=1e-2)
