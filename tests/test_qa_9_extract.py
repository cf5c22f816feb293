"""`lytools extract` as a user runs it: what the output can be loaded by, changes it cannot hold in an
unknown architecture, legacy pickles, and broken (NaN/inf) inputs named as such."""

from __future__ import annotations

import json

import pytest
import torch

from lytools.io import write_safetensors
from lytools.testing import build_checkpoint, build_network, build_tuned, select_modules
from tests.shared import read_tensors, run_lytools


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory):
    """A shrunk SD1 pair (UNet + CLIP) whose fine-tune changes a few attention and conv modules at rank 4."""
    folder = tmp_path_factory.mktemp("qa9-extract")
    base = build_checkpoint(folder / "base.safetensors", "sd1", factor=8, components=("unet", "clip_l"))
    modules = [m for m in select_modules("sd1", "c3lier") if "down_blocks_0" in m or m.endswith("layers_0_mlp_fc1")]
    network = build_network(folder / "net.safetensors", "sd1", factor=8, rank=4, modules=modules)
    tuned = build_tuned(base, folder / "tuned.safetensors", network, noise=1e-4)
    return base, tuned.path


# -- modules stored whole: said, since diffusers and kohya's scripts cannot load `diff` ---------------------
def test_modules_stored_whole_warn_which_loaders_cannot_read_them(sd1_pair, tmp_path, capsys):
    base, tuned = sd1_pair
    out = tmp_path / "whole.safetensors"
    # rank 24 reaches half the outputs of the 40-wide attention layers of this shrunk UNet: stored whole
    code, _, err = run_lytools(capsys, "extract", base, tuned, out, "--linear-dim", "24", "--conv-dim", "4", "-q")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "stored whole" in warnings[0] and "diffusers" in warnings[0], err
    assert "--no-full-fallback" in warnings[0]
    low = tmp_path / "low.safetensors"
    code, _, err = run_lytools(capsys, "extract", base, tuned, low, "--linear-dim", "24", "--conv-dim", "4", "-q",
                               "--no-full-fallback")
    assert code == 0 and "stored whole" not in err, err
    # what the warning says is so: diffusers refuses the `diff` modules and reads the low-rank file
    diffusers = pytest.importorskip("diffusers")
    loader = diffusers.loaders.StableDiffusionLoraLoaderMixin
    assert any(key.endswith(".diff") for key in read_tensors(out))
    with pytest.raises(ValueError):
        loader.lora_state_dict(str(out))
    state_dict, _ = loader.lora_state_dict(str(low))
    assert state_dict


def test_mode_full_says_which_loaders_read_it_without_a_warning(sd1_pair, tmp_path, capsys):
    base, tuned = sd1_pair
    code, _, err = run_lytools(capsys, "extract", base, tuned, tmp_path / "full.safetensors", "--mode", "full")
    assert code == 0, err
    assert "warning:" not in err and "stored whole (LyCORIS `diff`)" in err and "diffusers" in err, err


# -- an unknown architecture: changed tensors a LoRA cannot hold are counted as for known ones ---------------
def test_generic_pair_counts_changed_biases_norms_and_other_tensors(tmp_path, capsys):
    generator = torch.Generator().manual_seed(0)
    base = {
        "encoder.fc.weight": torch.randn(64, 32, generator=generator), "encoder.fc.bias": torch.randn(64, generator=generator),
        "head.conv.weight": torch.randn(32, 16, 3, 3, generator=generator), "norm.weight": torch.ones(64),
        "seq.conv1d.weight": torch.randn(16, 8, 3, generator=generator), "untouched.weight": torch.randn(8, 8, generator=generator),
    }
    tuned = {key: value.clone() for key, value in base.items()}
    tuned["encoder.fc.weight"] += 0.1 * torch.randn(64, 2, generator=generator) @ torch.randn(2, 32, generator=generator)
    tuned["head.conv.weight"] += 0.1 * torch.randn(32, 16, 3, 3, generator=generator)
    for key in ("encoder.fc.bias", "norm.weight", "seq.conv1d.weight"):
        tuned[key] += 0.05
    write_safetensors(tmp_path / "a.safetensors", base)
    write_safetensors(tmp_path / "b.safetensors", tuned)
    code, out, err = run_lytools(capsys, "extract", tmp_path / "a.safetensors", tmp_path / "b.safetensors",
                                 tmp_path / "o.safetensors", "--linear-dim", "2", "--conv-dim", "2", "--json")
    assert code == 0, err
    summary = json.loads(out)["summary"]
    assert summary["extracted"] == 2
    assert summary["uncovered_changes"] == 3
    assert sorted(summary["uncovered_examples"]) == ["encoder.fc.bias", "norm.weight", "seq.conv1d.weight"]
    assert "3 other tensors differ that a LoRA does not hold" in err


# -- a legacy (non-zip) pickle is read whole into memory: said, as merge says it ----------------------------
def test_legacy_pickle_input_is_said_to_be_read_whole(sd1_pair, tmp_path, capsys):
    base, tuned = sd1_pair
    legacy = tmp_path / "tuned.ckpt"
    torch.save({"state_dict": read_tensors(tuned)}, legacy, _use_new_zipfile_serialization=False)
    code, _, err = run_lytools(capsys, "extract", base, legacy, tmp_path / "o.safetensors", "--linear-dim", "4",
                               "--conv-dim", "4", "-q")
    assert code == 0, err
    assert "warning: tuned.ckpt: a legacy (torch < 1.6, non-zip) pickle" in err and "into memory" in err, err


# -- NaN/inf weights: the modules left out are named with the file that holds them --------------------------
def test_nan_and_inf_weights_name_the_broken_file(sd1_pair, tmp_path, capsys):
    base, tuned = sd1_pair
    q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    broken_tuned = read_tensors(tuned)
    broken_tuned[q][0, 0] = float("nan")
    broken_base = read_tensors(base)
    broken_base[k][1, 1] = float("inf")
    write_safetensors(tmp_path / "nan-tuned.safetensors", broken_tuned)
    write_safetensors(tmp_path / "inf-base.safetensors", broken_base)
    report = tmp_path / "r.json"
    code, _, err = run_lytools(capsys, "extract", tmp_path / "inf-base.safetensors", tmp_path / "nan-tuned.safetensors",
                               tmp_path / "o.safetensors", "--linear-dim", "4", "--conv-dim", "4", "-q", "--report", report)
    assert code == 0, err
    assert "2 module(s) were left out for NaN or infinite values" in err, err
    assert "inf-base.safetensors and nan-tuned.safetensors" in err and "could not be decomposed" not in err, err
    rows = {row["name"]: row for row in json.loads(report.read_text())["modules"]}
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_"
    assert rows[prefix + "to_q"]["reason"] == "NaN or infinite values in the weights of TUNED"
    assert rows[prefix + "to_k"]["reason"] == "NaN or infinite values in the weights of BASE"
    assert rows[prefix + "to_q"]["stored"] == rows[prefix + "to_k"]["stored"] == "skipped"


# -- another 16-bit or fp8 format: a fine-tune saved so is not changed everywhere ----------------------------
@pytest.mark.parametrize("saved, name", [(torch.bfloat16, "BF16"), (torch.float8_e4m3fn, "F8_E4M3")])
def test_fine_tune_saved_in_another_format_skips_modules_that_are_only_rounded(tmp_path, capsys, saved, name):
    base = build_checkpoint(tmp_path / "base.safetensors", "sd1", factor=8, components=("unet", "clip_l"),
                            dtype=torch.float16)
    modules = [m for m in select_modules("sd1", "lierla") if m.startswith("lora_te_")][:6]
    network = build_network(tmp_path / "net.safetensors", "sd1", factor=8, rank=4, modules=modules)
    tuned = build_tuned(base, tmp_path / "tuned16.safetensors", network)
    # the trainer read the fp16 base, changed six text-encoder modules and saved in bf16 (or its weights in fp8)
    def stored(value):
        wanted = value.is_floating_point() and (saved == torch.bfloat16 or value.dim() >= 2)
        return value.to(saved) if wanted else value
    write_safetensors(tmp_path / "tuned-other.safetensors", {key: stored(value) for key, value in read_tensors(tuned.path).items()})
    report = tmp_path / "r.json"
    code, out, err = run_lytools(capsys, "extract", base, tmp_path / "tuned-other.safetensors", tmp_path / "o.safetensors",
                                 "--linear-dim", "4", "--conv-dim", "4", "--json", "--report", report)
    assert code == 0, err
    result = json.loads(out)
    assert {m["name"] for m in result["modules"] if m["stored"] != "skipped"} == set(modules)
    rows = json.loads(report.read_text())["modules"]
    rounded = [m for m in rows if (m["reason"] or "").startswith(f"differs only by rounding to {name}")]
    assert len(rounded) == len(rows) - len(modules) > 300
    assert result["summary"]["uncovered_changes"] == 0, result["summary"]["uncovered_examples"]
