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


def _archives() -> list[tuple[bytes, str]]:
    """Archives whose first bytes read as a header length that fits the file or stays under the
    100 MB limit (a gzip of mtime 0, as `tar czf` writes it; a tar's member name; a zip that
    holds no torch.save data.pkl), which were reported as truncated safetensors or as a pickle."""
    import gzip
    import io
    import tarfile
    import zipfile

    def tar_bytes() -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            info = tarfile.TarInfo("lora.safetensors")
            info.size = 4
            archive.addfile(info, io.BytesIO(b"data"))
        return buffer.getvalue()

    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("lora.safetensors", b"data")
    big = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (700_000,), generator=big, dtype=torch.uint8).numpy().tobytes()
    return [
        (gzip.compress(tar_bytes(), mtime=0), "gzip"),
        (gzip.compress(noise, mtime=0), "gzip"),  # length 559903 fits: the JSON is what fails
        (tar_bytes(), "tar archive"),
        (zipped.getvalue(), "zip archive"),
    ]


FOREIGN += _archives()


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


# diffusers folders holding only a `variant` (what `--include "*.fp16.safetensors"` downloads leave)

PIPELINE_INDEX = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                  "safety_checker": [None, None], "feature_extractor": [None, None],
                  "tokenizer": ["transformers", "CLIPTokenizer"]}


@pytest.fixture(scope="module")
def diffusers_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("variant")
    unet = build_checkpoint(root / "u.safetensors", "sd1", factor=16, layout="diffusers", dtype=torch.float16)
    net = build_network(root / "n.safetensors", "sd1", factor=16, rank=4, components=["unet"])
    tuned = build_tuned(unet, root / "t.safetensors", net)
    return root, unet, net, tuned


def _pipeline(folder, files: dict, index=None):
    (folder / "unet").mkdir(parents=True)
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    (folder / "model_index.json").write_text(json.dumps(index or PIPELINE_INDEX))
    (folder / "unet" / "config.json").write_text("{}")
    for name, tensors in files.items():
        save_file(tensors, folder / "unet" / name)
    return folder


def test_variant_only_folder_reads_pairs_and_merges(tmp_path, capsys, diffusers_pair):
    root, unet, net, tuned = diffusers_pair
    base = _pipeline(tmp_path / "base", {"diffusion_pytorch_model.fp16.safetensors": load_file(unet)})
    other = _pipeline(tmp_path / "tuned", {"diffusion_pytorch_model.safetensors": load_file(tuned.path)})
    info = _info(capsys, base)
    assert (info["architecture"], info["layout"]) == ("sd1", "diffusers")
    extracted = tmp_path / "x.safetensors"
    code, _, err = run_lytools(capsys, "extract", base, other, extracted)
    assert code == 0, err
    modules = {key.split(".", 1)[0] for key in load_file(extracted)}
    assert len(modules) == len(tuned.changed)  # every changed layer paired and extracted, nothing else
    merged = tmp_path / "merged"
    code, _, err = run_lytools(capsys, "merge", "-o", merged, base, net)
    assert code == 0, err
    assert sorted(p.name for p in (merged / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    out, reference, stored = (load_file(merged / "unet" / "diffusion_pytorch_model.safetensors"),
                              load_file(tuned.path), load_file(unet))
    assert out.keys() == stored.keys()
    assert {k for k in out if not torch.equal(out[k], stored[k])} == set(tuned.changed)
    for key in out:
        assert out[key].dtype == torch.float16
        torch.testing.assert_close(out[key].float(), reference[key].float(), atol=2e-3, rtol=1e-2)


def test_sharded_variant_index_is_read_whole(tmp_path, capsys, diffusers_pair):
    _, unet, _, _ = diffusers_pair
    tensors = load_file(unet)
    names = sorted(tensors)
    halves = {"diffusion_pytorch_model.fp16-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model.fp16-00002-of-00002.safetensors": names[len(names) // 2:]}
    folder = _pipeline(tmp_path / "p", {shard: {k: tensors[k] for k in keys} for shard, keys in halves.items()})
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    info = _info(capsys, folder)
    assert (info["architecture"], info["tensor_count"]) == ("sd1", len(names))
    shard = folder / "unet" / next(iter(halves))
    code, _, err = run_lytools(capsys, "extract", shard, folder, tmp_path / "x.safetensors")
    assert code == 1 and "shards" in err and not (tmp_path / "x.safetensors").exists()


def test_two_variants_or_null_components(tmp_path, capsys, diffusers_pair):
    _, unet, _, _ = diffusers_pair
    tensors = load_file(unet)
    both = _pipeline(tmp_path / "both", {"diffusion_pytorch_model.fp16.safetensors": tensors,
                                         "diffusion_pytorch_model.bf16.safetensors": tensors})
    code, _, err = run_lytools(capsys, "info", both)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "bf16, fp16" in err
    # a component set to null is not loaded by the pipeline: a leftover folder of it is not read either
    index = dict(PIPELINE_INDEX, text_encoder=[None, None])
    nulled = _pipeline(tmp_path / "nulled", {"diffusion_pytorch_model.safetensors": tensors}, index=index)
    (nulled / "text_encoder").mkdir()
    (nulled / "text_encoder" / "config.json").write_text("{}")
    save_file({"text_model.final_layer_norm.weight": torch.ones(48)}, nulled / "text_encoder" / "model.safetensors")
    info = _info(capsys, nulled)
    assert info["tensor_count"] == len(tensors) and set(info["checkpoint"]["components"]) == {"unet"}


def test_safetensors_under_a_pickle_name_is_read_as_safetensors(tmp_path, capsys, sd1):
    renamed = tmp_path / "model.ckpt"
    renamed.write_bytes(sd1.read_bytes())
    info = _info(capsys, renamed)
    assert (info["format"], info["architecture"]) == ("safetensors", "sd1")
    out = tmp_path / "half.safetensors"
    code, _, err = run_lytools(capsys, "convert", "--save-dtype", "fp16", renamed, "-o", out)
    assert code == 0, err
    assert load_file(out).keys() == load_file(sd1).keys()
