"""Merging networks into one network (exact concatenation and SVD re-factoring), network key
styles merged into checkpoints, ratio parsing and the CLI surface of `lytools merge`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from lytools.cli import cli
from lytools.errors import LytoolsError, NetworkError
from lytools.io import open_file, read_header, sd_scripts_hashes, write_safetensors
from lytools.merge import merge_into_checkpoint, merge_networks, run_merge
from lytools.merge.combine import power_split, svd_factors
from lytools.merge.ratios import Ratios, parse_ratios
from lytools.testing import build_checkpoint, build_network
from tests.shared import read_tensors as read_all


def lora_change(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """ΔW of a kohya module by direct math (Tucker through lora_mid), flattened to (out, in·K)."""
    down = tensors[f"{name}.lora_down.weight"].float()
    up = tensors[f"{name}.lora_up.weight"].float()
    rank = down.shape[0]
    alpha = float(tensors.get(f"{name}.alpha", torch.tensor(0.0)))
    scale = alpha / rank if alpha else 1.0
    mid = tensors.get(f"{name}.lora_mid.weight")
    if mid is not None:
        product = torch.einsum("ij...,oi,jc->oc...", mid.float(), up.flatten(1), down.flatten(1))
        return product.reshape(product.shape[0], -1) * scale
    return up.flatten(1) @ down.flatten(1) * scale


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nets")
    ckpt = build_checkpoint(folder / "base.safetensors", "sd1", factor=16, components=("unet", "clip_l"), dtype=torch.float16)
    a = build_network(folder / "a.safetensors", "sd1", factor=16, rank=4, alpha=2.0, modules="c3lier", seed=1,
                      metadata={"ss_network_dim": "4", "ss_output_name": "a", "sshs_model_hash": "stale"})
    b = build_network(folder / "b.safetensors", "sd1", factor=16, rank=6, alpha=3.0, modules="lierla", seed=2,
                      dtype=torch.float32)
    return folder, ckpt, a, b


def test_concatenation_is_exact(sd1, tmp_path):
    folder, _, a, b = sd1
    out = tmp_path / "ab.safetensors"
    result = merge_networks([a, b], out, ratios=[0.5, -0.3])
    merged, ta, tb = read_all(out), read_all(a), read_all(b)
    names = {k.split(".")[0] for k in ta} | {k.split(".")[0] for k in tb}
    assert {m.name for m in result.modules} == names
    for name in names:
        expected = torch.zeros_like(lora_change(ta if f"{name}.alpha" in ta else tb, name))
        rank = 0
        if f"{name}.alpha" in ta:
            expected += 0.5 * lora_change(ta, name)
            rank += 4
        if f"{name}.alpha" in tb:
            expected -= 0.3 * lora_change(tb, name)
            rank += 6
        assert merged[f"{name}.lora_down.weight"].shape[0] == rank
        assert float(merged[f"{name}.alpha"]) == rank and merged[f"{name}.alpha"].dim() == 0
        torch.testing.assert_close(lora_change(merged, name), expected, rtol=5e-3, atol=5e-4)


def test_merged_network_then_merge_equals_merging_both(sd1, tmp_path):
    folder, ckpt, a, b = sd1
    merge_networks([a, b], tmp_path / "ab.safetensors", ratios=[0.5, -0.3])
    merge_into_checkpoint(ckpt, [tmp_path / "ab.safetensors"], tmp_path / "via.safetensors")
    merge_into_checkpoint(ckpt, [a, b], tmp_path / "direct.safetensors", ratios=[0.5, -0.3])
    via, direct, base = read_all(tmp_path / "via.safetensors"), read_all(tmp_path / "direct.safetensors"), read_all(ckpt)
    changed = 0
    for key in base:
        if torch.equal(direct[key], base[key]):
            assert torch.equal(via[key], base[key])
            continue
        changed += 1
        torch.testing.assert_close(via[key].float(), direct[key].float(), rtol=2e-3, atol=3e-4)
    assert changed > 200


def test_rank_refactoring_within_the_svd_bound(sd1, tmp_path):
    folder, ckpt, a, b = sd1
    result = merge_networks([a, b], tmp_path / "r3.safetensors", ratios=[0.5, -0.3], rank=3, conv_rank=2,
                            save_dtype=torch.float32)
    merged, ta, tb = read_all(tmp_path / "r3.safetensors"), read_all(a), read_all(b)
    for item in result.modules:
        name = item.name
        total = torch.zeros_like(lora_change(ta if f"{name}.alpha" in ta else tb, name))
        if f"{name}.alpha" in ta:
            total += 0.5 * lora_change(ta, name)
        if f"{name}.alpha" in tb:
            total -= 0.3 * lora_change(tb, name)
        sigma = torch.linalg.svdvals(total.double())
        is_conv = merged[f"{name}.lora_down.weight"].dim() == 4 and merged[f"{name}.lora_down.weight"].shape[-1] == 3
        rank = 2 if is_conv else 3
        assert item.rank == rank and merged[f"{name}.lora_down.weight"].shape[0] == rank
        kept = float(sigma[:rank].norm() / sigma.norm())
        assert item.kept == pytest.approx(kept, abs=1e-4)
        error = float((lora_change(merged, name) - total).norm() / total.norm())
        assert error <= math.sqrt(max(0.0, 1 - kept ** 2)) + 1e-3
    # then merged into the checkpoint: each tensor within the same bound of the direct merge
    merge_into_checkpoint(ckpt, [tmp_path / "r3.safetensors"], tmp_path / "via.safetensors", save_dtype=torch.float32)
    merge_into_checkpoint(ckpt, [a, b], tmp_path / "direct.safetensors", ratios=[0.5, -0.3], save_dtype=torch.float32)
    via, direct, base = read_all(tmp_path / "via.safetensors"), read_all(tmp_path / "direct.safetensors"), read_all(ckpt)
    worst = min(m.kept for m in result.modules)
    for key in base:
        change = direct[key].float() - base[key].float()
        if change.abs().max() == 0:
            continue
        error = float((via[key].float() - direct[key].float()).norm() / change.norm())
        assert error <= math.sqrt(1 - worst ** 2) + 1e-3, key


def test_low_rank_route_matches_dense_svd():
    generator = torch.Generator().manual_seed(0)
    up = torch.randn(48, 10, generator=generator)
    down = torch.randn(10, 36, generator=generator)
    new_up, new_down, kept = svd_factors(up, down, None, 4)
    dense_up, dense_down, dense_kept = svd_factors(None, None, up @ down, 4)
    torch.testing.assert_close(new_up @ new_down, dense_up @ dense_down, rtol=1e-4, atol=1e-4)
    assert kept == pytest.approx(dense_kept, abs=1e-5)
    sigma = torch.linalg.svdvals(up @ down)
    assert kept == pytest.approx(float(sigma[:4].norm() / sigma.norm()), abs=1e-5)


def write_module(path: Path, name: str, **tensors) -> Path:
    write_safetensors(path, {f"{name}.{suffix.replace('__', '.')}": t for suffix, t in tensors.items()})
    return path


CONV = "lora_unet_down_blocks_0_resnets_0_conv1"


def random(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def test_tucker_modules_concatenate_block_diagonally(tmp_path):
    first = write_module(tmp_path / "t1.safetensors", CONV, lora_down__weight=random(3, 20, 1, 1, seed=1),
                         lora_mid__weight=random(3, 3, 3, 3, seed=2), lora_up__weight=random(20, 3, 1, 1, seed=3),
                         alpha=torch.tensor(1.5))
    second = write_module(tmp_path / "t2.safetensors", CONV, lora_down__weight=random(2, 20, 1, 1, seed=4),
                          lora_mid__weight=random(2, 2, 3, 3, seed=5), lora_up__weight=random(20, 2, 1, 1, seed=6))
    merge_networks([first, second], tmp_path / "out.safetensors", ratios=[0.7, -1.2], save_dtype=torch.float32)
    merged = read_all(tmp_path / "out.safetensors")
    assert merged[f"{CONV}.lora_mid.weight"].shape == (5, 5, 3, 3)
    expected = 0.7 * lora_change(read_all(first), CONV) - 1.2 * lora_change(read_all(second), CONV)
    torch.testing.assert_close(lora_change(merged, CONV), expected, rtol=1e-5, atol=1e-6)


def test_tucker_with_plain_conv_is_flattened_exactly(tmp_path):
    tucker = write_module(tmp_path / "t.safetensors", CONV, lora_down__weight=random(3, 20, 1, 1, seed=1),
                          lora_mid__weight=random(3, 3, 3, 3, seed=2), lora_up__weight=random(20, 3, 1, 1, seed=3))
    plain = write_module(tmp_path / "p.safetensors", CONV, lora_down__weight=random(4, 20, 3, 3, seed=7),
                         lora_up__weight=random(20, 4, 1, 1, seed=8), alpha=torch.tensor(8.0))
    merge_networks([tucker, plain], tmp_path / "out.safetensors", save_dtype=torch.float32)
    merged = read_all(tmp_path / "out.safetensors")
    assert f"{CONV}.lora_mid.weight" not in merged and merged[f"{CONV}.lora_down.weight"].shape == (7, 20, 3, 3)
    expected = lora_change(read_all(tucker), CONV) + lora_change(read_all(plain), CONV)
    torch.testing.assert_close(lora_change(merged, CONV), expected, rtol=1e-5, atol=1e-6)


LINEAR = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def test_non_lora_overlap_needs_rank(tmp_path):
    loha = write_module(tmp_path / "h.safetensors", LINEAR, hada_w1_a=random(24, 2, seed=1), hada_w1_b=random(2, 12, seed=2),
                        hada_w2_a=random(24, 2, seed=3), hada_w2_b=random(2, 12, seed=4), alpha=torch.tensor(1.0))
    lora = write_module(tmp_path / "l.safetensors", LINEAR, lora_down__weight=random(2, 12, seed=5),
                        lora_up__weight=random(24, 2, seed=6))
    with pytest.raises(NetworkError, match="--rank"):
        merge_networks([loha, lora], tmp_path / "out.safetensors")
    result = merge_networks([loha, lora], tmp_path / "out.safetensors", rank=12, save_dtype=torch.float32)
    assert result.modules[0].method == "svd" and result.modules[0].kept == pytest.approx(1.0)
    w1 = random(24, 2, seed=1) @ random(2, 12, seed=2)
    w2 = random(24, 2, seed=3) @ random(2, 12, seed=4)
    expected = w1 * w2 * 0.5 + random(24, 2, seed=6) @ random(2, 12, seed=5)
    torch.testing.assert_close(lora_change(read_all(tmp_path / "out.safetensors"), LINEAR), expected, rtol=1e-4, atol=1e-6)


def test_single_loha_copied_with_ratio_folded(tmp_path):
    loha = write_module(tmp_path / "h.safetensors", LINEAR, hada_w1_a=random(24, 2, seed=1), hada_w1_b=random(2, 12, seed=2),
                        hada_w2_a=random(24, 2, seed=3), hada_w2_b=random(2, 12, seed=4), alpha=torch.tensor(1.0))
    result = merge_networks([loha], tmp_path / "out.safetensors", ratios=[-0.5])
    assert result.modules[0].method == "copy"
    merged = read_all(tmp_path / "out.safetensors")
    torch.testing.assert_close(merged[f"{LINEAR}.hada_w1_a"], -0.5 * random(24, 2, seed=1))
    torch.testing.assert_close(merged[f"{LINEAR}.hada_w2_a"], random(24, 2, seed=3))


def test_dora_cannot_be_refactored_without_base(tmp_path):
    dora = write_module(tmp_path / "d.safetensors", LINEAR, lora_down__weight=random(2, 12, seed=5),
                        lora_up__weight=random(24, 2, seed=6), dora_scale=torch.ones(24, 1))
    with pytest.raises(NetworkError, match="into a checkpoint"):
        merge_networks([dora], tmp_path / "out.safetensors", rank=2)
    with pytest.raises(NetworkError, match="ratio 0.5"):
        merge_networks([dora], tmp_path / "out.safetensors", ratios=[0.5])
    assert not (tmp_path / "out.safetensors").exists()


def test_network_metadata_and_fresh_hashes(sd1, tmp_path):
    folder, _, a, b = sd1
    out = tmp_path / "ab.safetensors"
    merge_networks([a, b], out, ratios=[0.5, -0.3])
    tensors = read_all(out)
    with open_file(out) as handle:
        meta = handle.metadata
    assert meta["ss_output_name"] == "a" and meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == "Dynamic"  # ranks 4 + 6 where both have a module, 4 elsewhere
    assert meta["sshs_model_hash"] != "stale"
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == sd_scripts_hashes(tensors, meta)
    assert meta["modelspec.merged_from"] == "a.safetensors, b.safetensors"
    assert [s["ratio"] for s in json.loads(meta["lytools.sources"])] == ["0.5", "-0.3"]


def test_network_key_styles_merge_alike(tmp_path):
    """The same LoRA written in kohya, diffusers, peft and lycoris_ key styles merges identically."""
    from lytools.arch import kohya_to_diffusers

    ckpt = build_checkpoint(tmp_path / "base.safetensors", "sd1", factor=16, components=("unet",), dtype=torch.float16)
    kohya = build_network(tmp_path / "kohya.safetensors", "sd1", factor=16, rank=4, modules="lierla",
                          components=("unet",), seed=11)
    tensors = read_all(kohya)
    styles: dict[str, dict[str, torch.Tensor]] = {"diffusers": {}, "peft": {}, "lycoris": {}}
    for key, tensor in tensors.items():
        name, _, suffix = key.partition(".")
        path = kohya_to_diffusers("sd1")[name][0].diffusers.partition(".")[2]
        if suffix == "alpha":
            styles["lycoris"][f"lycoris_{path.replace('.', '_')}.alpha"] = tensor
            continue  # alpha = rank here: diffusers/peft carry no alpha
        peft_suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}[suffix]
        styles["diffusers"][f"unet.{path}.{peft_suffix}"] = tensor
        styles["peft"][f"base_model.model.{path}.{peft_suffix}"] = tensor
        styles["lycoris"][f"lycoris_{path.replace('.', '_')}.{suffix}"] = tensor
    merge_into_checkpoint(ckpt, [kohya], tmp_path / "out-kohya.safetensors")
    reference = read_all(tmp_path / "out-kohya.safetensors")
    assert not torch.equal(reference["model.diffusion_model.input_blocks.1.1.proj_in.weight"],
                           read_all(ckpt)["model.diffusion_model.input_blocks.1.1.proj_in.weight"])
    for style, written in styles.items():
        write_safetensors(tmp_path / f"{style}.safetensors", written)
        merge_into_checkpoint(ckpt, [tmp_path / f"{style}.safetensors"], tmp_path / f"out-{style}.safetensors")
        merged = read_all(tmp_path / f"out-{style}.safetensors")
        for key, tensor in reference.items():
            assert torch.equal(merged[key], tensor), (style, key)


def test_flux_diffusers_network_into_bfl_checkpoint(tmp_path):
    ckpt = build_checkpoint(tmp_path / "flux.safetensors", "flux", factor=32, components=("unet",), keep_blocks=2)
    names = ["lora_unet_double_blocks_1_img_attn_qkv", "lora_unet_single_blocks_0_linear1"]
    kohya = build_network(tmp_path / "k.safetensors", "flux", factor=32, rank=4, modules=names, seed=2)
    split = build_network(tmp_path / "d.safetensors", "flux", factor=32, rank=4, modules=names, layout="diffusers", seed=2)
    merge_into_checkpoint(ckpt, [split], tmp_path / "out-d.safetensors")
    merge_into_checkpoint(ckpt, [kohya], tmp_path / "out-k.safetensors")
    base, from_split = read_all(ckpt), read_all(tmp_path / "out-d.safetensors")
    key = "model.diffusion_model.single_blocks.0.linear1.weight"
    assert not torch.equal(from_split[key], base[key])
    changed = [k for k in base if not torch.equal(from_split[k], base[k])]
    assert sorted(changed) == sorted(["model.diffusion_model.double_blocks.1.img_attn.qkv.weight", key])


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=1e-12, max_value=1e12), st.booleans())
def test_power_split_is_exact(value, negative):
    factor = -value if negative else value
    up, down = power_split(factor)
    assert math.frexp(abs(up))[0] == 0.5  # a power of two
    assert up * down == factor
    assert 0.25 <= abs(up) / math.sqrt(abs(factor)) <= 4


def test_ratios_parsing_and_rules():
    assert parse_ratios(["0.5", "-0.3,1e-1"]) == [0.5, -0.3, 0.1]
    with pytest.raises(LytoolsError, match="2 value"):
        Ratios.build(3, [0.5, 0.2])
    ratios = Ratios.build(2, [0.5, -1.0], ["attn=0.5", "attn2=2"])
    assert ratios.of(0, "lora_unet_x_attn2_to_k") == 0.5
    assert ratios.of(1, "lora_unet_x_attn1_to_k") == -0.5
    assert ratios.of(1, "lora_unet_x_ff") == -1.0
    assert ratios.unused_rules() == []
    with pytest.raises(LytoolsError, match="REGEX=R"):
        Ratios.build(1, None, ["noequals"])
    with pytest.raises(LytoolsError, match="regular expression"):
        Ratios.build(1, None, ["(=1"])


def test_cli_ratios_take_negative_numbers(sd1, tmp_path):
    folder, ckpt, a, b = sd1
    runner = CliRunner()
    result = runner.invoke(cli, ["merge", str(ckpt), str(a), str(b), "--ratios", "0.5", "-0.3", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert [i["ratio"] for i in plan["inputs"]] == [0.5, -0.3]
    assert plan["inputs"][0]["matched"] == plan["inputs"][0]["modules"]
    result = runner.invoke(cli, ["merge", str(a), str(b), "-o", str(tmp_path / "o.safetensors"), "--ratios", "1", "-1",
                                 "--rank", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "o.safetensors")


def test_cli_errors_are_one_line(sd1, tmp_path):
    from lytools.cli import main

    folder, ckpt, a, b = sd1
    for args, message in (
        ([str(ckpt), str(a), "--ratios", "0.5", "0.1", "-o", str(tmp_path / "x.safetensors")], "--ratios"),
        ([str(a), str(ckpt), "-o", str(tmp_path / "x.safetensors")], "only the first input"),
        ([str(ckpt), str(a), "--rank", "4", "-o", str(tmp_path / "x.safetensors")], "--rank"),
        ([str(a), str(b)], "-o OUT"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["merge", *args])
        assert exit_info.value.code == (1 if message == "only the first input" else 2), message  # 2: usage errors
    assert not (tmp_path / "x.safetensors").exists()


def test_network_merge_verify(sd1, tmp_path):
    folder, _, a, b = sd1
    result = run_merge([a, b], tmp_path / "v.safetensors", ratios=[0.5, -0.3], rank=3, verify=True)
    assert result.verification.failures == [] and result.verification.checked == len(result.modules)
    assert result.as_dict()["verify"]["worst_relative_error"] > 0


def test_cli_reads_inputs_from_stdin_and_prints_json(sd1, tmp_path):
    folder, ckpt, a, b = sd1
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["merge", "-", "-o", str(out), "--ratios", "0.5", "-0.3", "--json", "-q"],
                                input=f"{ckpt}\n{a}\n{b}\n")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mode"] == "checkpoint" and report["output"] == str(out) and out.exists()
    assert report["tensors_changed"] > 200 and report["inputs"][1]["ratio"] == -0.3


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 24), st.integers(2, 24), st.integers(1, 8), st.integers(1, 8), st.integers(0, 2**16))
def test_svd_of_stacked_factors_is_the_best_approximation(out, inp, total_rank, rank, seed):
    """Eckart–Young through the QR route: the error is exactly the discarded singular values."""
    generator = torch.Generator().manual_seed(seed)
    up = torch.randn(out, total_rank, generator=generator, dtype=torch.float64)
    down = torch.randn(total_rank, inp, generator=generator, dtype=torch.float64)
    new_up, new_down, kept = svd_factors(up, down, None, rank)
    product = up @ down
    sigma = torch.linalg.svdvals(product)
    keep = min(rank, total_rank, out, inp)
    assert new_up.shape == (out, keep) and new_down.shape == (keep, inp)
    error = float((new_up @ new_down - product).norm())
    assert error == pytest.approx(float(sigma[keep:].norm()), abs=1e-8 * float(sigma.norm()) + 1e-10)
    assert kept == pytest.approx(float(sigma[:keep].norm() / sigma.norm()), abs=1e-9)


def test_rank_merge_says_a_bias_change_is_dropped(tmp_path, capsys):
    """A full module's diff_b (or a norm's b_norm) has no place in the re-factored LoRA: said, not silent."""
    from safetensors.torch import load_file, save_file

    from lytools.cli import main
    from tests.shared import shared_dir

    if shared_dir() is None:
        pytest.skip("../shared fixtures not found")
    golden = load_file(shared_dir() / "fixtures" / "golden" / "full-linear.safetensors")
    network = {k[len("network."):]: v for k, v in golden.items() if k.startswith("network.")}
    assert any(k.endswith(".diff_b") for k in network)
    save_file(network, tmp_path / "full.safetensors")
    source = str(tmp_path / "full.safetensors")
    main(["merge", source, source, "--ratios", "0.5", "0.5", "--rank", "8", "-o", str(tmp_path / "r.safetensors")])
    err = capsys.readouterr().err
    assert "1 module(s) also change their layer's bias" in err and "lora_unet_down_blocks_0_attentions_0_proj_in" in err


def test_ratio_zero_warns_naming_the_input(sd1, tmp_path, capsys):
    from tests.shared import run_lytools

    _, _, a, b = sd1
    code, _, err = run_lytools(capsys, "merge", a, b, "--ratios", "0.5", "0", "-o", tmp_path / "ab.safetensors")
    assert code == 0 and "warning: ratio 0 for b.safetensors: it changes nothing" in err
    assert "a.safetensors" not in err and "every ratio is 0" not in err
    code, _, err = run_lytools(capsys, "merge", a, b, "--ratios", "0", "0", "--dry-run")
    assert code == 0 and "ratio 0 for a.safetensors" in err and "ratio 0 for b.safetensors" in err
    assert "every ratio is 0: the merged network changes nothing" in err


def written_ranks(path: Path) -> dict[str, set]:
    """Return {"linear"/"conv": {(rank, alpha)}} from the tensors of a kohya LoRA file (kxk convs apart)."""
    tensors = read_all(path)
    found: dict[str, set] = {"linear": set(), "conv": set()}
    for key, down in tensors.items():
        if key.endswith(".lora_down.weight") and down.abs().sum() > 0:  # not an A1111 zero completion
            name = key[: -len(".lora_down.weight")]
            kind = "conv" if down.dim() == 4 and down.shape[2:] != (1, 1) else "linear"
            found[kind].add((down.shape[0], float(tensors[f"{name}.alpha"])))
    return found


def test_network_metadata_describes_the_ranks_and_alphas_written(tmp_path):
    """ss_network_dim/alpha: the linear modules' rank and stored alpha, conv_dim/conv_alpha in ss_network_args,
    "Dynamic" only where the written modules differ (sd-scripts convention), concatenated or re-factored."""
    a = build_network(tmp_path / "a.safetensors", "sd1", factor=16, rank=4, alpha=2.0, modules="c3lier", seed=1,
                      metadata={"ss_network_dim": "4", "ss_network_alpha": "2.0",
                                "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2.0", "dropout": "0.1"})})
    b = build_network(tmp_path / "b.safetensors", "sd1", factor=16, rank=6, alpha=3.0, conv_rank=2, modules="c3lier", seed=2)
    out = tmp_path / "ab.safetensors"
    for options, dim, conv_dim in (({}, 10, 6), ({"rank": 8}, 8, 6), ({"rank": 8, "conv_rank": 3}, 8, 3)):
        merge_networks([a, b], out, ratios=[0.5, -1.0], overwrite=True, **options)
        meta = read_header(out).metadata
        assert written_ranks(out) == {"linear": {(dim, float(dim))}, "conv": {(conv_dim, float(conv_dim))}}, options
        assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(dim), f"{dim}.0"), options
        args = json.loads(meta["ss_network_args"])
        assert args == {"conv_dim": str(conv_dim), "conv_alpha": f"{conv_dim}.0", "dropout": "0.1"}, options
    # a LoHa copied with its own alpha beside concatenated LoRAs (alpha = rank): one rank, alphas that differ
    loha = build_network(tmp_path / "loha.safetensors", "sd1", factor=16, rank=4, alpha=1.0, algo="loha",
                         modules=["lora_te_text_model_encoder_layers_0_mlp_fc1"], seed=3)
    lora = build_network(tmp_path / "lora.safetensors", "sd1", factor=16, rank=4, alpha=1.0,
                         modules=["lora_te_text_model_encoder_layers_1_mlp_fc1"], seed=4)
    merge_networks([loha, lora], out, overwrite=True)
    meta = read_header(out).metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "Dynamic")
    lierla = build_network(tmp_path / "l.safetensors", "sd1", factor=16, rank=4, modules="lierla", seed=5)
    merge_networks([lierla, b], out, overwrite=True)  # ranks 4 + 6 where both have a module, 6 elsewhere
    meta = read_header(out).metadata
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("Dynamic", "Dynamic")
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}


def test_network_merge_output_dtype_is_the_widest_input_float_never_fp8(tmp_path):
    """Without --save-dtype: the widest float dtype of the inputs' factors; fp8 factors (stacked with ratios
    folded in) are not a default output dtype: float16 when every input is fp8, fp8 copies widened too."""
    fc1, fc2 = "lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te_text_model_encoder_layers_0_mlp_fc2"

    def net(name, dtype, modules=(fc1,), **options):
        return build_network(tmp_path / f"{name}.safetensors", "sd1", factor=16, rank=4, alpha=2.0, modules=list(modules),
                             dtype=dtype, seed=len(name), **options)

    def dtypes(path):
        return {key: tensor.dtype for key, tensor in read_all(path).items()}

    fp8 = net("fp8", torch.float8_e4m3fn)
    fp8_loha = net("fp8loha", torch.float8_e5m2, modules=(fc2,), algo="loha")
    half = net("half", torch.float16)
    full = net("full", torch.float32)
    out = tmp_path / "out.safetensors"
    merge_networks([fp8, half], out, ratios=[0.5, 1.0])
    written = dtypes(out)
    assert written[f"{fc1}.lora_up.weight"] == written[f"{fc1}.lora_down.weight"] == torch.float16
    merge_networks([fp8, fp8_loha], out, ratios=[0.5, 0.7], overwrite=True)
    written = dtypes(out)
    assert {d for k, d in written.items() if not k.endswith(".alpha")} == {torch.float16}
    assert not any(d.itemsize == 1 for d in written.values())  # the copied LoHa's alpha too
    merge_networks([half, full], out, overwrite=True)
    assert dtypes(out)[f"{fc1}.lora_up.weight"] == torch.float32
    merge_networks([full, fp8], out, save_dtype=torch.bfloat16, overwrite=True)
    assert dtypes(out)[f"{fc1}.lora_up.weight"] == torch.bfloat16
    # the change survives: fp8 factors times 0.5, stacked, read back as float16
    up = read_all(fp8)[f"{fc1}.lora_up.weight"].float()
    down = read_all(fp8)[f"{fc1}.lora_down.weight"].float()
    merge_networks([fp8], out, ratios=[0.3], overwrite=True)
    merged = read_all(out)
    assert merged[f"{fc1}.lora_up.weight"].dtype == torch.float16
    torch.testing.assert_close(lora_change(merged, fc1), 0.3 * (up @ down) * 0.5, rtol=2e-3, atol=1e-5)
    help_text = " ".join(CliRunner().invoke(cli, ["merge", "--help"]).output.split())
    assert "the widest float dtype of their factors, fp16 when all are fp8" in help_text


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """Text-encoder-only networks whose modules fit two architectures, and UNet networks that fit one."""
    folder = tmp_path_factory.mktemp("tied")
    return {
        "clip_lg": build_network(folder / "clip-lg.safetensors", "sdxl", factor=16, rank=2, components=("te1", "te2")),
        "t5": build_network(folder / "t5.safetensors", "flux", factor=16, rank=2, components=("te3",),
                            optional=("train_t5xxl",)),
        "sdxl": build_network(folder / "sdxl.safetensors", "sdxl", factor=16, rank=2, components=("unet",)),
        "flux": build_network(folder / "flux.safetensors", "flux", factor=16, rank=2, components=("unet",)),
    }


def test_tied_networks_merge_by_their_candidates(tied, tmp_path):
    """A tie (CLIP-L+CLIP-G: sdxl or sd3; T5: sd3 or flux) is compatible with each of its candidates; what the
    inputs' candidates leave in common names the output's architecture; no common one is refused."""
    from lytools.io.metadata import network_modelspec

    expected = {arch: network_modelspec(arch, "t")["modelspec.architecture"] for arch in ("sd3", "sdxl", "flux")}
    for names, arch in ((("clip_lg", "t5"), "sd3"), (("t5", "clip_lg"), "sd3"), (("clip_lg", "sdxl"), "sdxl"),
                        (("t5", "flux"), "flux")):
        out = tmp_path / f"{'-'.join(names)}.safetensors"
        merge_networks([tied[name] for name in names], out)
        assert open_file(out).metadata["modelspec.architecture"] == expected[arch], names
    out = tmp_path / "both-ties.safetensors"
    merge_networks([tied["clip_lg"], tied["clip_lg"]], out)
    assert "modelspec.architecture" not in open_file(out).metadata  # sdxl or sd3: no guess
    for names in (("clip_lg", "flux"), ("flux", "clip_lg"), ("clip_lg", "t5", "flux"), ("t5", "sdxl")):
        with pytest.raises(NetworkError, match="networks for different architectures"):
            merge_networks([tied[name] for name in names], tmp_path / "refused.safetensors", dry_run=True)
    assert not (tmp_path / "refused.safetensors").exists()


def test_device_on_a_merge_that_computes_nothing_warns(sd1, tmp_path, capsys):
    """--device given to an exact concatenation or a dry run changes nothing: said, exit 0; a merge that
    computes (--rank, --verify, into a checkpoint) or the default auto says nothing of it."""
    from tests.shared import run_lytools

    _, ckpt, a, b = sd1
    concat = "--device cpu: nothing here runs on a device (exact concatenation)"
    dry = "--device cpu: nothing here runs on a device (a dry run computes nothing)"
    runs = [
        (["-o", tmp_path / "concat.safetensors", "--device", "cpu"], concat),
        (["--dry-run", "--device", "cpu"], dry),
        (["--dry-run", "--rank", "2", "--device", "cpu"], dry),
        (["-o", tmp_path / "auto.safetensors"], None),
        (["-o", tmp_path / "svd.safetensors", "--rank", "2", "--device", "cpu"], None),
        (["-o", tmp_path / "verified.safetensors", "--verify", "--device", "cpu"], None),
    ]
    for options, warning in runs:
        code, _, err = run_lytools(capsys, "merge", a, b, *options)
        assert code == 0, err
        assert (warning in err) if warning else "nothing here runs on a device" not in err, (options, err)
    code, _, err = run_lytools(capsys, "merge", ckpt, a, "--dry-run", "--device", "cpu")
    assert code == 0 and dry in err
    code, _, err = run_lytools(capsys, "merge", ckpt, a, "-o", tmp_path / "into.safetensors", "--device", "cpu")
    assert code == 0 and "nothing here runs on a device" not in err
    concatenated, by_default = read_all(tmp_path / "concat.safetensors"), read_all(tmp_path / "auto.safetensors")
    assert concatenated.keys() == by_default.keys()
    assert all(torch.equal(tensor, by_default[key]) for key, tensor in concatenated.items())
