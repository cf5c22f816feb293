"""Audit of `lytools resize` as a kohya/LyCORIS user tests it: the dynamic rank rules of
ALGORITHMS.md 16, figures reported against an independent torch.linalg.svd, metadata that tells the
truth about the written ranks, degenerate modules, flattened conv kernels (spec: ALGORITHMS.md 16,
CLI.md resize, FORMATS.md 5.3)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from lytools.io import open_file, write_safetensors
from lytools.resize import ResizeOptions, resize_file, select_rank
from tests.shared import lycoris_modules, run_lytools, spectrum_factors


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with open_file(path) as reader:
        return {key: reader.get(key).clone() for key in reader.keys()}, dict(reader.metadata)


def module_change(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Return s · up @ down flattened to (out, in·K), float64, Tucker cores contracted, from the raw tensors."""
    up = tensors[f"{name}.lora_up.weight"].double()
    down = tensors[f"{name}.lora_down.weight"].double()
    rank = down.shape[0]
    alpha = tensors.get(f"{name}.alpha")
    scale = 1.0 if alpha is None or float(alpha) == 0 else float(alpha) / rank
    if f"{name}.lora_mid.weight" in tensors:
        mid = tensors[f"{name}.lora_mid.weight"].double()
        down = torch.einsum("ijhw,jc->ichw", mid, down.reshape(rank, -1))
    return scale * up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)


# -- rank rules: ALGORITHMS.md 16 (kohya's rule with its +1 in the index and in the rank) ---------------------------
# Current sd-scripts (after its PR #2194) dropped that +1 and keeps one or two values fewer; lytools
# follows the spec, which keeps kohya's long-standing convention.
@pytest.mark.parametrize("method,param,expected", [
    # σ = 8, 4, 2, 1 (a spectrum of length 16, the rest zeros): Σσ = 15, Σσ² = 85
    ("sv_ratio", 3.0, 3),        # σ > 8/3: 8, 4 -> index 2, rank 3
    ("sv_ratio", 8.0, 4),        # σ > 1 (strict): 8, 4, 2 -> index 3, rank 4
    ("sv_ratio", 1.0, 2),        # σ > 8: none -> index clamped to 1, rank 2
    ("sv_cumulative", 0.79, 3),  # shares 8/15 = 0.53, 12/15 = 0.8: searchsorted 1, index 2, rank 3
    ("sv_cumulative", 0.81, 4),
    ("sv_fro", 0.8, 2),          # 64/85 = 0.753 >= 0.64: searchsorted 0, index 1, rank 2
    ("sv_fro", 0.9, 3),          # 80/85 = 0.941 >= 0.81
    ("sv_fro", 0.99, 4),         # 84/85 = 0.988 >= 0.9801
])
def test_dynamic_rules_follow_the_spec(method, param, expected):
    sigma = torch.tensor([8.0, 4.0, 2.0, 1.0])
    assert select_rank(sigma, 16, method, param, None).rank == expected
    # the cap (--rank / --max-rank) applies after the rule
    assert select_rank(sigma, 16, method, param, 1).rank == 1


def test_sv_fro_rank_keeps_at_least_the_asked_frobenius_share(tmp_path):
    """sv_fro t writes the smallest rank whose kept share of ‖ΔW‖_F reaches t, plus kohya's one (capped
    at the module's own rank), checked on the written file."""
    sigma = [1.0, 0.7, 0.45, 0.3, 0.2, 0.12, 0.08, 0.05]
    up, down = spectrum_factors(40, 56, sigma, seed=3)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    path = tmp_path / "n.safetensors"
    write_safetensors(path, {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(4.0)})
    values = torch.tensor(sigma, dtype=torch.float64)
    shares = (values.square().cumsum(0) / values.square().sum()).sqrt()
    for target in (0.8, 0.9, 0.95, 0.99):
        out = tmp_path / f"o{target}.safetensors"
        summary = resize_file(path, out, ResizeOptions(method="sv_fro", method_param=target))
        rank = read_all(out)[0][f"{name}.lora_down.weight"].shape[0]
        smallest = int((shares < target).sum()) + 1
        assert rank == min(smallest + 1, len(sigma)), target
        assert summary.modules[0].fro_kept >= target


# -- metadata tells the ranks written ------------------------------------------------------------------------------
LINEAR = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TEXT = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


def small_locon(path: Path, rank: int = 4, conv_rank: int = 4, alpha: float = 2.0) -> Path:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"{LINEAR}.lora_up.weight": torch.randn(32, rank, generator=gen), f"{LINEAR}.lora_down.weight": torch.randn(rank, 24, generator=gen),
        f"{LINEAR}.alpha": torch.tensor(alpha),
        f"{TEXT}.lora_up.weight": torch.randn(16, rank, generator=gen), f"{TEXT}.lora_down.weight": torch.randn(rank, 16, generator=gen),
        f"{TEXT}.alpha": torch.tensor(alpha),
        f"{CONV}.lora_up.weight": torch.randn(20, conv_rank, 1, 1, generator=gen),
        f"{CONV}.lora_down.weight": torch.randn(conv_rank, 12, 3, 3, generator=gen), f"{CONV}.alpha": torch.tensor(1.0),
    }
    args = {"conv_dim": str(conv_rank), "conv_alpha": "1.0", "algo": "locon"}
    write_safetensors(path, tensors, {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha), "ss_training_comment": "c",
                                      "ss_network_args": json.dumps(args)})
    return path


def test_asking_more_than_the_file_holds_copies_and_says_so(tmp_path):
    source = small_locon(tmp_path / "n.safetensors")
    out = tmp_path / "o.safetensors"
    summary = resize_file(source, out, ResizeOptions(rank=8, conv_rank=16))
    assert {r.action for r in summary.modules} == {"copied"}
    tensors, meta = read_all(out)
    assert all(tensors[f"{n}.lora_down.weight"].shape[0] == 4 for n in (LINEAR, TEXT, CONV))
    # it said dim 8, alpha Dynamic, conv_dim 16 with the old conv_alpha: no module has those
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "1.0", "algo": "locon"}
    assert meta["ss_training_comment"] == "dimension is resized from 4 to 4; c"


def test_mixed_copy_and_resize_metadata(tmp_path):
    source = small_locon(tmp_path / "n.safetensors", rank=6, conv_rank=3)
    out = tmp_path / "o.safetensors"
    resize_file(source, out, ResizeOptions(rank=4, conv_rank=8))
    tensors, meta = read_all(out)
    assert tensors[f"{CONV}.lora_down.weight"].shape[0] == 3 and tensors[f"{LINEAR}.lora_down.weight"].shape[0] == 4
    assert meta["ss_network_dim"] == "4"
    assert float(meta["ss_network_alpha"]) == pytest.approx(2.0 / 6 * 4, rel=1e-6)
    assert json.loads(meta["ss_network_args"])["conv_dim"] == "3"
    assert meta["ss_training_comment"] == "dimension is resized from 6 to 4 (conv: 3); c"
    # truncation updates conv_dim too (it was left at the old rank)
    out = tmp_path / "t.safetensors"
    resize_file(source, out, ResizeOptions(rank=2, conv_rank=2, truncate=True))
    meta = read_all(out)[1]
    assert meta["ss_network_dim"] == "2" and json.loads(meta["ss_network_args"])["conv_dim"] == "2"
    assert meta["ss_network_alpha"] == "2.0"  # truncation keeps alpha


# -- degenerate modules ---------------------------------------------------------------------------------------------
def test_rank_zero_module_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "z.safetensors"
    gen = torch.Generator().manual_seed(1)
    write_safetensors(path, {f"{LINEAR}.lora_up.weight": torch.zeros(32, 0), f"{LINEAR}.lora_down.weight": torch.zeros(0, 24),
                             f"{LINEAR}.alpha": torch.tensor(4.0),
                             f"{TEXT}.lora_up.weight": torch.randn(16, 2, generator=gen), f"{TEXT}.lora_down.weight": torch.randn(2, 16, generator=gen)})
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_lytools(capsys, "resize", str(path), str(out), "--rank", "1")
    assert code == 1 and stdout == "" and err.count("\n") == 1  # it was an internal error (division by rank 0)
    assert str(path) in err and LINEAR in err and "rank-0" in err and not out.exists()


def test_all_zero_module_becomes_rank_one_with_its_scale(tmp_path):
    path = tmp_path / "z.safetensors"
    write_safetensors(path, {f"{LINEAR}.lora_up.weight": torch.zeros(32, 4), f"{LINEAR}.lora_down.weight": torch.zeros(4, 24),
                             f"{LINEAR}.alpha": torch.tensor(2.0)})
    out = tmp_path / "o.safetensors"
    summary = resize_file(path, out, ResizeOptions(method="sv_fro", method_param=0.9, verify=True))
    tensors = read_all(out)[0]
    assert tensors[f"{LINEAR}.lora_down.weight"].shape == (1, 24) and float(tensors[f"{LINEAR}.alpha"]) == 0.5
    assert not tensors[f"{LINEAR}.lora_up.weight"].any() and torch.isfinite(tensors[f"{LINEAR}.lora_down.weight"]).all()
    assert summary.modules[0].rank_out == 1 and "zero weight change" in summary.modules[0].note


# -- flattened LoHa: the conv kernel comes from the network's own architecture -----------------------------------------
def test_sdxl_loha_with_diffusers_path_names_keeps_linear_proj_in(tmp_path):
    from lytools.arch import alias_table, module_table
    from lytools.testing import build_network, select_modules

    chosen = [m for m in select_modules("sdxl", "c3lier", (), ("unet",)) if "input_blocks_4_1" in m or "in_layers_2" in m][:24]
    source = build_network(tmp_path / "l.safetensors", "sdxl", factor=16, rank=4, algo="loha", modules=chosen,
                           dtype=torch.float32)
    aliases, table = alias_table("sdxl"), module_table("sdxl")
    diffusers_path = {}
    for alias, target in aliases.items():
        if alias.startswith("lora_unet_") and ("down_blocks" in alias or "mid_block" in alias or "up_blocks" in alias):
            diffusers_path.setdefault(target.key, alias)
    tensors = read_all(source)[0]
    renamed = {}
    for key, value in tensors.items():
        name, suffix = key.split(".", 1)
        renamed[f"{diffusers_path.get(table[name].key, name)}.{suffix}"] = value
    proj_in = "lora_unet_down_blocks_1_attentions_0_proj_in"
    assert f"{proj_in}.hada_w1_a" in renamed  # an SD1 name too, where it is a 1x1 conv
    path = tmp_path / "d.safetensors"
    write_safetensors(path, renamed)
    out = tmp_path / "o.safetensors"
    resize_file(path, out, ResizeOptions(rank=3, verify=True))
    written = read_all(out)[0]
    assert written[f"{proj_in}.lora_down.weight"].dim() == 2 and written[f"{proj_in}.lora_up.weight"].dim() == 2
    convs = [k for k in written if k.endswith("lora_down.weight") and "resnets" in k]
    assert convs and all(written[k].shape[2:] == (3, 3) for k in convs)


# -- DoRA: refused without the base, baked at strength 1 with it, and said so ----------------------------------------
def test_dora_needs_the_base_and_warns_what_flattening_means(tmp_path, capsys):
    from lytools.testing import build_checkpoint, build_network, select_modules

    chosen = [m for m in select_modules("sd1", "c3lier", (), None) if "down_blocks_0" in m][:6]
    chosen.append("lora_te_text_model_encoder_layers_0_self_attn_q_proj")
    source = build_network(tmp_path / "d.safetensors", "sd1", factor=16, rank=6, dora=True, modules=chosen,
                           dtype=torch.float16)
    base = build_checkpoint(tmp_path / "b.safetensors", "sd1", factor=16)
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_lytools(capsys, "resize", str(source), str(out), "--rank", "3")
    assert code == 1 and err.count("\n") == 1 and "--base" in err and "lora+dora" in err and not out.exists()
    code, stdout, err = run_lytools(capsys, "resize", str(source), str(out), "--rank", "3", "--base", str(base), "--verify")
    assert code == 0 and stdout.strip() == str(out)
    assert "warning:" in err and "strength 1" in err and "verify:" in err
    tensors = read_all(out)[0]
    assert not any(k.endswith("dora_scale") for k in tensors)
    assert {tensors[k].dtype for k in tensors if k.endswith(".weight")} == {torch.float16}
    assert all(tensors[k].shape[0] == 3 for k in tensors if k.endswith("lora_down.weight"))


def test_lycoris_dylora_and_tucker_args_follow_the_refactoring(tmp_path):
    gen = torch.Generator().manual_seed(4)
    tucker = "lora_unet_down_blocks_0_resnets_0_conv2"
    tensors = {
        f"{LINEAR}.lora_up.weight": torch.randn(32, 8, generator=gen), f"{LINEAR}.lora_down.weight": torch.randn(8, 24, generator=gen),
        f"{tucker}.lora_up.weight": torch.randn(20, 6, 1, 1, generator=gen), f"{tucker}.lora_mid.weight": torch.randn(6, 6, 3, 3, generator=gen),
        f"{tucker}.lora_down.weight": torch.randn(6, 12, 1, 1, generator=gen), f"{tucker}.alpha": torch.tensor(3.0),
    }
    path = tmp_path / "n.safetensors"
    args = {"algo": "dylora", "use_tucker": "True", "block_size": "2", "conv_dim": "6", "conv_alpha": "3"}
    write_safetensors(path, tensors, {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)})
    out = tmp_path / "o.safetensors"
    resize_file(path, out, ResizeOptions(rank=4, conv_rank=3))
    written, meta = read_all(out)
    assert f"{tucker}.lora_mid.weight" not in written
    assert json.loads(meta["ss_network_args"]) == {"algo": "locon", "use_tucker": "False", "block_size": "2",
                                                   "conv_dim": "3", "conv_alpha": "1.5"}
    # a Tucker module kept (already at the rank) keeps use_tucker
    resize_file(path, out, ResizeOptions(rank=4, conv_rank=6, overwrite=True))
    written, meta = read_all(out)
    assert f"{tucker}.lora_mid.weight" in written and json.loads(meta["ss_network_args"])["use_tucker"] == "True"


# -- figures and optimality against an independent SVD, every method, linear / conv / Tucker / text encoder, dtypes ------
TUCKER = "lora_unet_down_blocks_0_resnets_0_conv2"


def mixed_network(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    tensors = {}
    up, down = spectrum_factors(48, 64, [2 * 0.8 ** i for i in range(12)], 1)
    tensors.update({f"{LINEAR}.lora_up.weight": up, f"{LINEAR}.lora_down.weight": down, f"{LINEAR}.alpha": torch.tensor(5.0)})
    up, down = spectrum_factors(40, 32 * 9, [0.7 ** i for i in range(10)], 2)
    tensors.update({f"{CONV}.lora_up.weight": up.reshape(40, 10, 1, 1), f"{CONV}.lora_down.weight": down.reshape(10, 32, 3, 3),
                    f"{CONV}.alpha": torch.tensor(1.0)})
    tensors.update({f"{TUCKER}.lora_up.weight": 0.3 * torch.randn(40, 8, 1, 1, generator=gen),
                    f"{TUCKER}.lora_mid.weight": 0.3 * torch.randn(8, 8, 3, 3, generator=gen),
                    f"{TUCKER}.lora_down.weight": 0.3 * torch.randn(8, 40, 1, 1, generator=gen), f"{TUCKER}.alpha": torch.tensor(3.0)})
    up, down = spectrum_factors(24, 16, [1, 0.5, 0.3, 0.2, 0.1, 0.05], 3)
    tensors.update({f"{TEXT}.lora_up.weight": up, f"{TEXT}.lora_down.weight": down})  # no alpha: alpha = rank
    return {key: value.to(dtype) for key, value in tensors.items()}


ROUNDING = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype,save", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, torch.float32),
                                        (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("options", [dict(rank=4, conv_rank=3), dict(method="sv_fro", method_param=0.9),
                                     dict(method="sv_ratio", method_param=4.0),
                                     dict(method="sv_cumulative", method_param=0.7, max_rank=6)],
                         ids=["fixed", "sv_fro", "sv_ratio", "sv_cumulative"])
def test_written_change_is_the_truncation_optimum_and_the_figures_are_true(tmp_path, dtype, save, options):
    source = tmp_path / "n.safetensors"
    write_safetensors(source, mixed_network(dtype))
    out = tmp_path / "o.safetensors"
    summary = resize_file(source, out, ResizeOptions(**options, save_dtype=save, device="cpu"))
    before, after = read_all(source)[0], read_all(out)[0]
    assert {t.dtype for k, t in after.items() if k.endswith(".weight")} == {save or dtype}
    for report in summary.modules:
        reference = module_change(before, report.name)
        sigma = torch.linalg.svdvals(reference)
        rank = after[f"{report.name}.lora_down.weight"].shape[0]
        rank_in = before[f"{report.name}.lora_down.weight"].shape[0]
        assert rank == report.rank_out <= rank_in
        unscaled = sigma / (float(before[f"{report.name}.alpha"]) / rank_in if f"{report.name}.alpha" in before else 1.0)
        if options.get("method") == "sv_fro":  # the smallest prefix reaching the share, + 1, capped at the module's rank
            shares = (unscaled.square().cumsum(0) / unscaled.square().sum()).sqrt()
            assert rank == min(int((shares < options["method_param"] - 1e-9).sum()) + 2, rank_in)
        elif options.get("method") == "sv_ratio":  # the count above σ_1 / t (at least 1), + 1, capped likewise
            assert rank == min(max(1, int((unscaled > unscaled[0] / options["method_param"]).sum())) + 1, rank_in)
        # the written ΔW is a best rank-r approximation: its error is the discarded singular values
        optimum = float(sigma[rank:].square().sum().sqrt())
        error = float((module_change(after, report.name) - reference).norm())
        assert abs(error - optimum) <= ROUNDING[save or dtype] * float(reference.norm()), report.name
        assert report.fro_kept == pytest.approx(float(sigma[:rank].norm() / sigma.norm()), abs=1e-4)
        assert report.sum_kept == pytest.approx(float(sigma[:rank].sum() / sigma.sum()), abs=1e-4)


def test_copied_and_truncated_modules_write_a_0d_alpha(tmp_path):
    gen = torch.Generator().manual_seed(6)
    tensors = {f"{LINEAR}.lora_up.weight": torch.randn(32, 4, generator=gen), f"{LINEAR}.lora_down.weight": torch.randn(4, 24, generator=gen),
               f"{LINEAR}.alpha": torch.tensor([2.0], dtype=torch.float16)}  # LyCORIS' extractor writes [alpha]
    path = tmp_path / "n.safetensors"
    write_safetensors(path, tensors)
    for options in (ResizeOptions(rank=8), ResizeOptions(rank=2, truncate=True), ResizeOptions(rank=2)):
        out = tmp_path / "o.safetensors"
        resize_file(path, out, dataclasses.replace(options, overwrite=True))
        alpha = read_all(out)[0][f"{LINEAR}.alpha"]
        assert alpha.shape == () and float(alpha) == (1.0 if not options.truncate and options.rank == 2 else 2.0)


def test_flattened_loha_takes_its_layer_shape_from_the_base_when_given(tmp_path):
    """SD1's proj_in is a 1x1 conv, SD2's a Linear: with --base the checkpoint says which (the tables guessed SD1)."""
    gen = torch.Generator().manual_seed(8)
    tensors = {f"{LINEAR}.hada_w1_a": torch.randn(32, 3, generator=gen), f"{LINEAR}.hada_w1_b": torch.randn(3, 24, generator=gen),
               f"{LINEAR}.hada_w2_a": torch.randn(32, 3, generator=gen), f"{LINEAR}.hada_w2_b": torch.randn(3, 24, generator=gen),
               f"{LINEAR}.alpha": torch.tensor(3.0)}
    path, base = tmp_path / "h.safetensors", tmp_path / "b.safetensors"
    write_safetensors(path, tensors)
    write_safetensors(base, {"down_blocks.0.attentions.0.proj_in.weight": torch.randn(32, 24, generator=gen)})
    out = tmp_path / "o.safetensors"
    resize_file(path, out, ResizeOptions(rank=4, base=base, verify=True))
    written = read_all(out)[0]
    assert written[f"{LINEAR}.lora_down.weight"].shape == (4, 24) and written[f"{LINEAR}.lora_up.weight"].shape == (32, 4)
    change = (tensors[f"{LINEAR}.hada_w1_a"] @ tensors[f"{LINEAR}.hada_w1_b"]) * (tensors[f"{LINEAR}.hada_w2_a"] @ tensors[f"{LINEAR}.hada_w2_b"])
    sigma = torch.linalg.svdvals(change.double())
    error = float((module_change(written, LINEAR) - change.double()).norm())
    assert error == pytest.approx(float(sigma[4:].square().sum().sqrt()), rel=1e-4)


def test_fused_flux_modules_from_diffusers_parts_warn_that_the_rank_is_the_fused_one(tmp_path, capsys):
    from lytools.testing import build_network

    chosen = ["lora_unet_single_blocks_0_linear1", "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj"]
    source = build_network(tmp_path / "f.safetensors", "flux", factor=16, rank=4, layout="diffusers", modules=chosen,
                           dtype=torch.float32)
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_lytools(capsys, "resize", str(source), str(out), "--rank", "4", "--json", "--verify")
    assert code == 0
    payload = json.loads(stdout)
    ranks = {m["module"]: (m["rank_in"], m["rank_out"], m["action"]) for m in payload["modules"]}
    assert ranks == {chosen[0]: (16, 4, "resized"), chosen[1]: (12, 4, "resized"), chosen[2]: (4, 4, "copied")}
    assert len(payload["warnings"]) == 1 and "2 modules were assembled from the q/k/v(/mlp) parts" in payload["warnings"][0]
    assert "4 parts, rank 16 -> 4" in payload["warnings"][0] and "warning:" in err
    # asking for the parts' rank times their number keeps every part whole
    code, stdout, err = run_lytools(capsys, "resize", str(source), str(out), "--rank", "16", "--overwrite", "--json")
    assert code == 0 and json.loads(stdout)["warnings"] == []
    assert {m["action"] for m in json.loads(stdout)["modules"]} == {"copied"}


def test_truncate_refuses_modules_fused_from_parts(tmp_path, capsys):
    from lytools.testing import build_network

    chosen = ["lora_unet_single_blocks_0_linear1", "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_double_blocks_0_img_attn_proj"]
    source = build_network(tmp_path / "f.safetensors", "flux", factor=16, rank=4, layout="diffusers", modules=chosen,
                           dtype=torch.float32)
    out = tmp_path / "o.safetensors"
    # the fused down is the parts' downs stacked: its leading 4 ranks were q's alone (k and v written as zeros)
    code, stdout, err = run_lytools(capsys, "resize", str(source), str(out), "--rank", "4", "--truncate")
    assert code == 1 and stdout == "" and err.count("\n") == 1 and "--truncate" in err and "assembled from" in err
    assert not out.exists()


# -- outputs load in LyCORIS: Tucker cores folded, LoHa flattened ---------------------------------------------------
def test_tucker_and_loha_inputs_resize_to_locon_that_lycoris_loads(tmp_path):
    pytest.importorskip("lycoris")
    pytest.importorskip("diffusers")
    from tests.test_resize_loaders import tiny_unet

    unet = tiny_unet()
    gen = torch.Generator().manual_seed(2)
    tensors, shapes = {}, {}
    for path_name, layer in unet.named_modules():
        if not isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) or "resnets" not in path_name and "proj_in" not in path_name:
            continue
        name = "lora_unet_" + path_name.replace(".", "_")
        shape = tuple(layer.weight.shape)
        shapes[name] = shape
        if len(shape) == 4 and shape[2:] == (3, 3):  # Tucker LoCon, rank 6
            tensors[f"{name}.lora_up.weight"] = 0.2 * torch.randn(shape[0], 6, 1, 1, generator=gen)
            tensors[f"{name}.lora_mid.weight"] = 0.2 * torch.randn(6, 6, 3, 3, generator=gen)
            tensors[f"{name}.lora_down.weight"] = 0.2 * torch.randn(6, shape[1], 1, 1, generator=gen)
            tensors[f"{name}.alpha"] = torch.tensor(2.0)
        else:  # LoHa, rank 3 (its change has rank up to 9)
            flat_in = math.prod(shape[1:])
            for half in ("1", "2"):
                tensors[f"{name}.hada_w{half}_a"] = 0.3 * torch.randn(shape[0], 3, generator=gen)
                tensors[f"{name}.hada_w{half}_b"] = 0.3 * torch.randn(3, flat_in, generator=gen)
            tensors[f"{name}.alpha"] = torch.tensor(3.0)
    source = tmp_path / "in.safetensors"
    write_safetensors(source, tensors)
    out = tmp_path / "out.safetensors"
    resize_file(source, out, ResizeOptions(rank=4, conv_rank=3, verify=True))
    written = read_all(out)[0]
    assert not any(".lora_mid." in k or ".hada_" in k for k in written)
    loaded = lycoris_modules(unet, written)
    assert set(loaded) == set(shapes)
    for name, lora in loaded.items():
        assert type(lora).__name__ == "LoConModule"
        change = lora.get_diff_weight(multiplier=1.0, shape=shapes[name])[0]
        torch.testing.assert_close(change.reshape(change.shape[0], -1).double(), module_change(written, name),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_network_resizes_and_verifies_in_its_own_dtype(tmp_path, dtype):
    up, down = spectrum_factors(64, 64, [1, 0.9, 0.8, 0.7, 1e-4, 1e-4, 1e-4, 1e-4], 0)
    path = tmp_path / "f8.safetensors"
    write_safetensors(path, {f"{LINEAR}.lora_up.weight": up.to(dtype), f"{LINEAR}.lora_down.weight": down.to(dtype),
                             f"{LINEAR}.alpha": torch.tensor(8.0)})
    out = tmp_path / "o.safetensors"
    summary = resize_file(path, out, ResizeOptions(rank=4, verify=True))  # e5m2 failed verification: no fp8 allowance
    assert summary.verify.ok and read_all(out)[0][f"{LINEAR}.lora_down.weight"].dtype == dtype


def test_output_naming_the_input_or_base_is_refused_even_with_overwrite(tmp_path, capsys):
    """resize rewrote IN in place with --overwrite (merge, extract and convert refuse that)."""
    path = small_locon(tmp_path / "n.safetensors")
    (tmp_path / "link.safetensors").symlink_to(path)
    base = tmp_path / "base.safetensors"
    write_safetensors(base, {"w": torch.zeros(2)})
    before = path.read_bytes(), base.read_bytes()
    for out, extra in ((tmp_path / "." / "n.safetensors", []), (tmp_path / "link.safetensors", []),
                       (base, ["--base", str(base)])):
        code, stdout, err = run_lytools(capsys, "resize", str(path), str(out), "--rank", "2", "--overwrite", *extra)
        assert code == 1 and stdout == "" and err.count("\n") == 1 and "would replace" in err
    assert (path.read_bytes(), base.read_bytes()) == before
