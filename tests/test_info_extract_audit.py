"""Audit of `lytools info` and `lytools extract` (SD1/SD2/SDXL) against the specs, with references
written independently of lytools: ranks from torch.linalg.svd (ALGORITHMS.md 15), hashes from
hashlib over the file bytes (FORMATS.md 5.4), ranks/alphas of the golden LyCORIS files."""

from __future__ import annotations

import hashlib
import json
import math
import struct

import pytest
import torch
from safetensors.torch import load_file, save, save_file

from lytools.extract import ExtractOptions, RankRule, extract
from lytools.info import inspect_file
from lytools.io import read_header
from lytools.testing import build_checkpoint, build_network, build_tuned

from tests.shared import run_lytools, shared_dir

P = "model.diffusion_model."
TE = "cond_stage_model.transformer.text_model."
# kohya module -> the single-file key it names (linear, 1x1 conv, kxk conv, text encoder)
SPECTRUM_MODULES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": P + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj": P + "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
    "lora_unet_down_blocks_0_attentions_0_proj_in": P + "input_blocks.1.1.proj_in.weight",
    "lora_unet_down_blocks_1_resnets_0_conv1": P + "input_blocks.4.0.in_layers.2.weight",
    "lora_unet_up_blocks_3_resnets_0_conv_shortcut": P + "output_blocks.9.0.skip_connection.weight",
    "lora_te_text_model_encoder_layers_3_self_attn_q_proj": TE + "encoder.layers.3.self_attn.q_proj.weight",
    "lora_te_text_model_encoder_layers_5_mlp_fc1": TE + "encoder.layers.5.mlp.fc1.weight",
}


# -- extract: rank selection against an independent reference ------------------------------------------
@pytest.fixture(scope="module")
def spectrum_pair(tmp_path_factory):
    """An SD1 pair (factor 8, fp32) whose only changes are known geometric spectra in SPECTRUM_MODULES."""
    folder = tmp_path_factory.mktemp("audit-spectra")
    base = build_checkpoint(folder / "base.safetensors", "sd1", factor=8, components=("unet", "clip_l"), dtype=torch.float32)
    tensors = load_file(base)
    generator = torch.Generator().manual_seed(0)
    spectra = {}
    for index, (name, key) in enumerate(SPECTRUM_MODULES.items()):
        weight = tensors[key]
        flat = weight.reshape(weight.shape[0], -1)
        n = min(flat.shape)
        sigma = torch.tensor([3.0 * (1 + 0.01 * index) * 0.72 ** j for j in range(n)], dtype=torch.float64)
        u, _ = torch.linalg.qr(torch.randn(flat.shape[0], n, generator=generator, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(flat.shape[1], n, generator=generator, dtype=torch.float64))
        tensors[key] = (flat.double() + (u * sigma) @ v.T).float().reshape(weight.shape).contiguous()
    tuned = folder / "tuned.safetensors"
    save_file(tensors, tuned)
    base_tensors = load_file(base)
    for name, key in SPECTRUM_MODULES.items():  # the reference: svd of what the files hold
        change = (tensors[key] - base_tensors[key]).reshape(tensors[key].shape[0], -1).double()
        spectra[name] = (torch.linalg.svd(change, full_matrices=False).S, tuple(tensors[key].shape))
    return base, tuned, spectra


def reference_rank(sigma: torch.Tensor, mode: str, value: float, out: int, flat_in: int, max_rank: int | None) -> int:
    """ALGORITHMS.md 15, written out again: strict comparisons, cumulative σ (not σ²), then clamps."""
    if mode == "fixed":
        rank = int(value)
    elif mode == "threshold":
        rank = sum(1 for s in sigma.tolist() if s > value)
    elif mode == "ratio":
        rank = sum(1 for s in sigma.tolist() if s > value * float(sigma[0]))
    else:
        total, running, rank = float(sigma.sum()), 0.0, 0
        for s in sigma.tolist():
            running += s
            if running < value * total:
                rank += 1
    rank = min(max(1, rank), out, flat_in)
    return min(rank, max_rank) if max_rank is not None and mode != "fixed" else rank


RANK_CASES = [
    ("fixed", 6, 3, None), ("fixed", 30, 50, None),
    ("threshold", 0.5, 0.25, None), ("threshold", 0.05, 1.0, 7),
    ("ratio", 0.3, 0.1, None), ("ratio", 0.01, 0.5, 5), ("ratio", 1.0, 0.0, None),
    ("quantile", 0.5, 0.8, None), ("quantile", 0.95, 0.3, 4), ("quantile", 0.0, 1.0, None),
]


def test_rank_modes_match_an_independent_svd_reference(spectrum_pair, tmp_path):
    base, tuned, spectra = spectrum_pair
    for case, (mode, linear, conv, cap) in enumerate(RANK_CASES):
        result = extract(base, tuned, tmp_path / f"out{case}.safetensors",
                         ExtractOptions(linear=RankRule(mode, linear, cap), conv=RankRule(mode, conv, cap)))
        records = {r.name: r for r in result.records}
        assert {r.name for r in result.records if r.stored != "skipped"} == set(spectra)
        for name, (sigma, shape) in spectra.items():
            kxk = len(shape) == 4 and shape[2] * shape[3] > 1  # 1x1 convs follow the linear rule (kohya)
            rank = reference_rank(sigma, mode, conv if kxk else linear, shape[0], math.prod(shape[1:]), cap)
            record = records[name]
            if rank >= shape[0] / 2:  # LyCORIS stores such a module whole
                assert record.stored == "full", (mode, name, record.rank, rank)
                continue
            assert (record.stored, record.rank, record.alpha) == ("lora", rank, float(rank)), (mode, linear, conv, name)
            optimum = math.sqrt(float(sigma[rank:].square().sum() / sigma.square().sum()))
            assert abs(record.rel_error - optimum) < 2e-3, (mode, name)  # the best rank-r approximation (fp16)


def test_a_difference_that_is_only_fp16_rounding_is_no_change(spectrum_pair, tmp_path, capsys):
    """An fp32 base and an fp16 fine-tune: the untouched modules differ by the rounding alone. They were
    all extracted as rank-32 noise (exit 0); now they are skipped and said, the trained ones kept."""
    base, tuned, spectra = spectrum_pair
    half = {key: value.half() for key, value in load_file(tuned).items()}
    save_file(half, tmp_path / "tuned16.safetensors")
    result = extract(base, tmp_path / "tuned16.safetensors", tmp_path / "out.safetensors",
                     ExtractOptions(linear=RankRule("fixed", 8), conv=RankRule("fixed", 8)))
    assert {r.name for r in result.records if r.stored != "skipped"} == set(spectra)
    assert sum(1 for r in result.records if (r.reason or "").startswith("differs only by rounding to F16")) > 300
    save_file({key: value.half() for key, value in load_file(base).items()}, tmp_path / "base16.safetensors")
    code, _, err = run_lytools(capsys, "extract", base, tmp_path / "base16.safetensors", tmp_path / "noise.safetensors", "-q")
    assert code == 1 and "no module differs" in err and "rounding" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "noise.safetensors").exists()


# -- extract: metadata ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd2_pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("audit-sd2")
    base = build_checkpoint(folder / "base.safetensors", "sd2", factor=16, components=("unet",))
    network = build_network(folder / "net.safetensors", "sd2", factor=16, rank=2, components=("unet",))
    tuned = build_tuned(base, folder / "tuned.safetensors", network).path
    tensors = load_file(tuned)
    tuned_v = folder / "tuned-v.safetensors"
    save_file(tensors, tuned_v, {"modelspec.prediction_type": "v"})
    return base, tuned, tuned_v


def test_sd2_v_prediction_is_labelled_from_metadata_and_unknown_is_said(sd2_pair, tmp_path, capsys):
    base, tuned, tuned_v = sd2_pair
    code, _, err = run_lytools(capsys, "extract", base, tuned_v, tmp_path / "v.safetensors", "--linear-dim", "2", "-q")
    assert code == 0 and "warning" not in err
    meta = read_header(tmp_path / "v.safetensors").metadata
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v2_v", "True")
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert (meta["modelspec.prediction_type"], meta["modelspec.resolution"]) == ("v", "768x768")
    # no metadata: sd-scripts' default label (512, epsilon; it wrote 768x768 with -512), with a warning
    code, _, err = run_lytools(capsys, "extract", base, tuned, tmp_path / "e.safetensors", "--linear-dim", "2", "-q")
    assert code == 0 and "prediction type" in err
    meta = read_header(tmp_path / "e.safetensors").metadata
    assert (meta["ss_base_model_version"], meta["modelspec.architecture"]) == ("sd_v2", "stable-diffusion-v2-512/lora")
    assert (meta["modelspec.prediction_type"], meta["modelspec.resolution"]) == ("epsilon", "512x512")


def test_full_mode_network_is_named_algo_full(sd2_pair, tmp_path):
    base, tuned, _ = sd2_pair
    result = extract(base, tuned, tmp_path / "full.safetensors", ExtractOptions(linear=RankRule("full"), conv=RankRule("full")))
    meta = read_header(result.output).metadata
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": "full"}  # it said locon (conv_dim Dynamic) for diff modules only


def test_variants_that_differ_are_said(tmp_path, capsys):
    base = build_checkpoint(tmp_path / "base.safetensors", "sd1", factor=16, components=("unet",))
    network = build_network(tmp_path / "net.safetensors", "sd1", factor=16, rank=2, components=("unet",))
    tensors = load_file(build_tuned(base, tmp_path / "tuned.safetensors", network).path)
    conv_in = P + "input_blocks.0.0.weight"
    tensors[conv_in] = torch.cat([tensors[conv_in], torch.zeros_like(tensors[conv_in])[:, :1].repeat(1, 5, 1, 1)], dim=1)
    save_file(tensors, tmp_path / "inpaint.safetensors")
    code, _, err = run_lytools(capsys, "extract", base, tmp_path / "inpaint.safetensors", tmp_path / "o.safetensors",
                               "--linear-dim", "2", "--conv-dim", "0", "-q")
    assert code == 0 and "sd1 plain and TUNED sd1 inpaint" in err


# -- info: every LyCORIS algorithm of the golden files (real LyCORIS outputs) ---------------------------
GOLDEN = shared_dir() / "fixtures" / "golden" if shared_dir() else None
GOLDEN_FILES = sorted(GOLDEN.glob("*.safetensors")) if GOLDEN and GOLDEN.is_dir() else []
ALGO_NAMES = {"locon": "lora", "diag-oft": "oft", "norms": "norm"}


@pytest.mark.skipif(not GOLDEN_FILES, reason="golden fixtures not found")
def test_info_names_every_golden_algorithm_with_its_rank_alpha_and_layer(tmp_path):
    for path in GOLDEN_FILES:
        header = read_header(path)
        meta = header.metadata
        tensors = load_file(path)
        network = {k[len("network."):]: v for k, v in tensors.items() if k.startswith("network.")}
        out = tmp_path / path.name
        save_file(network, out)  # no metadata: info must tell everything from the tensors
        report = inspect_file(out)["network"]
        algo = ALGO_NAMES.get(meta["golden_algo"], meta["golden_algo"])
        args = json.loads(meta["ss_network_args"])
        layer = json.loads(meta["golden_layer"])["kind"]
        case = meta["golden_case"]
        assert report["algorithms"] == {algo: 1}, path.name
        alpha_key = meta["golden_lora_name"] + ".alpha"
        dim = meta.get("ss_network_dim")
        if algo in ("lora", "loha", "glora") or (algo == "lokr" and not args.get("full_matrix")):
            assert report["rank"] == {"min": int(dim), "median": int(dim), "max": int(dim)}, path.name
        else:
            assert report["rank"] is None, path.name
        if algo in ("oft", "boft"):  # their "dim" is the block size; alpha is the constraint
            assert report["oft"]["block_size"]["max"] == int(dim), path.name
            constraint = float(network[alpha_key])
            assert (report["oft"]["constraint"] is not None) == (constraint != 0), path.name
            assert report["alpha"] is None
        elif alpha_key in network:
            value = float(network[alpha_key])
            assert report["alpha"]["max"] == pytest.approx(value), path.name
        else:
            assert report["alpha"] is None, path.name
        conv = report["conv_modules"]
        if layer == "conv3x3":
            tucker = "tucker" in case
            assert (conv["kxk"], conv["tucker"]) == (0 if tucker else 1, 1 if tucker else 0), path.name
        elif layer == "conv1x1" and algo not in ("loha", "lokr"):  # those store a 1x1 flattened: unknown kernel
            assert conv["1x1"] == 1, path.name
        elif layer != "conv1x1":
            assert conv == {"kxk": 0, "tucker": 0, "1x1": 0}, path.name
        assert report["dora"] == ("dora" in case), path.name
        if "dora" in case:
            assert report["dora_axes"] == {"in" if case.endswith("-in") else "out": 1}, path.name
        assert report["invalid_module_count"] == 0 and report["stray_key_count"] == 0, path.name


def test_info_note_names_a_command_that_takes_arch(tmp_path, capsys):
    network = {"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.zeros(48, 4),
               "lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_b": torch.zeros(4, 288),
               "lora_unet_down_blocks_0_resnets_0_conv1.hada_w2_a": torch.zeros(48, 4),
               "lora_unet_down_blocks_0_resnets_0_conv1.hada_w2_b": torch.zeros(4, 288),
               "lora_unet_down_blocks_0_resnets_0_conv1.alpha": torch.tensor(4.0)}
    save_file(network, tmp_path / "loha.safetensors")
    code, out, _ = run_lytools(capsys, "info", tmp_path / "loha.safetensors")
    # a LoHa stores a 3x3 conv flattened: the name says what it is in every architecture
    assert code == 0 and "1 kxk" in out
    assert "say which with --arch" not in out  # info has no --arch


# -- info --hash: every hash recomputed here from the file bytes ----------------------------------------
def sd_scripts_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' precalculate_safetensors_hashes: the bytes safetensors writes with ss_* metadata only."""
    raw = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    length = struct.unpack("<Q", raw[:8])[0]
    return hashlib.sha256(raw[8 + length:]).hexdigest(), hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]


def state_dict_hash(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for tensor in tensors.values():
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "0x" + digest.hexdigest()


HASH_CASES = {
    # under 1 MiB: the legacy window is empty input
    "small": (lambda: {"m.lora_down.weight": torch.randn(4, 64), "m.lora_up.weight": torch.randn(64, 4),
                       "m.alpha": torch.tensor(2.0)}, 0),
    # over 1 MiB, other metadata than ss_*: the file's legacy window is not sd-scripts' one
    "big": (lambda: {f"m{i}.lora_down.weight": torch.randn(8, 2048) for i in range(20)}
            | {f"m{i}.lora_up.weight": torch.randn(2048, 8).half() for i in range(20)}
            | {f"m{i}.alpha": torch.tensor(8.0) for i in range(20)}, 0),
    # a header over 1 MiB: the legacy window lies in the header
    "big-header": (lambda: {"m.lora_down.weight": torch.randn(4, 64), "m.lora_up.weight": torch.randn(64, 4),
                            "m.alpha": torch.tensor(2.0)}, 1_200_000),
}


@pytest.mark.parametrize("case", sorted(HASH_CASES))
def test_info_hashes_equal_hashlib_over_the_file(tmp_path, capsys, case):
    make, padding = HASH_CASES[case]
    torch.manual_seed(0)
    tensors = make()
    metadata = {"ss_network_dim": "4", "ss_tag_frequency": "x" * padding, "other": "y"}
    model_hash, legacy_hash = sd_scripts_hashes(tensors, metadata)
    metadata |= {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    metadata["modelspec.hash_sha256"] = state_dict_hash(tensors)
    path = tmp_path / f"{case}.safetensors"
    save_file(tensors, path, metadata)
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    whole, data = hashlib.sha256(raw).hexdigest(), hashlib.sha256(raw[8 + length:]).hexdigest()
    window = hashlib.sha256(raw[0x100000:0x110000]).hexdigest()[:8]
    code, out, _ = run_lytools(capsys, "info", "--json", "--verify", path)
    assert code == 0
    [report] = json.loads(out)
    hashes = report["hashes"]
    assert (hashes["sha256"], hashes["autov2"], hashes["autov3"]) == (whole, whole[:10], data[:12])
    assert (hashes["sshs_model_hash"], hashes["sshs_legacy_hash"]) == (data, window)
    embedded = hashes["embedded"]
    assert embedded["sshs_model_hash"]["matches"] is True
    assert embedded["sshs_legacy_hash"] == {"embedded": legacy_hash, "computed": legacy_hash, "matches": True}
    assert embedded["modelspec.hash_sha256"]["matches"] is not False  # the writer's order is unknown: never a false alarm
    code, out, _ = run_lytools(capsys, "info", "--hash", path)
    assert f"AutoV2        {whole[:10]}" in out and data[:12] in out and f"legacy        {window}" in out
    # the embedded legacy hash follows sd-scripts (file saved with ss_* only): said when it is not this file's window
    assert (f"({legacy_hash}: the window of this file saved with its ss_* metadata only" in out) == (legacy_hash != window)
    assert case != "big" or legacy_hash != window
    # a stale embedded hash fails --verify with one line naming the file
    metadata["sshs_model_hash"] = "0" * 64
    save_file(tensors, path, metadata)
    code, _, err = run_lytools(capsys, "info", "--verify", path)
    assert code == 1 and str(path) in err and "sshs_model_hash" in err


# -- extract: SD2's fused OpenCLIP in_proj, applied by diffusers ----------------------------------------
def test_sd2_extract_loads_in_diffusers_with_our_weight_changes(tmp_path):
    """The q/k/v modules cut from OpenCLIP's fused in_proj_weight (and the linear proj_in of the SD2 UNet)
    load in diffusers' SD2 pipeline, whose text encoder is a transformers CLIP with separate q/k/v."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from peft.tuners.lora import LoraLayer

    from lytools.algos import delta, group_keys, load_module
    from lytools.convert.names import candidates
    from lytools.io import open_file
    from lytools.testing import select_modules

    factor = 8
    base = build_checkpoint(tmp_path / "base.safetensors", "sd2", factor=factor, components=("unet", "clip_h"))
    modules = [m for m in select_modules("sd2", "c3lier")
               if "_1_" in m or m.endswith(("_0_mlp_fc1", "_0_self_attn_q_proj", "_0_self_attn_v_proj"))]
    network = build_network(tmp_path / "net.safetensors", "sd2", factor=factor, rank=4, modules=modules)
    tuned = build_tuned(base, tmp_path / "tuned.safetensors", network, noise=1e-4).path
    result = extract(base, tuned, tmp_path / "lora.safetensors", ExtractOptions(linear=RankRule("fixed", 6), conv=RankRule("fixed", 6)))
    shapes = {r.name: r.shape for r in result.records}
    with open_file(result.output) as lora:
        ours = {name: delta(load_module(lora, name, keys), shapes[name]) for name, keys in group_keys(lora.keys()).modules.items()}
    assert {"lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_te_text_model_encoder_layers_0_self_attn_v_proj"} <= set(ours)

    unet = diffusers.UNet2DConditionModel(
        sample_size=8, layers_per_block=2, block_out_channels=tuple(c // factor for c in (320, 640, 1280, 1280)),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=1024 // factor, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=8)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=1000, hidden_size=1024 // factor, intermediate_size=4096 // factor, num_hidden_layers=23,
        num_attention_heads=4, max_position_embeddings=77))
    vae = diffusers.AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                                  down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(result.output), adapter_name="x")
    found = {}
    for prefix, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        for path, module in model.named_modules():
            if isinstance(module, LoraLayer) and "x" in module.lora_A:
                found[candidates("sd2", f"{prefix}.{path}")[0].module] = module.get_delta_weight("x").float()
    assert set(found) == set(ours)  # k_proj of layer 0 too: the zero module added for A1111
    for name, change in found.items():
        expected = ours[name].float()
        assert torch.allclose(change.reshape(expected.shape), expected, atol=2e-3 * float(expected.abs().max()) + 1e-7), name


# -- info: checkpoint variants (FORMATS.md 2.2) --------------------------------------------------------
def _tiny(*shape):
    return torch.zeros(*shape, dtype=torch.float16)


VARIANTS = {  # header-level checkpoints at 1/16 of the real widths (detection scales them back)
    "sdxl-refiner": ({P + "input_blocks.0.0.weight": _tiny(24, 4, 3, 3), P + "label_emb.0.0.weight": _tiny(96, 160),
                      P + "out.2.weight": _tiny(4, 24, 3, 3), P + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": _tiny(48, 80),
                      "conditioner.embedders.0.model.ln_final.weight": _tiny(80)}, {}, ("sdxl", "refiner", "unknown")),
    "sdxl-ip2p": ({P + "input_blocks.0.0.weight": _tiny(20, 8, 3, 3), P + "label_emb.0.0.weight": _tiny(80, 176),
                   P + "out.2.weight": _tiny(4, 20, 3, 3), P + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": _tiny(40, 128)},
                  {"modelspec.prediction_type": "v"}, ("sdxl", "instruct-pix2pix", "v")),
    "sd1-inpaint-vpred-keys": ({P + "input_blocks.0.0.weight": _tiny(20, 9, 3, 3), P + "out.2.weight": _tiny(4, 20, 3, 3),
                                P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": _tiny(20, 48),
                                "v_pred": _tiny(0), "ztsnr": _tiny(0)}, {}, ("sd1", "inpaint", "v")),
    "sd2-768-v-metadata": ({P + "input_blocks.0.0.weight": _tiny(20, 4, 3, 3), P + "out.2.weight": _tiny(4, 20, 3, 3),
                            P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": _tiny(20, 64)},
                           {"modelspec.architecture": "stable-diffusion-v2-768-v"}, ("sd2", None, "v")),
    "sd2-no-metadata": ({P + "input_blocks.0.0.weight": _tiny(20, 4, 3, 3), P + "out.2.weight": _tiny(4, 20, 3, 3),
                         P + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": _tiny(20, 64)}, {}, ("sd2", None, "unknown")),
    "flux-fill": ({"double_blocks.0.img_attn.qkv.weight": _tiny(576, 192), "single_blocks.0.linear1.weight": _tiny(1344, 192),
                   "img_in.weight": _tiny(192, 24), "guidance_in.in_layer.weight": _tiny(192, 16)}, {}, ("flux", "dev-fill", "unknown")),
    "flux-schnell": ({"double_blocks.0.img_attn.qkv.weight": _tiny(576, 192), "single_blocks.0.linear1.weight": _tiny(1344, 192),
                      "img_in.weight": _tiny(192, 4)}, {}, ("flux", "schnell", "unknown")),
    "chroma": ({"double_blocks.0.img_attn.qkv.weight": _tiny(576, 192), "single_blocks.0.linear1.weight": _tiny(1344, 192),
                "img_in.weight": _tiny(192, 4), "distilled_guidance_layer.in_proj.weight": _tiny(320, 4)}, {}, ("chroma", None, "unknown")),
}


def test_info_checkpoint_variants_and_prediction_only_from_metadata(tmp_path):
    for name, (tensors, metadata, expected) in VARIANTS.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path, metadata or None)
        report = inspect_file(path)
        assert (report["architecture"], report["checkpoint"]["variant"], report["checkpoint"]["prediction"]) == expected, name


def test_info_shows_the_scale_and_says_how_alpha_zero_is_read(tmp_path, capsys):
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.lora_down.weight": torch.zeros(4, 320, 1, 1), f"{name}.lora_up.weight": torch.zeros(320, 4, 1, 1),
               f"{name}.alpha": torch.tensor(0.0)}, tmp_path / "zero.safetensors")
    save_file({f"{name}.lora_down.weight": torch.zeros(8, 320, 1, 1), f"{name}.lora_up.weight": torch.zeros(320, 8, 1, 1),
               f"{name}.alpha": torch.tensor(4.0)}, tmp_path / "half.safetensors")
    code, out, _ = run_lytools(capsys, "info", tmp_path / "zero.safetensors", tmp_path / "half.safetensors")
    zero, half = out.split("\n\n")
    assert code == 0 and "1 modules with alpha 0: kohya and LyCORIS read it as alpha = rank" in zero
    assert "scale         1 (alpha / rank)" in zero and "scale         0.5 (alpha / rank)" in half
    [report] = json.loads(run_lytools(capsys, "info", "--json", tmp_path / "zero.safetensors")[1])
    assert report["network"]["modules_with_zero_alpha"] == 1 and report["network"]["scale"]["max"] == 1


def test_a_diffusers_folder_says_its_prediction_type_in_its_scheduler_config(tmp_path, capsys):
    """stabilityai/stable-diffusion-2-1 and other v models ship as folders whose only record of v is
    scheduler/scheduler_config.json: info reports it and extract labels the network with it."""
    from tests.test_container_audit import write_diffusers_folder

    base = build_checkpoint(tmp_path / "base.safetensors", "sd1", factor=16, components=("unet", "clip_l"), dtype=torch.float32)
    network = build_network(tmp_path / "net.safetensors", "sd1", factor=16, rank=2, components=("unet",))
    tuned = build_tuned(base, tmp_path / "tuned.safetensors", network).path
    folders = [write_diffusers_folder(path, tmp_path / name) for path, name in ((base, "base-pipe"), (tuned, "tuned-pipe"))]
    for folder in folders:
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({"prediction_type": "v_prediction"}))
    [report] = json.loads(run_lytools(capsys, "info", "--json", folders[0])[1])
    assert (report["architecture"], report["checkpoint"]["prediction"]) == ("sd1", "v")
    code, _, err = run_lytools(capsys, "extract", *folders, tmp_path / "v.safetensors", "--linear-dim", "2", "-q")
    assert code == 0, err
    meta = read_header(tmp_path / "v.safetensors").metadata
    assert (meta["ss_base_model_version"], meta["modelspec.prediction_type"]) == ("sd_v1_v", "v")


def test_extract_refuses_to_replace_an_input_with_the_network(sd2_pair, tmp_path, capsys):
    base, tuned, _ = sd2_pair
    for which, target in (("BASE", tmp_path / "base.safetensors"), ("TUNED", tmp_path / "tuned.safetensors")):
        target.write_bytes((base if which == "BASE" else tuned).read_bytes())
        before = target.read_bytes()
        args = (target, tuned) if which == "BASE" else (base, target)
        code, out, err = run_lytools(capsys, "extract", *args, target, "--overwrite", "--linear-dim", "2", "-q")
        # it replaced the checkpoint with the LoRA (exit 0)
        # exit 1 and the wording merge, resize and convert use for an output naming an input
        assert code == 1 and f"would replace {which}" in err and len(err.strip().splitlines()) == 1 and not out
        assert target.read_bytes() == before


def test_other_tensors_that_differ_are_counted_not_lost_silently(spectrum_pair, tmp_path, capsys):
    """A fine-tune also moves biases, norms and embeddings, which a LoRA cannot hold; extract says how many
    (it said nothing). A bias of a module stored whole travels as diff_b and is not counted."""
    base, tuned, spectra = spectrum_pair
    tensors = load_file(tuned)
    changed = [P + "time_embed.0.weight", P + "input_blocks.1.1.proj_in.bias", P + "out.0.weight",
               TE + "embeddings.token_embedding.weight"]
    for key in changed:
        tensors[key] = tensors[key] + 0.01
    save_file(tensors, tmp_path / "tuned.safetensors")
    code, out, err = run_lytools(capsys, "extract", base, tmp_path / "tuned.safetensors", tmp_path / "a.safetensors",
                                 "--linear-dim", "4", "--conv-dim", "4", "--json")
    summary = json.loads(out)["summary"]
    assert code == 0 and summary["uncovered_changes"] == 4 and sorted(summary["uncovered_examples"]) == sorted(changed)
    assert "4 other tensors differ that a LoRA does not hold" in err
    result = extract(base, tmp_path / "tuned.safetensors", tmp_path / "b.safetensors",
                     ExtractOptions(linear=RankRule("full"), conv=RankRule("full"), text_encoder=False))
    assert sorted(result.uncovered) == sorted([changed[0], changed[2]])  # proj_in's bias is its diff_b now; no TE
    assert "lora_unet_down_blocks_0_attentions_0_proj_in.diff_b" in load_file(result.output)
