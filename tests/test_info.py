"""lytools info: checkpoints and networks of every arch and layout, header-only, errors, hashes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from lytools import testing
from lytools.cli import cli
from lytools.info import block_of, inspect_file
from lytools.io import SafetensorsFile, read_header, with_sshs_hashes, write_safetensors


def run_info(*args, stdin=None):
    result = CliRunner().invoke(cli, ["info", *map(str, args)], input=stdin)
    return result


def info_json(*paths, extra=()):
    result = run_info(*paths, "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    made = {
        "sd1": testing.build_checkpoint(root / "sd1.safetensors", "sd1", factor=16),
        "sd2": testing.build_checkpoint(root / "sd2.safetensors", "sd2", factor=16, components=["unet", "clip_h"]),
        "sdxl": testing.build_checkpoint(root / "sdxl.safetensors", "sdxl", factor=16, components=["unet", "clip_l", "clip_g"]),
        "sd3": testing.build_checkpoint(root / "sd3.safetensors", "sd3", factor=32, keep_blocks=2, components=["unet", "clip_l", "clip_g"]),
        "flux": testing.build_checkpoint(root / "flux.safetensors", "flux", factor=32, keep_blocks=2, release=True),
        "sdxl-diffusers": testing.build_checkpoint(root / "unet.safetensors", "sdxl", factor=16, layout="diffusers"),
        "sd1-inpaint": testing.build_checkpoint(root / "inp.safetensors", "sd1", factor=16, components=["unet"], in_channels=9),
        "sdxl-full": testing.build_sparse_checkpoint(root / "sdxl-full.safetensors", "sdxl", release=True),
        "flux-full": testing.build_sparse_checkpoint(root / "flux-full.safetensors", "flux", release=True),
        "sd3-full": testing.build_sparse_checkpoint(root / "sd3-full.safetensors", "sd3"),
        "sd2-full-v": testing.build_sparse_checkpoint(root / "sd2-v.safetensors", "sd2", metadata={"modelspec.prediction_type": "v"}),
    }
    return made


@pytest.mark.parametrize(
    "name,arch,layout,variant",
    [
        ("sd1", "sd1", "ldm", None), ("sd2", "sd2", "ldm", None), ("sdxl", "sdxl", "sgm", "base"),
        ("sd3", "sd3", "mmdit", None), ("flux", "flux", "bfl", "dev"), ("sdxl-diffusers", "sdxl", "diffusers", "base"),
        ("sd1-inpaint", "sd1", "ldm", "inpaint"), ("sdxl-full", "sdxl", "sgm", "base"), ("flux-full", "flux", "bfl", "dev"),
        ("sd3-full", "sd3", "mmdit", "medium"), ("sd2-full-v", "sd2", "ldm", None),
    ],
)
def test_checkpoints(models, name, arch, layout, variant):
    [report] = info_json(models[name])
    header = read_header(models[name])
    assert (report["kind"], report["architecture"], report["layout"]) == ("checkpoint", arch, layout)
    assert report["checkpoint"]["variant"] == variant
    assert report["tensor_count"] == len(header.tensors)
    assert report["tensor_bytes"] == header.data_bytes
    assert report["file_bytes"] == models[name].stat().st_size
    assert sum(report["dtypes"].values()) == len(header.tensors)
    assert report["checkpoint"]["prediction"] == ("v" if name == "sd2-full-v" else "unknown")
    if name == "flux":
        assert report["checkpoint"]["prefix"] == "" and report["dtypes"] == {"BF16": len(header.tensors)}
    if name.endswith("-full"):
        assert not any("scaled down" in note for note in report["notes"])


NETWORKS = [
    ("sd1", {}, "sd1", "kohya", {"lora": 264}),
    ("sd2", {"modules": "c3lier", "conv_rank": 2}, "sd2", "kohya", {"lora": 416}),
    ("sdxl", {"layout": "lycoris"}, "sdxl", "lycoris", {"lora": 722}),
    ("sdxl", {"layout": "diffusers"}, "sdxl", "diffusers", {"lora": 986}),
    ("sd1", {"layout": "peft"}, "sd1", "peft", {"lora": 192}),
    ("sd2", {"layout": "comfy"}, "sd2", "comfy", {"lora": 330}),
    ("flux", {}, "flux", "kohya", {"lora": 376}),
    ("flux", {"layout": "diffusers", "components": ["unet"]}, "flux", "diffusers", {"lora": 494}),
    ("sd3", {"components": ["unet"]}, "sd3", "kohya", {"lora": 237}),
    ("sd1", {"algo": "loha", "dora": True}, "sd1", "kohya", {"loha": 264}),
    ("sdxl", {"algo": "full", "components": ["unet"]}, "sdxl", "kohya", {"full": 722}),
    # CLIP-L alone fits SDXL te1, SD3 te1 and Flux te1 alike: unknown, never a guess
    ("sdxl", {"components": ["te1"]}, "unknown", "kohya", {"lora": 72}),
]


@pytest.mark.parametrize("arch,options,expect_arch,layout,algorithms", NETWORKS)
def test_networks(tmp_path, arch, options, expect_arch, layout, algorithms):
    path = testing.build_network(tmp_path / "n.safetensors", arch, factor=16, rank=4, **options)
    [report] = info_json(path)
    assert (report["kind"], report["architecture"], report["layout"]) == ("network", expect_arch, layout)
    network = report["network"]
    assert network["algorithms"] == algorithms
    assert network["modules"] == sum(algorithms.values())
    if "full" not in algorithms:
        assert network["rank"]["max"] == 4
    if layout in ("diffusers", "peft"):
        assert network["modules_without_alpha"] == network["modules"]
    elif "full" not in algorithms and "conv_rank" not in options:
        assert network["alpha"] == {"min": 4, "median": 4, "max": 4}
    assert network["dora"] == bool(options.get("dora"))
    if expect_arch == "unknown":
        assert any("equally" in note for note in report["notes"])
    if options.get("modules") == "c3lier":
        assert network["conv_modules"]["kxk"] == 50 and network["rank"]["min"] == 2


def test_rank_alpha_summary_and_blocks(tmp_path):
    path = testing.build_network(tmp_path / "n.safetensors", "sd1", modules="c3lier", rank=8, alpha=4, conv_rank=2, conv_alpha=1, factor=16)
    [report] = info_json(path, extra=["--verbose"])
    network = report["network"]
    assert network["rank"] == {"min": 2, "median": 8, "max": 8}
    assert network["alpha"] == {"min": 1, "median": 4, "max": 4}
    blocks = network["blocks"]
    assert list(blocks)[:3] == ["te:layers_0", "te:layers_1", "te:layers_2"]
    assert blocks["unet:mid"]["modules"] == 12 + 6
    assert sum(b["modules"] for b in blocks.values()) == 350
    human = run_info(path, "--verbose").stdout
    assert "per block:" in human and "unet:down_blocks_0" in human and "rank          min 2, median 8, max 8" in human


def test_zero_modules_completing_open_clip_layers_are_counted_apart(tmp_path, capsys):
    """lytools' kohya outputs complete SDXL te2 attention layers that hold only some of q/k/v/out with zero
    rank-1 modules (for A1111): info counts them apart instead of reporting rank 1 and alpha 1 modules."""
    layer = "lora_te2_text_model_encoder_layers_{}_self_attn_{}_proj"
    trained = [layer.format(0, "q"), layer.format(0, "v"), layer.format(1, "k"), "lora_te2_text_model_encoder_layers_2_mlp_fc1",
               "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]
    source = testing.build_network(tmp_path / "partial.safetensors", "sdxl", rank=4, alpha=2.0, modules=trained, factor=16)
    completed = tmp_path / "completed.safetensors"
    assert CliRunner().invoke(cli, ["convert", str(source), "-o", str(completed), "--to", "kohya"]).exit_code == 0
    assert len(read_header(completed).tensors) == 3 * (len(trained) + 5)  # 2 + 3 parts completed
    [report] = info_json(completed, extra=["--verbose"])
    network = report["network"]
    assert network["zero_filler_modules"] == 5 and network["modules"] == len(trained) + 5
    assert network["rank"] == {"min": 4, "median": 4, "max": 4} and network["alpha"] == {"min": 2, "median": 2, "max": 2}
    assert network["scale"] == {"min": 0.5, "median": 0.5, "max": 0.5}
    assert network["blocks"]["te2:layers_1"]["rank"] == {"min": 4, "median": 4, "max": 4}
    human = run_info(completed).stdout
    assert "rank          4 (and 5 zero rank-1 filler modules: A1111 completion" in human
    # the same names and shapes with values are trained rank-1 modules, and so is a layer of zero modules only
    tensors = load_file(completed)
    tensors[f"{layer.format(0, 'k')}.lora_up.weight"] += 1
    for part in ("q", "k", "v", "out"):
        tensors[f"{layer.format(5, part)}.lora_down.weight"] = torch.zeros(1, 80, dtype=torch.float16)
        tensors[f"{layer.format(5, part)}.lora_up.weight"] = torch.zeros(80, 1, dtype=torch.float16)
        tensors[f"{layer.format(5, part)}.alpha"] = torch.tensor(1.0, dtype=torch.float16)
    write_safetensors(tmp_path / "edited.safetensors", tensors)
    network = info_json(tmp_path / "edited.safetensors")[0]["network"]
    assert network["zero_filler_modules"] == 4 and network["rank"]["min"] == 1


def test_block_labels():
    assert block_of("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") == "unet:input_blocks_4"
    assert block_of("lora_te2_text_model_encoder_layers_31_mlp_fc1") == "te2:layers_31"
    assert block_of("transformer.single_transformer_blocks.3.attn.to_q") == "unet:single_transformer_blocks_3"
    assert block_of("lora_unet_mid_block_attentions_0_proj_in") == "unet:mid"
    assert block_of("lora_te3_encoder_block_2_layer_0_SelfAttention_q") == "te3:block_2"


def test_header_only_reads_alpha_scalars_only(tmp_path, monkeypatch):
    path = testing.build_network(tmp_path / "n.safetensors", "sdxl", factor=16)
    read: list[str] = []
    for method in ("get", "raw_bytes", "get_rows"):
        original = getattr(SafetensorsFile, method)

        def spy(self, name, *rest, _original=original):
            read.append(name)
            return _original(self, name, *rest)

        monkeypatch.setattr(SafetensorsFile, method, spy)
    report = inspect_file(path)
    assert read and all(name.endswith(".alpha") for name in read)
    assert report["network"]["scalars_read"] == len(read)
    checkpoint = testing.build_sparse_checkpoint(tmp_path / "c.safetensors", "sd1")
    read.clear()
    inspect_file(checkpoint)
    assert read == []


def test_metadata_summary_and_extra_fields(tmp_path):
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_tag_frequency": "{" + "x" * 400 + "}",
            "modelspec.architecture": "stable-diffusion-v1/lora", "modelspec.title": "t", "lytools.version": "0.1"}
    path = testing.build_network(tmp_path / "n.safetensors", "sd1", factor=16, metadata=meta, components=["te"])
    [report] = info_json(path)
    metadata = report["metadata"]
    assert metadata["count"] == 6
    assert metadata["ss"] == {"ss_network_module": "networks.lora", "ss_network_dim": "4"}
    assert metadata["ss_other_keys"] == ["ss_tag_frequency"]
    assert metadata["modelspec"]["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["other"] == {"lytools.version": "0.1"}
    # a header with extra per-tensor fields is still read, and the fields are reported
    raw = tmp_path / "extra.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "quant": "x"}}).encode()
    raw.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    [extra] = info_json(raw)
    assert extra["extra_header_fields"] == {"w": ["quant"]} and extra["kind"] == "checkpoint"
    assert extra["architecture"] == "unknown"


def test_hashes_and_verify(tmp_path):
    # rank 8 full-size text-encoder modules: 1.8 MB, so the legacy window (64 KiB at 1 MiB) holds data
    path = testing.build_network(tmp_path / "n.safetensors", "sd1", factor=1, rank=8, components=["te"])
    tensors = load_file(path)
    assert path.stat().st_size > 0x110000

    good = tmp_path / "good.safetensors"
    write_safetensors(good, tensors, with_sshs_hashes(tensors, {"ss_network_dim": "4"}))
    bad_meta = with_sshs_hashes(tensors, {"ss_network_dim": "4"})
    bad_meta["sshs_model_hash"] = "0" * 64
    bad = tmp_path / "bad.safetensors"
    write_safetensors(bad, tensors, bad_meta)
    [report] = info_json(good, extra=["--hash"])
    data = good.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    hashes = report["hashes"]
    assert hashes["sha256"] == hashlib.sha256(data).hexdigest()
    assert hashes["autov2"] == hashlib.sha256(data).hexdigest()[:10]
    assert hashes["sshs_model_hash"] == hashlib.sha256(data[8 + header_len:]).hexdigest()
    assert hashes["embedded"]["sshs_model_hash"]["matches"] is True
    assert hashes["embedded"]["sshs_legacy_hash"]["matches"] is True
    assert run_info(good, "--verify").exit_code == 0
    result = run_info(bad, "--verify")
    assert result.exit_code == 1
    assert "sshs_model_hash" in result.stderr and "does not match" in result.stderr
    [bad_report] = info_json(bad, extra=["--hash"])
    assert bad_report["hashes"]["embedded"]["sshs_model_hash"]["matches"] is False


def test_bad_file_one_line_others_reported_stdin(tmp_path, models):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")
    missing = tmp_path / "missing.safetensors"
    stdin = f"{models['sd1']}\n{bad}\n{missing}\n{models['flux']}\n"
    result = run_info("-", "--json", stdin=stdin)
    assert result.exit_code == 1
    reports = json.loads(result.stdout)
    assert [r.get("architecture") for r in reports] == ["sd1", None, None, "flux"]
    assert "error" in reports[1] and "error" in reports[2]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("lytools: error: ") for line in lines)
    assert str(bad) in lines[0] and str(missing) in lines[1]


def test_cli_process_malformed_no_traceback(tmp_path, models):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    process = subprocess.run([sys.executable, "-m", "lytools", "info", str(models["sd1"]), str(bad)],
                             capture_output=True, text=True, timeout=120)
    assert process.returncode == 1
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().count("\n") == 0 and str(bad) in process.stderr
    assert "architecture  sd1" in process.stdout and "kind          checkpoint (ldm layout)" in process.stdout


def test_pickled_checkpoint(tmp_path):
    tensors = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(40, 4, 3, 3)}
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": tensors}, path)
    [report] = info_json(path, extra=["--hash"])
    assert report["format"].startswith("pickle")
    assert report["hashes"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64])
def test_alpha_of_any_dtype_and_shape(tmp_path, dtype):
    down, up = torch.zeros(4, 96, dtype=torch.float16), torch.zeros(96, 4, dtype=torch.float16)
    name = "lora_te_text_model_encoder_layers_0_mlp_fc2"
    tensors = {f"{name}.lora_down.weight": torch.zeros(4, 3072 // 16), f"{name}.lora_up.weight": torch.zeros(768 // 16, 4),
               f"{name}.alpha": torch.tensor(2, dtype=dtype)}
    other = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    tensors |= {f"{other}.lora_down.weight": down[:, :48].clone(), f"{other}.lora_up.weight": up[:48].clone(),
                f"{other}.alpha": torch.tensor([3.0], dtype=dtype)}
    path = tmp_path / "a.safetensors"
    write_safetensors(path, tensors)
    [report] = info_json(path)
    assert report["network"]["alpha"] == {"min": 2, "median": 2.5, "max": 3}


def test_unknown_architecture_network(tmp_path):
    tensors = {"lora_unet_blocks_0_attn_qkv.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_blocks_0_attn_qkv.lora_up.weight": torch.zeros(24, 2),
               "lora_unet_blocks_0_attn_qkv.alpha": torch.tensor(1.0)}
    path = tmp_path / "u.safetensors"
    write_safetensors(path, tensors)
    [report] = info_json(path)
    assert (report["kind"], report["architecture"], report["layout"]) == ("network", "unknown", "kohya")
    assert report["network"]["components"] == {"unet": 1}
    assert report["network"]["rank"] == {"min": 2, "median": 2, "max": 2}
    human = run_info(path).stdout
    assert "architecture  unknown" in human


def test_peft_adapter_config_is_reported(tmp_path):
    path = testing.build_network(tmp_path / "adapter_model.safetensors", "sd1", layout="peft", factor=16)
    [report] = info_json(path)
    assert any("no adapter config" in note for note in report["notes"])
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 2}))
    [report] = info_json(path)
    assert "adapter_config.json: r=4, lora_alpha=2" in report["notes"]
    meta = {"unet_lora_adapter_metadata": json.dumps({"r": 8, "lora_alpha": 8, "rank_pattern": {"a": 4}})}
    other = testing.build_network(tmp_path / "d.safetensors", "sd1", layout="diffusers", factor=16, metadata=meta)
    [report] = info_json(other)
    assert "unet_lora_adapter_metadata: r=8, lora_alpha=8, rank/alpha patterns" in report["notes"]


def test_text_encoder_only_checkpoint(tmp_path):
    path = testing.build_checkpoint(tmp_path / "te.safetensors", "sd2", components=["clip_h"], factor=16)
    [report] = info_json(path)
    assert (report["kind"], report["architecture"], report["checkpoint"]["text_encoder_only"]) == ("checkpoint", "sd2", True)
    assert "text encoders only" in run_info(path).stdout


def test_peft_dora_magnitude_is_output_axis(tmp_path):
    path = testing.build_network(tmp_path / "d.safetensors", "sd1", layout="diffusers", modules="c3lier", dora=True,
                                 components=["unet"], factor=16)
    [report] = info_json(path)
    network = report["network"]
    assert network["dora"] and network["dora_axes"] == {"out": network["modules"]}
    assert network["invalid_module_count"] == 0


def test_stdin_names_keep_their_spaces_and_crlf_is_a_line_end(tmp_path, models):
    spaced = tmp_path / " spaced .safetensors"
    spaced.write_bytes(Path(models["sd1"]).read_bytes())
    result = run_info("-", "--json", stdin=f"{spaced}\r\n\n{models['flux']}\n")
    assert result.exit_code == 0, result.stderr
    assert [r["path"] for r in json.loads(result.stdout)] == [str(spaced), str(models["flux"])]


def test_hash_of_a_pickle_shows_its_autov2(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(2)}, path)
    result = run_info(path, "--hash")
    assert result.exit_code == 0, result.stderr
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert "AutoV2" in result.stdout and digest[:10] in result.stdout


def test_loha_convs_are_counted_like_lora_ones(tmp_path):
    """LoHa stores a conv's factors flattened (no kernel in the shapes): the target layer says it is a conv."""
    from lytools.testing import build_network

    counts = {}
    for algo in ("lora", "loha"):
        path = build_network(tmp_path / f"{algo}.safetensors", "sd1", factor=8, rank=4, modules="c3lier", algo=algo)
        [report] = info_json(path)
        counts[algo] = report["network"]["conv_modules"]
    assert counts["loha"] == counts["lora"] and counts["lora"]["kxk"] > 0 and counts["lora"]["1x1"] > 0
