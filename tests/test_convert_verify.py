"""convert --verify (reload each output as its target loader reads it, compare every module's weight
change with the input's) and convert --check (every output module name resolves in its target
loader's table): exact successes on sd1/sdxl/flux synthetic networks, and real failures caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lytools.convert.fast as fast
import lytools.convert.write as write
from lytools.convert.check import check_names
from lytools.convert.verify import EXACT, verify_network
from lytools.io import open_file, write_safetensors
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors, run_lytools


@pytest.fixture(scope="module")
def nets(tmp_path_factory) -> dict[str, Path]:
    """Synthetic networks, built once: alpha 3 of rank 4 (a scale that rounds when folded) unless named."""
    folder = tmp_path_factory.mktemp("nets")
    built = {
        "sd1": build_network(folder / "sd1.safetensors", "sd1", alpha=3.0),
        "sd1_half": build_network(folder / "sd1_half.safetensors", "sd1", alpha=2.0, seed=1),
        "sdxl": build_network(folder / "sdxl.safetensors", "sdxl", alpha=3.0, seed=2),
        "flux": build_network(folder / "flux.safetensors", "flux", alpha=3.0, seed=3),
        "flux_final": build_network(folder / "flux_final.safetensors", "flux", alpha=2.0, seed=8, optional=("final_layer",)),
        "flux_t5": build_network(folder / "flux_t5.safetensors", "flux", alpha=3.0, seed=4, optional=("train_t5xxl",)),
        "flux_split": build_network(folder / "flux_split.safetensors", "flux", layout="diffusers", components=("unet",), seed=5),
        "sd1_dora": build_network(folder / "sd1_dora.safetensors", "sd1", alpha=3.0, dora=True, seed=6),
        "sd1_loha": build_network(folder / "sd1_loha.safetensors", "sd1", algo="loha", alpha=3.0, seed=7),
    }
    return built


def _ok(capsys, *args) -> tuple[str, str]:
    code, out, err = run_lytools(capsys, "convert", *args)
    assert code == 0, err
    return out, err


def _fails(capsys, *args) -> str:
    code, out, err = run_lytools(capsys, "convert", *args)
    assert code == 1, (out, err)
    assert out == ""
    lines = [line for line in err.splitlines() if line.startswith("lytools: error:")]
    assert len(lines) == 1, err
    return lines[0]


# -- successes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["sd1", "sdxl", "flux", "sd1_loha", "sd1_dora"])
def test_kohya_output_verifies_exactly(capsys, nets, tmp_path, name):
    out = tmp_path / "out.safetensors"
    _, err = _ok(capsys, nets[name], "-o", out, "--to", "kohya", "--verify", "--check")
    assert "largest relative error 0 (exact)" in err
    assert "checked: all" in err
    assert out.is_file()


@pytest.mark.parametrize("name", ["sd1", "sdxl", "flux"])
def test_diffusers_no_fold_is_exact_and_fold_within_fp16(capsys, nets, tmp_path, name):
    _, err = _ok(capsys, nets[name], "-o", tmp_path / "exact.safetensors", "--to", "diffusers", "--no-fold", "--verify")
    assert "largest relative error 0 (exact)" in err
    # alpha 3 / rank 4 folded into fp16 factors rounds them: within fp16's rounding, not exact
    _, err = _ok(capsys, nets[name], "-o", tmp_path / "folded.safetensors", "--to", "diffusers", "--verify", "--check")
    error = float(err.split("largest relative error ")[1].split()[0])
    assert 0 < error < 3e-3


def test_power_of_two_fold_is_held_to_one_unit(nets, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    _ok(capsys, nets["sd1_half"], "-o", out, "--to", "diffusers")
    result = verify_network(nets["sd1_half"], out, "diffusers")
    assert result.ok
    assert max(allowed for _, allowed in result.errors.values()) <= torch.finfo(torch.float16).eps


def test_fused_and_split_qkv_compare_row_for_row(capsys, nets, tmp_path):
    # split diffusers parts -> fused kohya modules, and back: both exact (no fold in either direction)
    kohya = tmp_path / "fused.safetensors"
    _, err = _ok(capsys, nets["flux_split"], "-o", kohya, "--to", "kohya", "--verify", "--check")
    assert "(exact)" in err
    assert any("_img_attn_qkv." in key for key in read_tensors(kohya))
    _, err = _ok(capsys, kohya, "-o", tmp_path / "split.safetensors", "--to", "diffusers", "--no-fold", "--verify", "--check")
    assert "(exact)" in err


def test_peft_outputs_verify_and_check(capsys, nets, tmp_path):
    _, err = _ok(capsys, nets["flux"], "-o", tmp_path / "unet", "--to", "peft", "--component", "unet", "--verify", "--check")
    assert "verified:" in err and "checked: all" in err
    _, err = _ok(capsys, nets["sd1"], "-o", tmp_path / "te", "--to", "peft", "--component", "te", "--no-fold", "--verify",
                 "--check")
    assert "(exact)" in err
    # SDXL's two CLIP encoders share their bare paths: each adapter is compared with its own encoder's modules
    for component in ("te1", "te2"):
        _, err = _ok(capsys, nets["sdxl"], "-o", tmp_path / component, "--to", "peft", "--component", component,
                     "--no-fold", "--verify", "--check")
        assert "(exact)" in err
    # the peft DoRA magnitude ([out]) against the input's dora_scale ([out, 1])
    _, err = _ok(capsys, nets["sd1_dora"], "-o", tmp_path / "dora", "--to", "peft", "--component", "unet", "--no-fold",
                 "--verify")
    assert "(exact)" in err


def test_flatten_dora_modules_are_compared_with_the_flattening_done_again(capsys, nets, tmp_path):
    tensors = read_tensors(nets["sd1_dora"])
    plain = sorted(k for k in tensors if k.endswith(".dora_scale"))[:100]
    for key in plain:  # 100 modules without DoRA: written as they are, compared
        del tensors[key]
    mixed = tmp_path / "mixed.safetensors"
    write_safetensors(mixed, tensors, {})
    base = build_checkpoint(tmp_path / "base.safetensors", "sd1", components=("unet", "clip_l"))
    _, err = _ok(capsys, mixed, "-o", tmp_path / "out.safetensors", "--to", "diffusers", "--no-fold", "--flatten-dora",
                 "--base", base, "--verify")
    assert "verified: 264 modules as the target loader reads them, largest relative error " in err
    assert "; 164 of them flattened DoRA, compared with the flattening done again on --base" in err


def test_dtype_changes_within_the_dtype(capsys, nets, tmp_path):
    _, err = _ok(capsys, nets["flux"], "-o", tmp_path / "bf16.safetensors", "--to", "diffusers", "--no-fold",
                 "--save-dtype", "bf16", "--verify")
    error = float(err.split("largest relative error ")[1].split()[0])
    assert 0 < error < 2e-2
    _, err = _ok(capsys, nets["sdxl"], "-o", tmp_path / "fp8.safetensors", "--to", "kohya", "--save-dtype", "fp8_e4m3",
                 "--verify", "--check")
    assert "verified:" in err


def test_plain_casts_compare_tensor_by_tensor(capsys, nets, tmp_path):
    _, err = _ok(capsys, nets["sdxl"], "-o", tmp_path / "fp32.safetensors", "--save-dtype", "fp32", "--verify", "--check")
    assert "each the input's cast to the written dtype" in err
    assert "checked: all" in err  # kohya names, checked as the input stores them
    checkpoint = build_checkpoint(tmp_path / "ckpt.safetensors", "sd1", factor=16)
    _ok(capsys, checkpoint, "-o", tmp_path / "ckpt16.safetensors", "--save-dtype", "bf16", "--verify")


def test_batch_with_jobs_quiet_and_verbose(capsys, nets, tmp_path):
    inputs = [nets["sd1"], nets["sdxl"], nets["flux"]]
    out, err = _ok(capsys, *inputs, "--output-dir", tmp_path / "q", "--to", "diffusers", "-j", "2", "--verify", "--check", "-q")
    assert err == ""
    assert sorted(Path(line).name for line in out.splitlines()) == ["flux.safetensors", "sd1.safetensors", "sdxl.safetensors"]
    out, err = _ok(capsys, *inputs, "--output-dir", tmp_path / "v", "--to", "kohya", "--verify", "-v")
    assert err.count("(exact)") == 3 and "done in" in err


# -- failures caught ----------------------------------------------------------------------------------------
def _corrupting(real, module_hint: str):
    """Wrap convert_network so the written tensors have one factor changed in one module."""

    def convert_network(*args, **kwargs):
        converted = real(*args, **kwargs)
        key = next(k for k in sorted(converted.tensors) if module_hint in k and ("lora_up" in k or "lora_B" in k))
        tensor = converted.tensors[key].clone()
        tensor.view(-1)[0] += 0.5
        converted.tensors[key] = tensor
        return converted

    return convert_network


@pytest.mark.parametrize("target", ["kohya", "diffusers", "peft"])
def test_verify_catches_a_corrupted_factor(capsys, nets, tmp_path, monkeypatch, target):
    hint = "double_blocks_0_img_attn_qkv" if target == "kohya" else ".transformer_blocks.0.attn.to_k."
    monkeypatch.setattr(write, "convert_network", _corrupting(write.convert_network, hint))
    out = tmp_path / ("out" if target == "peft" else "out.safetensors")
    extra = ("--component", "unet") if target == "peft" else ()
    line = _fails(capsys, nets["flux"], "-o", out, "--to", target, "--save-dtype", "fp32", *extra, "--verify")
    assert "--verify failed: 1 of" in line and str(out) in line
    assert "worst lora_unet_double_blocks_0_img_attn_qkv" in line  # the input's module (the fused q/k/v)
    if target != "kohya":  # and the parts written for it
        assert "transformer_blocks.0.attn.to_k" in line
    assert not out.exists() and list(tmp_path.iterdir()) == []  # output (and the peft folder and config) removed


def test_verify_catches_a_corrupted_fast_path_output(capsys, nets, tmp_path, monkeypatch):
    real = fast.try_convert

    def try_convert(source, output, options):
        result = real(source, output, options)
        assert result is not None  # the torch-free path wrote it
        tensors = read_tensors(output)
        key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[5]
        tensors[key] = -tensors[key]
        write_safetensors(output, tensors, open_file(output).metadata, overwrite=True)
        return result

    monkeypatch.setattr(fast, "try_convert", try_convert)
    out = tmp_path / "out.safetensors"
    line = _fails(capsys, nets["sd1"], "-o", out, "--to", "diffusers", "--verify")
    assert "--verify failed: 1 of 264 modules off, worst" in line
    assert "relative error 2 > allowed" in line  # ΔW negated: ‖−ΔW − ΔW‖ / ‖ΔW‖
    assert not out.exists()


def test_verify_catches_a_wrong_scale_in_the_config(capsys, nets, tmp_path, monkeypatch):
    real = write.lora_config

    def lora_config(*args, **kwargs):
        config = real(*args, **kwargs)
        config["lora_alpha"] = config["lora_alpha"] * 2
        return config

    monkeypatch.setattr(write, "lora_config", lora_config)
    out = tmp_path / "unet"
    line = _fails(capsys, nets["sdxl"], "-o", out, "--to", "peft", "--component", "unet", "--no-fold", "--verify")
    assert "relative error 1 > allowed" in line
    assert not out.exists()


def test_verify_catches_unswapped_modulation_halves(capsys, nets, tmp_path, monkeypatch):
    # diffusers stores Flux's final adaLN modulation as [scale; shift]: a writer that forgets the swap is caught
    out = tmp_path / "out.safetensors"
    _, err = _ok(capsys, nets["flux_final"], "-o", out, "--to", "diffusers", "--save-dtype", "fp32", "--verify")
    assert "verified:" in err
    monkeypatch.setattr(write, "swap_halves", lambda name, tensors: dict(tensors))
    line = _fails(capsys, nets["flux_final"], "-o", out, "--to", "diffusers", "--save-dtype", "fp32", "--overwrite",
                  "--verify")
    assert "1 of 378 modules off, worst lora_unet_final_layer_adaLN_modulation_1 (written as transformer.norm_out.linear)" in line
    assert not out.exists()


def test_verify_catches_a_wrong_cast(capsys, nets, tmp_path, monkeypatch):
    import lytools.convert.run as run

    real = run.saturating_cast

    def saturating_cast(tensor, dtype):
        out, beyond = real(tensor, dtype)
        return (out * 2 if tensor.dim() == 2 else out), beyond

    monkeypatch.setattr(run, "saturating_cast", saturating_cast)
    out = tmp_path / "out.safetensors"
    line = _fails(capsys, nets["sd1"], "-o", out, "--save-dtype", "fp32", "--verify")
    assert "tensors off" in line and "differs from the input cast to the written dtype" in line
    assert not out.exists()


def test_overwritten_output_that_fails_is_removed(capsys, nets, tmp_path, monkeypatch):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    monkeypatch.setattr(write, "convert_network", _corrupting(write.convert_network, "lora_te_"))
    _fails(capsys, nets["sd1"], "-o", out, "--to", "kohya", "--overwrite", "--verify")
    assert not out.exists()


def _renaming(real, old: str, new: str):
    def convert_network(*args, **kwargs):
        converted = real(*args, **kwargs)
        converted.tensors = {key.replace(old, new): value for key, value in converted.tensors.items()}
        return converted

    return convert_network


def test_check_catches_a_name_outside_the_table(capsys, nets, tmp_path, monkeypatch):
    monkeypatch.setattr(write, "convert_network",
                        _renaming(write.convert_network, "lora_unet_down_blocks_0_attentions_0_proj_in",
                                  "lora_unet_down_blocks_0_attentions_0_proj_inn"))
    out = tmp_path / "out.safetensors"
    line = _fails(capsys, nets["sd1"], "-o", out, "--to", "kohya", "--check")
    assert "--check: 1 of 264 modules would not be applied by ComfyUI/A1111/Forge (sd1)" in line
    assert "(sd1): no such module: lora_unet_down_blocks_0_attentions_0_proj_inn" in line
    assert not out.exists()


def test_check_catches_a_wrong_diffusers_path_in_a_batch(capsys, nets, tmp_path, monkeypatch):
    monkeypatch.setattr(write, "convert_network", _renaming(write.convert_network, "attn1.to_k", "attn1.to_key"))
    out_dir = tmp_path / "out"
    code, out, err = run_lytools(capsys, "convert", nets["sd1"], nets["flux"], "--output-dir", out_dir, "--to", "diffusers",
                                 "--save-dtype", "fp32", "--check")
    assert code == 1
    assert [Path(line).name for line in out.splitlines()] == ["flux.safetensors"]  # the other file went on
    assert "would not be applied by diffusers (sd1)" in err and "and 13 more" in err
    assert sorted(p.name for p in out_dir.iterdir()) == ["flux.safetensors"]


def test_check_counts_t5_in_the_diffusers_layout_as_not_applied(capsys, nets, tmp_path):
    line = _fails(capsys, nets["flux_t5"], "-o", tmp_path / "out.safetensors", "--to", "diffusers", "--check")
    assert "would not be applied by diffusers (flux)" in line
    assert "(flux): the flux pipeline loads no LoRA into text_encoder_2 (T5): text_encoder_2.encoder.block.0" in line
    assert list(tmp_path.iterdir()) == []
    _ok(capsys, nets["flux_t5"], "-o", tmp_path / "kohya.safetensors", "--to", "kohya", "--check")  # lora_te3_: loaded


def test_check_full_preset_denoiser_names_and_text_encoder_norms(tmp_path):
    tensors = read_tensors(build_network(tmp_path / "in.safetensors", "sd1"))
    gen = torch.Generator().manual_seed(0)
    tensors["lora_unet_conv_in.lora_down.weight"] = torch.randn(4, 4, 3, 3, generator=gen).half()
    tensors["lora_unet_conv_in.lora_up.weight"] = torch.randn(40, 4, 1, 1, generator=gen).half()
    path = tmp_path / "full.safetensors"
    write_safetensors(path, tensors, {})
    assert check_names(path, "kohya", "sd1").ok  # ComfyUI maps every denoiser weight, A1111 too
    tensors["lora_te_text_model_final_layer_norm.w_norm"] = torch.ones(96).half()
    write_safetensors(path, tensors, {}, overwrite=True)
    result = check_names(path, "kohya", "sd1")
    assert list(result.unresolved) == ["lora_te_text_model_final_layer_norm"]


def test_check_refuses_an_unknown_architecture_and_checkpoints(capsys, tmp_path):
    unknown = tmp_path / "unknown.safetensors"
    write_safetensors(unknown, {"lora_unet_foo_bar.lora_down.weight": torch.ones(2, 8), "lora_unet_foo_bar.lora_up.weight": torch.ones(8, 2)}, {})
    line = _fails(capsys, unknown, "-o", tmp_path / "out.safetensors", "--save-dtype", "fp16", "--check")
    assert "architecture is not recognised" in line and "--arch" in line
    checkpoint = build_checkpoint(tmp_path / "ckpt.safetensors", "sd1", factor=16)
    line = _fails(capsys, checkpoint, "-o", tmp_path / "ckpt16.safetensors", "--save-dtype", "fp16", "--check")
    assert "--check applies to networks" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "unknown.safetensors"]


def test_verify_result_names_missing_modules(nets, tmp_path):
    out = tmp_path / "out.safetensors"
    tensors = read_tensors(nets["sd1"])
    dropped = "lora_unet_up_blocks_3_attentions_2_proj_out"
    tensors = {k: v for k, v in tensors.items() if not k.startswith(dropped + ".")}
    write_safetensors(out, tensors, {})
    result = verify_network(nets["sd1"], out, "kohya")
    assert result.problems == {dropped: "missing from the output"}
    assert all(error == 0 and allowed == EXACT for error, allowed in result.errors.values())
    assert dropped in result.message(out)


def test_verify_reads_peft_configs_as_peft_does(capsys, nets, tmp_path):
    out = tmp_path / "dora"
    _ok(capsys, nets["sd1_dora"], "-o", out, "--to", "peft", "--component", "unet")
    adapter, config_path = out / "adapter_model.safetensors", out / "adapter_config.json"
    config = json.loads(config_path.read_text())
    assert verify_network(nets["sd1_dora"], adapter, "peft", component="unet", config_file=config_path).ok
    first = config["target_modules"][0]
    broken = [
        ({**config, "use_dora": False}, "DoRA magnitude without use_dora"),
        ({**config, "rank_pattern": {first: 8}}, "rank 4 stored, 8 in the config"),
        ({**config, "target_modules": config["target_modules"][1:]}, "not in the config's target_modules"),
    ]
    for changed, problem in broken:
        config_path.write_text(json.dumps(changed))
        result = verify_network(nets["sd1_dora"], adapter, "peft", component="unet", config_file=config_path)
        assert not result.ok and problem in result.problems[f"base_model.model.{first}"], result.problems


def test_stray_keys_and_lone_alphas_are_kept_checked_and_compared(capsys, nets, tmp_path, monkeypatch):
    tensors = read_tensors(nets["sd1"])
    tensors["lora_unet_bogus_thing.alpha"] = torch.tensor(4.0)  # an alpha of no module: passed over by loaders
    tensors["text_projection.weight"] = torch.ones(2, 2)
    source = tmp_path / "stray.safetensors"
    write_safetensors(source, tensors, {})
    _, err = _ok(capsys, source, "-o", tmp_path / "kohya.safetensors", "--to", "kohya", "--check", "--verify")
    assert "checked: all 264 module names" in err and "(exact)" in err
    real = write.convert_network

    def convert_network(*args, **kwargs):
        converted = real(*args, **kwargs)
        converted.tensors["text_projection.weight"] = converted.tensors["text_projection.weight"] * 2
        return converted

    monkeypatch.setattr(write, "convert_network", convert_network)
    line = _fails(capsys, source, "-o", tmp_path / "changed.safetensors", "--to", "kohya", "--verify")
    assert "text_projection.weight: stray key missing or changed" in line
