"""lytools resize: low-rank SVD through the core, kohya's rank rules, alpha bookkeeping, DyLoRA
truncation, conv/Tucker, mixed-algorithm files, metadata, the CLI's errors (spec: ALGORITHMS.md 16)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from lytools.algos import NetworkModule, delta
from lytools.cli import main
from lytools.io import file_hashes, open_file, write_safetensors
from lytools.resize import (
    ResizeOptions, resize_file, select_rank, svd_of_product, tucker_to_flat_down,
)
from tests.shared import shared_dir, spectrum_factors


def golden(name: str) -> dict[str, torch.Tensor]:
    root = shared_dir()
    if root is None or not (root / "fixtures/golden" / f"{name}.safetensors").exists():
        pytest.skip("no shared golden fixtures (LYTOOLS_SHARED)")
    with open_file(root / "fixtures/golden" / f"{name}.safetensors") as reader:
        return {key: reader.get(key).clone() for key in reader.keys()}


# -- helpers ------------------------------------------------------------------------------------------
def lora_delta(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Return s·up@down flattened (out, in·K) in float64, as a loader rebuilds it (Tucker included)."""
    module = NetworkModule(name, {k.split(".", 1)[1]: v for k, v in tensors.items() if k.split(".", 1)[0] == name})
    change = delta(module, _shape_of(module), precision="float64")
    return change.reshape(change.shape[0], -1)


def _shape_of(module: NetworkModule) -> tuple[int, ...]:
    up, down = module["lora_up.weight"], module["lora_down.weight"]
    kernel = tuple(module["lora_mid.weight"].shape[2:]) if "lora_mid.weight" in module else tuple(down.shape[2:])
    return (up.shape[0], down.shape[1], *kernel)


def best_approx(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.to(torch.float64), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with open_file(path) as reader:
        return {key: reader.get(key).clone() for key in reader.keys()}, dict(reader.metadata)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


LINEAR = "lora_unet_down_blocks_0_attentions_0_proj_in"
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"
TUCKER = "lora_unet_down_blocks_0_resnets_0_conv2"
SMALL = "lora_te_text_model_encoder_layers_0_mlp_fc1"


@pytest.fixture
def network(tmp_path) -> Path:
    """A LoRA/LoCon file: linear rank 8 alpha 4, conv3x3 rank 8, Tucker conv rank 6, a rank-2 module (fp32)."""
    tensors: dict[str, torch.Tensor] = {}
    up, down = spectrum_factors(48, 64, [2.0 * 0.7 ** i for i in range(8)], seed=1)
    tensors.update({f"{LINEAR}.lora_up.weight": up, f"{LINEAR}.lora_down.weight": down, f"{LINEAR}.alpha": torch.tensor(4.0)})
    up, down = spectrum_factors(40, 32 * 9, [1.0 * 0.8 ** i for i in range(8)], seed=2)
    tensors.update({f"{CONV}.lora_up.weight": up.reshape(40, 8, 1, 1), f"{CONV}.lora_down.weight": down.reshape(8, 32, 3, 3),
                    f"{CONV}.alpha": torch.tensor(8.0)})
    gen = torch.Generator().manual_seed(3)
    tensors.update({
        f"{TUCKER}.lora_up.weight": torch.randn(40, 6, 1, 1, generator=gen) * 0.3,
        f"{TUCKER}.lora_mid.weight": torch.randn(6, 6, 3, 3, generator=gen) * 0.3,
        f"{TUCKER}.lora_down.weight": torch.randn(6, 40, 1, 1, generator=gen) * 0.3,
        f"{TUCKER}.alpha": torch.tensor(3.0),
    })
    up, down = spectrum_factors(24, 16, [0.5, 0.25], seed=4)
    tensors.update({f"{SMALL}.lora_up.weight": up, f"{SMALL}.lora_down.weight": down})  # no alpha: alpha = rank
    path = tmp_path / "net.safetensors"
    write_safetensors(path, tensors, {"ss_network_dim": "8", "ss_network_alpha": "4.0", "ss_training_comment": "hello",
                                      "sshs_model_hash": "stale", "ss_network_module": "networks.lora"})
    return path


# -- the core -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("out,inp,rank", [(48, 64, 8), (7, 50, 12), (96, 5, 9), (33, 33, 33)])
def test_core_svd_matches_dense_svd(out, inp, rank):
    gen = torch.Generator().manual_seed(out * inp)
    up = torch.randn(out, rank, generator=gen, dtype=torch.float64)
    down = torch.randn(rank, inp, generator=gen, dtype=torch.float64)
    spectrum = svd_of_product(up, down)
    dense = up @ down
    reference = torch.linalg.svdvals(dense)
    k = spectrum.S.numel()
    assert k == min(out, inp, rank)
    torch.testing.assert_close(spectrum.S, reference[:k], rtol=1e-10, atol=1e-10)
    for keep in (1, k // 2 or 1, k):
        approx = (spectrum.U[:, :keep] * spectrum.S[:keep]) @ spectrum.Vh[:keep]
        torch.testing.assert_close(approx, best_approx(dense, keep), rtol=1e-9, atol=1e-9)
    assert spectrum.full_length == min(out, inp)


def test_tucker_contraction_is_the_lora_mid_product():
    gen = torch.Generator().manual_seed(5)
    up, mid, down = torch.randn(12, 4, generator=gen), torch.randn(4, 4, 3, 3, generator=gen), torch.randn(4, 10, 1, 1, generator=gen)
    module = NetworkModule("m", {"lora_up.weight": up.reshape(12, 4, 1, 1), "lora_mid.weight": mid, "lora_down.weight": down})
    expected = delta(module, (12, 10, 3, 3)).reshape(12, -1)
    torch.testing.assert_close(up @ tucker_to_flat_down(mid, down), expected, rtol=1e-5, atol=1e-5)


# -- rank rules: kohya's dense route written out independently ------------------------------------------
def kohya_dense_rank(dense: torch.Tensor, method: str, param: float | None, new_rank: int) -> int:
    S = torch.linalg.svdvals(dense.to(torch.float64))
    if method == "sv_ratio":
        index = int(torch.sum(S > S[0] / param).item())
        index = max(1, min(index, len(S) - 1)) + 1
    elif method == "sv_cumulative":
        cumulative = torch.cumsum(S, dim=0) / float(torch.sum(S))
        index = int(torch.searchsorted(cumulative, param)) + 1
        index = max(1, min(index, len(S) - 1)) + 1
    elif method == "sv_fro":
        squared = S.pow(2)
        cumulative = torch.cumsum(squared, dim=0) / float(torch.sum(squared))
        index = int(torch.searchsorted(cumulative, param ** 2)) + 1
        index = max(1, min(index, len(S) - 1)) + 1
    else:
        index = new_rank
    if S[0] < 1e-6:
        return 1
    return min(index, new_rank)


@pytest.mark.parametrize("method,param", [("sv_ratio", 2.0), ("sv_ratio", 7.5), ("sv_fro", 0.5), ("sv_fro", 0.9),
                                          ("sv_fro", 0.99), ("sv_cumulative", 0.3), ("sv_cumulative", 0.8)])
def test_dynamic_methods_pick_kohyas_rank(method, param):
    for seed, decay in enumerate((0.5, 0.75, 0.9, 0.97)):
        sigma = [decay ** i * (1 + 0.01 * i) for i in range(16)]
        sigma = sorted(sigma, reverse=True)
        up, down = spectrum_factors(80, 60, sigma, seed=seed, dtype=torch.float64)
        spectrum = svd_of_product(up, down)
        for cap in (4, 64):
            choice = select_rank(spectrum.S, spectrum.full_length, method, param, cap)
            assert choice.rank == kohya_dense_rank(up @ down, method, param, cap), (seed, cap)


def test_rank_rule_edge_cases():
    sigma = torch.tensor([3.0, 2.0, 1.0])
    # the +1 convention: sv_ratio 1.5 keeps sigma > 2 (one value) and answers 2
    assert select_rank(sigma, 10, "sv_ratio", 1.5, None).rank == 2
    # the whole share is reached at the last non-zero value: index 2, + 1, + 1 (padded zeros do not count)
    assert select_rank(sigma, 10, "sv_fro", 1.0, None).rank == 4
    # ... and the clamp at len(S) - 1 applies where the spectrum has no zeros
    assert select_rank(sigma, 3, "sv_cumulative", 1.0, None).rank == 3
    zero = select_rank(torch.tensor([5e-7, 1e-7]), 8, "fixed", None, 4)
    assert zero.rank == 1 and zero.zero
    choice = select_rank(sigma, 10, "fixed", None, 2)
    assert choice.sum_kept == pytest.approx(5 / 6)
    assert choice.fro_kept == pytest.approx(math.sqrt(13 / 14))
    assert choice.max_ratio == pytest.approx(1.5)


# -- whole files --------------------------------------------------------------------------------------
def test_fixed_resize_is_the_best_approximation_with_scale_kept(network, tmp_path):
    out = tmp_path / "out.safetensors"
    summary = resize_file(network, out, ResizeOptions(rank=4, conv_rank=3))
    before, _ = read_all(network)
    after, meta = read_all(out)
    # linear: s = 4/8 kept; alpha' = s·r' = 2 as a 0-d tensor
    assert after[f"{LINEAR}.alpha"].shape == () and float(after[f"{LINEAR}.alpha"]) == 2.0
    assert after[f"{LINEAR}.lora_down.weight"].shape == (4, 64) and after[f"{LINEAR}.lora_up.weight"].shape == (48, 4)
    assert rel(lora_delta(after, LINEAR), best_approx(lora_delta(before, LINEAR), 4)) < 1e-5
    # conv 3x3: conv rank 3, LoCon shapes
    assert after[f"{CONV}.lora_down.weight"].shape == (3, 32, 3, 3) and after[f"{CONV}.lora_up.weight"].shape == (40, 3, 1, 1)
    assert float(after[f"{CONV}.alpha"]) == 3.0
    assert rel(lora_delta(after, CONV), best_approx(lora_delta(before, CONV), 3)) < 1e-5
    # Tucker: core folded, plain LoCon out, scale 3/6 kept
    assert f"{TUCKER}.lora_mid.weight" not in after
    assert after[f"{TUCKER}.lora_down.weight"].shape == (3, 40, 3, 3)
    assert float(after[f"{TUCKER}.alpha"]) == pytest.approx(1.5)
    assert rel(lora_delta(after, TUCKER), best_approx(lora_delta(before, TUCKER), 3)) < 1e-5
    # already at or below the target: bit-identical copy (alpha stays absent)
    for suffix in ("lora_up.weight", "lora_down.weight"):
        assert torch.equal(after[f"{SMALL}.{suffix}"], before[f"{SMALL}.{suffix}"])
    assert f"{SMALL}.alpha" not in after
    by_name = {r.name: r for r in summary.modules}
    assert by_name[SMALL].action == "copied" and by_name[LINEAR].action == "resized"
    # reported figures are those of the dense spectrum
    dense_sigma = torch.linalg.svdvals(lora_delta(before, LINEAR) / 0.5)
    assert by_name[LINEAR].fro_kept == pytest.approx(float(dense_sigma[:4].norm() / dense_sigma.norm()), rel=1e-6)
    assert by_name[LINEAR].sum_kept == pytest.approx(float(dense_sigma[:4].sum() / dense_sigma.sum()), rel=1e-5)
    assert by_name[LINEAR].max_ratio == pytest.approx(float(dense_sigma[0] / dense_sigma[3]), rel=1e-5)
    # metadata: sd-scripts' comment prefix, dim/alpha, fresh hashes, provenance
    assert meta["ss_training_comment"] == "dimension is resized from 8 to 4 (conv: 3); hello"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["sshs_model_hash"].startswith(file_hashes(out).autov3) and meta["sshs_model_hash"] != "stale"
    assert json.loads(meta["lytools.sources"])[0]["name"] == "net.safetensors"
    assert "lytools.command" in meta and "lytools.version" in meta


def test_fp16_alpha_rounding_is_folded_into_up(tmp_path):
    up, down = spectrum_factors(32, 24, [1.0, 0.6, 0.3, 0.1, 0.05], seed=7)
    alpha = 3.3  # s·r' = 3.3·2/5 = 1.32 is not exact in fp16
    path = tmp_path / "h.safetensors"
    write_safetensors(path, {f"{LINEAR}.lora_up.weight": up.half(), f"{LINEAR}.lora_down.weight": down.half(),
                             f"{LINEAR}.alpha": torch.tensor(alpha, dtype=torch.float16)})
    out = tmp_path / "o.safetensors"
    resize_file(path, out, ResizeOptions(rank=2))
    before, after = read_all(path)[0], read_all(out)[0]
    assert after[f"{LINEAR}.lora_up.weight"].dtype == torch.float16 and after[f"{LINEAR}.alpha"].dtype == torch.float16
    s = float(torch.tensor(alpha, dtype=torch.float16)) / 5
    assert float(after[f"{LINEAR}.alpha"]) == pytest.approx(s * 2, rel=1e-3)
    assert rel(lora_delta(after, LINEAR), best_approx(lora_delta(before, LINEAR), 2)) < 2e-3
    out32 = tmp_path / "o32.safetensors"
    resize_file(path, out32, ResizeOptions(rank=2, save_dtype=torch.float32))
    assert read_all(out32)[0][f"{LINEAR}.lora_down.weight"].dtype == torch.float32


@pytest.mark.parametrize("method,param", [("sv_fro", 0.9), ("sv_ratio", 3.0), ("sv_cumulative", 0.6)])
def test_dynamic_file_ranks_and_metadata(network, tmp_path, method, param):
    out = tmp_path / "d.safetensors"
    summary = resize_file(network, out, ResizeOptions(method=method, method_param=param, max_rank=6))
    before, _ = read_all(network)
    after, meta = read_all(out)
    for name in (LINEAR, CONV):
        dense = lora_delta(before, name)
        expected = kohya_dense_rank(dense, method, param, 6)
        report = next(r for r in summary.modules if r.name == name)
        assert report.rank_rule == expected
        written = after[f"{name}.lora_down.weight"].shape[0]
        assert written == min(expected, 8)
        assert rel(lora_delta(after, name), best_approx(dense, written)) < 1e-5
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_alpha"] == "Dynamic"
    assert meta["ss_training_comment"] == f"Dynamic resize with {method}: {param} from 8; hello"


def test_dyLoRA_truncation_keeps_alpha_and_reports_unit(tmp_path, capsys):
    gen = torch.Generator().manual_seed(9)
    tensors = {
        f"{LINEAR}.lora_up.weight": torch.randn(48, 16, generator=gen), f"{LINEAR}.lora_down.weight": torch.randn(16, 64, generator=gen),
        f"{LINEAR}.alpha": torch.tensor(8.0),
        f"{SMALL}.lora_up.weight": torch.randn(24, 16, generator=gen), f"{SMALL}.lora_down.weight": torch.randn(16, 16, generator=gen),
    }
    path = tmp_path / "dy.safetensors"
    write_safetensors(path, tensors, {"ss_network_module": "networks.dylora", "ss_network_args": json.dumps({"unit": "4"})})
    out = tmp_path / "t.safetensors"
    summary = resize_file(path, out, ResizeOptions(rank=8, truncate=True))
    after, meta = read_all(out)
    assert torch.equal(after[f"{LINEAR}.lora_down.weight"], tensors[f"{LINEAR}.lora_down.weight"][:8])
    assert torch.equal(after[f"{LINEAR}.lora_up.weight"], tensors[f"{LINEAR}.lora_up.weight"][:, :8])
    assert float(after[f"{LINEAR}.alpha"]) == 8.0  # alpha kept: scale becomes 8/8
    assert float(after[f"{SMALL}.alpha"]) == 16.0  # missing alpha meant alpha = 16: written explicitly
    assert not summary.warnings
    assert meta["ss_network_module"] == "networks.dylora"
    assert meta["ss_training_comment"].startswith("dimension is truncated from 16 to 8; ")
    code, stdout, err = run_cli(["resize", path, tmp_path / "t6.safetensors", "--rank", "6", "--truncate"], capsys)
    assert code == 0 and stdout.strip().endswith("t6.safetensors")
    assert err.count("not a multiple of the DyLoRA unit 4") == 1


# -- other algorithms -----------------------------------------------------------------------------------
def _golden_module(case: str, name: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    tensors = golden(case)
    net = {}
    for key, value in tensors.items():
        if key.startswith("network."):
            _, rest = key.split(".", 1)
            module, suffix = rest.split(".", 1)
            net[f"{name}.{suffix}"] = value
    return net, tensors


def test_mixed_algorithm_file_flattens_additive_modules(tmp_path):
    names = {"loha-linear": "lora_unet_mid_block_attentions_0_proj_in", "lokr-linear": "lora_unet_mid_block_attentions_0_proj_out",
             "full-linear": "lora_unet_up_blocks_1_attentions_0_proj_in", "loha-conv3x3": CONV,
             "locon-linear": LINEAR, "norms-layernorm": "lora_unet_down_blocks_0_attentions_0_norm"}
    tensors, expected = {}, {}
    for case, name in names.items():
        net, gold = _golden_module(case, name)
        tensors.update(net)
        expected[name] = gold["expected.weight@1.0"] - gold["base.weight"]
    path = tmp_path / "mixed.safetensors"
    write_safetensors(path, tensors, {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha", "conv_dim": "4"})})
    out = tmp_path / "m.safetensors"
    summary = resize_file(path, out, ResizeOptions(rank=3, verify=True))
    after, meta = read_all(out)
    actions = {r.name: r.action for r in summary.modules}
    assert actions[names["norms-layernorm"]] == "kept" and actions[LINEAR] == "resized"
    for case in ("loha-linear", "lokr-linear", "full-linear", "loha-conv3x3"):
        name = names[case]
        assert actions[name] == "flattened"
        assert set(k.split(".", 1)[1] for k in after if k.startswith(name + ".")) == {"lora_up.weight", "lora_down.weight", "alpha"}
        approx = best_approx(expected[name].reshape(expected[name].shape[0], -1), 3)
        assert rel(lora_delta(after, name), approx) < 1e-4, case
    assert after[f"{CONV}.lora_down.weight"].shape == (3, 32, 3, 3)  # kernel from the name tables
    for key in ("w_norm", "b_norm"):
        assert torch.equal(after[f"{names['norms-layernorm']}.{key}"], tensors[f"{names['norms-layernorm']}.{key}"])
    assert meta["ss_network_module"] == "networks.lora" and "algo" not in json.loads(meta["ss_network_args"])
    assert summary.verify is not None and summary.verify.ok
    assert any("bias change dropped" in w for w in summary.warnings) == (f"{names['full-linear']}.diff_b" in tensors)


@pytest.mark.parametrize("case", ["ia3-linear", "diag-oft-linear", "boft-linear", "glora-linear", "locon-linear-dora", "loha-linear-dora"])
def test_non_additive_modules_need_and_use_the_base(tmp_path, capsys, case):
    net, gold = _golden_module(case, LINEAR)
    path = tmp_path / "n.safetensors"
    write_safetensors(path, net)
    base = tmp_path / "base.safetensors"
    write_safetensors(base, {"down_blocks.0.attentions.0.proj_in.weight": gold["base.weight"],
                             "down_blocks.0.attentions.0.proj_in.bias": gold["base.bias"]})
    code, _, err = run_cli(["resize", path, tmp_path / "x.safetensors", "--rank", "5", "-q"], capsys)
    assert code == 1 and err.count("\n") == 1 and "--base" in err and not (tmp_path / "x.safetensors").exists()
    out = tmp_path / "y.safetensors"
    resize_file(path, out, ResizeOptions(rank=5, base=base, verify=True))
    change = gold["expected.weight@1.0"] - gold["base.weight"]
    assert rel(lora_delta(read_all(out)[0], LINEAR), best_approx(change, 5)) < 1e-4


# -- errors and options -------------------------------------------------------------------------------------
def test_malformed_inputs_fail_in_one_line(tmp_path, capsys, network):
    cases = {}
    cases["broken"] = tmp_path / "broken.safetensors"
    cases["broken"].write_bytes(b"\xff" * 40)
    gen = torch.Generator().manual_seed(0)
    cases["unchained"] = tmp_path / "unchained.safetensors"
    write_safetensors(cases["unchained"], {f"{LINEAR}.lora_up.weight": torch.randn(48, 4, generator=gen),
                                           f"{LINEAR}.lora_down.weight": torch.randn(5, 64, generator=gen)})
    cases["half"] = tmp_path / "half.safetensors"
    write_safetensors(cases["half"], {f"{LINEAR}.lora_up.weight": torch.randn(48, 4, generator=gen)})
    cases["checkpoint"] = tmp_path / "ckpt.safetensors"
    write_safetensors(cases["checkpoint"], {"model.diffusion_model.out.2.weight": torch.randn(4, 4)})
    cases["tlora"] = tmp_path / "tlora.safetensors"
    write_safetensors(cases["tlora"], {f"{LINEAR}.q_layer.weight": torch.randn(4, 64), f"{LINEAR}.p_layer.weight": torch.randn(48, 4),
                                       f"{LINEAR}.lambda_layer": torch.randn(1, 4)})
    cases["missing"] = tmp_path / "nope.safetensors"
    for label, path in cases.items():
        out = tmp_path / f"out-{label}.safetensors"
        code, stdout, err = run_cli(["resize", path, out, "--rank", "2"], capsys)
        assert code == 1, label
        assert err.startswith("lytools: error: ") and err.count("\n") == 1, (label, err)
        assert path.name in err, (label, err)
        assert not out.exists() and stdout == ""
    # existing output without --overwrite; bad option combinations
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"x")
    assert run_cli(["resize", network, existing, "--rank", "2"], capsys)[0] == 1
    for args in (["--method", "sv_fro"], [], ["--rank", "2", "--method-param", "0.5"], ["--method", "sv_fro", "--method-param", "2"],
                 ["--method", "sv_ratio", "--method-param", "0.5"], ["--rank", "0"], ["--method", "sv_ratio", "--method-param", "2", "--truncate"], ["--rank", "2", "--report", tmp_path / "r.txt"]):
        code, _, err = run_cli(["resize", network, tmp_path / "o.safetensors", *args], capsys)
        assert code == 2 and err.count("\n") == 1, (args, err)  # option values: usage errors
    assert run_cli(["resize", network, tmp_path / "o.safetensors", "--method", "svd"], capsys)[0] == 2
    assert not (tmp_path / "o.safetensors").exists()


def test_cli_report_json_verbose_and_verify(network, tmp_path, capsys):
    out, report = tmp_path / "out.safetensors", tmp_path / "rep.csv"
    code, stdout, err = run_cli(["resize", network, out, "--rank", "4", "--report", report, "--verify", "-v",
                                 "--save-dtype", "bf16", "--device", "cpu"], capsys)
    assert code == 0 and stdout.strip() == str(out)
    assert f"{LINEAR}: lora linear resized 8->4" in err and "fro " in err and "verify:" in err
    rows = list(csv.DictReader(report.open()))
    assert {row["module"] for row in rows} == {LINEAR, CONV, TUCKER, SMALL}
    linear = next(row for row in rows if row["module"] == LINEAR)
    assert linear["rank_out"] == "4" and float(linear["alpha_out"]) == 2.0 and 0 < float(linear["fro_kept"]) < 1
    assert read_all(out)[0][f"{LINEAR}.lora_up.weight"].dtype == torch.bfloat16
    code, stdout, err = run_cli(["resize", network, out, "--method", "sv_fro", "--method-param", "0.8", "--rank", "5",
                                 "--overwrite", "--json", "-q", "--report", tmp_path / "rep.json"], capsys)
    assert code == 0 and err == ""
    payload = json.loads(stdout)
    assert all(m["rank_out"] <= 5 for m in payload["modules"])
    assert json.loads((tmp_path / "rep.json").read_text())["modules"][0]["module"]
    code, _, err = run_cli(["resize", network, tmp_path / "c.safetensors", "--rank", "2", "--device", "cuda:7"], capsys)
    assert code == 1 and "cuda" in err.lower()


# -- properties ----------------------------------------------------------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402

from lytools.algos import describe_module  # noqa: E402
from lytools.resize import Context, RankRule, resize_module  # noqa: E402


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 24), inp=st.integers(1, 24), kernel=st.sampled_from([(), (1,), (1, 1), (3, 3), (1, 3)]),
       rank=st.integers(1, 12), target=st.integers(1, 12), alpha=st.sampled_from([None, 0.0, 1.0, 5.5]),
       seed=st.integers(0, 1000))
def test_property_resized_module_is_the_scaled_best_approximation(out, inp, kernel, rank, target, alpha, seed):
    gen = torch.Generator().manual_seed(seed)
    up_tail = (1,) * len(kernel)
    tensors = {"lora_up.weight": torch.randn(out, rank, *up_tail, generator=gen, dtype=torch.float64),
               "lora_down.weight": torch.randn(rank, inp, *kernel, generator=gen, dtype=torch.float64)}
    if alpha is not None:
        tensors["alpha"] = torch.tensor(alpha, dtype=torch.float64)
    module = NetworkModule("lora_unet_x", tensors)
    info = describe_module(module)
    is_conv = any(k != 1 for k in kernel)
    result = resize_module(module, info, Context(RankRule("fixed", None, target, target), torch.device("cpu")))
    written = NetworkModule("lora_unet_x", result.tensors)
    shape = (out, inp, *kernel)
    reference = delta(module, shape, precision="float64").reshape(out, -1)
    kept = min(target, rank, out, inp * math.prod(kernel))
    if kept >= rank:
        assert result.report.action == "copied" and all(torch.equal(written[s], tensors[s]) for s in tensors)
    else:
        assert written["lora_down.weight"].shape == (kept, inp, *kernel)
        assert written["lora_up.weight"].shape == (out, kept, *up_tail)
        assert written["alpha"].shape == ()
        scale = 1.0 if not alpha else alpha / rank
        assert float(written["alpha"]) == pytest.approx(scale * kept)
    approx = delta(written, shape, precision="float64").reshape(out, -1)
    # A rank-`kept` matrix whose error equals the discarded singular values is a best approximation
    # (Eckart-Young). Comparing to one SVD's truncation instead is ill-conditioned when sigma_kept
    # and sigma_kept+1 are close; the error itself is not. The math runs in float32 (ALGORITHMS.md 1.4).
    sigma = torch.linalg.svdvals(reference)
    optimal = float(sigma[kept:].pow(2).sum().sqrt())
    achieved = float(torch.linalg.vector_norm(approx - reference))
    assert abs(achieved - optimal) <= 2e-6 * float(torch.linalg.vector_norm(reference))
    assert int(torch.linalg.matrix_rank(approx, rtol=1e-5)) <= kept
    if kept < sigma.numel() and float(sigma[kept - 1] - sigma[kept]) > 1e-3 * float(sigma[0]):
        assert rel(approx, best_approx(reference, kept)) < 2e-6 * float(sigma[0] / (sigma[kept - 1] - sigma[kept]))
    assert result.report.kind == (("conv" if is_conv else "conv1x1") if kernel else "linear")


def test_metadata_conv_args_and_svd_of_dylora(tmp_path):
    up, down = spectrum_factors(40, 32 * 9, [1.0, 0.5, 0.25, 0.1], seed=11)
    lin_up, lin_down = spectrum_factors(48, 64, [1.0, 0.5, 0.25, 0.1], seed=12)
    tensors = {f"{CONV}.lora_up.weight": up.reshape(40, 4, 1, 1), f"{CONV}.lora_down.weight": down.reshape(4, 32, 3, 3),
               f"{CONV}.alpha": torch.tensor(2.0), f"{LINEAR}.lora_up.weight": lin_up, f"{LINEAR}.lora_down.weight": lin_down,
               f"{LINEAR}.alpha": torch.tensor(4.0)}
    path = tmp_path / "dy.safetensors"
    write_safetensors(path, tensors, {"ss_network_module": "networks.dylora", "modelspec.date": "2020-01-01T00:00:00",
                                      "ss_network_args": json.dumps({"conv_dim": "4", "conv_alpha": "2.0", "unit": "1"})})
    out = tmp_path / "o.safetensors"
    resize_file(path, out, ResizeOptions(rank=3, conv_rank=2))
    meta = read_all(out)[1]
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0", "unit": "1"}
    assert meta["ss_network_dim"] == "3" and meta["ss_network_alpha"] == "3.0"
    assert meta["ss_network_module"] == "networks.lora"  # re-factored: the ranks are no longer nested
    assert meta["modelspec.date"] != "2020-01-01T00:00:00"


def test_verify_catches_a_wrong_module(network, tmp_path):
    from lytools.algos import describe_module
    from lytools.resize.pipeline import read_network
    from lytools.resize.verify import verify_output

    out = tmp_path / "v.safetensors"
    summary = resize_file(network, out, ResizeOptions(rank=4, verify=True))
    assert summary.verify.ok and set(summary.verify.errors) == {r.name for r in summary.modules}
    tensors, meta = read_all(out)
    tensors[f"{LINEAR}.lora_up.weight"] = tensors[f"{LINEAR}.lora_up.weight"] * 1.05
    write_safetensors(out, tensors, meta, overwrite=True)
    source = read_network(network)
    infos = {name: describe_module(module) for name, module in source.modules.items()}
    from lytools.resize import Context, RankRule
    result = verify_output(out, source.modules, infos, summary.modules, Context(RankRule(rank=4, conv_rank=4), torch.device("cpu")))
    assert result.failed == [LINEAR] and "relative error" in result.message


def test_non_finite_factors_are_refused_by_resize_and_merge(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from lytools.testing import build_checkpoint, build_network

    base = build_checkpoint(tmp_path / "b.safetensors", "sd1", factor=16)
    build_network(tmp_path / "l.safetensors", "sd1", factor=16, rank=4)
    tensors = load_file(tmp_path / "l.safetensors")
    key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors")
    bad = str(tmp_path / "nan.safetensors")
    for args in (["resize", bad, str(tmp_path / "r.safetensors"), "--rank", "2"],
                 ["merge", str(base), bad, "-o", str(tmp_path / "m.safetensors")],
                 ["merge", bad, bad, "-o", str(tmp_path / "n.safetensors"), "--rank", "2"]):
        with pytest.raises(SystemExit) as raised:
            main(args)
        assert raised.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and bad in err[0] and key.split(".")[0] in err[0] and "1 non-finite values" in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "l.safetensors", "nan.safetensors"]
