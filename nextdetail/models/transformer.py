"""The next-detail transformer (CART §3.3, Eq. 13): VAR's class-conditional decoder-only transformer
over a base/detail token schedule.

Every token map is predicted in parallel from the maps before it. As in VAR, the input at the positions
of map k+1 is not a token embedding but the tokenizer's cumulative reconstruction f̂_k = Σ_{j≤k} φ_j(z_j)
area-resampled to map k+1's size (`MultiScaleQuantizer.next_inputs`); map 1's input is the class
embedding (start token) plus `pos_start`. Base scales and detail maps are only different sizes and
levels here: decomposition order 0 is exactly VAR's layout (levels = scales).

Module and parameter names follow VAR's `models/var.py` and `basic_var.py` (class_emb, pos_start,
pos_1LC, lvl_embed, word_embed, blocks.N.attn.mat_qkv, …, head_nm, head).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextdetail.models.configs import TransformerConfig, VARShape


def block_causal_bias(sides: tuple[int, ...]) -> Tensor:
    """(1, 1, L, L) additive mask: a token attends to every token of its own map and of earlier maps."""
    level = torch.cat([torch.full((s * s,), k) for k, s in enumerate(sides)])  # (L,)
    allowed = level.view(-1, 1) >= level.view(1, -1)  # (L, L)
    return torch.where(allowed, 0.0, -torch.inf).view(1, 1, len(level), len(level))


class SelfAttention(nn.Module):
    def __init__(self, C: int, H: int, attn_l2_norm: bool) -> None:
        super().__init__()
        self.H, self.head_dim, self.attn_l2_norm = H, C // H, attn_l2_norm
        self.mat_qkv = nn.Linear(C, 3 * C, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(C)), nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C))
        if attn_l2_norm:  # normalized q/k with a learned per-head temperature (VAR)
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, H, 1, 1), math.log(4.0)))
            self.max_scale_mul = math.log(100.0)
        else:
            self.scale = self.head_dim**-0.5
        self.proj = nn.Linear(C, C)
        self.caching, self.cached_k, self.cached_v = False, None, None

    def kv_caching(self, enable: bool) -> None:
        self.caching, self.cached_k, self.cached_v = enable, None, None

    def forward(self, x: Tensor, attn_bias: Tensor | None) -> Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.H, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, head_dim)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if self.caching:  # sampling: this map's keys/values join those of every earlier map
            if self.cached_k is not None:
                k, v = torch.cat((self.cached_k, k), dim=2), torch.cat((self.cached_v, v), dim=2)
            self.cached_k, self.cached_v = k, v
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if attn_bias is None else attn_bias.to(q.dtype),
                                             scale=self.scale)  # (B, H, L, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, C: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(C, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, C)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DropPath(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty(x.shape[0], *(1,) * (x.ndim - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class AdaLNSelfAttn(nn.Module):
    """Pre-norm block whose LayerNorm scale/shift and residual gates come from the class condition."""

    def __init__(self, C: int, H: int, mlp_ratio: float, drop_path: float, attn_l2_norm: bool) -> None:
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(C, H, attn_l2_norm)
        self.ffn = FFN(C, round(C * mlp_ratio))
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, cond_BD: Tensor, attn_bias: Tensor | None) -> Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BD).view(-1, 1, 6, self.C).unbind(2)
        x = x + self.drop_path(self.attn(self.ln_wo_grad(x).mul(scale1.add(1)).add_(shift1), attn_bias).mul_(gamma1))
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(scale2.add(1)).add_(shift2)).mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, C: int) -> None:
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x: Tensor, cond_BD: Tensor) -> Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add_(shift)


class VARTrunk(nn.Module):
    """What our transformers share, under VAR's names: class embedding (+1: unconditional), start
    positions, per-slot positions, level embedding, word_embed of f̂, AdaLN blocks with VAR's drop-path
    ramp, the AdaLN before the heads. Subclasses add their heads, then call `_init_trunk()` (last, so the
    parameters draw from the generator in one fixed order)."""

    def __init__(self, cfg: VARShape, n_start: int, L: int) -> None:
        super().__init__()
        self.cfg = cfg
        C = cfg.C
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # index num_classes = unconditional
        self.pos_start = nn.Parameter(torch.empty(1, n_start, C))  # drawn by _init_trunk
        self.pos_1LC = nn.Parameter(torch.empty(1, L, C))
        self.lvl_embed = nn.Embedding(len(cfg.sides), C)
        self.word_embed = nn.Linear(cfg.cvae, C)
        dpr = cfg.drop_path if cfg.drop_path is not None else 0.1 * cfg.depth / 24
        self.blocks = nn.ModuleList(AdaLNSelfAttn(C, cfg.H, cfg.mlp_ratio, dpr * i / max(cfg.depth - 1, 1),
                                                  cfg.attn_l2_norm) for i in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C)

    def _init_trunk(self, init_head: float = 0.02, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5) -> None:
        """VAR's initialisation (`VAR.init_weights` with its train.py defaults `ini=-1 hd=0.02 aln=0.5 alng=1e-5`):
        every Linear / Embedding / position table trunc-normal with std √(1/3C), biases zero; the heads ×0.02;
        each block's residual projections (attn.proj, ffn.fc2) ÷√(2·depth); the AdaLN scale/shift rows ×0.5 and
        the residual gates ×1e-5 (branches start nearly closed, not exactly: gradients reach every gate)."""
        C, depth = self.cfg.C, len(self.blocks)
        std = math.sqrt(1 / (3 * C))
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=std)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, m in self.named_children():  # head, root_head, difficulty_head, detail_head
            if (name == "head" or name.endswith("_head")) and isinstance(m, nn.Linear):
                m.weight.data.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        for block in self.blocks:
            block.attn.proj.weight.data.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.data.div_(math.sqrt(2 * depth))
            gates_and_modulation = block.ada_lin[-1].weight.data  # rows: γ1 γ2 | scale1 scale2 shift1 shift2
            gates_and_modulation[2 * C:].mul_(init_adaln)
            gates_and_modulation[:2 * C].mul_(init_adaln_gamma)


class NextDetailTransformer(VARTrunk):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__(cfg, cfg.first_l, cfg.L)
        C, L = cfg.C, cfg.L
        self.head = nn.Linear(C, cfg.vocab_size)
        # CART's detail dial: at each position of the last base map, how much detail lives there (log ‖Σ detail
        # φ_k(z_k)‖² over its cells), read from the detached features the token head sees (`detail_difficulty`)
        self.detail_head = nn.Linear(C, 1) if cfg.has_detail_head else None
        level = torch.cat([torch.full((s * s,), k) for k, s in enumerate(cfg.sides)])
        self.register_buffer("lvl_1L", level.view(1, L), persistent=False)
        self.register_buffer("attn_bias_for_masking", block_causal_bias(cfg.sides), persistent=False)
        starts = [0]
        for s in cfg.sides:
            starts.append(starts[-1] + s * s)
        self.begin_ends = [(starts[k], starts[k + 1]) for k in range(len(cfg.sides))]
        self._init_trunk()

    def embed(self, label_B: Tensor, x_BLCv_wo_first_l: Tensor | None) -> tuple[Tensor, Tensor]:
        """(tokens' input (B, l, C), condition (B, C)) for the first l positions."""
        cond_BD = self.class_emb(label_B)  # (B, C)
        B, first_l = label_B.shape[0], self.cfg.first_l
        sos = cond_BD.unsqueeze(1).expand(B, first_l, -1) + self.pos_start.expand(B, first_l, -1)  # (B, first_l, C)
        x = sos if x_BLCv_wo_first_l is None else torch.cat(
            (sos, self.word_embed(x_BLCv_wo_first_l.to(self.word_embed.weight.dtype))), dim=1)
        ed = x.shape[1]
        x = x + self.lvl_embed(self.lvl_1L[:, :ed].expand(B, -1)) + self.pos_1LC[:, :ed]  # (B, ed, C)
        return x, cond_BD

    def forward(self, label_B: Tensor, x_BLCv_wo_first_l: Tensor, drop_labels: bool | None = None,
                return_features: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Teacher forcing: logits (B, L, V) for every token map given the inputs of maps 2…M; with
        `return_features`, also the head's input features (B, L, C)."""
        drop = self.training if drop_labels is None else drop_labels
        if drop and self.cfg.cond_drop > 0:
            unconditional = torch.rand(label_B.shape, device=label_B.device) < self.cfg.cond_drop
            label_B = torch.where(unconditional, self.cfg.num_classes, label_B)
        x, cond_BD = self.embed(label_B, x_BLCv_wo_first_l)
        bias = self.attn_bias_for_masking[..., : x.shape[1], : x.shape[1]]
        for block in self.blocks:
            x = block(x, cond_BD, bias)
        h = self.head_nm(x, cond_BD)
        logits = self.head(h).float()
        return (logits, h) if return_features else logits

    def detail_difficulty(self, features_BlC: Tensor) -> Tensor:
        """The dial's score at the last base map's positions (B, l) from its head features, detached: the
        head learns on top of the transformer without changing what it learns."""
        return self.detail_head(features_BlC.detach()).squeeze(-1).float()

    # ---- sampling ------------------------------------------------------------------------------

    def _map_logits(self, k: int, x: Tensor, cond_BD: Tensor, cache: bool) -> tuple[Tensor, Tensor]:
        """(logits, head features) of map k; with `cache`, x holds map k's inputs only (or a subset of its
        positions) and earlier maps come from the KV cache."""
        bias = None if cache else self.attn_bias_for_masking[..., : x.shape[1], : x.shape[1]]
        for block in self.blocks:
            x = block(x, cond_BD, bias)
        bg, ed = self.begin_ends[k]
        x = x if cache else x[:, bg:ed]
        h = self.head_nm(x, cond_BD)
        return self.head(h).float(), h  # (B, h_k·w_k, V), (B, h_k·w_k, C)

    @torch.no_grad()
    def sample(self, label_B: Tensor, next_input: Callable[..., Tensor], cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
               generator: torch.Generator | None = None, use_cache: bool = True,
               given: list[Tensor] | None = None,
               select_details: Callable[[Tensor], Tensor] | None = None, cfg_ramp_maps: int | None = None) -> list[Tensor]:
        """Class-conditional sampling, map by map (`sample_map`), each map's tokens drawn with classifier-free
        guidance ramped over the maps as VAR does (`GuidedDraw`). `next_input(k, idx_Bhw)` adds map k's tokens
        to the reconstruction and returns map k+1's input (B, h_{k+1}·w_{k+1}, Cvae) (the tokenizer's
        `next_inputs` step). `given`: the first maps are these tokens, not sampled (a fixed prefix, e.g. the base
        maps when only the details are generated). `select_details` (CART's detail dial, `DetailDial`; KV cache
        only): called with the detail difficulty at the last base map (B, l), returns which latent cells (B, h·w)
        bool, the same count per image, get detail tokens; every detail map then runs only those positions and
        `next_input(k, idx, keep)` gets the mask. Returns the M token maps (B, h_k, w_k) (unselected detail
        positions hold 0 and are not part of the image). `cfg_ramp_maps`: the maps the guidance ramps over (default
        all M, VAR's; `GuidedDraw`)."""
        M = len(self.cfg.sides)
        draw = GuidedDraw(cfg, top_k, top_p, generator, cfg_ramp_maps or M)
        dial = None
        if select_details is not None and self.cfg.has_detail_head:
            if not use_cache:
                raise ValueError("the detail dial runs with the KV cache")
            dial = DetailDial(select_details, self.cfg.n_base)
        labels = torch.cat((label_B, torch.full_like(label_B, self.cfg.num_classes)))  # (2B,): cond, uncond
        x, cond_BD = self.embed(labels, None)  # map 1's input: (2B, first_l, C)
        for block in self.blocks:
            block.attn.kv_caching(use_cache)
        inputs: list[Tensor] = []  # uncached: every map's input so far, re-run each step
        out: list[Tensor] = []
        try:
            for k in range(M):
                if not use_cache:
                    inputs.append(x)
                    x = torch.cat(inputs, dim=1)
                fixed = given[k] if given is not None and k < len(given) else None
                out.append(self.sample_map(k, x, cond_BD, use_cache, draw, dial, fixed))
                if k + 1 < M:
                    x = self._next_map_input(k, out[-1], next_input, dial)
        finally:
            for block in self.blocks:
                block.attn.kv_caching(False)
        return out

    def sample_map(self, k: int, x: Tensor, cond_BD: Tensor, use_cache: bool, draw: GuidedDraw,
                   dial: DetailDial | None = None, fixed: Tensor | None = None) -> Tensor:
        """One step: map k's tokens (B, s_k, s_k) from its input x (2B, l, C) (with the cache: map k's positions
        only; without: every map's so far). A `fixed` map (the given prefix) is only run for its keys/values;
        otherwise the tokens are drawn by `draw`, at the dial's positions only once it has chosen them."""
        B, side = cond_BD.shape[0] // 2, self.cfg.sides[k]
        if dial is not None:
            x = dial.restrict(k, x)
        if fixed is not None:
            if use_cache:  # the prefix's keys/values still enter the cache
                self._map_logits(k, x, cond_BD, use_cache)
            return fixed.view(B, side, side)
        logits, feats = self._map_logits(k, x, cond_BD, use_cache)  # (2B, l_k, V), (2B, l_k, C)
        drawn = draw(k, logits)  # (B, l_k), or (B, n) at the dial's positions
        if dial is None:
            return drawn.view(B, side, side)
        tokens = dial.place(k, drawn, side)
        if k == dial.n_base - 1:  # the last base map: where do details go?
            dial.choose(self.detail_difficulty(feats[:B]))
        return tokens

    def _next_map_input(self, k: int, idx: Tensor, next_input: Callable[..., Tensor], dial: DetailDial | None) -> Tensor:
        """Map k+1's input (2B, l_{k+1}, C) from map k's tokens: the same for the cond and uncond halves."""
        B = idx.shape[0]
        nb, ned = self.begin_ends[k + 1]
        masked = dial is not None and dial.active(k)  # a detail map: only its kept tokens count
        f = (next_input(k, idx, dial.keep) if masked else next_input(k, idx)).to(self.word_embed.weight.dtype)
        x = self.word_embed(f).repeat(2, 1, 1)
        return x + self.lvl_embed(self.lvl_1L[:, nb:ned].expand(2 * B, -1)) + self.pos_1LC[:, nb:ned]


@dataclass
class GuidedDraw:
    """How a map's tokens are drawn: classifier-free guidance ramped over the first `maps` maps as VAR does
    (t_k = cfg · k / (maps − 1): none at the first map, `cfg` at map `maps` − 1 and after), then top-k / top-p
    sampling. VAR ramps over all M maps; `sample.cfg_schedule=base_maps` ramps over CART's base maps only, so the
    last base map gets the full guidance whatever the number of detail maps after it."""

    cfg: float
    top_k: int
    top_p: float
    generator: torch.Generator | None
    maps: int

    def guidance(self, k: int) -> float:
        """t_k, the guidance of map k."""
        return self.cfg * min(k, self.maps - 1) / max(self.maps - 1, 1)

    def __call__(self, k: int, logits_2BlV: Tensor) -> Tensor:
        B = logits_2BlV.shape[0] // 2
        t = self.guidance(k)
        guided = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]  # (B, l, V)
        return sample_top_k_top_p(guided, self.top_k, self.top_p, self.generator)  # (B, l)


@dataclass
class DetailDial:
    """CART's detail dial while sampling: after the last base map, `select(difficulty (B, l))` picks the latent
    cells (B, l) bool — the same count per image — that get detail tokens; each detail map then runs, and is
    drawn, at those positions only (the rest hold 0 and are not part of the image)."""

    select: Callable[[Tensor], Tensor]
    n_base: int
    keep: Tensor | None = None  # (B, l) bool once chosen

    def active(self, k: int) -> bool:
        return self.keep is not None and k >= self.n_base

    def choose(self, difficulty_Bl: Tensor) -> None:
        self.keep = self.select(difficulty_Bl)

    def restrict(self, k: int, x_2BlC: Tensor) -> Tensor:
        """Map k's input at the kept positions only: (2B, n, C)."""
        if not self.active(k):
            return x_2BlC
        B = self.keep.shape[0]
        pos = self.keep.nonzero()[:, 1].view(B, -1).repeat(2, 1)  # (2B, n)
        return x_2BlC.gather(1, pos.unsqueeze(-1).expand(-1, -1, x_2BlC.shape[-1]))

    def place(self, k: int, drawn_Bn: Tensor, side: int) -> Tensor:
        """Drawn tokens (B, n) → the map (B, side, side), zeros where no detail is drawn."""
        B = drawn_Bn.shape[0]
        if not self.active(k):
            return drawn_Bn.view(B, side, side)
        idx = torch.zeros(B, side * side, dtype=drawn_Bn.dtype, device=drawn_Bn.device)
        idx[self.keep] = drawn_Bn.flatten()
        return idx.view(B, side, side)


# ---- training: VAR's teacher forcing and CART's objective -----------------------------------------


def split_maps(tokens_BL: Tensor, sides: tuple[int, ...]) -> list[Tensor]:
    """(B, L) → the M token maps (B, s_k, s_k), in prediction order."""
    return [t.view(-1, s, s) for t, s in zip(tokens_BL.split([s * s for s in sides], dim=1), sides, strict=True)]


class TeacherInputs:
    """Tokens (B, L) → the transformer's inputs for maps 2…M (B, L − first_l, Cvae): f̂_{k−1} area-resampled
    to map k (VAR's teacher forcing), by the quantizer of exactly the tokenizer the tokens came from."""

    def __init__(self, tokenizer: nn.Module, sides: tuple[int, ...]) -> None:
        self.quantizer = tokenizer.quantize.eval().requires_grad_(False)
        self.latent_side, self.sides = tokenizer.spec.latent_side, sides

    def __call__(self, tokens_BL: Tensor) -> Tensor:
        return self.quantizer.next_inputs(split_maps(tokens_BL, self.sides), self.latent_side)

    @torch.no_grad()
    def detail_target(self, tokens_BL: Tensor, n_base: int) -> Tensor:
        """CART's detail-dial target (B, l_b): log of the detail maps' summed contribution ‖Σ_{k ≥ n_base}
        φ_k(z_k)‖² averaged over each cell of the last base map — where detail matters."""
        maps = split_maps(tokens_BL, self.sides)
        detail = sum(self.quantizer._to_latent(k, maps[k], self.latent_side) for k in range(n_base, len(maps)))
        energy = detail.float().square().sum(1, keepdim=True)  # (B, 1, S, S)
        side = self.sides[n_base - 1]
        return torch.log(F.adaptive_avg_pool2d(energy, side).flatten(1) + 1e-6)  # (B, l_b)


def token_weights(sides: tuple[int, ...], loss_weighting: str) -> Tensor:
    """Per-token loss weights (L,) summing to 1: every token the same (`token`, VAR), or each map's tokens
    sharing 1/M (`map`)."""
    sizes = torch.tensor([s * s for s in sides], dtype=torch.float32)
    per_map = 1 / (len(sizes) * sizes) if loss_weighting == "map" else torch.full_like(sizes, 1 / sizes.sum())
    return per_map.repeat_interleave(sizes.long())


def loss(model: NextDetailTransformer, net: nn.Module, teacher: TeacherInputs, tokens_BL: Tensor, label_B: Tensor, *,
         loss_weighting: str = "token", difficulty_weight: float = 0.0, label_smoothing: float = 0.0,
         generator: torch.Generator | None = None, drop_labels: bool | None = None,
         ) -> tuple[Tensor, Tensor, dict[str, Tensor | float]]:
    """CART's objective (Eq. 13): cross-entropy of all L tokens given the maps before them (teacher forcing),
    weighted by `token_weights`, mean over the batch → (loss, token accuracy, extra). With the dial's head
    and `difficulty_weight` > 0, extra["aux_loss"] is its weighted MSE to `detail_target` (on detached
    features: trained beside the loss, not part of it). `net`: the model or its DDP wrapper; `generator` is
    unused (the family interface: NDP draws its quadtree states from it)."""
    cfg = model.cfg
    with torch.autocast(tokens_BL.device.type, enabled=False):
        x = teacher(tokens_BL)  # (B, L − first_l, Cvae), in full precision
    dial = model.detail_head is not None and difficulty_weight > 0
    out = net(label_B, x, drop_labels=drop_labels, return_features=dial)
    logits = out[0] if dial else out  # (B, L, V)
    ce = F.cross_entropy(logits.float().transpose(1, 2), tokens_BL, reduction="none",
                         label_smoothing=label_smoothing)  # (B, L)
    extra: dict[str, Tensor | float] = {}
    if dial:  # log detail energy under each last-base-map position
        bg, ed = model.begin_ends[cfg.n_base - 1]
        pred = model.detail_difficulty(out[1][:, bg:ed])  # (B, l_b)
        d_err = F.mse_loss(pred, teacher.detail_target(tokens_BL, cfg.n_base))
        extra = {"aux_loss": difficulty_weight * d_err, "difficulty_loss": float(d_err.detach())}
    weights = token_weights(cfg.sides, loss_weighting).to(ce.device)
    acc = (logits.detach().argmax(-1) == tokens_BL).float().mean()
    return ce.mul(weights).sum(1).mean(), acc, extra


def sample_top_k_top_p(logits_BlV: Tensor, top_k: int = 0, top_p: float = 0.0,
                       generator: torch.Generator | None = None) -> Tensor:
    """One token per position from logits (B, l, V), restricted to the top k and/or nucleus p. → (B, l)."""
    B, n, V = logits_BlV.shape
    logits = logits_BlV.clone()
    if top_k > 0:
        kth = logits.topk(min(top_k, V), dim=-1).values[..., -1:]  # (B, l, 1)
        logits.masked_fill_(logits < kth, -torch.inf)
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cut = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p  # the low tail whose mass is ≤ 1 − p
        cut[..., -1:] = False  # keep at least the best
        logits.masked_fill_(cut.scatter(-1, order, cut), -torch.inf)
    probs = logits.softmax(-1).view(-1, V)
    return torch.multinomial(probs, 1, generator=generator).view(B, n)


# ---- VAR's released weights ----------------------------------------------------------------------

VAR_CONSTANTS = ("lvl_1L", "attn_bias_for_masking")
"""Buffers VAR saves (registered persistent) that are functions of the scale schedule; ours are derived, not saved."""


def load_var_state_dict(model: NextDetailTransformer, state_dict: dict[str, Tensor]) -> NextDetailTransformer:
    """VAR's released transformer (var_d16.pth … var_d30.pth, plain state dicts; `tests/data/var_d16_keys.txt`
    pins the layout) into `model` — order 0 over VAR's scales, VAR's depth. Names map one to one (ours follow
    VAR's), every shape is checked, and VAR's two constant buffers must equal ours (the same scale schedule).
    Anything that does not fit raises ValueError naming the first key."""
    theirs = {k.removeprefix("module."): v for k, v in state_dict.items()}  # DDP-saved copies
    for name in VAR_CONSTANTS:
        if name in theirs:
            value, ours_c = theirs.pop(name), getattr(model, name)
            if value.shape != ours_c.shape or not torch.equal(value.to(ours_c.dtype).cpu(), ours_c.cpu()):
                raise ValueError(f"{name}: the checkpoint's scale schedule is not this model's (maps "
                                 f"{model.cfg.sides}); VAR's is 1, 2, 3, 4, 5, 6, 8, 10, 13, 16 at order 0")
    ours = model.state_dict()
    unknown, missing = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    if unknown or missing:
        raise ValueError(f"not a VAR transformer state dict for this architecture: unknown keys {unknown[:5]}, "
                         f"missing keys {missing[:5]} ({len(unknown)} / {len(missing)} in all)")
    for key, value in theirs.items():
        if value.shape != ours[key].shape:
            raise ValueError(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(ours[key].shape)}")
    model.load_state_dict(theirs, strict=True)
    return model


Config, Model = TransformerConfig, NextDetailTransformer  # the family's names (nextdetail.models.FAMILIES)
