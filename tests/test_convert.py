"""lytools convert: round trips per layout, fold rule, unsupported algorithms, stray keys, dtypes,
metadata, batch behaviour (failures, stdin, --jobs, naming)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from lytools.cli import main
from lytools.convert import load_network
from lytools.convert.layout import fold_split
from lytools.io import open_file, with_sshs_hashes, write_safetensors
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors as tensors_of


def run_cli(capsys, *args: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    """Run `lytools ARGS` in this process; return (exit code, stdout, stderr)."""
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def lora_delta(module, probe: bool = True) -> torch.Tensor:
    """ΔW of a LoRA module applied to 4 fixed probe vectors (ΔW·V: cheap, and zero only if ΔW is)."""
    up, down = module["lora_up.weight"].float(), module["lora_down.weight"].float()
    rank = down.shape[0]
    alpha = float(module["alpha"].float()) if "alpha" in module else rank
    down = down.reshape(rank, -1)
    probes = torch.randn(down.shape[1], 4, generator=torch.Generator().manual_seed(0))
    return (up.reshape(up.shape[0], -1) @ (down @ probes)) * (alpha / rank)


def assert_same_modules(a: Path, b: Path, *, bits: bool) -> int:
    first, second = load_network(a), load_network(b)
    assert set(first.modules) == set(second.modules)
    for name, module in first.modules.items():
        other = second.modules[name]
        if bits:
            assert set(module.tensors) == set(other.tensors), name
            for suffix, tensor in module.tensors.items():
                assert other[suffix].dtype == tensor.dtype and torch.equal(other[suffix], tensor), f"{name}.{suffix}"
        else:
            # a fold by a non-power-of-two scale rounds each factor once in its dtype (fp16: 2^-11)
            expected = lora_delta(module)
            error = (lora_delta(other) - expected).norm() / expected.norm()
            assert error < 2e-3, f"{name}: relative error {error:.2e}"
    return len(first.modules)


NETWORKS = {
    "sd1": dict(modules="c3lier", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0),
    "sd2": dict(modules="lierla", rank=4, alpha=1.0),
    "sdxl": dict(modules="lierla", rank=4, alpha=8.0),
    "flux": dict(modules="lierla", rank=4, alpha=3.0),
}


@pytest.mark.parametrize("arch", sorted(NETWORKS))
def test_kohya_diffusers_kohya_is_bit_identical_without_fold(tmp_path, capsys, arch):
    source = build_network(tmp_path / "k.safetensors", arch, **NETWORKS[arch])
    code, out, _ = run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "d.safetensors"), "--to", "diffusers", "--no-fold")
    assert code == 0 and out.strip() == str(tmp_path / "d.safetensors")
    diffusers_keys = tensors_of(tmp_path / "d.safetensors")
    assert all(k.split(".")[0] in ("unet", "transformer", "text_encoder", "text_encoder_2") for k in diffusers_keys)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in diffusers_keys)
    code, _, _ = run_cli(capsys, "convert", str(tmp_path / "d.safetensors"), "-o", str(tmp_path / "k2.safetensors"), "--to", "kohya")
    assert code == 0
    assert_same_modules(source, tmp_path / "k2.safetensors", bits=True)
    # the written kohya names are the canonical ones (SGM names for SDXL)
    with open_file(source) as a, open_file(tmp_path / "k2.safetensors") as b:
        assert set(a.keys()) == set(b.keys())


@pytest.mark.parametrize("arch", sorted(NETWORKS))
def test_kohya_peft_kohya_is_bit_identical_without_fold(tmp_path, capsys, arch):
    source = build_network(tmp_path / "k.safetensors", arch, **NETWORKS[arch])
    code, out, _ = run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "p"), "--to", "peft", "--component", "unet", "--no-fold")
    assert code == 0
    adapter, config = tmp_path / "p" / "adapter_model.safetensors", tmp_path / "p" / "adapter_config.json"
    assert out.split() == [str(adapter), str(config)]
    assert all(k.startswith("base_model.model.") for k in tensors_of(adapter))
    assert json.loads(config.read_text())["peft_type"] == "LORA"
    code, _, _ = run_cli(capsys, "convert", str(adapter), "-o", str(tmp_path / "k2.safetensors"), "--to", "kohya")
    assert code == 0
    back, original = load_network(tmp_path / "k2.safetensors"), load_network(source)
    unet = {name: m for name, m in original.modules.items() if name.startswith("lora_unet_")}
    assert set(back.modules) == set(unet)
    for name, module in unet.items():
        for suffix, tensor in module.tensors.items():
            assert torch.equal(back.modules[name][suffix], tensor) and back.modules[name][suffix].dtype == tensor.dtype


@pytest.mark.parametrize("arch", ["sd1", "flux"])
def test_fold_keeps_the_weight_change(tmp_path, capsys, arch):
    source = build_network(tmp_path / "k.safetensors", arch, **NETWORKS[arch])
    assert run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "d.safetensors"), "--to", "diffusers")[0] == 0
    meta = json.loads(open_file(tmp_path / "d.safetensors").metadata["lora_adapter_metadata"])
    component = "unet" if arch == "sd1" else "transformer"
    assert meta[f"{component}.lora_alpha"] == meta[f"{component}.r"]  # folded: scale 1 everywhere
    assert meta[f"{component}.alpha_pattern"] == meta[f"{component}.rank_pattern"]
    assert run_cli(capsys, "convert", str(tmp_path / "d.safetensors"), "-o", str(tmp_path / "k2.safetensors"), "--to", "kohya")[0] == 0
    assert_same_modules(source, tmp_path / "k2.safetensors", bits=False)
    # kohya to kohya with --fold: alpha = rank in every module, the same change
    code, _, err = run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "kf.safetensors"), "--to", "kohya", "--fold")
    assert code == 0 and "scales folded" in err
    folded = load_network(tmp_path / "kf.safetensors")
    assert all(float(m["alpha"]) == m["lora_down.weight"].shape[0] for m in folded.modules.values())
    assert_same_modules(source, tmp_path / "kf.safetensors", bits=False)


def test_fold_split_is_a_power_of_two_on_down():
    for scale in (0.5, 0.25, 3.0 / 4, 1 / 64, 16.0, 1.0):
        down, up = fold_split(scale)
        assert down * up == pytest.approx(scale) and (down == 2.0 ** round(torch.log2(torch.tensor(down)).item()))
    assert fold_split(1 / 64) == (0.125, 0.125)


def test_algorithms_diffusers_cannot_hold_are_named(tmp_path, capsys):
    source = build_network(tmp_path / "loha.safetensors", "sd1", algo="loha", rank=4)
    code, out, err = run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "d.safetensors"), "--to", "diffusers")
    assert code == 1 and out == ""
    assert "loha: 264 modules" in err and "lytools resize" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "d.safetensors").exists()
    code, _, _ = run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "k.safetensors"), "--to", "kohya")
    assert code == 0 and set(tensors_of(tmp_path / "k.safetensors")) == set(tensors_of(source))


def test_stray_keys_kept_for_kohya_dropped_for_diffusers(tmp_path, capsys):
    source = build_network(tmp_path / "k.safetensors", "sd1", rank=4)
    tensors = tensors_of(source)
    tensors["text_projection.weight"] = torch.ones(3, 3)
    write_safetensors(tmp_path / "stray.safetensors", tensors, {"ss_network_dim": "4"})
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "stray.safetensors"), "-o", str(tmp_path / "k2.safetensors"), "--to", "kohya")
    assert code == 0 and "text_projection.weight" in err
    assert torch.equal(tensors_of(tmp_path / "k2.safetensors")["text_projection.weight"], torch.ones(3, 3))
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "stray.safetensors"), "-o", str(tmp_path / "d.safetensors"), "--to", "diffusers")
    assert code == 0 and "dropped 1 keys" in err
    assert "text_projection.weight" not in tensors_of(tmp_path / "d.safetensors")


def test_unmapped_module_is_an_error(tmp_path, capsys):
    tensors = tensors_of(build_network(tmp_path / "k.safetensors", "sd1", rank=4))
    tensors["unet.no_such_block.proj.lora_A.weight"] = torch.ones(4, 8)
    tensors["unet.no_such_block.proj.lora_B.weight"] = torch.ones(8, 4)
    write_safetensors(tmp_path / "odd.safetensors", tensors)
    code, _, err = run_cli(capsys, "convert", str(tmp_path / "odd.safetensors"), "-o", str(tmp_path / "o.safetensors"), "--to", "kohya")
    assert code == 1 and "unet.no_such_block.proj" in err and not (tmp_path / "o.safetensors").exists()


def test_metadata_carried_and_hashes_recomputed(tmp_path, capsys):
    source = build_network(tmp_path / "k.safetensors", "sd1", rank=4,
                           metadata={"ss_network_dim": "4", "sshs_model_hash": "stale", "modelspec.title": "x",
                                     "modelspec.implementation": "https://github.com/Stability-AI/generative-models"})
    assert run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "o.safetensors"), "--to", "kohya", "--save-dtype", "bf16")[0] == 0
    with open_file(tmp_path / "o.safetensors") as out:
        meta = dict(out.metadata)
        tensors = {k: out.get(k).clone() for k in out.keys()}
    assert meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "x"
    assert meta["modelspec.implementation"] == "diffusers"  # SD1 kohya names are diffusers paths
    assert json.loads(meta["lytools.sources"])[0]["name"] == "k.safetensors" and "convert" in meta["lytools.command"]
    assert meta["sshs_model_hash"] == with_sshs_hashes(tensors, meta)["sshs_model_hash"] != "stale"
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())


def test_fp8_network_keeps_alpha_precise(tmp_path, capsys):
    source = build_network(tmp_path / "k.safetensors", "sd1", rank=4, alpha=0.3)
    assert run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "o.safetensors"), "--to", "kohya", "--save-dtype", "fp8_e4m3")[0] == 0
    out = tensors_of(tmp_path / "o.safetensors")
    alphas = [t for k, t in out.items() if k.endswith(".alpha")]
    assert alphas and all(t.dtype == torch.float32 and abs(float(t) - 0.3) < 1e-3 for t in alphas)
    assert all(t.dtype == torch.float8_e4m3fn for k, t in out.items() if k.endswith(".weight"))
    # a dtype-only conversion (no --to) keeps them too: e5m2 would store alpha 11 as 12
    source = build_network(tmp_path / "k11.safetensors", "sd1", rank=4, alpha=11.0, dtype=torch.float32)
    assert run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "c.safetensors"), "--save-dtype", "fp8_e5m2")[0] == 0
    out = tensors_of(tmp_path / "c.safetensors")
    alphas = [t for k, t in out.items() if k.endswith(".alpha")]
    assert alphas and all(t.dtype == torch.float32 and float(t) == 11.0 for t in alphas)
    assert all(t.dtype == torch.float8_e5m2 for k, t in out.items() if k.endswith(".weight"))


def test_checkpoint_dtype_streaming(tmp_path, capsys):
    source = build_checkpoint(tmp_path / "ckpt.safetensors", "sd1", factor=32, components=("unet", "clip_l"), dtype=torch.float16)
    before = tensors_of(source)
    assert any(not t.is_floating_point() for t in before.values())  # position_ids stay integers
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp8_e5m2", torch.float8_e5m2), ("fp32", torch.float32)):
        out_path = tmp_path / f"c-{dtype}.safetensors"
        code, out, _ = run_cli(capsys, "convert", str(source), "-o", str(out_path), "--save-dtype", dtype)
        assert code == 0 and out.strip() == str(out_path)
        after = tensors_of(out_path)
        assert set(before) == set(after)
        for name, tensor in before.items():
            if tensor.is_floating_point():
                assert after[name].dtype == torch_dtype and torch.equal(after[name], tensor.to(torch_dtype)), name
            else:
                assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor)


def test_batch_failure_stdin_jobs_and_naming(tmp_path, capsys, monkeypatch):
    inputs = []
    for index in range(3):
        inputs.append(build_network(tmp_path / f"n{index}.safetensors", "sd1", rank=2, modules=["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"], seed=index))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    listing = "\n".join(str(p) for p in [inputs[0], broken, inputs[1], inputs[2]]) + "\n"
    code, out, err = run_cli(capsys, "convert", "-", "--output-dir", str(out_dir), "--to", "diffusers", "--jobs", "2",
                             stdin=listing, monkeypatch=monkeypatch)
    assert code == 1
    written = sorted(out.split())
    assert written == sorted(str(out_dir / f"n{i}.safetensors") for i in range(3))
    assert "broken.safetensors" in err and err.count("lytools: error") == 1
    assert not (out_dir / "broken.safetensors").exists()
    # existing outputs are refused without --overwrite; with it they are replaced
    code, out, err = run_cli(capsys, "convert", *map(str, inputs), "--output-dir", str(out_dir), "--to", "diffusers")
    assert code == 1 and err.count("already exists") == 3 and out == ""
    code, out, _ = run_cli(capsys, "convert", *map(str, inputs), "--output-dir", str(out_dir), "--to", "diffusers", "--overwrite", "--json")
    report = json.loads(out)
    assert code == 0 and [r["error"] for r in report] == [None] * 3 and report[0]["outputs"] == [str(out_dir / "n0.safetensors")]


def test_usage_errors(tmp_path, capsys):
    source = build_network(tmp_path / "n.safetensors", "sd1", rank=2, modules=["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k"])
    assert run_cli(capsys, "convert", str(source), str(source), "-o", str(tmp_path / "x.safetensors"), "--to", "kohya")[0] == 2
    assert run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "x.safetensors"))[0] == 2
    code, _, err = run_cli(capsys, "convert", str(source), "--output-dir", str(tmp_path), "--to", "kohya")
    assert code == 1 and "replace its own input" in err
    code, _, err = run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "x.ckpt"), "--to", "kohya")
    assert code == 1 and ".safetensors" in err


def test_peft_file_output_and_config_beside(tmp_path, capsys):
    source = build_network(tmp_path / "n.safetensors", "sdxl", rank=4, alpha=2.0)
    code, _, err = run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "te2.safetensors"), "--to", "peft")
    assert code == 1 and "--component" in err
    code, out, _ = run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "te2.safetensors"), "--to", "peft", "--component", "te2")
    assert code == 0 and out.split()[1] == str(tmp_path / "te2.adapter_config.json")
    net = load_network(tmp_path / "te2.safetensors", arch="sdxl")
    original = load_network(source)
    assert set(net.modules) == {n for n in original.modules if n.startswith("lora_te2_")}
    name = next(iter(net.modules))
    expected = lora_delta(original.modules[name])
    assert (lora_delta(net.modules[name]) - expected).norm() / expected.norm() < 2e-3
    # SDXL has no te3 (T5 belongs to SD3 and Flux): an error, not its te2 modules
    code, out, err = run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "t5.safetensors"), "--to", "peft", "--component", "te3")
    assert code == 1 and out == "" and "no te3 modules in this sdxl network" in err
    assert not (tmp_path / "t5.safetensors").exists()


def test_checkpoint_given_to_a_layout_conversion_is_refused(tmp_path, capsys):
    source = build_checkpoint(tmp_path / "ckpt.safetensors", "sd1", factor=32, components=("clip_l",))
    code, out, err = run_cli(capsys, "convert", str(source), "-o", str(tmp_path / "o.safetensors"), "--to", "kohya")
    assert code == 1 and out == "" and "no network modules" in err and "--save-dtype" in err
    assert not (tmp_path / "o.safetensors").exists()


def test_diffusers_output_names_what_loaders_will_not_apply(tmp_path):
    """T5 modules have diffusers names (text_encoder_2 for Flux) that no pipeline loads, and --no-fold
    leaves the scale in metadata only: both are said, on the fast path and the general one."""
    from lytools.convert.fast import try_convert
    from lytools.convert.run import ConvertOptions, convert_file

    from lytools.testing import select_modules

    t5 = select_modules("flux", "all", optional=("train_t5xxl",), components=("te3",))
    unfused = ["lora_unet_single_blocks_0_linear2", "lora_unet_double_blocks_0_img_mlp_0"]  # what the fast path takes
    source = build_network(tmp_path / "k.safetensors", "flux", factor=32, rank=4, alpha=2.0, modules=unfused + t5)
    options = ConvertOptions(target="diffusers", overwrite=True)
    general = convert_file(source, tmp_path / "g.safetensors", options)
    fast = try_convert(source, tmp_path / "f.safetensors", options)
    assert fast is not None and fast.notes == general.notes
    said = [note for note in general.notes if "text_encoder_2 (T5)" in note]
    assert len(said) == 1 and said[0].startswith(f"{len(t5)} text_encoder_2 (T5) modules") and "transformer, text_encoder" in said[0]
    assert not any("--no-fold" in note for note in general.notes)

    unfolded = convert_file(source, tmp_path / "n.safetensors", ConvertOptions(target="diffusers", fold=False)).notes
    assert any(note.startswith("--no-fold: the scales of ") and "ComfyUI" in note for note in unfolded)
    plain = build_network(tmp_path / "s.safetensors", "sd1", rank=4, alpha=4.0)  # alpha = rank: nothing to say
    notes = convert_file(plain, tmp_path / "sn.safetensors", ConvertOptions(target="diffusers", fold=False)).notes
    assert not any("T5" in note or "--no-fold" in note for note in notes)


def _slow_process(source, output, options):
    """Stands in for run.process in the forked workers: a file that takes a while."""
    import time

    from lytools.convert.run import FileResult

    time.sleep(0.3)
    output.write_bytes(b"written")
    return FileResult(source, outputs=[output])


def test_interrupted_batch_starts_no_more_files_and_reports_every_written_one(tmp_path, monkeypatch):
    from lytools.convert import run

    monkeypatch.setattr(run, "process", _slow_process)  # the forked workers inherit the patch
    pairs = [(tmp_path / f"in{i}.safetensors", tmp_path / f"out{i}.safetensors") for i in range(12)]
    reported = []

    def on_done(result):
        reported.append(result)
        if len(reported) == 1:
            raise KeyboardInterrupt  # Ctrl-C in the parent while it reports the first file

    with pytest.raises(KeyboardInterrupt):
        run.run_batch(pairs, run.ConvertOptions(target="kohya"), jobs=2, on_done=on_done)
    written = {output for _, output in pairs if output.exists()}
    assert 1 <= len(written) <= 4  # the file reported, the two under way, at most one already queued
    assert written == {result.outputs[0] for result in reported}


def test_verbose_says_how_each_file_was_read(tmp_path, capsys):
    source = build_network(tmp_path / "k.safetensors", "sd1", rank=4, alpha=2.0)
    out = tmp_path / "out"
    out.mkdir()
    code, _, quiet = run_cli(capsys, "convert", str(source), "--output-dir", str(out), "--to", "diffusers")
    assert code == 0 and "read as" not in quiet and "done in" not in quiet
    code, _, err = run_cli(capsys, "convert", str(source), "--output-dir", str(out), "--to", "diffusers", "-v", "--overwrite")
    assert code == 0 and "read as a kohya sd1 network of" in err and "fast path" in err and "done in" in err
    code, _, err = run_cli(capsys, "convert", str(source), "--output-dir", str(out), "--to", "kohya", "-v", "--overwrite")
    assert code == 0 and "read as a kohya sd1 network of" in err and "fast path" not in err


def test_folding_leaves_no_stale_alpha_in_the_metadata(tmp_path, capsys):
    meta = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_network_args": json.dumps({"conv_dim": "2", "conv_alpha": "1"})}
    source = build_network(tmp_path / "k.safetensors", "sd1", rank=4, alpha=2.0, conv_rank=2, conv_alpha=1.0,
                           modules="c3lier", metadata=meta)
    for target, extra in (("diffusers", []), ("kohya", ["--fold"]), ("kohya", [])):
        out = tmp_path / f"{target}{len(extra)}.safetensors"
        assert run_cli(capsys, "convert", str(source), "-o", str(out), "--to", target, *extra)[0] == 0
        written = open_file(out).metadata
        folded = bool(extra) or target == "diffusers"
        assert written["ss_network_alpha"] == ("4.0" if folded else "2.0"), target
        assert json.loads(written["ss_network_args"])["conv_alpha"] == ("2.0" if folded else "1"), target
