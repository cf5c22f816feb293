"""--save-dtype and input dtypes across commands: casts round to nearest like torch, values beyond the
output dtype's range saturate with a warning (never a silent inf), fp8 networks are read, alphas
stay exact, and a streamed cast recomputes embedded sshs hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save

from lytools.cli import cli
from lytools.io import write_safetensors
from lytools.io.dtypes import saturating_cast
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors

NAME = "lora_te_text_model_encoder_layers_1_mlp_fc2"
OTHER = "lora_te_text_model_encoder_layers_2_self_attn_q_proj"
TOUCHED = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"
UNTOUCHED = "cond_stage_model.transformer.text_model.encoder.layers.0.layer_norm1.weight"


def lytools(*args: str):
    result = CliRunner().invoke(cli, [str(a) for a in args], prog_name="lytools")
    assert result.exit_code == 0, result.output
    return result


def all_finite(path: Path) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in load_file(path).values() if t.is_floating_point())


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dtype")
    base = read_tensors(build_checkpoint(folder / "b.safetensors", "sd1", factor=16, components=("clip_l",),
                                         dtype=torch.float32))
    base[TOUCHED][0, 0] = 1e6
    base[UNTOUCHED][0] = -2e5
    write_safetensors(folder / "big.safetensors", base)
    net = read_tensors(build_network(folder / "n.safetensors", "sd1", factor=16, rank=4, alpha=3.0,
                                     modules=[NAME, OTHER], dtype=torch.float32))
    net[f"{NAME}.lora_up.weight"][0, 0] = 1e5
    write_safetensors(folder / "bignet.safetensors", net)
    return folder


def test_saturating_cast_matches_torch_in_range():
    values = torch.tensor([1e6, 65519.0, -7e4, float("inf"), float("nan"), 1e-9, 3.0, 6e-8])
    for dtype, limit in ((torch.float16, 65504.0), (torch.float8_e4m3fn, 448.0), (torch.float8_e5m2, 57344.0)):
        out, beyond = saturating_cast(values, dtype)
        assert beyond
        inside = values.abs() <= limit
        assert torch.equal(out.float()[inside], values.to(dtype).float()[inside])  # round to nearest, subnormals too
        assert out.float()[0] == limit and out.float()[2] == -limit
        if dtype != torch.float8_e4m3fn:  # e4m3fn has no inf; torch maps it to 448
            assert out.float()[3] == float("inf")
    out, beyond = saturating_cast(values.bfloat16(), torch.float16)  # 65504 is not a bf16 value
    assert beyond and out.float()[1] == 65504.0
    small = torch.randn(100)
    out, beyond = saturating_cast(small, torch.float16)
    assert not beyond and torch.equal(out, small.half())
    assert saturating_cast(torch.arange(3), torch.float16)[1] is False


def test_convert_checkpoint_cast_saturates_fp16(files, tmp_path):
    out = tmp_path / "c.safetensors"
    result = lytools("convert", files / "big.safetensors", "-o", out, "--save-dtype", "fp16")
    assert "2 tensors had values beyond the F16 range and were saturated to ±65504" in result.stderr
    source, written = load_file(files / "big.safetensors"), load_file(out)
    assert written[TOUCHED][0, 0] == 65504 and written[UNTOUCHED][0] == -65504
    for key, tensor in source.items():
        if tensor.is_floating_point():
            expected = tensor.clamp(-65504, 65504).half()
            assert torch.equal(written[key], expected), key
        else:  # position_ids keep their dtype and values
            assert written[key].dtype == tensor.dtype and torch.equal(written[key], tensor)


@pytest.mark.parametrize("target, dtype", [("kohya", "fp8_e5m2"), ("diffusers", "fp16"), ("kohya", "fp16")])
def test_convert_layout_with_save_dtype_saturates(files, tmp_path, target, dtype):
    out = tmp_path / "c.safetensors"
    result = lytools("convert", files / "bignet.safetensors", "--to", target, "-o", out, "--save-dtype", dtype)
    assert "beyond the output dtype's range and were saturated" in result.stderr
    assert all_finite(out)


def test_cast_of_a_file_with_sshs_hashes_streams_and_rehashes(files, tmp_path, monkeypatch):
    import lytools.convert.run as run

    def whole_file_in_memory(*args, **kwargs):
        raise AssertionError("cast_file must stream, not gather every tensor for write_network")

    monkeypatch.setattr(run, "write_network", whole_file_in_memory)
    source = tmp_path / "s.safetensors"
    tensors = {k: (v.bfloat16() if v.is_floating_point() else v) for k, v in load_file(files / "b.safetensors").items()}
    write_safetensors(source, tensors, {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "1" * 8, "ss_x": "1"})
    out = tmp_path / "o.safetensors"
    lytools("convert", source, "-o", out, "--save-dtype", "fp32")
    written = load_file(out)
    assert out.stat().st_size > 0x110000  # the legacy window lies inside the data
    from safetensors import safe_open

    with safe_open(out, "pt") as handle:
        meta = handle.metadata()
    # sd-scripts: the bytes safetensors writes with only the ss_* metadata
    data = save(written, {"ss_x": "1"})
    start = 8 + int.from_bytes(data[:8], "little")
    assert meta["sshs_model_hash"] == hashlib.sha256(data[start:]).hexdigest()
    assert meta["sshs_legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_merge_into_checkpoint_saturates_touched_and_untouched(files, tmp_path):
    out = tmp_path / "m.safetensors"
    result = lytools("merge", files / "big.safetensors", files / "n.safetensors", "-o", out,
                     "--save-dtype", "fp16", "--json", "--allow-unmatched")
    report = json.loads(result.stdout)
    assert sorted(report["saturated"]) == sorted([TOUCHED, UNTOUCHED])
    assert "2 tensor(s) had values beyond the range of their output dtype" in result.stderr
    assert all_finite(out)
    # the rest: the float32 merge cast once (compare with the fp32 result cast by torch)
    wide = tmp_path / "w.safetensors"
    lytools("merge", files / "big.safetensors", files / "n.safetensors", "-o", wide, "--save-dtype", "fp32", "-q")
    narrow, exact = load_file(out), load_file(wide)
    for key, tensor in exact.items():
        if tensor.is_floating_point():
            assert torch.equal(narrow[key], tensor.clamp(-65504, 65504).half()), key


def test_merge_networks_saturates(files, tmp_path):
    out = tmp_path / "m.safetensors"
    result = lytools("merge", files / "bignet.safetensors", files / "n.safetensors", "-o", out, "--save-dtype", "fp16")
    assert f"1 tensor(s) had values beyond the range of the output dtype and were saturated to its largest value, " \
        f"not written as inf (e.g. {NAME}.lora_up.weight)" in result.stderr
    assert all_finite(out)


def test_resize_saturates(files, tmp_path):
    out = tmp_path / "r.safetensors"
    result = lytools("resize", files / "bignet.safetensors", out, "--rank", "8", "--save-dtype", "fp16")
    assert f"were saturated to its largest value, not written as inf (e.g. {NAME})" in result.stderr
    assert all_finite(out)


def test_extract_saturates(files, tmp_path):
    out = tmp_path / "x.safetensors"
    result = lytools("extract", files / "b.safetensors", files / "big.safetensors", out, "--mode", "full")
    assert "values beyond the range of --save-dtype F16 and were saturated" in result.stderr
    assert all_finite(out)


def test_extract_alpha_exact_where_the_save_dtype_rounds_it():
    from lytools.extract.factor import FactorOptions, extract_module
    from lytools.extract.ranks import RankRule

    delta = torch.randn(600, 600)
    for dtype in (torch.bfloat16, torch.float16):
        extracted = extract_module("m", delta, RankRule("fixed", 257), FactorOptions(save_dtype=dtype, randomized=False))
        alpha = extracted.tensors["alpha"]
        assert float(alpha) == 257 and alpha.dim() == 0  # bf16 would store 256: every scale off by 0.4%
        assert alpha.dtype == (torch.float32 if dtype == torch.bfloat16 else torch.float16)
        assert extracted.tensors["lora_up.weight"].dtype == dtype


def test_fp8_networks_are_read(files, tmp_path):
    tensors = load_file(files / "n.safetensors")
    fp8 = {k: (v if k.endswith("alpha") else v.to(torch.float8_e4m3fn)) for k, v in tensors.items()}
    source = tmp_path / "f8.safetensors"
    write_safetensors(source, fp8)
    lytools("resize", source, tmp_path / "r.safetensors", "--rank", "2", "--save-dtype", "fp16", "-q")
    lytools("merge", source, files / "n.safetensors", "-o", tmp_path / "m.safetensors", "--save-dtype", "fp16", "-q")
    lytools("merge", files / "b.safetensors", source, "-o", tmp_path / "c.safetensors", "-q", "--allow-unmatched")
    info = lytools("info", tmp_path / "r.safetensors", tmp_path / "m.safetensors")
    assert "F16" in info.stdout


def test_resize_of_dora_keeps_the_factor_dtype(tmp_path):
    base = build_checkpoint(tmp_path / "b.safetensors", "sd1", factor=16, components=("clip_l",), dtype=torch.float32)
    net = build_network(tmp_path / "d.safetensors", "sd1", factor=16, rank=4, modules=[NAME], dtype=torch.bfloat16,
                        dora=True)
    assert load_file(net)[f"{NAME}.dora_scale"].dtype == torch.float32  # the magnitude is kept wider
    out = tmp_path / "r.safetensors"
    lytools("resize", net, out, "--rank", "2", "--base", base, "-q")
    written = load_file(out)
    assert written[f"{NAME}.lora_up.weight"].dtype == torch.bfloat16  # was float32: the magnitude's dtype


def test_merge_networks_default_dtype_is_the_factors_not_a_dora_magnitude(tmp_path):
    dora = build_network(tmp_path / "d.safetensors", "sd1", factor=16, rank=4, modules=[NAME], dtype=torch.bfloat16,
                         dora=True)
    plain = build_network(tmp_path / "p.safetensors", "sd1", factor=16, rank=4, modules=[OTHER], dtype=torch.bfloat16)
    out = tmp_path / "m.safetensors"
    lytools("merge", dora, plain, "-o", out, "-q")
    written = load_file(out)
    assert written[f"{OTHER}.lora_up.weight"].dtype == torch.bfloat16  # was float32, the magnitude's dtype
    assert written[f"{NAME}.dora_scale"].dtype == torch.float32


def test_folding_into_fp8_factors_is_said(files, tmp_path):
    tensors = load_file(files / "n.safetensors")  # alpha 3, rank 4: scale 0.75 is no power of two
    source = tmp_path / "f8.safetensors"
    write_safetensors(source, {k: (v if k.endswith("alpha") else v.to(torch.float8_e4m3fn)) for k, v in tensors.items()})
    folded = lytools("convert", source, "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    assert "fp8 factors: folding alpha/rank rounds them to fp8 again" in folded.stderr
    kept = lytools("convert", source, "--to", "diffusers", "--no-fold", "-o", tmp_path / "k.safetensors")
    assert "fp8 again" not in kept.stderr
    wider = lytools("convert", source, "--to", "diffusers", "--save-dtype", "fp16", "-o", tmp_path / "w.safetensors")
    assert "fp8 again" not in wider.stderr


@pytest.mark.parametrize("to", [None, "kohya"])
def test_an_alpha_the_save_dtype_would_round_stays_float32(files, tmp_path, to):
    tensors = load_file(files / "n.safetensors")
    tensors[f"{NAME}.alpha"] = torch.tensor(0.1)  # bf16 holds 0.10009765625: the scale would move 0.1%
    tensors[f"{OTHER}.alpha"] = torch.tensor(3.0)
    source = tmp_path / "a.safetensors"
    write_safetensors(source, tensors)
    out = tmp_path / "o.safetensors"
    lytools("convert", source, "-o", out, "--save-dtype", "bf16", *(["--to", to] if to else []), "-q")
    written = load_file(out)
    assert written[f"{NAME}.alpha"].dtype == torch.float32 and float(written[f"{NAME}.alpha"]) == float(torch.tensor(0.1))
    assert written[f"{OTHER}.alpha"].dtype == torch.bfloat16 and float(written[f"{OTHER}.alpha"]) == 3.0
    assert written[f"{NAME}.lora_up.weight"].dtype == torch.bfloat16
    assert torch.equal(written[f"{NAME}.lora_up.weight"], tensors[f"{NAME}.lora_up.weight"].bfloat16())


@pytest.mark.parametrize("extra", [[], ["--truncate"]])
def test_resize_copy_keeps_an_alpha_the_save_dtype_would_round(files, tmp_path, extra):
    tensors = load_file(files / "n.safetensors")
    tensors[f"{NAME}.alpha"] = torch.tensor(0.1)
    source = tmp_path / "a.safetensors"
    write_safetensors(source, tensors)
    out = tmp_path / "o.safetensors"
    lytools("resize", source, out, "--rank", "4", "--save-dtype", "bf16", *extra, "-q")  # rank 4: copied as is
    written = load_file(out)
    assert written[f"{NAME}.alpha"].dtype == torch.float32 and float(written[f"{NAME}.alpha"]) == float(torch.tensor(0.1))
    assert torch.equal(written[f"{NAME}.lora_up.weight"], tensors[f"{NAME}.lora_up.weight"].bfloat16())


def test_merge_saturation_of_a_row_sliced_tensor_is_counted_once(tmp_path):
    tensors = read_tensors(build_checkpoint(tmp_path / "b.safetensors", "sd2", factor=16, components=("clip_h",),
                                            dtype=torch.float32))
    key = next(k for k in tensors if k.endswith("resblocks.0.attn.in_proj_weight"))
    tensors[key][-1, 0] = 1e6  # in the v rows; the network changes the q rows
    write_safetensors(tmp_path / "big.safetensors", tensors)
    net = build_network(tmp_path / "n.safetensors", "sd2", factor=16, rank=4, dtype=torch.float32,
                        modules=["lora_te_text_model_encoder_layers_0_self_attn_q_proj"])
    out = tmp_path / "m.safetensors"
    result = lytools("merge", tmp_path / "big.safetensors", net, "-o", out, "--save-dtype", "fp16", "--json")
    assert json.loads(result.stdout)["saturated"] == [key]
    assert "1 tensor(s) had values beyond" in result.stderr
    assert load_file(out)[key][-1, 0] == 65504


def test_merge_networks_copied_module_with_a_ratio_is_cast_once(tmp_path):
    source = build_network(tmp_path / "a.safetensors", "sd1", factor=16, rank=4, alpha=4.0, modules=[NAME],
                           dtype=torch.bfloat16)
    other = build_network(tmp_path / "b.safetensors", "sd1", factor=16, rank=4, modules=[OTHER], dtype=torch.bfloat16)
    out = tmp_path / "m.safetensors"
    lytools("merge", source, other, "-o", out, "--ratios", "0.7", "1", "--save-dtype", "fp32", "-q")
    before, after = load_file(source), load_file(out)
    intended = 0.7 * (before[f"{NAME}.lora_up.weight"].double() @ before[f"{NAME}.lora_down.weight"].double())
    got = after[f"{NAME}.lora_up.weight"].double() @ after[f"{NAME}.lora_down.weight"].double()
    assert float((got - intended).norm() / intended.norm()) < 1e-6  # bf16 in between cost ~1e-3
    default = tmp_path / "d.safetensors"
    lytools("merge", source, other, "-o", default, "--ratios", "0.7", "1", "-q")
    assert load_file(default)[f"{NAME}.lora_up.weight"].dtype == torch.bfloat16


def _scaled_and_true(source: Path, scaled: Path, true: Path) -> None:
    """Write `source` as a scaled-fp8 checkpoint (per-tensor and per-row scales) and its true weights in f32."""
    tensors, out, exact = read_tensors(source), {}, {}
    for index, (key, tensor) in enumerate(sorted(tensors.items())):
        if tensor.dim() == 2 and key.endswith(".weight") and "embedding" not in key:
            if index % 2:
                scale = tensor.abs().amax(dim=1, keepdim=True) / 200.0 + 1e-12  # per row
            else:
                scale = tensor.abs().max().reshape(()) / 200.0
            out[key] = (tensor / scale).to(torch.float8_e4m3fn)
            out[key[: -len(".weight")] + ".scale_weight"] = scale
            exact[key] = out[key].float() * scale
        else:
            out[key] = exact[key] = tensor
    out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    write_safetensors(scaled, out)
    write_safetensors(true, exact)


def test_extract_and_resize_read_scaled_fp8_as_fp8_times_scale(tmp_path):
    from lytools.testing import build_tuned

    base = build_checkpoint(tmp_path / "b.safetensors", "sd2", factor=16, components=("clip_h",), dtype=torch.float32)
    net = build_network(tmp_path / "n.safetensors", "sd2", factor=16, rank=4, dtype=torch.float32,
                        modules=["lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                                 "lora_te_text_model_encoder_layers_1_mlp_fc1"])
    tuned = build_tuned(base, tmp_path / "t.safetensors", net, ratio=30.0).path  # survives fp8 steps
    _scaled_and_true(base, tmp_path / "bs.safetensors", tmp_path / "bt.safetensors")
    _scaled_and_true(tuned, tmp_path / "ts.safetensors", tmp_path / "tt.safetensors")
    for pair, out in (("s", "xs"), ("t", "xt")):
        lytools("extract", tmp_path / f"b{pair}.safetensors", tmp_path / f"t{pair}.safetensors",
                tmp_path / f"{out}.safetensors", "--linear-dim", "4", "--save-dtype", "fp32", "-q")
    scaled, true = load_file(tmp_path / "xs.safetensors"), load_file(tmp_path / "xt.safetensors")
    assert scaled.keys() == true.keys() and all(torch.equal(scaled[k], true[k]) for k in true)  # was ~500x off
    dora = build_network(tmp_path / "d.safetensors", "sd2", factor=16, rank=4, dtype=torch.float32, dora=True,
                         modules=["lora_te_text_model_encoder_layers_0_self_attn_q_proj"])
    for base_file, out in (("bs", "rs"), ("bt", "rt")):
        lytools("resize", dora, tmp_path / f"{out}.safetensors", "--rank", "2", "--base",
                tmp_path / f"{base_file}.safetensors", "-q")
    scaled, true = load_file(tmp_path / "rs.safetensors"), load_file(tmp_path / "rt.safetensors")
    assert all(torch.equal(scaled[k], true[k]) for k in true)


def test_read_weight_slices_a_per_row_scale_with_the_rows(tmp_path):
    from lytools.io import open_file
    from lytools.merge.fp8 import detect_fp8, read_weight

    weight = torch.randn(12, 5)
    scale = weight.abs().amax(dim=1, keepdim=True) / 100.0
    stored = (weight / scale).to(torch.float8_e4m3fn)
    path = tmp_path / "s.safetensors"
    write_safetensors(path, {"a.qkv.weight": stored, "a.qkv.scale_weight": scale, "scaled_fp8": torch.empty(0)})
    with open_file(path) as reader:
        layout = detect_fp8({info.name: info for info in reader.infos()})
        whole = read_weight(reader, layout, "a.qkv.weight")
        assert torch.equal(whole, stored.float() * scale)
        assert torch.equal(read_weight(reader, layout, "a.qkv.weight", (4, 8)), whole[4:8])
