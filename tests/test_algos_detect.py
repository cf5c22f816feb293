"""Detection of algorithm and hyper-parameters from key sets and shapes; every malformed case."""

from __future__ import annotations

import pytest
import torch

from lytools.algos import (
    KNOWN_SUFFIXES, NetworkModule, apply_module, describe_header, describe_module, describe_shapes,
    group_keys, module_prefix, read_scalar, scale_for, split_key,
)
from lytools.errors import LytoolsError, NetworkError, UnsupportedError

N = "lora_unet_mid_block_attentions_0_proj_in"


def info(shapes, **scalars):
    return describe_shapes(N, shapes, scalars)


# -- each algorithm ------------------------------------------------------------------------------

def test_lora_linear():
    got = info({"lora_up.weight": (320, 8), "lora_down.weight": (8, 768), "alpha": ()}, alpha=4.0)
    assert (got.algo, got.rank, got.alpha, got.scale) == ("lora", 8, 4.0, 0.5)
    assert (got.kernel, got.tucker, got.delta_shape, got.is_conv) == ((), False, (320, 768), False)
    assert got.additive and not got.needs_weight and got.mergeable


def test_lora_conv_and_conv_shaped_linear_factors():
    conv = info({"lora_up.weight": (64, 4, 1, 1), "lora_down.weight": (4, 32, 3, 3)})
    assert (conv.kernel, conv.delta_shape, conv.is_conv, conv.scale) == ((3, 3), (64, 32, 3, 3), True, 1.0)
    one = info({"lora_up.weight": (64, 4, 1, 1), "lora_down.weight": (4, 32, 1, 1)})
    assert (one.kernel, one.is_conv) == ((1, 1), False)


def test_lora_tucker():
    got = info({"lora_up.weight": (64, 4, 1, 1), "lora_down.weight": (4, 32, 1, 1),
                "lora_mid.weight": (4, 4, 3, 3), "alpha": ()}, alpha=2.0)
    assert (got.tucker, got.kernel, got.delta_shape, got.scale) == (True, (3, 3), (64, 32, 3, 3), 0.5)


def test_header_only_scale_unknown_without_alpha_value():
    headers = {"lora_up.weight": ((320, 8), "F16"), "lora_down.weight": ((8, 768), "F16"), "alpha": ((), "F16")}
    assert describe_header(N, headers).scale is None
    assert describe_header(N, headers, alpha=16).scale == 2.0
    assert describe_header(N, headers, alpha=0).scale == 1.0
    no_alpha = {k: v for k, v in headers.items() if k != "alpha"}
    assert describe_header(N, no_alpha).scale == 1.0


def test_loha_plain_and_tucker():
    plain = info({"hada_w1_a": (48, 4), "hada_w1_b": (4, 288), "hada_w2_a": (48, 4), "hada_w2_b": (4, 288),
                  "alpha": ()}, alpha=2.0)
    assert (plain.algo, plain.rank, plain.scale, plain.kernel, plain.delta_shape) == ("loha", 4, 0.5, None, (48, 288))
    tucker = info({"hada_w1_a": (4, 48), "hada_w1_b": (4, 32), "hada_w2_a": (4, 48), "hada_w2_b": (4, 32),
                   "hada_t1": (4, 4, 3, 3), "hada_t2": (4, 4, 3, 3)})
    assert (tucker.tucker, tucker.kernel, tucker.delta_shape) == (True, (3, 3), (48, 32, 3, 3))


@pytest.mark.parametrize(
    ("shapes", "rank", "full", "scale", "delta_shape"),
    [
        ({"lokr_w1": (6, 8), "lokr_w2": (8, 8)}, None, (True, True), 1.0, (48, 64)),
        ({"lokr_w1": (6, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}, 2, (True, False), 3.0, (48, 64)),
        ({"lokr_w1_a": (6, 2), "lokr_w1_b": (2, 8), "lokr_w2": (8, 8)}, 2, (False, True), 3.0, (48, 64)),
        ({"lokr_w1_a": (6, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}, 2, (False, False), 3.0, (48, 64)),
        ({"lokr_w1": (6, 4), "lokr_w2": (8, 8, 3, 3)}, None, (True, True), 1.0, (48, 32, 3, 3)),
        ({"lokr_w1": (6, 4), "lokr_w2_a": (2, 8), "lokr_w2_b": (2, 8), "lokr_t2": (2, 2, 3, 3)}, 2, (True, False), 3.0, (48, 32, 3, 3)),
        ({"lokr_w1": (6, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 72)}, 2, (True, False), 3.0, (48, 288)),
    ],
)
def test_lokr_every_half_combination(shapes, rank, full, scale, delta_shape):
    got = info({**shapes, "alpha": ()}, alpha=6.0)
    assert (got.algo, got.rank, got.lokr_full, got.scale, got.delta_shape) == ("lokr", rank, full, scale, delta_shape)
    first_in = shapes["lokr_w1"][1] if "lokr_w1" in shapes else shapes["lokr_w1_b"][1]
    assert got.lokr_w1 == (6, first_in)
    assert got.tucker == ("lokr_t2" in shapes)


def test_full_norm_ia3():
    full = info({"diff": (48, 32, 3, 3), "diff_b": (48,)})
    assert (full.algo, full.kernel, full.bias_delta, full.rank) == ("full", (3, 3), True, None)
    assert not info({"diff": (48, 64)}).bias_delta
    norm = info({"w_norm": (48,), "b_norm": (48,)})
    assert (norm.algo, norm.bias_delta, norm.delta_shape) == ("norm", True, (48,))
    ia3 = info({"weight": (1, 48, 1, 1), "on_input": ()}, on_input=1)
    assert (ia3.algo, ia3.on_input, ia3.additive) == ("ia3", True, False)
    assert info({"weight": (48,)}).on_input is False  # no on_input key: output axis
    assert info({"weight": (48,), "on_input": ()}).on_input is None  # value not given


def test_glora_layouts():
    current = info({"a1.weight": (64, 4), "a2.weight": (4, 64), "b1.weight": (48, 4), "b2.weight": (4, 64),
                    "alpha": ()}, alpha=2.0)
    assert (current.algo, current.rank, current.scale, current.variant, current.needs_weight) == ("glora", 4, 0.5, None, True)
    old = info({"a1.weight": (4, 64), "a2.weight": (64, 4), "b1.weight": (4, 64), "b2.weight": (48, 4)})
    assert (old.variant, old.rank, old.delta_shape) == ("old-layout", 4, (48, 64))
    square = info({"a1.weight": (8, 8), "a2.weight": (8, 8), "b1.weight": (8, 8), "b2.weight": (8, 8)})
    assert square.variant is None  # both layouts fit: the current one wins
    conv = info({"a1.weight": (32, 4, 1, 1), "a2.weight": (4, 32, 1, 1), "b1.weight": (48, 4, 1, 1),
                 "b2.weight": (4, 32, 3, 3)})
    assert (conv.kernel, conv.delta_shape) == ((3, 3), (48, 32, 3, 3))


def test_oft_boft_and_legacy():
    oft = info({"oft_blocks": (12, 4, 4), "alpha": ()}, alpha=0.5)
    assert (oft.algo, oft.blocks, oft.constraint, oft.additive, oft.variant) == ("oft", (12, 4), 0.5, False, None)
    assert info({"oft_blocks": (12, 4, 4)}).constraint == 0.0
    legacy = info({"oft_diag": (12, 4, 4)})
    assert (legacy.algo, legacy.variant, legacy.constraint) == ("oft", "legacy", None)
    boft = info({"oft_blocks": (4, 8, 6, 6), "rescale": (48, 1), "alpha": ()}, alpha=0)
    assert (boft.algo, boft.blocks, boft.constraint) == ("boft", (4, 8, 6), 0.0)
    assert (oft.out_features, boft.out_features, legacy.out_features) == (48, 48, 48)


def test_dora_axes():
    lora = {"lora_up.weight": (48, 8), "lora_down.weight": (8, 64)}
    assert info({**lora, "dora_scale": (48, 1)}).dora == "out"
    assert info({**lora, "dora_scale": (1, 64)}).dora == "in"
    assert info({**lora, "dora_scale": (48,)}).dora == "out"
    dora = info({**lora, "dora_scale": (48, 1)})
    assert not dora.additive and dora.needs_weight
    square = {"lora_up.weight": (64, 8), "lora_down.weight": (8, 64)}
    assert info({**square, "dora_scale": (64, 1)}).dora == "out"
    assert info({**square, "dora_scale": (1, 64)}).dora == "in"
    conv = {"lora_up.weight": (48, 4, 1, 1), "lora_down.weight": (4, 32, 3, 3)}
    assert info({**conv, "dora_scale": (1, 32, 1, 1)}).dora == "in"
    assert info({"oft_blocks": (12, 4, 4), "dora_scale": (48, 1)}).dora == "out"


def test_tlora_detected_not_mergeable():
    got = info({"q_layer.weight": (4, 64), "p_layer.weight": (48, 4), "lambda_layer": (1, 4), "alpha": ()}, alpha=4)
    assert (got.algo, got.rank, got.mergeable) == ("tlora", 4, False)
    module = NetworkModule(N, {"q_layer.weight": torch.ones(4, 64), "p_layer.weight": torch.ones(48, 4),
                               "lambda_layer": torch.ones(1, 4), "alpha": torch.tensor(4.0)})
    with pytest.raises(UnsupportedError, match=N):
        apply_module(module, torch.zeros(48, 64))


def test_sparse_bias_extras_detected():
    got = info({"lora_up.weight": (48, 8), "lora_down.weight": (8, 64), "bias_indices": (2, 10),
                "bias_values": (10,), "bias_size": (2,)})
    assert got.sparse_bias and got.algo == "lora"


# -- alpha ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "alpha",
    [torch.tensor(4), torch.tensor([4.0], dtype=torch.float16), torch.tensor(4.0, dtype=torch.bfloat16),
     torch.tensor([4], dtype=torch.int64), torch.tensor(4.0, dtype=torch.float64)],
)
def test_alpha_any_dtype_and_shape(alpha):
    module = NetworkModule(N, {"lora_up.weight": torch.ones(4, 8), "lora_down.weight": torch.ones(8, 6), "alpha": alpha})
    assert read_scalar(N, "alpha", alpha) == 4.0
    assert describe_module(module).scale == 0.5


def test_scale_for_zero_or_missing_alpha():
    assert scale_for(None, 8) == 1.0 and scale_for(0, 8) == 1.0 and scale_for(16, 8) == 2.0


# -- grouping ------------------------------------------------------------------------------------

def test_group_keys_mixed_file_and_stray():
    keys = [
        "lora_unet_a_proj.lora_up.weight", "lora_unet_a_proj.lora_down.weight", "lora_unet_a_proj.alpha",
        "lora_te1_b_fc1.lokr_w1", "lora_te1_b_fc1.lokr_w2_a", "lora_te1_b_fc1.lokr_w2_b", "lora_te1_b_fc1.alpha",
        "lora_te_c.diff", "lycoris_d.w_norm",
        "text_projection.weight", "bundle_emb.x.string_to_param.*", "orphan.alpha", "nodot",
        "unet.down_blocks.0.lora_A.weight", "lora_unet_a_proj.lora_up.weight.extra",
    ]
    groups = group_keys(keys)
    assert set(groups.modules) == {"lora_unet_a_proj", "lora_te1_b_fc1", "lora_te_c", "lycoris_d"}
    assert groups.modules["lora_unet_a_proj"]["lora_up.weight"] == "lora_unet_a_proj.lora_up.weight"
    assert sorted(groups.stray) == sorted([
        "text_projection.weight", "bundle_emb.x.string_to_param.*", "orphan.alpha", "nodot",
        "unet.down_blocks.0.lora_A.weight", "lora_unet_a_proj.lora_up.weight.extra",
    ])
    shapes = {
        "lora_unet_a_proj": {"lora_up.weight": (8, 2), "lora_down.weight": (2, 8), "alpha": ()},
        "lora_te1_b_fc1": {"lokr_w1": (2, 2), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 4), "alpha": ()},
    }
    algos = {name: describe_shapes(name, s, {"alpha": 1.0}).algo for name, s in shapes.items()}
    assert algos == {"lora_unet_a_proj": "lora", "lora_te1_b_fc1": "lokr"}


def test_prefixes_and_split():
    assert split_key("lora_unet_x.lora_up.weight") == ("lora_unet_x", "lora_up.weight")
    assert split_key("alpha") is None
    assert module_prefix("lora_te1_text_model") == "lora_te1_"
    assert module_prefix("lora_te_text_model") == "lora_te_"
    assert module_prefix("lycoris_transformer_blocks_0") == "lycoris_"
    assert module_prefix("model_diffusion") is None
    assert group_keys(["lycoris_x.weight", "lycoris_x.on_input"]).modules == {
        "lycoris_x": {"weight": "lycoris_x.weight", "on_input": "lycoris_x.on_input"}}
    assert "lora_up.weight" in KNOWN_SUFFIXES and "hada_t2" in KNOWN_SUFFIXES


# -- malformed modules ---------------------------------------------------------------------------

MALFORMED = {
    "lora up without down": ({"lora_up.weight": (48, 8), "alpha": ()}, "lora_up.weight without lora_down.weight"),
    "lora down without up": ({"lora_down.weight": (8, 64)}, "lora_down.weight without lora_up.weight"),
    "lora rank mismatch": ({"lora_up.weight": (48, 4), "lora_down.weight": (8, 64)}, "does not chain"),
    "lora up has a kernel": ({"lora_up.weight": (48, 4, 3, 3), "lora_down.weight": (4, 32, 3, 3)}, "does not chain"),
    "lora mid mismatch": ({"lora_up.weight": (48, 4, 1, 1), "lora_down.weight": (4, 32, 1, 1),
                           "lora_mid.weight": (8, 4, 3, 3)}, "lora_mid.weight"),
    "lora 1-d factor": ({"lora_up.weight": (48,), "lora_down.weight": (8, 64)}, "dimensions"),
    "loha missing half": ({"hada_w1_a": (48, 4), "hada_w1_b": (4, 64)}, "missing hada_w2_a, hada_w2_b"),
    "loha t1 without t2": ({"hada_w1_a": (4, 48), "hada_w1_b": (4, 32), "hada_w2_a": (4, 48), "hada_w2_b": (4, 32),
                            "hada_t1": (4, 4, 3, 3)}, "missing hada_t2"),
    "loha not chaining": ({"hada_w1_a": (48, 4), "hada_w1_b": (3, 64), "hada_w2_a": (48, 4), "hada_w2_b": (4, 64)},
                          "does not chain"),
    "loha halves differ": ({"hada_w1_a": (48, 4), "hada_w1_b": (4, 64), "hada_w2_a": (40, 4), "hada_w2_b": (4, 64)},
                           "different shapes"),
    "lokr first half missing": ({"lokr_w2": (8, 8)}, "first half missing"),
    "lokr second half missing": ({"lokr_w1": (6, 8)}, "second half missing"),
    "lokr half w1_a only": ({"lokr_w1_a": (6, 2), "lokr_w2": (8, 8)}, "first half missing"),
    "lokr both forms": ({"lokr_w1": (6, 8), "lokr_w1_a": (6, 2), "lokr_w1_b": (2, 8), "lokr_w2": (8, 8)}, "both"),
    "lokr ranks differ": ({"lokr_w1_a": (6, 2), "lokr_w1_b": (2, 8), "lokr_w2_a": (8, 3), "lokr_w2_b": (3, 8)}, "differ"),
    "lokr t2 mismatch": ({"lokr_w1": (6, 4), "lokr_w2_a": (2, 8), "lokr_w2_b": (3, 8), "lokr_t2": (2, 2, 3, 3)},
                         "do not chain"),
    "full without diff": ({"diff_b": (48,)}, "missing diff"),
    "full bias mismatch": ({"diff": (48, 64), "diff_b": (40,)}, "diff_b"),
    "norm bias mismatch": ({"w_norm": (48,), "b_norm": (40,)}, "b_norm"),
    "glora missing factor": ({"a1.weight": (64, 4), "a2.weight": (4, 64), "b1.weight": (48, 4)}, "missing b2.weight"),
    "glora inconsistent": ({"a1.weight": (64, 4), "a2.weight": (4, 64), "b1.weight": (48, 4), "b2.weight": (3, 64)},
                           "rank"),
    "oft not square": ({"oft_blocks": (12, 4, 3)}, "not square"),
    "oft 2-d blocks": ({"oft_blocks": (12, 4)}, "dimensions"),
    "oft rescale mismatch": ({"oft_blocks": (12, 4, 4), "rescale": (40, 1)}, "rescale"),
    "boft odd blocks": ({"oft_blocks": (2, 8, 5, 5)}, "even"),
    "boft too many stages": ({"oft_blocks": (5, 8, 6, 6)}, "stages"),
    "ia3 bad shape": ({"weight": (48, 64), "on_input": ()}, "ia3 weight"),
    "dora bad shape": ({"lora_up.weight": (48, 8), "lora_down.weight": (8, 64), "dora_scale": (48, 64)}, "dora_scale"),
    "dora on full": ({"diff": (48, 64), "dora_scale": (48, 1)}, "dora_scale"),
    "sparse incomplete": ({"lora_up.weight": (48, 8), "lora_down.weight": (8, 64), "bias_indices": (2, 5)},
                          "missing bias_values, bias_size"),
    "sparse shapes": ({"lora_up.weight": (48, 8), "lora_down.weight": (8, 64), "bias_indices": (2, 5),
                       "bias_values": (4,), "bias_size": (2,)}, "do not agree"),
    "mixed algorithms": ({"lora_up.weight": (48, 8), "lora_down.weight": (8, 64), "hada_w1_a": (48, 4)}, "hada_w1_a"),
    "tlora incomplete": ({"lambda_layer": (1, 4)}, "missing"),
    "alpha only": ({"alpha": ()}, "no weight tensors"),
    "unknown keys": ({"mystery": (3,), "alpha": ()}, "unknown key set: alpha, mystery"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_module_raises_naming_it(case):
    shapes, fragment = MALFORMED[case]
    with pytest.raises(NetworkError) as caught:
        info(shapes)
    message = str(caught.value)
    assert N in message and fragment in message
    assert "\n" not in message


def test_target_mismatch_at_merge_names_module():
    module = NetworkModule(N, {"lora_up.weight": torch.ones(48, 8), "lora_down.weight": torch.ones(8, 64)})
    with pytest.raises(NetworkError, match=f"{N}.*does not fit target weight"):
        apply_module(module, torch.zeros(48, 32))
    oft = NetworkModule(N, {"oft_blocks": torch.zeros(12, 4, 4)})
    with pytest.raises(NetworkError, match="output channels"):
        apply_module(oft, torch.zeros(40, 8))
    ia3 = NetworkModule(N, {"weight": torch.zeros(64), "on_input": torch.tensor(1)})
    with pytest.raises(NetworkError, match="input channels"):
        apply_module(ia3, torch.zeros(48, 32))
    dora = NetworkModule(N, {"lora_up.weight": torch.ones(48, 8), "lora_down.weight": torch.ones(8, 64),
                             "dora_scale": torch.ones(1, 32)})
    with pytest.raises(NetworkError, match=r"dora_scale \[1, 32\] does not match target weight \[48, 64\]"):
        apply_module(dora, torch.zeros(48, 64))


def test_errors_are_lytools_errors():
    assert issubclass(NetworkError, LytoolsError) and issubclass(UnsupportedError, LytoolsError)


def test_mixed_file_through_lytools_io(tmp_path):
    """A file mixing LoRA, LoKr, full and norm modules plus stray keys: grouped, detected per
    module from headers alone, then every module merged."""
    from safetensors.torch import save_file

    from lytools.algos import load_module
    from lytools.io import open_file

    tensors = {
        "lora_unet_attn_to_q.lora_up.weight": torch.randn(32, 4).half(),
        "lora_unet_attn_to_q.lora_down.weight": torch.randn(4, 16).half(),
        "lora_unet_attn_to_q.alpha": torch.tensor(2.0).half(),
        "lora_unet_conv_in.lokr_w1": torch.randn(4, 4),
        "lora_unet_conv_in.lokr_w2_a": torch.randn(8, 2),
        "lora_unet_conv_in.lokr_w2_b": torch.randn(2, 8 * 9),
        "lora_unet_conv_in.alpha": torch.tensor([1], dtype=torch.int64),
        "lora_te1_embeddings.diff": torch.randn(10, 16),
        "lora_te1_final_layer_norm.w_norm": torch.randn(16),
        "lora_te1_final_layer_norm.b_norm": torch.randn(16),
        "text_projection.weight": torch.randn(4, 4),
        "lora_unet_orphan.alpha": torch.tensor(1.0),
    }
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    targets = {"lora_unet_attn_to_q": (32, 16), "lora_unet_conv_in": (32, 32, 3, 3),
               "lora_te1_embeddings": (10, 16), "lora_te1_final_layer_norm": (16,)}
    with open_file(path) as source:
        groups = group_keys(source.keys())
        assert sorted(groups.stray) == ["lora_unet_orphan.alpha", "text_projection.weight"]
        found = {}
        for name, keys in groups.modules.items():
            alpha = float(source.get(keys["alpha"]).flatten()[0]) if "alpha" in keys else None
            header_info = describe_header(name, {s: source.info(k) for s, k in keys.items()}, alpha=alpha)
            module = load_module(source, name, keys)
            assert header_info == describe_module(module)
            found[name] = (header_info.algo, header_info.rank, header_info.scale)
            weight = torch.zeros(targets[name])
            merged = apply_module(module, weight, None, 1.0)
            assert merged.weight.shape == weight.shape and merged.weight.abs().sum() > 0
    assert found == {
        "lora_unet_attn_to_q": ("lora", 4, 0.5),
        "lora_unet_conv_in": ("lokr", 2, 0.5),
        "lora_te1_embeddings": ("full", None, None),
        "lora_te1_final_layer_norm": ("norm", None, None),
    }
