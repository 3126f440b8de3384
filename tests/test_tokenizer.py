"""The base-detail multi-scale tokenizer (CART §3.2, Algorithms 1–2) on VAR's VQ-VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nextdetail.models.quant import MultiScaleQuantizer, TokenMap, token_schedule
from nextdetail.models.tokenizer import VAR_SPEC, BaseDetailVQVAE, TokenizerSpec, load_var_state_dict

TINY = TokenizerSpec(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2), resolution=32, patch_nums=(1, 2, 4, 8),
                     order=3, detail_depth=2)


def _images(n: int = 2, order: int = 3, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] and `order` progressively smoother versions standing in for B_1 … B_n."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    bases, current = [], x
    for _ in range(order):
        current = F.avg_pool2d(F.pad(current, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        bases.append(current)
    return x, torch.stack(bases) if bases else torch.empty(0, *x.shape)


def test_schedule_has_base_scales_then_full_resolution_detail_maps():
    s = token_schedule((1, 2, 4, 8), order=3, detail_depth=2, latent_side=8)
    assert len(s) == 4 + 3 * 2
    assert [m.side for m in s] == [1, 2, 4, 8] + [8] * 6
    assert [m.source for m in s] == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="increasing"):
        token_schedule((2, 1, 8), 0, 1, 8)
    with pytest.raises(ValueError, match="latent side"):
        token_schedule((1, 16), 0, 1, 8)


def test_detail_sources_telescope_to_the_image_feature():
    torch.manual_seed(0)
    model = BaseDetailVQVAE(TINY).eval()
    x, bases = _images()
    sources = model.sources(x, bases)
    assert len(sources) == 1 + TINY.order
    f_image = model.quant_conv(model.encoder(x))
    # f_{B_n} + f_{D_n} + … + f_{D_1} = f_{B_0} = f_I  (Eq. 12 summed)
    assert torch.allclose(torch.stack(sources).sum(0), f_image, atol=1e-5)
    f_base = model.quant_conv(model.encoder(bases[-1]))
    assert torch.allclose(sources[0], f_base, atol=1e-5)


def test_algorithm_1_then_2_equals_the_summed_phi_reconstruction():
    torch.manual_seed(0)
    model = BaseDetailVQVAE(TINY).eval()
    x, bases = _images()
    with torch.no_grad():
        q = model.quantize(model.sources(x, bases))
    indices = model.img_to_indices(x, bases)
    assert [tuple(i.shape[1:]) for i in indices] == [(m.side, m.side) for m in model.schedule]
    assert all(torch.equal(a, b) for a, b in zip(indices, q.indices, strict=True))
    f_hat = model.quantize.indices_to_f(indices, TINY.latent_side)
    assert torch.allclose(f_hat, q.f_hat, atol=1e-5)
    # and the decoder turns it into the same image the training pass reconstructs
    recon, _ = model(x, bases)
    assert torch.allclose(model.indices_to_img(indices), recon.clamp(-1, 1), atol=1e-5)


def _var_reference_indices(quant: MultiScaleQuantizer, f: torch.Tensor, patch_nums: tuple[int, ...]) -> list[torch.Tensor]:
    """VAR's multi-scale residual quantization written out plainly, as its paper and code describe it:
    area-downsample the residual, nearest code (L2), bicubic up, φ picked by VAR's tick rule, subtract."""
    b, c, h, w = f.shape
    k_phi = len(quant.quant_resi.qresi_ls)
    ticks = np.linspace(1 / 3 / k_phi, 1 - 1 / 3 / k_phi, k_phi)
    codes = quant.embedding.weight
    rest, out = f.clone(), []
    for si, pn in enumerate(patch_nums):
        r = F.interpolate(rest, size=(pn, pn), mode="area") if si != len(patch_nums) - 1 else rest
        flat = r.permute(0, 2, 3, 1).reshape(-1, c)
        idx = torch.cdist(flat, codes, compute_mode="donot_use_mm_for_euclid_dist").argmin(1).view(b, pn, pn)
        z = codes[idx].permute(0, 3, 1, 2)
        if si != len(patch_nums) - 1:
            z = F.interpolate(z, size=(h, w), mode="bicubic")
        phi = quant.quant_resi.qresi_ls[int(np.argmin(np.abs(ticks - si / (len(patch_nums) - 1))))]
        rest = rest - (z * (1 - phi.resi_ratio) + F.conv2d(z, phi.weight, phi.bias, padding=1) * phi.resi_ratio)
        out.append(idx)
    return out


def test_order_0_is_a_plain_var_multi_scale_quantizer():
    torch.manual_seed(0)
    spec = TokenizerSpec(vocab_size=128, z_channels=8, ch=32, ch_mult=(1, 2, 2, 2), resolution=64,
                         patch_nums=(1, 2, 3, 4, 5, 6, 8), order=0)
    model = BaseDetailVQVAE(spec).eval()
    assert [m.source for m in model.schedule] == [0] * 7
    x, _ = _images(order=0, size=64)
    ours = model.img_to_indices(x)
    with torch.no_grad():
        reference = _var_reference_indices(model.quantize, model.quant_conv(model.encoder(x)), spec.patch_nums)
    assert all(torch.equal(a, b) for a, b in zip(ours, reference, strict=True))
    with pytest.raises(ValueError, match="bases"):
        BaseDetailVQVAE(TINY).img_to_indices(x[..., :32, :32])


@pytest.mark.parametrize("residual", ["independent", "shared", "independent+global"])
def test_gradients_reach_encoder_codebook_and_phi(residual):
    from dataclasses import replace

    torch.manual_seed(0)
    model = BaseDetailVQVAE(replace(TINY, residual=residual)).train()
    x, bases = _images()
    recon, q = model(x, bases)
    (F.mse_loss(recon, x) + q.vq_loss).backward()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.embedding.weight",
                 "quantize.quant_resi.qresi_ls.0.weight", "quant_conv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_dead_codes_are_restarted_from_recent_encoder_outputs():
    torch.manual_seed(0)
    model = BaseDetailVQVAE(TINY).train()
    with torch.no_grad():  # move half the codebook far away: those codes can never be picked
        model.quantize.embedding.weight[32:] += 100.0
    x, bases = _images()
    for _ in range(3):
        model(x, bases)
    used_before = model.quantize.ema_vocab_hit_SV.sum(0)[32:].sum()
    assert used_before == 0
    restarted = model.quantize.restart_dead_codes(generator=torch.Generator().manual_seed(0))
    assert restarted >= 32
    assert model.quantize.embedding.weight[32:].abs().max() < 50  # now near the data
    for _ in range(3):
        model(x, bases)
    assert model.quantize.ema_vocab_hit_SV[-1, 32:].sum() > 0  # and picked again
    health = model.quantize.usage()
    assert len(health) == len(model.schedule) and all(0 <= h["usage"] <= 1 for h in health)


VAR_KEYS = Path(__file__).with_name("data") / "var_vae_ch160v4096z32_keys.txt"


def test_var_released_tokenizer_layout_loads_and_round_trips(tmp_path):
    """The layout of VAR's vae_ch160v4096z32.pth (key and shape per line, from VAR's module definitions)."""
    expected = [line.split() for line in VAR_KEYS.read_text().splitlines() if line.strip() and line[0] != "#"]
    model = BaseDetailVQVAE(VAR_SPEC)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(int(s) for s in shape.split(",") if s) for k, shape in expected} == ours
    # A checkpoint in that layout (random numbers, as VAR's file is not downloadable here) loads …
    g = torch.Generator().manual_seed(0)
    plain = {k: torch.randn(ours[k], generator=g) * 0.02 for k, _ in expected}
    foreign = {f"module.{k}" if i % 2 else k: v for i, (k, v) in enumerate(plain.items())}  # DDP prefixes too
    torch.save(foreign, tmp_path / "vae.pth")
    loaded = load_var_state_dict(BaseDetailVQVAE(VAR_SPEC), tmp_path / "vae.pth")
    assert all(torch.equal(loaded.state_dict()[k.removeprefix("module.")], v) for k, v in foreign.items())
    # … into a base-detail model too (its statistics buffer has its own number of maps) …
    cart = load_var_state_dict(BaseDetailVQVAE(TokenizerSpec(patch_nums=(1, 2, 3, 4, 5, 6, 8, 10), order=3,
                                                             detail_depth=2)), tmp_path / "vae.pth")
    assert torch.equal(cart.quantize.embedding.weight, plain["quantize.embedding.weight"])
    assert torch.equal(cart.encoder.conv_in.weight, plain["encoder.conv_in.weight"])
    # … and round-trips through our own save.
    torch.save(loaded.state_dict(), tmp_path / "ours.pth")
    again = load_var_state_dict(BaseDetailVQVAE(VAR_SPEC), tmp_path / "ours.pth")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), loaded.state_dict().values(), strict=True))


def test_var_loader_names_what_does_not_fit(tmp_path):
    small = BaseDetailVQVAE(TINY)
    with pytest.raises(FileNotFoundError, match="vae_ch160v4096z32"):
        load_var_state_dict(small, tmp_path / "absent.pth")
    sd = small.state_dict()
    sd["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unknown keys .*decoder\.extra\.weight"):
        load_var_state_dict(BaseDetailVQVAE(TINY), sd)
    sd = BaseDetailVQVAE(TokenizerSpec(**{**TINY.to_dict(), "vocab_size": 32})).state_dict()
    with pytest.raises(ValueError, match=r"quantize\.embedding\.weight: checkpoint \(32, 8\) vs model \(64, 8\)"):
        load_var_state_dict(BaseDetailVQVAE(TINY), sd)


def test_unused_schedule_argument_is_rejected():
    with pytest.raises(ValueError, match="source feature maps"):
        MultiScaleQuantizer(16, 4, (TokenMap(1, 0), TokenMap(2, 1)))([torch.zeros(1, 4, 2, 2)])


def test_phi_sharing_follows_vars_tick_rule():
    """VAR's 10 scales share 4 φ's as [0, 0, 1, 1, 1, 2, 2, 3, 3, 3] (ties at scales 2 and 7 resolved
    by float64 rounding, as VAR's own code does)."""
    schedule = tuple(TokenMap(p, 0) for p in (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))
    quant = MultiScaleQuantizer(16, 4, schedule)
    phis = list(quant.quant_resi.qresi_ls)
    assert [phis.index(quant.phi(k)) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


@pytest.mark.parametrize("residual", ["independent", "shared", "independent+global"])
def test_each_residual_reading_quantizes_what_it_says(residual):
    """tokenizer.residual: with `shared` the first map of each detail chain quantizes its feature plus what the chains
    before left, so the last map's codes are the nearest to f_I − f̂_{<M} (the global residual); with `independent`
    they are the nearest to D_1's own feature (its chain is one map); `independent+global` keeps the independent
    chains and adds one full-resolution map whose codes are the nearest to the global residual. The training pass
    and Algorithm 1 agree, Algorithm 2 reconstructs each, the token layout names the extra map, and at order 0
    `shared` is VAR's quantizer."""
    from dataclasses import replace

    from nextdetail.storage.tokens import token_layout

    torch.manual_seed(0)
    spec = replace(TINY, detail_depth=1, residual=residual)
    model = BaseDetailVQVAE(spec).eval()
    assert len(model.schedule) == spec.n_maps == 4 + 3 + (residual == "independent+global")
    x, bases = _images()
    with torch.no_grad():
        sources = model.sources(x, bases)
        q = model.quantize(sources)
    indices = model.img_to_indices(x, bases)
    assert all(torch.equal(a, b) for a, b in zip(indices, q.indices, strict=True))
    quant, c = model.quantize, spec.z_channels
    partial = quant.indices_to_f(indices, spec.latent_side, cumulative=True)
    assert torch.allclose(partial[-1], q.f_hat, atol=1e-5)

    def nearest(r: torch.Tensor) -> torch.Tensor:
        return quant.lookup(r.permute(0, 2, 3, 1).reshape(-1, c)).view(indices[-1].shape)

    global_rest = torch.stack(sources).sum(0) - partial[-2]  # f_I − Σ_{k<M} φ_k(z_k)
    if residual == "shared":
        assert torch.equal(indices[-1], nearest(global_rest))
    elif residual == "independent":
        assert torch.equal(indices[-1], nearest(sources[-1])) and not torch.equal(indices[-1], nearest(global_rest))
    else:
        assert torch.equal(indices[-1], nearest(global_rest)) and torch.equal(indices[-2], nearest(sources[-1]))
    kinds = [m["kind"] for m in token_layout(model.schedule, spec.order, spec.vocab_size, ["none"])["maps"]]
    assert kinds == ["base"] * 4 + ["detail"] * 3 + (["global"] if residual == "independent+global" else [])
    var = replace(TINY, order=0)
    torch.manual_seed(1)
    a = BaseDetailVQVAE(replace(var, residual="shared")).eval()
    torch.manual_seed(1)
    b = BaseDetailVQVAE(replace(var, residual="independent")).eval()
    assert all(torch.equal(i, j) for i, j in zip(a.img_to_indices(x, bases[:0]), b.img_to_indices(x, bases[:0]),
                                                  strict=True))


@pytest.mark.parametrize("order", [0, 3])
def test_normalized_codes_are_llamagens_unit_sphere_with_a_fitted_scale_per_map(order):
    """tokenizer.normalized_codes (NDP §2.1, LlamaGen's normalized embedding space): the sources sum to f_I/‖f_I‖ at
    every position; map k's codes all have norm s_k, and the cosine lookup picks the L2-nearest of them; the first
    training pass fits each s_k to its residuals (least squares), which a unit code would overshoot; the scales
    learn, survive a state-dict round trip, and VAR's layout (which has none) is refused naming the key."""
    from dataclasses import replace

    torch.manual_seed(0)
    spec = replace(TINY, order=order, detail_depth=1, normalized_codes=True)
    model = BaseDetailVQVAE(spec)
    x, bases = _images(4, order)
    quant, c = model.quantize, spec.z_channels
    with torch.no_grad():
        sources = model.sources(x, bases)
    f_norm = torch.stack(sources).sum(0).norm(dim=1)
    assert torch.allclose(f_norm, torch.ones_like(f_norm), atol=1e-5)

    def latent_error(m: BaseDetailVQVAE) -> float:
        with torch.no_grad():
            f_hat = m.quantize.indices_to_f(m.quantize.f_to_indices(sources), spec.latent_side)
        return float((f_hat - torch.stack(sources).sum(0)).square().mean())

    unit_error = latent_error(model.eval())  # s_k = 1 for every map before the first training pass
    assert not model.quantize.code_scale_fitted
    rec, q = model.train()(x, bases)
    (F.mse_loss(rec, x) + q.vq_loss).backward()
    assert model.quantize.code_scale_fitted and quant.log_code_scale_M.grad.abs().sum() > 0
    scales = quant.log_code_scale_M.detach().exp()
    with torch.no_grad():  # map 0's fit by hand: its residual is f_{B_n}'s mean over the 1×1 grid
        r0 = model.sources(x, bases)[0].mean((2, 3))  # (B, C)
        e0 = F.normalize(quant.embedding.weight[quant.lookup(r0)], dim=-1)
    assert torch.allclose(scales[0], (r0 * e0).sum(1).mean(), rtol=1e-4)
    assert bool((scales < 1).all())  # every residual is shorter than a unit code: s_k = 1 overshoots it
    assert latent_error(model.eval()) < unit_error
    before = scales.clone()
    model.train()(x, bases)  # fitted once: later passes leave the scales to the optimizer
    assert torch.equal(quant.log_code_scale_M.detach().exp(), before)

    model.eval()
    rest = torch.randn(64, c)
    for k in (0, len(model.schedule) - 1):
        codes = quant.codes(k, torch.arange(spec.vocab_size).view(1, 1, -1)).reshape(c, -1).T  # (V, C)
        assert torch.allclose(codes.norm(dim=1), scales[k].expand(spec.vocab_size), rtol=1e-5)
        assert torch.equal(quant.lookup(rest), torch.cdist(rest, codes).argmin(1))
    indices = quant.f_to_indices(sources)
    present = [torch.ones_like(i, dtype=torch.bool) for i in indices]
    assert torch.allclose(quant.indices_to_f_mixed(indices, present, spec.latent_side),
                          quant.indices_to_f(indices, spec.latent_side), atol=1e-6)
    again = BaseDetailVQVAE(spec)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.quantize.log_code_scale_M, quant.log_code_scale_M) and again.quantize.code_scale_fitted
    with pytest.raises(ValueError, match="log_code_scale_M"):
        load_var_state_dict(BaseDetailVQVAE(spec), BaseDetailVQVAE(replace(spec, normalized_codes=False)).state_dict())


def test_tile_2x2_places_each_fours_members_in_reading_order():
    from nextdetail.stages.train_tokenizer.tasks import tile_2x2

    x = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1).expand(8, 2, 3, 3)  # image i is all i
    tiled = tile_2x2(x)
    assert tiled.shape == (2, 2, 6, 6)
    for m, (tl, tr, bl, br) in enumerate(((0, 1, 2, 3), (4, 5, 6, 7))):
        assert tiled[m, :, :3, :3].eq(tl).all() and tiled[m, :, :3, 3:].eq(tr).all()
        assert tiled[m, :, 3:, :3].eq(bl).all() and tiled[m, :, 3:, 3:].eq(br).all()


def test_the_mosaic_term_decodes_maps_twice_the_side_and_trains_the_decoder():
    """train_tokenizer's `mosaic_weight` (issue 42): the batch's quantized latents tiled 2×2 are decoded at twice
    the trained side against the images tiled alike; its gradient reaches the decoder."""
    from types import SimpleNamespace

    from nextdetail.conf.model_settings import TokenizerConfig
    from nextdetail.stages.train_tokenizer.tasks import TokenizerTraining, tile_2x2

    torch.manual_seed(0)
    model = BaseDetailVQVAE(TINY).train()
    x, bases = _images(n=5)
    _, q = model(x, bases)
    seen = []
    handle = model.decoder.register_forward_hook(lambda mod, args, out: seen.append(tuple(out.shape)))
    loss = TokenizerTraining.mosaic_loss(SimpleNamespace(model=model, cfg=TokenizerConfig()), q.f_hat, x)
    handle.remove()
    assert seen == [(1, 3, 64, 64)]  # the first 4 of 5 images, one 64-px mosaic
    with torch.no_grad():
        expected = F.mse_loss(model.decoder(model.post_quant_conv(tile_2x2(q.f_hat[:4]))), tile_2x2(x[:4]))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
