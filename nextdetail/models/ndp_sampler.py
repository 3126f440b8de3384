"""Sampling NDP with a compute budget: refine the hardest leaves first until the budget is spent.

Per image, the budget is a number of refinements R = round(budget · (internal nodes of the full
pyramid)); budget 1 refines every node, i.e. the full pyramid. The loop (one forward pass per step):
  state = the 1×1 root, sampled from the class (start token; CFG as VAR's first map: none)
  while refinements < R and a leaf can still be refined:
    one forward over [start] + the current leaves (conditional and unconditional halves: CFG) gives
    every leaf's children logits and difficulty; the estimator scores the refinable leaves; the
    k = min(refine_per_step, R − refinements) best are refined: their 4 children sampled from the
    guided logits of that same pass (CFG ramped by the children's level, t = cfg · level / (K − 1),
    as VAR ramps over maps; top-k / top-p)
  image = the tokenizer's mixed-scale decoding of the final state.

Estimators (`ESTIMATORS`): `learned` — the difficulty head; `entropy` — Σ of the four children's
predictive entropies under the guided logits; `random`; `uniform` — breadth-first in raster order (VAR's
order: every 2×2 before any 4×4); `oracle` (analysis only) — the model's own fully refined sample is
drawn first, then truncated greedily by the error that refining each leaf removes from it
(`ndp.refinement_error`), k per step: the best ranking any estimator could make for that sample.
Compute is charged as the budgeted run's forward passes (the full draw is not counted).

FLOPs are counted per image from the leaves it had at each pass (`ndp.forward_flops`, both CFG halves).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from nextdetail.models.ndp import (
    NextDetailMaskedTransformer,
    child_targets,
    forward_flops,
    full_refinements,
    leaf_inputs,
    refinement_error,
)
from nextdetail.models.quadtree import Quadtree, pack, slot_offsets
from nextdetail.models.transformer import sample_top_k_top_p

ESTIMATORS = ("learned", "entropy", "oracle", "random", "uniform")


@dataclass
class NDPSamples:
    images: Tensor  # (B, 3, H, W) in [-1, 1]
    maps: list[Tensor]  # K × (B, s_k, s_k); tokens of nodes the state lacks are 0 and never read
    tree: Quadtree  # the final state
    flops: Tensor  # (B,) forward FLOPs spent on the image (both CFG halves)
    tokens: Tensor  # (B,) sequence positions processed over all its forward passes (both halves)
    forward_passes: Tensor  # (B,)
    refined: Tensor  # (B,) refinements made

    @property
    def level_maps(self) -> Tensor:
        """(B, S, S): the level each latent cell ended at (the refinement heat map)."""
        return self.tree.level_map()


# step(rows, maps of rows, tree of rows) → (scores (n, N), children (n, N, 4), slots (n, N), valid (n, N), flops (n,), tokens (n,))
Step = Callable[[Tensor, list[Tensor], Quadtree], tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]]


class NDPSampler:
    def __init__(self, model: NextDetailMaskedTransformer, tokenizer: torch.nn.Module, budget: float = 1.0,
                 estimator: str = "learned", refine_per_step: int = 4) -> None:
        sides = tuple(m.side for m in tokenizer.schedule)
        if sides != model.cfg.sides or tokenizer.spec.vocab_size != model.cfg.vocab_size:
            raise ValueError(f"NDP model (pyramid {model.cfg.sides}, V {model.cfg.vocab_size}) and tokenizer (maps "
                             f"{sides}, V {tokenizer.spec.vocab_size}) do not belong together")
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown difficulty estimator {estimator!r}; one of {', '.join(ESTIMATORS)}")
        if not 0 < budget <= 1:
            raise ValueError(f"budget must be in (0, 1], got {budget}")
        self.transformer, self.tokenizer = model.eval(), tokenizer.eval()
        self.quantizer, self.sides = tokenizer.quantize, sides
        self.budget, self.estimator, self.refine_per_step = budget, estimator, refine_per_step
        self.last: NDPSamples | None = None

    @property
    def forward_passes(self) -> float:
        """Mean forward passes per image of the last call (the sample stage's summary)."""
        return round(float(self.last.forward_passes.float().mean()), 2) if self.last is not None else 0.0

    def refinements(self, budget: float) -> int:
        return round(budget * full_refinements(self.sides))

    @torch.no_grad()
    def sample(self, labels: Tensor, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
               generator: torch.Generator | None = None, budget: float | None = None,
               estimator: str | None = None) -> NDPSamples:
        budget = self.budget if budget is None else budget
        estimator = self.estimator if estimator is None else estimator
        if estimator == "oracle":
            full = self.sample(labels, cfg, top_k, top_p, generator, budget=1.0, estimator="uniform")
            out = self._oracle(labels, full.maps, budget)
        else:
            out = self._run(labels, self._model_step(labels, estimator, cfg, top_k, top_p, generator), budget, generator,
                            cfg, top_k, top_p)
        self.last = out
        return out

    # ---- the loop ---------------------------------------------------------------------------------

    def _root(self, labels: Tensor, cfg: float, top_k: int, top_p: float, generator: torch.Generator | None) -> Tensor:
        B, V = labels.shape[0], self.transformer.cfg.vocab_size
        labels2 = torch.cat((labels, torch.full_like(labels, self.transformer.cfg.num_classes)))
        empty = labels.new_zeros(2 * B, 0)
        out = self.transformer(labels2, labels.new_zeros(2 * B, 0, self.transformer.cfg.cvae, dtype=torch.float32), empty,
                         empty.bool(), drop_labels=False)
        return sample_top_k_top_p(out.root[:B].view(B, 1, V), top_k, top_p, generator).view(B, 1, 1)  # t = 0

    def _run(self, labels: Tensor, step: Step, budget: float, generator: torch.Generator | None, cfg: float,
             top_k: int, top_p: float, maps: list[Tensor] | None = None) -> NDPSamples:
        B, device = labels.shape[0], labels.device
        mcfg = self.transformer.cfg
        tree = Quadtree.root(B, self.sides, device)
        flops = torch.full((B,), 2 * forward_flops(mcfg, 0), dtype=torch.float64, device=device)
        tokens = torch.full((B,), 2, dtype=torch.long, device=device)
        passes = torch.ones(B, dtype=torch.long, device=device)
        if maps is None:
            maps = [torch.zeros(B, s, s, dtype=torch.long, device=device) for s in self.sides]
            maps[0] = self._root(labels, cfg, top_k, top_p, generator)
        R = self.refinements(budget)
        refined = torch.zeros(B, dtype=torch.long, device=device)
        active = refined < R
        offsets = slot_offsets(self.sides)
        while bool(active.any()):
            rows = active.nonzero().flatten()
            sub_tree, sub_maps = tree.index(rows), [m[rows] for m in maps]
            score, kids, slot, valid, f, t = step(rows, sub_maps, sub_tree)
            level = self.transformer.slot_level[slot]  # (n, N)
            refinable = valid & (level < len(self.sides) - 1)
            score = score.masked_fill(~refinable, -torch.inf)
            k = torch.minimum(torch.full_like(rows, self.refine_per_step), R - refined[rows])
            k = torch.minimum(k, refinable.sum(1))
            rank = score.argsort(dim=1, descending=True).argsort(dim=1)  # (n, N): 0 = hardest
            chosen = (rank < k.view(-1, 1)) & refinable
            r_idx, n_idx = chosen.nonzero(as_tuple=True)
            for lv in range(len(self.sides) - 1):  # write the children, mark the parents refined
                at = level[r_idx, n_idx] == lv
                if not bool(at.any()):
                    continue
                rr, nn_ = r_idx[at], n_idx[at]
                s = self.sides[lv]
                pos = slot[rr, nn_] - offsets[lv]
                i, j = pos // s, pos % s
                b = rows[rr]
                for q, (di, dj) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                    maps[lv + 1][b, 2 * i + di, 2 * j + dj] = kids[rr, nn_, q]
                where = torch.zeros(B, s, s, dtype=torch.bool, device=device)
                where[b, i, j] = True
                tree.refine(lv, where)
            flops[rows] += f
            tokens[rows] += t
            passes[rows] += 1
            refined[rows] += k
            active = (refined < R) & ~tree.is_full()
        images = self.tokenizer.indices_to_img_mixed(maps, tree.present())
        return NDPSamples(images, maps, tree, flops, tokens, passes, refined)

    def _model_step(self, labels: Tensor, estimator: str, cfg: float, top_k: int, top_p: float,
                    generator: torch.Generator | None) -> Step:
        mcfg, K = self.transformer.cfg, len(self.sides)
        ranking = torch.Generator().manual_seed(int(labels.sum()) * 7919 + len(labels))  # the random estimator's

        def step(rows: Tensor, maps: list[Tensor], tree: Quadtree) -> tuple[Tensor, ...]:
            n = len(rows)
            f, slot, valid = leaf_inputs(self.quantizer, maps, tree)
            lab = labels[rows]
            lab2 = torch.cat((lab, torch.full_like(lab, mcfg.num_classes)))
            out = self.transformer(lab2, f.repeat(2, 1, 1), slot.repeat(2, 1), valid.repeat(2, 1), drop_labels=False)
            level = self.transformer.slot_level[slot]
            t = (cfg * (level + 1) / max(K - 1, 1)).unsqueeze(-1).unsqueeze(-1)  # (n, N, 1, 1): the children's level
            guided = (1 + t) * out.children[:n] - t * out.children[n:]  # (n, N, 4, V)
            if estimator == "learned":
                score = out.difficulty[:n]
            elif estimator == "entropy":
                logp = guided.log_softmax(-1)
                score = -(logp.exp() * logp).sum(-1).sum(-1)  # (n, N)
            elif estimator == "random":  # its own generator: the tokens' draws stay those of the other estimators
                score = torch.rand(slot.shape, generator=ranking).to(slot.device)
            else:  # uniform: breadth-first, raster order within a level
                score = -slot.float()
            N, V = slot.shape[1], mcfg.vocab_size
            kids = sample_top_k_top_p(guided.reshape(n, N * 4, V), top_k, top_p, generator).view(n, N, 4)
            leaves = valid.sum(1)
            flops = torch.tensor([2 * forward_flops(mcfg, int(c)) for c in leaves], dtype=torch.float64,
                                 device=slot.device)
            return score, kids, slot, valid, flops, 2 * (leaves + 1)

        return step

    def _oracle(self, labels: Tensor, full_maps: list[Tensor], budget: float) -> NDPSamples:
        """Truncate fully refined pyramids greedily by `refinement_error`, k leaves per step."""
        mcfg = self.transformer.cfg
        error = refinement_error(self.quantizer, full_maps, self.sides)  # (B, L)
        kids_all = child_targets(full_maps)  # (B, L, 4)

        def step(rows: Tensor, maps: list[Tensor], tree: Quadtree) -> tuple[Tensor, ...]:
            slot, valid = pack(tree.leaf_slots())
            score = error[rows].gather(1, slot)
            kids = kids_all[rows].gather(1, slot.unsqueeze(-1).expand(-1, -1, 4))
            leaves = valid.sum(1)
            flops = torch.tensor([2 * forward_flops(mcfg, int(c)) for c in leaves], dtype=torch.float64,
                                 device=slot.device)
            return score, kids, slot, valid, flops, 2 * (leaves + 1)

        maps = [full_maps[0].clone()] + [torch.zeros_like(m) for m in full_maps[1:]]
        return self._run(labels, step, budget, None, 0.0, 0, 0.0, maps=maps)


def from_config(transformer: Any, tokenizer: Any, cfg: Any) -> NDPSampler:
    """The family's sampler (nextdetail.models.FAMILIES) with `sample.*`'s budget."""
    return NDPSampler(transformer, tokenizer, cfg.budget, cfg.estimator, cfg.refine_per_step)
