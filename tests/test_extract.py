"""`lytools extract` end to end on synthetic checkpoint pairs with a known change (lytools.testing):
names, metadata, merge-back within the SVD bound, rank modes, skips, errors, architectures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lytools.algos import delta, group_keys, load_module
from lytools.arch import Resolver, module_table
from lytools.cli import main
from lytools.extract import ExtractOptions, FactorOptions, RankRule, extract
from lytools.extract.pipeline import read_module
from lytools.io import SafetensorsWriter, file_hashes, open_file, plan_entry, read_header
from lytools.testing import build_checkpoint, build_network, build_tuned, select_modules


# modules the synthetic fine-tune leaves unchanged (so extract must report them, not write them)
UNCHANGED = ("lora_te_text_model_encoder_layers_11_mlp_fc1", "lora_te_text_model_encoder_layers_11_mlp_fc2")


@pytest.fixture(scope="module")
def sd1_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("extract-sd1")
    base = build_checkpoint(folder / "base.safetensors", "sd1", factor=8, components=("unet", "clip_l"))
    modules = [m for m in select_modules("sd1", "c3lier") if m not in UNCHANGED]
    network = build_network(folder / "net.safetensors", "sd1", factor=8, rank=4, modules=modules)
    tuned = build_tuned(base, folder / "tuned.safetensors", network, noise=2e-4, seed=1)
    return folder, base, tuned.path


@pytest.fixture(scope="module")
def sd1_extracted(sd1_pair):
    folder, base, tuned = sd1_pair
    out = folder / "lora.safetensors"
    report = folder / "report.json"
    code = None
    try:
        main(["extract", str(base), str(tuned), str(out), "--linear-dim", "8", "--conv-dim", "8",
              "--report", str(report), "--verify", "-q"])
    except SystemExit as exc:  # pragma: no cover - a failure shows in the assertion below
        code = exc.code
    assert code is None
    return out, json.loads(report.read_text())


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def difference(base, tuned, name: str) -> torch.Tensor:
    header_b, header_t = read_header(base), read_header(tuned)
    resolved_b = Resolver(header_b.tensors).resolve(name)
    resolved_t = Resolver(header_t.tensors).resolve(name)
    with open_file(base) as fb, open_file(tuned) as ft:
        fb.keys_set, ft.keys_set = set(fb.keys()), set(ft.keys())
        return read_module(ft, resolved_t.placements, resolved_t.shape) - read_module(fb, resolved_b.placements, resolved_b.shape)


def test_sd1_output_names_alpha_and_dtypes(sd1_pair, sd1_extracted):
    out, report = sd1_extracted
    table = module_table("sd1")
    with open_file(out) as lora:
        groups = group_keys(lora.keys())
        assert not groups.stray
        expected = set(table) - set(UNCHANGED)
        assert set(groups.modules) == expected
        for name in ("lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_up_blocks_1_resnets_0_conv1",
                     "lora_te_text_model_encoder_layers_0_self_attn_q_proj"):
            keys = groups.modules[name]
            assert set(keys) == {"lora_down.weight", "lora_up.weight", "alpha"}
            alpha = lora.get(keys["alpha"])
            assert alpha.shape == () and float(alpha) == 8.0
            assert lora.get(keys["lora_up.weight"]).dtype == torch.float16
        assert lora.get("lora_unet_up_blocks_1_resnets_0_conv1.lora_down.weight").shape == (8, 320, 3, 3)
        assert lora.get("lora_unet_up_blocks_1_resnets_0_conv1.lora_up.weight").shape == (160, 8, 1, 1)
        assert lora.get("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight").shape == (8, 40, 1, 1)


def test_sd1_metadata_is_what_sd_scripts_writes_plus_provenance(sd1_pair, sd1_extracted):
    folder, base, tuned = sd1_pair
    out, _ = sd1_extracted
    metadata = read_header(out).metadata
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "8" and metadata["ss_network_alpha"] == "8.0"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "8.0"}
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == "lora"
    assert metadata["sshs_model_hash"] == file_hashes(out).data_sha256
    sources = json.loads(metadata["lytools.sources"])
    assert [s["name"] for s in sources] == ["base.safetensors", "tuned.safetensors"]
    assert sources[0]["autov3"] == file_hashes(base).autov3
    assert sources[1]["autov3"] == file_hashes(tuned).autov3  # each input hashed on its own thread
    assert metadata["lytools.command"].startswith("lytools ") and metadata["lytools.version"]


def test_sd1_merged_back_reproduces_the_difference_within_the_svd_bound(sd1_pair, sd1_extracted):
    folder, base, tuned = sd1_pair
    out, report = sd1_extracted
    rows = {row["name"]: row for row in report["modules"]}
    with open_file(out) as lora:
        groups = group_keys(lora.keys())
        for name in ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
                     "lora_unet_up_blocks_2_resnets_1_conv2", "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
                     "lora_te_text_model_encoder_layers_3_mlp_fc2"):
            change = difference(base, tuned, name)
            rebuilt = delta(load_module(lora, name, groups.modules[name]), change.shape)
            sigma = torch.linalg.svdvals(change.reshape(change.shape[0], -1).double())
            bound = math.sqrt(float(sigma[8:].square().sum() / sigma.square().sum()))
            error = relative(rebuilt, change)
            assert error <= 1.01 * bound + 2e-3, name  # + fp16 rounding of the factors
            assert rows[name]["rel_error"] == pytest.approx(error, abs=1e-4)


def test_sd1_report_lists_every_module_and_the_unchanged_ones(sd1_extracted):
    _, report = sd1_extracted
    rows = {row["name"]: row for row in report["modules"]}
    assert len(rows) == len(module_table("sd1"))
    for name in UNCHANGED:
        assert rows[name]["stored"] == "skipped" and "identical" in rows[name]["reason"]
    stored = [row for row in rows.values() if row["stored"] == "lora"]
    assert all(row["rank"] == 8 and row["alpha"] == 8.0 for row in stored)
    assert all(0.99 < row["retained_energy"] <= 1.0 for row in stored)
    assert report["summary"]["skipped"] == 2 and report["summary"]["extracted"] == len(stored)


def test_ratio_mode_with_max_rank_picks_the_svdvals_rank(sd1_pair, tmp_path):
    folder, base, tuned = sd1_pair
    result = extract(base, tuned, tmp_path / "ratio.safetensors",
                     ExtractOptions(linear=RankRule("ratio", 0.05, max_rank=6), conv=RankRule("fixed", 0),
                                    unet=False, factor=FactorOptions(full_fallback=False)))
    records = {r.name: r for r in result.records}
    for name in ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_5_mlp_fc1"):
        sigma = torch.linalg.svdvals(difference(base, tuned, name).double())
        expected = min(6, max(1, int((sigma > 0.05 * sigma[0]).sum())))
        assert records[name].rank == expected == 4  # the synthetic change has rank 4
    assert result.summary.extracted == 72 - len(UNCHANGED)
    assert read_header(result.output).metadata["ss_network_dim"] == "Dynamic"


def test_conv_dim_zero_skips_kxk_convs_and_csv_report(sd1_pair, tmp_path, capsys):
    folder, base, tuned = sd1_pair
    out, report = tmp_path / "noconv.safetensors", tmp_path / "report.csv"
    main(["extract", str(base), str(tuned), str(out), "--conv-dim", "0", "--no-text-encoder", "--linear-dim", "4",
          "--report", str(report), "--save-dtype", "bf16"])
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "modules extracted" in captured.err and "retained energy" in captured.err
    assert "sparse corrections" not in captured.err
    with open_file(out) as lora:
        names = set(group_keys(lora.keys()).modules)
        assert not any(name.startswith("lora_te_") for name in names)
        assert "lora_unet_down_blocks_0_resnets_0_conv1" not in names
        assert "lora_unet_down_blocks_0_resnets_0_time_emb_proj" in names  # a linear inside a resnet
        assert lora.get("lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_up.weight").dtype == torch.bfloat16
    lines = report.read_text().splitlines()
    assert lines[0].startswith("name,component,kind,shape,stored,rank,alpha,rel_error,retained_energy")
    assert any("conv dim 0" in line for line in lines)


def test_min_diff_skips_small_changes_and_nothing_left_is_an_error(sd1_pair, tmp_path, capsys):
    folder, base, tuned = sd1_pair
    out = tmp_path / "none.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["extract", str(base), str(tuned), str(out), "--min-diff", "100", "--no-unet", "-q"])
    assert exc.value.code == 1
    assert "no module differs" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_tucker_sparse_bias_and_full_fallback_in_one_file(sd1_pair, tmp_path):
    folder, base, tuned = sd1_pair
    result = extract(base, tuned, tmp_path / "lyco.safetensors",
                     ExtractOptions(linear=RankRule("fixed", 24), conv=RankRule("fixed", 4), text_encoder=False,
                                    factor=FactorOptions(tucker=True, sparse_bias=True, sparsity=0.99), verify=True))
    records = {r.name: r for r in result.records}
    assert records["lora_unet_up_blocks_1_resnets_0_conv1"].stored == "lora+mid"
    assert records["lora_unet_down_blocks_0_attentions_0_proj_in"].stored == "full"  # 24 >= 40/2
    assert records["lora_unet_mid_block_attentions_0_proj_in"].stored == "lora"  # 24 < 160/2
    assert result.verified == result.summary.extracted
    metadata = read_header(result.output).metadata
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["use_tucker"] == "True"
    with open_file(result.output) as lora:
        assert lora.get("lora_unet_up_blocks_1_resnets_0_conv1.lora_mid.weight").shape == (4, 4, 3, 3)
        assert "lora_unet_down_blocks_0_attentions_0_proj_in.diff" in set(lora.keys())
        assert "lora_unet_mid_block_attentions_0_proj_in.bias_indices" in set(lora.keys())


def test_module_missing_from_tuned_is_reported_and_different_archs_are_an_error(sd1_pair, tmp_path, capsys):
    folder, base, tuned = sd1_pair
    dropped = "cond_stage_model.transformer.text_model.encoder.layers.2.mlp.fc1.weight"
    partial = tmp_path / "partial.safetensors"
    with open_file(tuned) as source:
        entries = [plan_entry(i.name, i.dtype, i.shape) for i in source.infos() if i.name != dropped]
        with SafetensorsWriter(partial, entries, source.metadata) as writer:
            for name in writer.order:
                writer.write(name, source.get(name))
    result = extract(base, partial, tmp_path / "p.safetensors", ExtractOptions(unet=False, linear=RankRule("fixed", 4)))
    skipped = {r.name: r.reason for r in result.records if r.stored == "skipped"}
    assert skipped["lora_te_text_model_encoder_layers_2_mlp_fc1"] == "only in base.safetensors"
    assert result.summary.skip_reasons["in one file only"] == 1

    other = build_checkpoint(tmp_path / "sd2.safetensors", "sd2", factor=16, components=("unet",))
    out = tmp_path / "x.safetensors"
    with pytest.raises(SystemExit) as exc:
        main(["extract", str(base), str(other), str(out)])
    assert exc.value.code == 1
    error = capsys.readouterr().err.strip()
    assert "different architectures" in error and error.count("\n") == 0 and not out.exists()


def test_unknown_architecture_uses_generic_names(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = {
        "encoder.blocks.0.fc.weight": torch.randn(48, 64, generator=generator),
        "encoder.blocks.0.fc.bias": torch.randn(48, generator=generator),
        "diffusion_model.conv.weight": torch.randn(32, 16, 3, 3, generator=generator),
        "only_base.weight": torch.randn(8, 8, generator=generator),
        "resized.weight": torch.randn(8, 8, generator=generator),
    }
    tuned = {k: v.clone() for k, v in base.items() if k != "only_base.weight"}
    tuned["encoder.blocks.0.fc.weight"] += torch.randn(48, 2) @ torch.randn(2, 64) * 0.1
    tuned["diffusion_model.conv.weight"] += (torch.randn(32, 2) @ torch.randn(2, 144) * 0.1).reshape(32, 16, 3, 3)
    tuned["resized.weight"] = torch.randn(8, 9)
    from lytools.io import write_safetensors

    write_safetensors(tmp_path / "a.safetensors", base)
    write_safetensors(tmp_path / "b.safetensors", tuned)
    result = extract(tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "g.safetensors",
                     ExtractOptions(linear=RankRule("fixed", 2), conv=RankRule("fixed", 2), verify=True))
    stored = {r.name: r for r in result.records}
    assert stored["lora_unet_encoder_blocks_0_fc"].rank == 2
    assert stored["lora_unet_encoder_blocks_0_fc"].rel_error < 1e-3
    assert stored["lora_unet_conv"].kind == "conv3x3" and stored["lora_unet_conv"].rank == 2
    assert stored["lora_unet_only_base"].stored == "skipped" and "only in BASE" in stored["lora_unet_only_base"].reason
    assert stored["lora_unet_resized"].stored == "skipped" and "shape" in stored["lora_unet_resized"].reason
    metadata = read_header(result.output).metadata
    assert "ss_base_model_version" not in metadata and "modelspec.architecture" not in metadata


def test_cli_rejects_options_that_would_be_ignored(sd1_pair, tmp_path, capsys):
    folder, base, tuned = sd1_pair
    for args in (["--sparsity", "0.9"], ["--no-unet", "--no-text-encoder"], ["--mode", "ratio"],
                 ["--mode", "fixed", "--linear-quantile", "0.5"], ["--max-rank", "4"], ["--report", "x.txt"],
                 ["--mode", "full", "--tucker"], ["--mode", "full", "--clamp-quantile", "0.99"],
                 ["--mode", "full", "--sparse-bias"], ["--mode", "full", "--no-full-fallback"]):
        with pytest.raises(SystemExit) as exc:
            main(["extract", str(base), str(tuned), str(tmp_path / "o.safetensors"), *args])
        assert exc.value.code in (1, 2), args
        assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_sd2_fused_qkv_becomes_three_modules(tmp_path):
    base = build_checkpoint(tmp_path / "base.safetensors", "sd2", factor=16, components=("unet", "clip_h"))
    modules = select_modules("sd2", "lierla", components=("te",))[:30]
    network = build_network(tmp_path / "net.safetensors", "sd2", factor=16, rank=2, modules=modules)
    tuned = build_tuned(base, tmp_path / "tuned.safetensors", network)
    result = extract(base, tuned.path, tmp_path / "out.safetensors",
                     ExtractOptions(linear=RankRule("fixed", 2), unet=False, verify=True))
    names = {r.name for r in result.records if r.stored == "lora"}
    assert {"lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_0_self_attn_k_proj",
            "lora_te_text_model_encoder_layers_0_self_attn_v_proj"} <= names
    assert names == set(modules)
    fused = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    with open_file(base) as fb, open_file(tuned.path) as ft, open_file(result.output) as lora:
        change = (ft.get(fused).float() - fb.get(fused).float())
        width = change.shape[1]
        groups = group_keys(lora.keys())
        for index, part in enumerate("qkv"):
            name = f"lora_te_text_model_encoder_layers_0_self_attn_{part}_proj"
            rebuilt = delta(load_module(lora, name, groups.modules[name]), (width, width))
            assert relative(rebuilt, change[index * width:(index + 1) * width]) < 2e-3
    assert read_header(result.output).metadata["ss_v2"] == "True"


def test_sdxl_two_text_encoders_and_sgm_unet_names(tmp_path):
    base = build_checkpoint(tmp_path / "base.safetensors", "sdxl", factor=32, components=("unet", "clip_l", "clip_g"))
    picked = [m for m in select_modules("sdxl", "lierla") if m.endswith(("layers_0_self_attn_k_proj", "layers_0_mlp_fc1"))
              or m.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1")]
    network = build_network(tmp_path / "net.safetensors", "sdxl", factor=32, rank=2, modules=picked)
    tuned = build_tuned(base, tmp_path / "tuned.safetensors", network)
    result = extract(base, tuned.path, tmp_path / "out.safetensors", ExtractOptions(linear=RankRule("fixed", 2), verify=True))
    names = {r.name for r in result.records if r.stored != "skipped"}
    assert names == set(picked)
    assert {"lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_0_self_attn_k_proj",
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"} <= names
    metadata = read_header(result.output).metadata
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_flux_fused_modules_pair_across_layouts(tmp_path):
    base = build_checkpoint(tmp_path / "base.safetensors", "flux", factor=32, components=("unet",), keep_blocks=1)
    picked = ["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1", "lora_unet_double_blocks_0_txt_mlp_0"]
    network = build_network(tmp_path / "net.safetensors", "flux", factor=32, rank=2, modules=picked)
    tuned = build_tuned(base, tmp_path / "tuned.safetensors", network)
    # the same fine-tune in diffusers names (q, k, v as separate tensors) pairs with the BFL base
    diffusers_tuned = tmp_path / "tuned-diffusers.safetensors"
    resolver = Resolver(read_header(tuned.path).tensors)
    diffusers_base = build_checkpoint(tmp_path / "db.safetensors", "flux", factor=32, layout="diffusers", keep_blocks=1)
    diffusers_resolver = Resolver(read_header(diffusers_base).tensors)
    with open_file(tuned.path) as source, open_file(diffusers_base) as shape_source:
        writes: dict[str, torch.Tensor] = {}
        for name in module_table("flux"):
            target = diffusers_resolver.resolve(name)
            native = resolver.resolve(name)
            if target is None or native is None:
                continue
            full = source.get(native.key)
            for placement in target.placements:
                rows = placement.module_rows or (0, full.shape[0])
                writes[placement.key] = full[rows[0]:rows[1]].clone()
        for key in shape_source.keys():
            writes.setdefault(key, shape_source.get(key).clone())
    from lytools.io import write_safetensors

    write_safetensors(diffusers_tuned, writes)
    for tuned_path in (tuned.path, diffusers_tuned):
        result = extract(base, tuned_path, tmp_path / f"out-{tuned_path.stem}.safetensors",
                         ExtractOptions(linear=RankRule("fixed", 2), verify=True))
        names = {r.name for r in result.records if r.stored != "skipped"}
        assert names == set(picked), tuned_path.name
        with open_file(result.output) as lora:
            assert lora.get("lora_unet_single_blocks_0_linear1.lora_up.weight").shape == (21504 // 32, 2)
        assert read_header(result.output).metadata["modelspec.architecture"] == "flux-1-dev/lora"


def test_a_module_that_cannot_be_decomposed_is_reported_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    from lytools.extract import factor as factor_module
    from lytools.extract.svd import SvdFailure
    from lytools.io import write_safetensors

    generator = torch.Generator().manual_seed(3)
    base = {f"blocks.{i}.fc.weight": torch.randn(24, 40, generator=generator) for i in range(3)}
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in base.items()}
    tuned["blocks.1.fc.weight"][0, 0] = float("nan")
    write_safetensors(tmp_path / "a.safetensors", base)
    write_safetensors(tmp_path / "b.safetensors", tuned)
    real = factor_module.fixed_rank

    def failing(matrix, rank, **kwargs):
        if matrix.shape == (24, 40) and float(matrix[0, 1]) == float(tuned["blocks.2.fc.weight"][0, 1] - base["blocks.2.fc.weight"][0, 1]):
            raise SvdFailure("every decomposition failed: LAPACK did not converge")
        return real(matrix, rank, **kwargs)

    monkeypatch.setattr(factor_module, "fixed_rank", failing)
    out = tmp_path / "o.safetensors"
    main(["extract", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), str(out), "--linear-dim", "4",
          "--report", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert "could not be decomposed" in err
    rows = {row["name"]: row for row in json.loads((tmp_path / "r.json").read_text())["modules"]}
    assert rows["lora_unet_blocks_0_fc"]["stored"] == "lora"
    assert "NaN" in rows["lora_unet_blocks_1_fc"]["reason"]
    assert rows["lora_unet_blocks_2_fc"]["reason"].startswith("decomposition failed")
    with open_file(out) as lora:
        assert set(group_keys(lora.keys()).modules) == {"lora_unet_blocks_0_fc"}


def test_prefetch_keeps_order_and_hands_reader_errors_to_the_caller(sd1_pair):
    from lytools.extract.pipeline import _prefetch, _Source
    from lytools.extract.plan import PairedModule
    from lytools.arch import Placement

    folder, base, tuned = sd1_pair
    source_b, source_t = _Source(base), _Source(tuned)
    try:
        key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
        shape = tuple(read_header(base).tensors[key].shape)
        good = [PairedModule(f"m{i}", "te", "linear", shape, (Placement(key),), (Placement(key),)) for i in range(5)]
        names = [loaded.module.name for loaded in _prefetch(good, source_b, source_t, False, lambda m: False)]
        assert names == [m.name for m in good]
        broken = good[:2] + [PairedModule("bad", "te", "linear", shape, (Placement("no.such.key"),), (Placement(key),))]
        with pytest.raises(Exception, match="no.such.key"):
            for _ in _prefetch(broken, source_b, source_t, False, lambda m: False):
                pass
    finally:
        source_b.close()
        source_t.close()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without CUDA gives")
def test_cuda_request_without_cuda_is_a_clear_error(sd1_pair, tmp_path, capsys):
    folder, base, tuned = sd1_pair
    with pytest.raises(SystemExit) as exc:
        main(["extract", str(base), str(tuned), str(tmp_path / "o.safetensors"), "--device", "cuda"])
    assert exc.value.code == 1
    assert "CUDA is not available" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_sparse_bias_says_which_loaders_apply_it(sd1_pair, tmp_path, capsys):
    folder, base, tuned = sd1_pair
    out = tmp_path / "sparse.safetensors"
    main(["extract", str(base), str(tuned), str(out), "--no-unet", "--linear-dim", "2", "--sparse-bias"])
    captured = capsys.readouterr()
    assert captured.out.strip() == str(out)
    assert "sparse corrections (bias_indices/bias_values/bias_size) are applied by lytools merge only" in captured.err
    # the text encoders alone hold no kxk conv: the conv rule is not announced
    assert "(linear fixed 2)" in captured.err and "conv fixed" not in captured.err
    with open_file(out) as lora:
        assert any(key.endswith(".bias_indices") for key in lora.keys())


def test_arch_that_contradicts_the_checkpoints_is_refused(sd1_pair, tmp_path, capsys):
    folder, base, tuned = sd1_pair
    for forced in ("sdxl", "sd2"):
        out = tmp_path / f"{forced}.safetensors"
        with pytest.raises(SystemExit) as raised:
            main(["extract", str(base), str(tuned), str(out), "--arch", forced])
        assert raised.value.code == 1 and not out.exists()
        assert f"is sd1 by its keys, not {forced}" in capsys.readouterr().err
    main(["extract", str(base), str(tuned), str(tmp_path / "sd1.safetensors"), "--arch", "sd1", "--no-unet", "-q"])
    assert (tmp_path / "sd1.safetensors").is_file()


def test_a_network_given_as_a_checkpoint_is_named(sd1_pair, tmp_path, capsys):
    folder, base, tuned = sd1_pair
    network = build_network(tmp_path / "lora.safetensors", "sd1", rank=4)
    for pair in ((network, tuned), (base, network)):
        with pytest.raises(SystemExit) as raised:
            main(["extract", str(pair[0]), str(pair[1]), str(tmp_path / "x.safetensors")])
        assert raised.value.code == 1
        assert "lora.safetensors is a network (LoRA/LyCORIS), not a checkpoint" in capsys.readouterr().err
