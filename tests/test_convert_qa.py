"""convert's newer options from the command line, as a user combines them: partial DoRA refused for
diffusers/peft, a bad adapter_config.json alpha, a stripped peft text-encoder adapter converting back,
peft folders named in batch logs, a --base whose weight does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lytools.testing import build_checkpoint, build_network
from tests.shared import run_lytools
from tests.test_convert_dora import FACTOR, LINEAR, PLAIN, dora_network


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    sdxl = build_network(folder / "sdxl.safetensors", "sdxl", rank=4, alpha=2.0, modules=[
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"], metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    mixed = dora_network(folder / "mixed.safetensors", rank=8, plain=[PLAIN])
    return {"folder": folder, "sdxl": sdxl, "mixed": mixed}


@pytest.mark.parametrize("target", ["diffusers", "peft"])
def test_partial_dora_refused_before_writing(files, tmp_path, capsys, target):
    # peft's use_dora is one flag per model: a plain module beside DoRA ones would load as DoRA
    out = tmp_path / ("out.safetensors" if target == "diffusers" else "out")
    extra = ["--component", "unet"] if target == "peft" else []
    code, stdout, err = run_lytools(capsys, "convert", files["mixed"], "-o", out, "--to", target, *extra)
    assert code == 1 and stdout == "" and not out.exists()
    line, = err.strip().splitlines()
    assert "DoRA on only some modules (unet: 3 of 4 modules)" in line and "--flatten-dora" in line


def test_partial_dora_flattened_or_kohya_still_written(files, tmp_path, capsys):
    base = build_checkpoint(tmp_path / "sd1.safetensors", "sd1", factor=FACTOR, components=("unet", "clip_l"))
    code, _, err = run_lytools(capsys, "convert", files["mixed"], "-o", tmp_path / "flat.safetensors", "--to", "diffusers",
                               "--flatten-dora", "--base", base, "--verify", "--check")
    assert code == 0, err
    code, _, err = run_lytools(capsys, "convert", files["mixed"], "-o", tmp_path / "k.safetensors", "--to", "kohya", "--verify")
    assert code == 0, err


@pytest.mark.parametrize("alpha", [None, "abc", float("nan")])
def test_adapter_config_alpha_not_a_number(files, tmp_path, capsys, alpha):
    adapter = tmp_path / "adapter"
    code, _, err = run_lytools(capsys, "convert", files["sdxl"], "-o", adapter, "--to", "peft", "--component", "te2")
    assert code == 0, err
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["lora_alpha"] = alpha
    (adapter / "adapter_config.json").write_text(json.dumps(config))  # NaN is written as json's NaN
    other = build_network(tmp_path / "other.safetensors", "sd1", rank=4, modules=["lora_te_text_model_encoder_layers_0_mlp_fc1"])
    code, stdout, err = run_lytools(capsys, "convert", adapter, other, "--output-dir", tmp_path / "out", "--to", "kohya")
    assert code == 1  # a per-file error: the batch goes on with the next file
    assert stdout.strip().splitlines() == [str(tmp_path / "out" / "other.safetensors")]
    error = [line for line in err.splitlines() if "error" in line]
    assert len(error) == 1 and "adapter_model.safetensors: adapter config: the alpha of module" in error[0]
    assert "not a number" in error[0] and "internal error" not in error[0]


def test_stripped_text_encoder_adapter_says_how_to_convert_back(files, tmp_path, capsys):
    adapter = tmp_path / "te2"
    code, _, err = run_lytools(capsys, "convert", files["sdxl"], "-o", adapter, "--to", "peft", "--component", "te2",
                               "--strip-metadata")
    assert code == 0 and "converting it back needs --arch sdxl" in err
    code, _, err = run_lytools(capsys, "convert", adapter, "-o", tmp_path / "back.safetensors", "--to", "kohya",
                               "--arch", "sdxl", "--verify", "--check")
    assert code == 0, err
    assert set(load_file(tmp_path / "back.safetensors")) >= {
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"}
    # not said for a denoiser adapter, nor without --strip-metadata (the adapter records its architecture then)
    code, _, err = run_lytools(capsys, "convert", files["sdxl"], "-o", tmp_path / "te2b", "--to", "peft", "--component", "te2")
    assert code == 0 and "--arch" not in err


def test_peft_folders_named_in_batch_logs(files, tmp_path, capsys):
    for name in ("first", "second"):
        code, _, err = run_lytools(capsys, "convert", files["sdxl"], "-o", tmp_path / name, "--to", "peft", "--component", "te2")
        assert code == 0, err
    code, _, err = run_lytools(capsys, "convert", tmp_path / "first", tmp_path / "second", "--output-dir", tmp_path / "out",
                               "--to", "diffusers", "--verify")
    assert code == 0, err
    verified = [line for line in err.splitlines() if "verified" in line]
    assert sorted(line.split(":")[0] for line in verified) == ["first/adapter_model.safetensors", "second/adapter_model.safetensors"]


def test_flatten_dora_base_weight_that_does_not_fit_names_the_base(files, tmp_path, capsys):
    base = build_checkpoint(tmp_path / "sd1.safetensors", "sd1", factor=FACTOR, components=("unet", "clip_l"))
    tensors = load_file(base)
    key = next(k for k in tensors if k.endswith("input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"))
    tensors[key] = tensors[key][:, :10].contiguous()
    bad = tmp_path / "narrow.safetensors"
    save_file(tensors, bad)
    out = tmp_path / "flat.safetensors"
    code, stdout, err = run_lytools(capsys, "convert", files["mixed"], "-o", out, "--to", "kohya", "--flatten-dora", "--base", bad)
    assert code == 1 and stdout == "" and not out.exists()
    line, = err.strip().splitlines()
    assert "flattening on --base narrow.safetensors" in line and LINEAR in line


def test_nan_alpha_json_is_refused_by_load_network(tmp_path):
    # the reader merge and resize share: a non-number alpha is a FileFormatError, not a TypeError
    from lytools.convert.load import config_scale
    from lytools.errors import FileFormatError

    for alpha in (None, "8", True, float("inf")):
        with pytest.raises(FileFormatError, match="not a number"):
            config_scale({"lora_alpha": alpha}, "a.b", 4)
    assert config_scale({"lora_alpha": 8}, "a.b", 4) == 2.0
    assert config_scale({}, "a.b", 4) == 2.0  # peft's default lora_alpha, 8
    assert torch.isfinite(torch.tensor(config_scale({"lora_alpha": 4.0, "use_rslora": True}, "a.b", 4)))


def test_check_refuses_a_checkpoint_before_casting_it(tmp_path, capsys):
    checkpoint = build_checkpoint(tmp_path / "ckpt.safetensors", "sd1", factor=FACTOR, components=("clip_l",))
    network = build_network(tmp_path / "net.safetensors", "sd1", rank=4, modules=["lora_te_text_model_encoder_layers_0_mlp_fc1"])
    out = tmp_path / "out"
    code, stdout, err = run_lytools(capsys, "convert", checkpoint, network, "--output-dir", out, "--save-dtype", "bf16",
                                    "--check", "-j", "2")
    assert code == 1 and stdout.strip().splitlines() == [str(out / "net.safetensors")]
    error, = [line for line in err.splitlines() if "error" in line]
    assert error == f"lytools: error: {checkpoint}: --check applies to networks; this file holds no network modules; nothing written"
    assert sorted(p.name for p in out.iterdir()) == ["net.safetensors"]
    comfy = build_network(tmp_path / "comfy.safetensors", "sd1", rank=4, layout="comfy",
                          modules=["lora_te_text_model_encoder_layers_0_mlp_fc1"])
    code, stdout, err = run_lytools(capsys, "convert", comfy, "-o", tmp_path / "c.safetensors", "--save-dtype", "bf16", "--check")
    assert code == 1 and stdout == "" and not (tmp_path / "c.safetensors").exists()
    assert err.strip() == (f"lytools: error: {comfy}: --check knows the names kohya, diffusers and peft loaders read; this "
                           f"file's keys are in none of those layouts (convert it with --to); nothing written")


def test_json_carries_check_verify_and_flatten_figures(files, tmp_path, capsys):
    base = build_checkpoint(tmp_path / "sd1.safetensors", "sd1", factor=FACTOR, components=("unet", "clip_l"))
    code, stdout, err = run_lytools(capsys, "convert", files["mixed"], "-o", tmp_path / "k.safetensors", "--to", "kohya",
                                    "--flatten-dora", "--base", base, "--check", "--verify", "--json", "-q")
    assert code == 0, err
    entry, = json.loads(stdout)
    assert entry["check"] == {"loader": "ComfyUI/A1111/Forge", "layout": "kohya", "arch": "sd1", "modules": 5}
    assert entry["verify"]["compared"] == 5 and entry["verify"]["flattened"] == 4
    assert entry["verify"]["unit"] == "modules" and entry["verify"]["largest_relative_error"] < 1e-6
    flat = entry["flatten_dora"]
    assert flat["modules"] == 4 and flat["ranks"] == [8] and flat["worst_module"] in entry["notes"][0]
    assert 0 <= flat["mean_relative_error"] <= flat["max_relative_error"] < 1
    # a plain cast: the tensors compared; without the options, no such keys
    code, stdout, _ = run_lytools(capsys, "convert", files["sdxl"], "-o", tmp_path / "c.safetensors", "--save-dtype", "fp8_e4m3",
                                  "--verify", "--json")
    entry, = json.loads(stdout)
    assert code == 0 and entry["verify"]["unit"] == "tensors" and entry["verify"]["compared"] == 9 and "check" not in entry
    code, stdout, _ = run_lytools(capsys, "convert", files["sdxl"], "-o", tmp_path / "d.safetensors", "--to", "kohya", "--json")
    entry, = json.loads(stdout)
    assert code == 0 and not {"check", "verify", "flatten_dora"} & set(entry)


def test_fp8_diffusers_flux_reads_back(tmp_path, capsys):
    # lytools' own fp8 diffusers output: its split q/k/v parts share a down, compared bit for bit (no fp8 torch.equal)
    flux = build_network(tmp_path / "flux.safetensors", "flux", rank=4, modules=[
        "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"])
    fp8 = tmp_path / "fp8.safetensors"
    code, _, err = run_lytools(capsys, "convert", flux, "-o", fp8, "--to", "diffusers", "--save-dtype", "fp8_e4m3")
    assert code == 0, err
    back = tmp_path / "back.safetensors"
    code, _, err = run_lytools(capsys, "convert", fp8, "-o", back, "--to", "kohya", "--verify", "--check")
    assert code == 0 and "internal error" not in err, err
    assert {t.dtype for t in load_file(back).values()} == {torch.float8_e4m3fn, torch.float32}  # alphas stay float32


def test_pickled_peft_adapter_folder_is_an_input(files, tmp_path, capsys):
    # older peft save_pretrained wrote adapter_model.bin; read it as the safetensors one, named after its folder
    adapter = tmp_path / "te2"
    code, _, err = run_lytools(capsys, "convert", files["sdxl"], "-o", adapter, "--to", "peft", "--component", "te2")
    assert code == 0, err
    old = tmp_path / "old_adapter"
    old.mkdir()
    torch.save(load_file(adapter / "adapter_model.safetensors"), old / "adapter_model.bin")
    (old / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    code, stdout, err = run_lytools(capsys, "convert", old, "--output-dir", tmp_path / "out", "--to", "kohya", "--arch", "sdxl",
                                    "--verify", "--check")
    assert code == 0, err
    assert stdout.strip() == str(tmp_path / "out" / "old_adapter.safetensors")
    assert "old_adapter/adapter_model.bin: verified: 2 modules" in err
    ours, source = load_file(tmp_path / "out" / "old_adapter.safetensors"), load_file(files["sdxl"])
    for key in [k for k in source if k.startswith("lora_te2_") and k.endswith("lora_down.weight")]:  # te2's change,
        up = key.replace("lora_down", "lora_up")  # rescaled by the fold (and A1111's zero fillers beside it)
        theirs = source[up].float() @ source[key].float() * float(source[key.replace("lora_down.weight", "alpha")]) / 4
        mine = ours[up].float() @ ours[key].float() * float(ours[key.replace("lora_down.weight", "alpha")]) / 4
        assert torch.allclose(mine, theirs, rtol=1e-2, atol=1e-4)


def test_verify_summary_when_every_module_was_flattened(tmp_path, capsys):
    base = build_checkpoint(tmp_path / "sd1.safetensors", "sd1", factor=FACTOR, components=("unet", "clip_l"))
    network = dora_network(tmp_path / "all.safetensors", rank=8)
    code, _, err = run_lytools(capsys, "convert", network, "-o", tmp_path / "k.safetensors", "--to", "kohya",
                               "--flatten-dora", "--base", base, "--verify")
    assert code == 0, err
    assert "verified: 4 modules as the target loader reads them, largest relative error " in err
    assert "; 4 of them flattened DoRA, compared with the flattening done again on --base" in err


def test_verify_catches_a_flattened_module_written_wrong(tmp_path, capsys, monkeypatch):
    # the flattened modules are compared with the flattening done again: a writer that spoiled one is caught
    import lytools.convert.run as run

    base = build_checkpoint(tmp_path / "sd1.safetensors", "sd1", factor=FACTOR, components=("unet", "clip_l"))
    network = dora_network(tmp_path / "all.safetensors", rank=8)
    real = run.write_network

    def spoiled(path, tensors, metadata, **kwargs):
        tensors = dict(tensors)
        key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
        tensors[key] = tensors[key] * 1.01
        return real(path, tensors, metadata, **kwargs)

    monkeypatch.setattr(run, "write_network", spoiled)
    out = tmp_path / "k.safetensors"
    code, _, err = run_lytools(capsys, "convert", network, "-o", out, "--to", "kohya", "--flatten-dora", "--base", base,
                               "--verify")
    assert code == 1 and not out.exists()
    assert "--verify failed: 1 of 4 modules off" in err and "output removed" in err


def test_interrupted_run_leaves_no_output_dir(files, tmp_path, capsys, monkeypatch):
    import lytools.convert.run as run

    def interrupted(source, output, options):
        raise KeyboardInterrupt  # Ctrl-C while the first file converts (its temporary output already gone)

    monkeypatch.setattr(run, "process", interrupted)
    out = tmp_path / "new" / "out"
    code, stdout, err = run_lytools(capsys, "convert", files["sdxl"], "--output-dir", out, "--to", "kohya", "--verify")
    assert code == 130 and stdout == "" and err.strip() == "lytools: interrupted"
    assert not (tmp_path / "new").exists()  # the folders this run created went too


def test_missing_base_is_a_runtime_error_like_resize(files, tmp_path, capsys):
    # a file that is not there is exit 1, one line naming it (resize --base says the same), not click's usage error
    code, stdout, err = run_lytools(capsys, "convert", files["mixed"], "-o", tmp_path / "o.safetensors", "--to", "kohya",
                                    "--flatten-dora", "--base", tmp_path / "gone.safetensors")
    assert (code, stdout, err) == (1, "", f"lytools: error: {tmp_path / 'gone.safetensors'}: no such file\n")


def test_unexpected_failure_fails_its_file_only(files, tmp_path, capsys, monkeypatch):
    # as a --jobs worker's crash does: the batch goes on, the file is named, exit 1 at the end
    import lytools.convert.run as run

    real = run.process

    def flaky(source, output, options):
        if source.name == "mixed.safetensors":
            raise ValueError("boom\nsecond line")
        return real(source, output, options)

    monkeypatch.setattr(run, "process", flaky)
    out = tmp_path / "out"
    code, stdout, err = run_lytools(capsys, "convert", files["mixed"], files["sdxl"], "--output-dir", out, "--to", "kohya")
    assert code == 1 and stdout.strip() == str(out / "sdxl.safetensors")
    assert f"lytools: error: {files['mixed']}: internal error ValueError: boom\n" in err and "second line" not in err


def test_flatten_dora_metadata_states_the_ranks_written(tmp_path, capsys):
    # the input says dim 96 / conv_dim 96 (LYCORIS_META); its modules are rank 8 and stay so when flattened
    base = build_checkpoint(tmp_path / "sd1.safetensors", "sd1", factor=FACTOR, components=("unet", "clip_l"))
    network = dora_network(tmp_path / "all.safetensors", rank=8)
    out = tmp_path / "k.safetensors"
    code, _, err = run_lytools(capsys, "convert", network, "-o", out, "--to", "kohya", "--flatten-dora", "--base", base)
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(out, "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_network_dim"] == "8" and json.loads(meta["ss_network_args"])["conv_dim"] == "8"
    assert meta["ss_network_module"] == "networks.lora"
