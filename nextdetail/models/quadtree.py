"""Quadtree states over a dyadic token pyramid (NDP's image state; our design, docs/architecture.md).

The pyramid has K levels of token maps with sides 1, 2, 4, …, S = 2^(K−1) (S = the latent side): the
node (k, i, j) covers latent cells [i·S/s_k, (i+1)·S/s_k) × [j·S/s_k, (j+1)·S/s_k) and its four children
are the quadrants (k+1, 2i+di, 2j+dj), di, dj ∈ {0, 1}, in raster order. A *state* marks which nodes are
refined: the root always exists, a node exists iff its parent is refined, and the *leaves* are the
existing nodes that are not refined. Every latent cell lies in exactly one leaf; its level is the
number of refined ancestors (`level_map`).

A node is addressed on the flattened pyramid of L = Σ s_k² *slots*: slot = offset_k + i·s_k + j, the
same order as the token maps of a dyadic tokenizer concatenated coarse to fine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from nextdetail.models.configs import dyadic_sides


def is_dyadic(sides: tuple[int, ...] | list[int]) -> bool:
    """Whether map sides are exactly 1, 2, 4, …, up to a power of two."""
    top = sides[-1] if len(sides) else 0
    return top >= 1 and top & (top - 1) == 0 and tuple(sides) == dyadic_sides(top)


def children(level: int, i: int, j: int) -> list[tuple[int, int, int]]:
    """The four children of node (level, i, j): its quadrants at the next level, raster order."""
    return [(level + 1, 2 * i + di, 2 * j + dj) for di in (0, 1) for dj in (0, 1)]


def quadrants(map_BSS: Tensor) -> Tensor:
    """A level-(k+1) map (B, 2s, 2s) → each level-k node's four children (B, s·s, 4), raster order."""
    B, s = map_BSS.shape[0], map_BSS.shape[-1] // 2
    return map_BSS.reshape(B, s, 2, s, 2).transpose(2, 3).reshape(B, s * s, 4)  # (B, i, di, j, dj) → (B, i·j, di·dj)


@dataclass
class Quadtree:
    """A batch of B states: `refined[k]` (B, s_k, s_k) bool for the K − 1 levels that have children."""

    refined: list[Tensor]
    sides: tuple[int, ...]

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def root(cls, batch: int, sides: tuple[int, ...], device: torch.device | str = "cpu") -> Quadtree:
        """Nothing refined: one leaf, the 1×1 root."""
        return cls([torch.zeros(batch, s, s, dtype=torch.bool, device=device) for s in sides[:-1]], tuple(sides))

    @classmethod
    def full(cls, batch: int, sides: tuple[int, ...], device: torch.device | str = "cpu") -> Quadtree:
        """Everything refined: the leaves are the S×S finest tokens (VAR's full pyramid)."""
        return cls([torch.ones(batch, s, s, dtype=torch.bool, device=device) for s in sides[:-1]], tuple(sides))

    @classmethod
    def random(cls, p_B: Tensor, sides: tuple[int, ...], generator: torch.Generator | None = None) -> Quadtree:
        """Each existing node refined independently with its image's probability p_B (B,): p ~ U(0, 1)
        over a batch gives every mixture, from the root alone to the full pyramid."""
        B, device = p_B.shape[0], p_B.device
        refined, exists = [], torch.ones(B, 1, 1, dtype=torch.bool, device=device)
        for s in sides[:-1]:
            coin = torch.rand(B, s, s, generator=generator, device="cpu" if generator is None else generator.device)
            r = exists & (coin.to(device) < p_B.view(B, 1, 1))
            refined.append(r)
            exists = upsample(r, 2)
        return cls(refined, tuple(sides))

    # ---- queries ------------------------------------------------------------------------------

    @property
    def batch(self) -> int:
        return self.refined[0].shape[0] if self.refined else 1

    @property
    def levels(self) -> int:
        return len(self.sides)

    def exists(self, k: int) -> Tensor:
        """(B, s_k, s_k) bool: node present in the state (its parent is refined)."""
        if k == 0:
            ref = self.refined[0] if self.refined else None
            return torch.ones(self.batch, 1, 1, dtype=torch.bool, device=None if ref is None else ref.device)
        return upsample(self.refined[k - 1], 2)

    def present(self) -> list[Tensor]:
        """Per level, (B, s_k, s_k) bool: the nodes whose tokens the state holds (`exists`)."""
        return [self.exists(k) for k in range(self.levels)]

    def leaves(self, k: int) -> Tensor:
        """(B, s_k, s_k) bool: present and not refined."""
        e = self.exists(k)
        return e if k == self.levels - 1 else e & ~self.refined[k]

    def leaf_slots(self) -> Tensor:
        """(B, L) bool over the pyramid's slots."""
        return torch.cat([self.leaves(k).flatten(1) for k in range(self.levels)], dim=1)

    def level_map(self) -> Tensor:
        """(B, S, S) int64: the level of the leaf covering each latent cell."""
        S = self.sides[-1]
        out = torch.zeros(self.batch, S, S, dtype=torch.long, device=self.refined[0].device if self.refined else None)
        for k, r in enumerate(self.refined):
            out += upsample(r, S // self.sides[k]).long()
        return out

    def n_refined(self) -> Tensor:
        """(B,) refinements made (internal nodes)."""
        return sum(r.flatten(1).sum(1) for r in self.refined) if self.refined else torch.zeros(self.batch, dtype=torch.long)

    def is_full(self) -> Tensor:
        """(B,) bool: every internal node refined."""
        return torch.stack([r.flatten(1).all(1) for r in self.refined]).all(0)

    def refine(self, k: int, where: Tensor) -> None:
        """Refine the level-k leaves in `where` (B, s_k, s_k); every one must be a leaf with children."""
        if k >= self.levels - 1:
            raise ValueError(f"level {k} is the finest: its nodes have no children")
        if bool((where & ~self.leaves(k)).any()):
            raise ValueError("only leaves can be refined")
        self.refined[k] = self.refined[k] | where

    def index(self, rows: Tensor) -> Quadtree:
        """The states of the images `rows` (a batch subset)."""
        return Quadtree([r[rows] for r in self.refined], self.sides)


def upsample(mask_Bss: Tensor, factor: int) -> Tensor:
    """Nearest-neighbour ×factor of a (B, s, s) map: each node's value over its region."""
    if factor == 1:
        return mask_Bss
    return mask_Bss.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def slot_levels(sides: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """(L,) the level of every pyramid slot."""
    return torch.cat([torch.full((s * s,), k, dtype=torch.long, device=device) for k, s in enumerate(sides)])


def slot_offsets(sides: tuple[int, ...]) -> list[int]:
    out = [0]
    for s in sides:
        out.append(out[-1] + s * s)
    return out


def pyramid_pool(x_BCSS: Tensor, sides: tuple[int, ...]) -> Tensor:
    """A latent map (B, C, S, S) averaged over every node's region: (B, L, C), slots in pyramid order."""
    S = x_BCSS.shape[-1]
    out = [x_BCSS.flatten(2) if s == S else F.adaptive_avg_pool2d(x_BCSS, s).flatten(2) for s in sides]
    return torch.cat(out, dim=2).transpose(1, 2)  # (B, L, C)


def pack(mask_BL: Tensor) -> tuple[Tensor, Tensor]:
    """The slots where `mask_BL` holds, packed left: (slot (B, N), valid (B, N)), N = the largest count.
    Padding positions point at slot 0 and are not valid."""
    counts = mask_BL.sum(1)
    N = int(counts.max()) if mask_BL.numel() else 0
    order = torch.sort((~mask_BL).to(torch.int8), dim=1, stable=True).indices[:, :N]  # True slots first, in order
    valid = torch.arange(N, device=mask_BL.device).view(1, -1) < counts.view(-1, 1)
    return torch.where(valid, order, 0), valid
