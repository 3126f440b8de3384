"""Released weights as inputs (issue 25): `tokenizer.pretrained` adopts a tokenizer file instead of training —
VAR's layout (a plain state dict, names as VAR's module definitions: `tests/data/var_vae_ch160v4096z32_keys.txt`
pins them at VAR's size) or a nextdetail tokenizer.pt — and order 0 needs no decomposition at all.

The files are built here with seeded random values in VAR's layout (its checkpoints are not downloadable here)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, cli_config, make_config, run_cli

from nextdetail.errors import UserError

ORDER0 = ("tokenizer.order=0", "ar.steps=6", "ar.checkpoint_every=6", "sample.per_class=2",
          "eval.samples_per_class=2")


def var_layout_file(path: Path, spec, seed: int = 0, bad_key: str | None = None) -> dict[str, torch.Tensor]:
    """A tokenizer checkpoint as VAR writes one (a plain state dict; half the names with DDP's `module.`), random
    values for the architecture `spec`; `bad_key`: that tensor one row short."""
    from nextdetail.models.tokenizer import BaseDetailVQVAE

    g = torch.Generator().manual_seed(seed)
    plain = {k: torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v
             for k, v in BaseDetailVQVAE(spec).state_dict().items()}
    if bad_key:
        plain[bad_key] = plain[bad_key][:-1]
    torch.save({f"module.{k}" if i % 2 else k: v for i, (k, v) in enumerate(plain.items())}, path)
    return plain


def test_a_file_that_does_not_fit_is_one_line_naming_the_key_or_setting(tmp_path):
    from nextdetail.models.configs import TokenizerSpec
    from nextdetail.models.tokenizer import BaseDetailVQVAE, load_pretrained

    spec = TokenizerSpec.from_config(make_config(tmp_path, "embedded", *FAST, "tokenizer.order=0"))
    var_layout_file(tmp_path / "wrong.pth", spec, bad_key="decoder.conv_out.weight")
    truncated = tmp_path / "truncated.pth"
    var_layout_file(tmp_path / "good.pth", spec)
    truncated.write_bytes((tmp_path / "good.pth").read_bytes()[:5000])
    ours = tmp_path / "ours.pt"
    other = TokenizerSpec(**{**spec.to_dict(), "vocab_size": 32})
    torch.save({"spec": other.to_dict(), "model": BaseDetailVQVAE(other).state_dict()}, ours)
    for path, words in [(tmp_path / "wrong.pth", "decoder.conv_out.weight: checkpoint"),
                        (truncated, "not a readable torch file"),
                        (ours, "a nextdetail tokenizer with vocab_size=32, but the config declares 64"),
                        (tmp_path / "absent.pth", "no such file")]:
        with pytest.raises(UserError) as info:
            load_pretrained(str(path), {}, spec)
        assert words in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)
    model, layout = load_pretrained(str(tmp_path / "good.pth"), {}, spec)
    assert layout == "var" and model.quantize.embedding.weight.shape == (64, spec.z_channels)


def var_transformer_file(path: Path, cfg, classes: int, seed: int = 0, extra_classes: int = 0) -> dict:
    """A transformer checkpoint as VAR writes one for the config's architecture at order 0: a plain state dict
    with VAR's two constant buffers (lvl_1L, attn_bias_for_masking) and random weights."""
    from nextdetail.models.configs import TokenizerSpec
    from nextdetail.models.quant import token_schedule
    from nextdetail.models.transformer import NextDetailTransformer
    from nextdetail.stages.train_ar.tasks import transformer_config
    from nextdetail.storage.tokens import token_layout

    spec = TokenizerSpec.from_config(cfg)
    layout = token_layout(token_schedule(spec.patch_nums, 0, 1, spec.latent_side), 0, spec.vocab_size, ["none"])
    model = NextDetailTransformer(transformer_config(cfg.ar, layout, classes + extra_classes, spec.z_channels))
    g = torch.Generator().manual_seed(seed)
    plain = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()}
    saved = {"lvl_1L": model.lvl_1L.clone(), "attn_bias_for_masking": model.attn_bias_for_masking.clone(), **plain}
    torch.save({f"module.{k}" if i % 3 == 1 else k: v for i, (k, v) in enumerate(saved.items())}, path)
    return plain


@pytest.fixture(scope="module")
def adopted(tmp_path_factory, embedded_source):
    """One pipeline on the tiny data with both files adopted: a tokenizer and a transformer in VAR's layout (random
    weights for the tiny architecture at order 0), through tokenize, sample and evaluate."""
    from nextdetail.models.configs import TokenizerSpec
    from nextdetail.pipeline.run import run_pipeline

    tmp = tmp_path_factory.mktemp("adopted")
    root, tok, weights = tmp / "root", tmp / "vae_tiny.pth", tmp / "var_tiny.pth"
    base = make_config(root, embedded_source, *FAST, *ORDER0)
    plain_tok = var_layout_file(tok, TokenizerSpec.from_config(base))
    plain_ar = var_transformer_file(weights, base, classes=12)  # the embedded dataset's classes
    overrides = (*FAST, *ORDER0, f"tokenizer.pretrained={tok}", f"ar.pretrained={weights}")
    cfg = make_config(root, embedded_source, *overrides)
    return root, overrides, run_pipeline(cfg, until="evaluate", progress=False), plain_tok, plain_ar, tok, weights


@pytest.mark.e2e
def test_a_pretrained_tokenizer_is_adopted_as_it_is_and_order_0_builds_no_factors(adopted, embedded_source):
    """`-o tokenizer.pretrained=FILE` at order 0 (VAR's tokenizer): the stage adopts the file's exact weights
    without training or reading data; no decomposition is built ("not needed"); tokenize encodes with those
    weights. The identity is the file's content + the declared architecture: a training setting changes nothing,
    other bytes at the same path re-adopt."""
    from nextdetail.cache.status import pipeline_status
    from nextdetail.models.configs import TokenizerSpec
    from nextdetail.storage.fs import Store
    from nextdetail.storage.lineage import Lineage

    root, overrides, results, plain, _, weights, _ = adopted
    assert results.work["decompose"] == "not needed" and not (root / "factors").exists()
    tok = results["train_tokenizer"]
    assert tok.work == "ran" and tok.summary["adopted_from"] == str(weights) and tok.summary["layout"] == "var"
    saved = torch.load(Path(tok.url, "tokenizer.pt"), weights_only=True)["model"]
    assert all(torch.equal(saved[k], v) for k, v in plain.items())  # the file's weights, untouched
    assert not Path(tok.url, "checkpoints").exists()  # no training
    record = Lineage(Store(str(root))).read("train_tokenizer", results.identities["train_tokenizer"])
    assert record["upstream"] == {} and record["inputs"]["pretrained"]["url"] == str(weights)
    cache = results["tokenize"].open()
    assert cache.record["lineage"]["upstream"]["tokenizer_sha256"] == tok.summary["tokenizer_sha256"]
    assert "decompose" not in cache.record["lineage"]["upstream"]

    statuses = pipeline_status(make_config(root, embedded_source, *overrides, "tokenizer.steps=7", "tokenizer.lr=0.5",
                                           "ar.steps=9", "ar.base_lr=0.5"))
    assert statuses["decompose"].state == "not needed"
    assert all(statuses[s].state == "up to date" for s in ("shard", "train_tokenizer", "tokenize", "train_ar",
                                                             "evaluate"))
    var_layout_file(weights, TokenizerSpec.from_config(make_config(root, embedded_source, *FAST, *ORDER0)), seed=1)
    assert pipeline_status(make_config(root, embedded_source, *overrides))["train_tokenizer"].state == "stale"
    var_layout_file(weights, TokenizerSpec.from_config(make_config(root, embedded_source, *FAST, *ORDER0)))  # back


@pytest.mark.e2e
def test_vars_released_transformer_layout_is_ours_and_adopting_it_samples_and_evaluates(adopted, embedded_source,
                                                                                        tmp_path):
    """VAR-d16's keys and shapes (pinned from VAR's module definitions) are our order-0 transformer's plus VAR's
    two constant buffers; `-o ar.pretrained=FILE` adopts such a file (its exact weights, step 0) and sample and
    evaluate run on it; a file for another class count is one line naming `class_emb.weight`."""
    from nextdetail.models.transformer import VAR_CONSTANTS, NextDetailTransformer, TransformerConfig
    from nextdetail.pipeline.run import run_pipeline

    pinned = [line.split() for line in (Path(__file__).parent / "data" / "var_d16_keys.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    with torch.device("meta"):
        d16 = NextDetailTransformer(TransformerConfig(sides=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16), depth=16))
    ours = {k: tuple(v.shape) for k, v in d16.state_dict().items()}
    theirs = {k: tuple(int(n) for n in shape.split(",")) for k, shape in pinned}
    assert set(theirs) - set(ours) == set(VAR_CONSTANTS) and all(ours[k] == theirs[k] for k in ours)
    assert len(theirs) == 12 + 13 * 16 and sum(n.numel() for n in d16.parameters()) == 310_283_520  # VAR's README

    root, _, results, _, plain, tok, weights = adopted
    ar = results["train_ar"]
    assert ar.summary["adopted_from"] == str(weights) and ar.summary["steps"] == 0
    saved = torch.load(Path(ar.url, "transformer.pt"), weights_only=True)
    assert saved["step"] == 0 and all(torch.equal(saved["model"][k], v) for k, v in plain.items())
    assert not Path(ar.url, "checkpoints").exists()
    assert results.work["sample"] == "ran" and results["evaluate"].summary["fid"] > 0

    wrong = tmp_path / "var_1000.pth"
    var_transformer_file(wrong, make_config(root, embedded_source, *FAST, *ORDER0), classes=12, extra_classes=988)
    bad = make_config(root, embedded_source, *FAST, *ORDER0, f"tokenizer.pretrained={tok}", f"ar.pretrained={wrong}")
    with pytest.raises(UserError) as info:
        run_pipeline(bad, until="train_ar", progress=False)
    assert "class_emb.weight: checkpoint (1001, " in str(info.value) and "\n" not in str(info.value)


@pytest.mark.integration
def test_the_cli_refuses_a_wrong_shaped_or_missing_file_in_one_line(tmp_path, embedded_source):
    from nextdetail.models.configs import TokenizerSpec

    root = tmp_path / "root"
    spec = TokenizerSpec.from_config(make_config(root, embedded_source, *FAST, *ORDER0))
    var_layout_file(tmp_path / "wrong.pth", spec, bad_key="quantize.embedding.weight")
    nextdetail = str(Path(sys.executable).parent / "nextdetail")
    for path, words in [(tmp_path / "absent.pth", "no such file"),
                        (tmp_path / "wrong.pth", "quantize.embedding.weight: checkpoint (63, 8) vs model (64, 8)")]:
        proc = run_cli([nextdetail, "train-tokenizer", "--no-progress",
                        *cli_config(root, embedded_source, *FAST, *ORDER0, f"tokenizer.pretrained={path}")])
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]


# ---- sampling parity with VAR's recipe ------------------------------------------------------------------------
# `var_forward` / `var_draw` restate VAR's computation from its module definitions (FoundationVision/VAR
# models/var.py, basic_var.py, helpers.py; read, not copied): on a state dict in VAR's layout, every op in
# VAR's order — class embedding + pos_start, lvl_embed + pos_1LC, per block SiLU → ada_lin → (γ1 γ2 s1 s2 b1 b2),
# LayerNorm(eps 1e-6, no affine), q/k L2-normalised with q × exp(min(scale_mul, log 100)), softmax scale 1,
# the block-causal 0/−inf bias, tanh-GELU MLP; head: (scale, shift) AdaLN then Linear; CFG t = cfg · k/(M − 1)
# as (1 + t)·cond − t·uncond; top-k by threshold, top-p on ascending sorted probabilities, one multinomial.

def var_forward(sd: dict, label_B: torch.Tensor, x_BLCv: torch.Tensor | None, n_tokens: int) -> torch.Tensor:
    import torch.nn.functional as F

    C = sd["pos_start"].shape[-1]
    cond = sd["class_emb.weight"][label_B]  # (B, C)
    x = cond[:, None, :] + sd["pos_start"]
    if x_BLCv is not None:
        x = torch.cat((x, x_BLCv @ sd["word_embed.weight"].T + sd["word_embed.bias"]), dim=1)
    x = x + sd["lvl_embed.weight"][sd["lvl_1L"][0, :n_tokens]] + sd["pos_1LC"][:, :n_tokens]
    bias = sd["attn_bias_for_masking"][..., :n_tokens, :n_tokens]
    depth = sum(1 for k in sd if k.endswith(".attn.proj.weight"))
    B, L = x.shape[:2]

    def ln(t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(t, (C,), eps=1e-6)

    for n in range(depth):
        p = f"blocks.{n}."
        g1, g2, s1, s2, b1, b2 = (F.silu(cond) @ sd[p + "ada_lin.1.weight"].T + sd[p + "ada_lin.1.bias"]
                                  ).view(B, 1, 6, C).unbind(2)
        H = sd[p + "attn.scale_mul_1H11"].shape[1]
        qkv_bias = torch.cat((sd[p + "attn.q_bias"], sd[p + "attn.zero_k_bias"], sd[p + "attn.v_bias"]))
        qkv = (ln(x) * (1 + s1) + b1) @ sd[p + "attn.mat_qkv.weight"].T + qkv_bias
        q, k, v = qkv.view(B, L, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)
        q = F.normalize(q, dim=-1) * sd[p + "attn.scale_mul_1H11"].clamp_max(math.log(100)).exp()
        k = F.normalize(k, dim=-1)
        att = ((q @ k.transpose(-2, -1)) + bias).softmax(-1) @ v  # scale 1
        x = x + (att.transpose(1, 2).reshape(B, L, C) @ sd[p + "attn.proj.weight"].T + sd[p + "attn.proj.bias"]) * g1
        h = ln(x) * (1 + s2) + b2
        h = F.gelu(h @ sd[p + "ffn.fc1.weight"].T + sd[p + "ffn.fc1.bias"], approximate="tanh")
        x = x + (h @ sd[p + "ffn.fc2.weight"].T + sd[p + "ffn.fc2.bias"]) * g2
    scale, shift = (F.silu(cond) @ sd["head_nm.ada_lin.1.weight"].T + sd["head_nm.ada_lin.1.bias"]).view(B, 1, 2, C).unbind(2)
    return ((ln(x) * (1 + scale) + shift) @ sd["head.weight"].T + sd["head.bias"]).float()


def var_draw(logits_BlV: torch.Tensor, top_k: int, top_p: float, g: torch.Generator) -> torch.Tensor:
    B, n, V = logits_BlV.shape
    logits = logits_BlV.clone()
    if top_k > 0:
        thr = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(-1, keepdim=True)
        logits.masked_fill_(logits < thr, -torch.inf)
    if top_p > 0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(-1).cumsum_(-1) <= 1 - top_p
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(-1, order, remove), -torch.inf)
    return torch.multinomial(logits.softmax(-1).view(-1, V), 1, replacement=True, generator=g).view(B, n)


def test_with_vars_weights_our_transformer_gives_vars_logits_and_draws():
    """Random weights in VAR's layout (its constant buffers included) loaded by `load_var_state_dict`: teacher-forced,
    our logits equal VAR's recipe's at every map; sampling with CFG, top-k and top-p from the same generator state
    draws the same tokens at every map (float64, so that no rounding can flip a draw)."""
    from nextdetail.models.configs import TokenizerSpec
    from nextdetail.models.quant import NextInput
    from nextdetail.models.tokenizer import BaseDetailVQVAE
    from nextdetail.models.transformer import (
        NextDetailTransformer,
        TeacherInputs,
        TransformerConfig,
        load_var_state_dict,
    )

    sides = (1, 2, 3, 4)
    cfg = TransformerConfig(sides=sides, vocab_size=64, cvae=8, num_classes=5, depth=2, width=128, heads=2)
    torch.manual_seed(0)
    layout = NextDetailTransformer(cfg)
    g = torch.Generator().manual_seed(1)
    sd = {k: torch.zeros_like(v, dtype=torch.float64) if k.endswith("zero_k_bias")  # VAR's constant zeros
          else torch.randn(v.shape, generator=g, dtype=torch.float64) * (0.3 if v.ndim > 1 else 0.1)
          for k, v in layout.state_dict().items()}
    sd["lvl_1L"], sd["attn_bias_for_masking"] = layout.lvl_1L.clone(), layout.attn_bias_for_masking.double()
    model = load_var_state_dict(NextDetailTransformer(cfg).double(), {f"module.{k}": v for k, v in sd.items()}).eval()
    tokenizer = BaseDetailVQVAE(TokenizerSpec(vocab_size=64, z_channels=8, ch=16, ch_mult=(1, 2, 2), resolution=16,
                                              patch_nums=sides, order=0, using_sa=False, using_mid_sa=False)).double()

    tokens = torch.randint(64, (3, cfg.L), generator=g)
    labels = torch.tensor([0, 3, 4])
    x = TeacherInputs(tokenizer, sides)(tokens)  # (B, L − 1, Cvae)
    ours = model(labels, x, drop_labels=False)
    torch.testing.assert_close(ours, var_forward(sd, labels, x, cfg.L), rtol=1e-6, atol=1e-6)

    B, M = 3, len(sides)
    mine = model.sample(labels, NextInput(tokenizer.quantize, tokenizer.spec.latent_side), cfg=1.5, top_k=20,
                        top_p=0.9, generator=torch.Generator().manual_seed(7))
    step = NextInput(tokenizer.quantize, tokenizer.spec.latent_side)  # f̂ accumulates: one per sampling run
    rng, inputs, theirs = torch.Generator().manual_seed(7), [], []
    both = torch.cat((labels, torch.full_like(labels, cfg.num_classes)))
    for k, side in enumerate(sides):
        end = sum(s * s for s in sides[: k + 1])
        x_in = torch.cat(inputs, 1).repeat(2, 1, 1) if inputs else None
        logits = var_forward(sd, both, x_in, end)[:, end - side * side:]
        t = 1.5 * k / (M - 1)
        idx = var_draw((1 + t) * logits[:B] - t * logits[B:], 20, 0.9, rng).view(B, side, side)
        theirs.append(idx)
        if k + 1 < M:
            inputs.append(step(k, idx).double())
    for k in range(M):
        assert torch.equal(mine[k], theirs[k]), k
    assert len({tuple(m.flatten().tolist()) for m in mine[-1]}) > 1  # the draws depend on the class
