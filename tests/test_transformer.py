"""The next-detail transformer: block-causal attention, KV-cached sampling, VAR's layout at order 0."""

from __future__ import annotations

import pytest
import torch

from nextdetail.models.quant import MultiScaleQuantizer, NextInput, token_schedule
from nextdetail.models.transformer import (
    NextDetailTransformer,
    TransformerConfig,
    block_causal_bias,
    sample_top_k_top_p,
)

SIDES = (1, 2, 4, 4, 4)  # base scales 1, 2, 4 then two detail maps at the 4×4 latent


def _model(sides=SIDES, dtype=torch.float32) -> NextDetailTransformer:
    torch.manual_seed(0)
    cfg = TransformerConfig(sides=sides, vocab_size=32, cvae=8, num_classes=5, depth=2, width=64, heads=4)
    model = NextDetailTransformer(cfg).to(dtype).eval()
    for block in model.blocks:  # gates far from VAR's ×1e-5 start, so every path carries signal
        torch.nn.init.normal_(block.ada_lin[-1].weight, std=0.05)
    return model


def test_a_maps_logits_do_not_depend_on_later_maps():
    model = _model()
    L, first = model.cfg.L, model.cfg.first_l
    labels = torch.tensor([1, 3])
    x = torch.randn(2, L - first, 8)
    base = model(labels, x, drop_labels=False)  # (B, L, V)
    assert base.shape == (2, L, 32)
    for m, (_, ed) in enumerate(model.begin_ends[:-1]):
        changed = x.clone()
        changed[:, ed - first :] += torch.randn_like(changed[:, ed - first :])  # inputs of maps m+1 …
        out = model(labels, changed, drop_labels=False)
        assert torch.allclose(out[:, :ed], base[:, :ed], atol=1e-6), f"map {m} saw a later map"
        assert not torch.allclose(out[:, ed:], base[:, ed:], atol=1e-4)  # later maps do see the change
    # within a map every token sees every other (maps are predicted in parallel)
    bias = block_causal_bias(SIDES)[0, 0]
    bg, ed = model.begin_ends[2]
    assert (bias[bg:ed, bg:ed] == 0).all() and (bias[bg:ed, ed:] == -torch.inf).all() and (bias[bg:ed, :bg] == 0).all()


def test_kv_cached_sampling_gives_the_uncached_tokens():
    model = _model(dtype=torch.float64)
    quantizer = MultiScaleQuantizer(32, 8, token_schedule((1, 2, 4), 1, 2, 4)).double().eval()
    labels = torch.tensor([0, 2, 4])
    runs = []
    for use_cache in (True, False):
        step = NextInput(quantizer, 4)
        gen = torch.Generator().manual_seed(7)
        runs.append(model.sample(labels, step, cfg=2.0, top_k=10, top_p=0.9, generator=gen, use_cache=use_cache))
    assert [tuple(m.shape) for m in runs[0]] == [(3, s, s) for s in SIDES]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    # and the teacher-forcing input of those tokens is what sampling fed the model
    inputs = quantizer.next_inputs(runs[0], 4)
    assert inputs.shape == (3, model.cfg.L - 1, 8)
    assert all(not b.attn.caching and b.attn.cached_k is None for b in model.blocks)  # caches released


def test_order_0_is_vars_layout():
    var_patch_nums = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    sides = tuple(m.side for m in token_schedule(var_patch_nums, 0, 1, 16))
    assert sides == var_patch_nums
    model = NextDetailTransformer(TransformerConfig(sides=sides, depth=16))
    assert model.cfg.L == 680 and model.cfg.C == 1024 and model.cfg.H == 16 and model.lvl_embed.num_embeddings == 10
    # VAR's mask: d = levels of the L tokens, attend where d_query ≥ d_key
    d = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(var_patch_nums)]).view(1, 680, 1)
    var_mask = torch.where(d >= d.transpose(1, 2), 0.0, -torch.inf).reshape(1, 1, 680, 680)
    assert torch.equal(model.attn_bias_for_masking, var_mask)
    names = dict(model.named_parameters())
    for name, shape in {"class_emb.weight": (1001, 1024), "pos_start": (1, 1, 1024), "pos_1LC": (1, 680, 1024),
                        "lvl_embed.weight": (10, 1024), "word_embed.weight": (1024, 32),
                        "blocks.0.attn.mat_qkv.weight": (3072, 1024), "blocks.0.attn.scale_mul_1H11": (1, 16, 1, 1),
                        "blocks.15.ffn.fc1.weight": (4096, 1024), "blocks.0.ada_lin.1.weight": (6144, 1024),
                        "head_nm.ada_lin.1.weight": (2048, 1024), "head.weight": (4096, 1024)}.items():
        assert tuple(names[name].shape) == shape, name
    # VAR-d16 has 310M parameters
    assert 300e6 < sum(p.numel() for p in model.parameters()) < 320e6


@pytest.mark.parametrize("top_k, top_p", [(1, 0.0), (0, 1e-9)])
def test_top_k_1_and_tiny_top_p_are_argmax(top_k, top_p):
    logits = torch.randn(2, 5, 50)
    assert torch.equal(sample_top_k_top_p(logits, top_k, top_p, torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_initialisation_is_vars():
    """VAR's `init_weights` with its training defaults: std √(1/3C) everywhere, heads ×0.02, residual projections
    ÷√(2·depth), AdaLN modulation ×0.5, gates ×1e-5, biases zero; NDP's trunk and heads alike."""
    from nextdetail.models.ndp import NDPConfig, NextDetailMaskedTransformer

    torch.manual_seed(0)
    C, depth = 256, 4
    for model in (NextDetailTransformer(TransformerConfig(sides=(1, 2, 4, 8, 8), vocab_size=512, cvae=8,
                                                          num_classes=10, depth=depth, width=C, heads=4)),
                  NextDetailMaskedTransformer(NDPConfig(latent_side=8, vocab_size=512, cvae=8, num_classes=10,
                                                        depth=depth, width=C, heads=4))):
        std = (1 / (3 * C)) ** 0.5
        p = dict(model.named_parameters())

        def close(name: str, want: float, rows: slice = slice(None), p=p, model=model) -> None:
            got = p[name].detach()[rows].std().item()
            assert abs(got / want - 1) < 0.06, (type(model).__name__, name, got, want)

        for name in ("class_emb.weight", "lvl_embed.weight", "pos_1LC", "word_embed.weight",
                     "blocks.0.attn.mat_qkv.weight", "blocks.3.ffn.fc1.weight"):
            close(name, std)
        for name in ("blocks.0.attn.proj.weight", "blocks.3.ffn.fc2.weight"):
            close(name, std / (2 * depth) ** 0.5)
        close("head.weight", 0.02 * std)
        close("head_nm.ada_lin.1.weight", 0.5 * std)
        close("blocks.1.ada_lin.1.weight", 0.5 * std, slice(2 * C, None))
        close("blocks.1.ada_lin.1.weight", 1e-5 * std, slice(None, 2 * C))
        assert all(p[n].abs().max() == 0 for n in p if n.endswith(".bias") or n.endswith(("q_bias", "v_bias")))
        assert p["pos_1LC"].abs().max() <= 2  # trunc_normal_'s bounds


def test_flops_formula_counts_what_torch_counts_in_the_real_blocks():
    """`flops.transformer_flops` against torch's FlopCounterMode on our AdaLN blocks: without a cache (n_key =
    n_query) and with one (a map's queries against every earlier key), and the head's AdaLN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from nextdetail.models.flops import transformer_flops
    from nextdetail.models.transformer import AdaLNBeforeHead, AdaLNSelfAttn

    C, depth, heads, n_prefix, n_new = 64, 3, 4, 21, 16
    blocks = [AdaLNSelfAttn(C, heads, 4.0, 0.0, attn_l2_norm=True).eval() for _ in range(depth)]
    head_nm = AdaLNBeforeHead(C).eval()
    cond = torch.randn(1, C)
    for n_query, n_key in ((n_prefix, n_prefix), (n_new, n_prefix + n_new)):
        for b in blocks:
            b.attn.kv_caching(n_key > n_query)
            if n_key > n_query:  # the earlier maps' keys and values, as sampling leaves them
                b.attn.cached_k = torch.randn(1, heads, n_key - n_query, C // heads)
                b.attn.cached_v = torch.randn(1, heads, n_key - n_query, C // heads)
        x = torch.randn(1, n_query, C)
        # the math kernel: its matmuls are what the counter sees (CPU's fused kernel is not registered with it)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            for b in blocks:
                x = b(x, cond, None)
            head_nm(x, cond)
        assert counter.get_total_flops() == transformer_flops(depth, C, 4 * C, n_query, n_key), (n_query, n_key)


def test_guidance_ramps_over_all_maps_or_the_base_maps_only():
    """sample.cfg_schedule: VAR's ramp t_k = cfg·k/(M−1) over all maps, or over CART's base maps (the last base map
    and every detail map at the full cfg). Greedy draws: the first map (no guidance in either) is the same, later
    maps — guided more strongly with the shorter ramp — change."""
    from nextdetail.models.transformer import GuidedDraw

    every = GuidedDraw(2.0, 0, 0.0, None, 5)
    base = GuidedDraw(2.0, 0, 0.0, None, 3)
    assert [every.guidance(k) for k in range(5)] == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert [base.guidance(k) for k in range(5)] == [0.0, 1.0, 2.0, 2.0, 2.0]
    model = _model(dtype=torch.float64)
    quantizer = MultiScaleQuantizer(32, 8, token_schedule((1, 2, 4), 1, 2, 4)).double().eval()
    labels = torch.tensor([0, 2, 4])
    runs = [model.sample(labels, NextInput(quantizer, 4), cfg=4.0, top_k=1, generator=torch.Generator().manual_seed(0),
                         cfg_ramp_maps=ramp) for ramp in (None, 3)]
    assert torch.equal(runs[0][0], runs[1][0])  # map 0: no guidance in either
    assert any(not torch.equal(a, b) for a, b in zip(runs[0][1:], runs[1][1:], strict=True))
