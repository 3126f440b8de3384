"""The next-detail prediction model (NDP, ndp.txt §1; the paper's body is lost, so the design is ours and
documented in docs/architecture.md): one masked transformer that sees the leaves of a quadtree state and,
in a single forward pass, predicts for every leaf (a) the tokens of its four children at the next scale
and (b) a difficulty scalar — how much refining it would change the image.

Sequence: [start] + the N leaves of the state (any mixture of scales; padding masked out of attention).
- start: class embedding + `pos_start`; it attends only to itself and predicts the 1×1 root token from
  the class alone (VAR's first map), so the first step needs no leaves;
- a leaf (k, i, j): word_embed(its region's mean of the mixed-scale reconstruction f̂ of the state — the
  tokenizer's `indices_to_f_mixed`: the leaf's token and its ancestors') + pos_1LC[slot] + lvl_embed[k],
  like VAR's input at scale k; leaves attend to every leaf and to start (bidirectional: a masked model).
Heads: `head` (C → 4·V: the children, quadrants in raster order), `difficulty_head` (C → 1), `root_head`
(C → V, on start). Blocks are VAR's AdaLN blocks (models/transformer.py), class-conditioned.

Training (`ndp_loss`) samples random quadtree states of real token pyramids (each node refined with the
image's p ~ U(0, 1)), so every mixture of refined and unrefined regions is seen. Targets: the children's
tokens of every refinable leaf, the root token, and the difficulty target — log of the latent error that
refining the leaf removes, ‖f̂_full − f̂_≤k‖² averaged over its region (f̂_≤k: maps 1…k). We chose this over
the children's cross-entropy because it measures what a budget buys (an unrefined leaf leaves exactly
that error in the decoder's input), it depends on the data and not on the model being trained, and the
predictive-entropy estimator already covers "uncertainty".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextdetail.models.configs import NDPConfig
from nextdetail.models.quadtree import Quadtree, pack, pyramid_pool, quadrants, slot_levels
from nextdetail.models.transformer import VARTrunk


@dataclass
class NDPOutput:
    root: Tensor  # (B, V) logits of the 1×1 root token
    children: Tensor  # (B, N, 4, V) logits of each leaf's four children
    difficulty: Tensor  # (B, N) predicted log error that refining the leaf removes


class NextDetailMaskedTransformer(VARTrunk):
    def __init__(self, cfg: NDPConfig) -> None:
        super().__init__(cfg, 1, cfg.L)
        C = cfg.C
        self.head = nn.Linear(C, 4 * cfg.vocab_size)
        self.root_head = nn.Linear(C, cfg.vocab_size)
        self.difficulty_head = nn.Linear(C, 1)
        self.register_buffer("slot_level", slot_levels(cfg.sides), persistent=False)
        self._init_trunk()

    def forward(self, label_B: Tensor, f_BNc: Tensor, slot_BN: Tensor, valid_BN: Tensor,
                drop_labels: bool | None = None) -> NDPOutput:
        """label (B,), the leaves' pooled f̂ (B, N, Cvae), their slots (B, N) and validity (B, N) → NDPOutput."""
        drop = self.training if drop_labels is None else drop_labels
        if drop and self.cfg.cond_drop > 0:
            unconditional = torch.rand(label_B.shape, device=label_B.device) < self.cfg.cond_drop
            label_B = torch.where(unconditional, self.cfg.num_classes, label_B)
        B, N = slot_BN.shape
        cond_BD = self.class_emb(label_B)  # (B, C)
        start = (cond_BD + self.pos_start[0]).unsqueeze(1)  # (B, 1, C)
        leaves = self.word_embed(f_BNc.to(self.word_embed.weight.dtype)) + self.pos_1LC[0, slot_BN] + \
            self.lvl_embed(self.slot_level[slot_BN])  # (B, N, C)
        x = torch.cat((start, leaves), dim=1)  # (B, 1 + N, C)
        keys = torch.cat((valid_BN.new_ones(B, 1), valid_BN), dim=1)  # (B, 1 + N)
        allowed = keys.view(B, 1, 1, N + 1).expand(B, 1, N + 1, N + 1).clone()
        allowed[:, :, 0, 1:] = False  # start sees only itself: the root comes from the class alone
        bias = torch.zeros(allowed.shape, dtype=x.dtype, device=x.device).masked_fill_(~allowed, -torch.inf)
        for block in self.blocks:
            x = block(x, cond_BD, bias)
        h = self.head_nm(x, cond_BD)  # (B, 1 + N, C)
        children = self.head(h[:, 1:]).float().view(B, N, 4, self.cfg.vocab_size)  # (B, N, 4, V)
        return NDPOutput(self.root_head(h[:, 0]).float(), children, self.difficulty_head(h[:, 1:]).float().squeeze(-1))


# ---- inputs and targets from a token pyramid --------------------------------------------------


def leaf_inputs(quantizer: nn.Module, maps: list[Tensor], tree: Quadtree) -> tuple[Tensor, Tensor, Tensor]:
    """The model's inputs for a state: (pooled mixed-scale f̂ of its leaves (B, N, Cvae), slots (B, N),
    valid (B, N)). Tokens of absent nodes are never read."""
    S = tree.sides[-1]
    f = quantizer.indices_to_f_mixed(maps, tree.present(), S)  # (B, Cvae, S, S)
    pooled = pyramid_pool(f, tree.sides)  # (B, L, Cvae)
    slot, valid = pack(tree.leaf_slots())
    return pooled.gather(1, slot.unsqueeze(-1).expand(-1, -1, pooled.shape[-1])), slot, valid


@torch.no_grad()
def refinement_error(quantizer: nn.Module, maps: list[Tensor], sides: tuple[int, ...]) -> Tensor:
    """(B, L) per node: ‖f̂_full − f̂_≤k‖² averaged over its region — what refining it (fully) adds to the
    decoder's input. Zero at the finest level. The difficulty target, and the oracle estimator."""
    partial = quantizer.indices_to_f(maps, sides[-1], cumulative=True)  # K × (B, C, S, S)
    full = partial[-1]
    out = [pyramid_pool((full - partial[k]).square().sum(1, keepdim=True), (s,))[..., 0]
           for k, s in enumerate(sides)]  # K × (B, s_k²)
    return torch.cat(out, dim=1)


def difficulty_target(error_BL: Tensor) -> Tensor:
    return torch.log(error_BL + 1e-6)


def child_targets(maps: list[Tensor]) -> Tensor:
    """(B, L, 4): the children's tokens of every slot (zeros at the finest level)."""
    B = maps[0].shape[0]
    per_level = [quadrants(m) for m in maps[1:]] + [maps[-1].new_zeros(B, maps[-1].shape[-1] ** 2, 4)]
    return torch.cat(per_level, dim=1)


def ndp_loss(model: nn.Module, net: nn.Module, quantizer: nn.Module, tokens_BL: Tensor, label_B: Tensor,
             loss_weighting: str = "map", difficulty_weight: float = 0.5, label_smoothing: float = 0.0,
             generator: torch.Generator | None = None, drop_labels: bool | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One batch of pyramids (B, L) in slot order → (loss, metrics). A random state per image; CE of the
    root and of every refinable leaf's children (per level equally with `map`, per token with `token`),
    plus `difficulty_weight` · MSE of the difficulty head to `difficulty_target`."""
    cfg = model.cfg
    sides, B, K, V = cfg.sides, tokens_BL.shape[0], len(cfg.sides), cfg.vocab_size
    maps = [t.view(B, s, s) for t, s in zip(tokens_BL.split([s * s for s in sides], dim=1), sides, strict=True)]
    p = torch.rand(B, generator=generator, device="cpu" if generator is None else generator.device).to(tokens_BL.device)
    tree = Quadtree.random(p, sides, generator)
    f, slot, valid = leaf_inputs(quantizer, maps, tree)
    out: NDPOutput = net(label_B, f, slot, valid, drop_labels=drop_labels)
    level = model.slot_level[slot]  # (B, N)
    refinable = valid & (level < K - 1)
    targets = child_targets(maps).gather(1, slot.unsqueeze(-1).expand(-1, -1, 4))  # (B, N, 4)
    ce = F.cross_entropy(out.children.reshape(-1, V), targets.reshape(-1), reduction="none",
                         label_smoothing=label_smoothing).view(B, -1, 4).mean(-1)  # (B, N): per leaf, mean of 4
    root_ce = F.cross_entropy(out.root, maps[0].view(B), reduction="none", label_smoothing=label_smoothing)  # (B,)
    if loss_weighting == "map":  # the root and each level of refinable leaves weigh the same
        onehot = F.one_hot(level, K).float() * refinable.unsqueeze(-1)  # (B, N, K)
        per_level = onehot.sum(1)  # (B, K) refinable leaves per level
        groups = 1 + (per_level > 0).sum(1)  # (B,) root + levels present
        w = (onehot / per_level.clamp_min(1).unsqueeze(1)).sum(-1)  # (B, N): 1 / (leaves of its level)
        token_loss = ((ce * w).sum(1) + root_ce) / groups
    else:  # every predicted token the same: a leaf's 4 children count 4, the root 1
        token_loss = (4 * (ce * refinable).sum(1) + root_ce) / (4 * refinable.sum(1) + 1)
    target_d = difficulty_target(refinement_error(quantizer, maps, sides)).gather(1, slot)  # (B, N)
    d_err = (out.difficulty - target_d).square() * refinable
    d_loss = d_err.sum() / refinable.sum().clamp_min(1)
    loss = token_loss.mean() + difficulty_weight * d_loss
    with torch.no_grad():
        pred = out.children.argmax(-1)  # (B, N, 4)
        hits = ((pred == targets).float().mean(-1) * refinable).sum() + (out.root.argmax(-1) == maps[0].view(B)).sum()
        acc = hits / (refinable.sum() + B)
    return loss, {"acc": acc, "token_loss": token_loss.mean().detach(), "difficulty_loss": d_loss.detach(),
                  "leaves": valid.sum(1).float().mean()}


def loss(model: NextDetailMaskedTransformer, net: nn.Module, teacher: object, tokens_BL: Tensor, label_B: Tensor, *,
         loss_weighting: str = "map", difficulty_weight: float = 0.5, label_smoothing: float = 0.0,
         generator: torch.Generator | None = None, drop_labels: bool | None = None,
         ) -> tuple[Tensor, Tensor, dict[str, Tensor | float]]:
    """The family interface of the training loop (as `models/transformer.loss`): `ndp_loss` with the
    quantizer of the teacher (`TeacherInputs`) → (loss, accuracy, extra metrics)."""
    value, m = ndp_loss(model, net, teacher.quantizer, tokens_BL, label_B, loss_weighting, difficulty_weight,
                        label_smoothing, generator, drop_labels)
    return value, m["acc"], {"difficulty_loss": float(m["difficulty_loss"]), "leaves": float(m["leaves"])}


# ---- compute ------------------------------------------------------------------------------------


def forward_flops(cfg: NDPConfig, n_leaves: int) -> float:
    """Multiply-adds × 2 of one forward pass over [start] + n leaves (one image, no CFG)."""
    from nextdetail.models.flops import transformer_flops

    n = n_leaves + 1
    heads = 2 * n_leaves * cfg.C * (4 * cfg.vocab_size + 1) + 2 * cfg.C * cfg.vocab_size
    return transformer_flops(cfg.depth, cfg.C, cfg.mlp_hidden, n, n) + 2 * n_leaves * cfg.cvae * cfg.C + heads


def full_refinements(sides: tuple[int, ...]) -> int:
    """Internal nodes of the full pyramid: the refinements that reach every finest token."""
    return sum(s * s for s in sides[:-1])


Config, Model = NDPConfig, NextDetailMaskedTransformer  # the family's names (nextdetail.models.FAMILIES)
