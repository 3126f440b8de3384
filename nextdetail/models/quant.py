"""Multi-scale residual quantization with one shared codebook: VAR's quantizer, generalised to CART's
base/detail token schedule (cart.txt §3.2, Algorithms 1–2).

A *token schedule* lists the M token maps in prediction order. Map k has a side (h_k = w_k) and a
*source*: source 0 is the base feature f_{B_n}, source t ≥ 1 the detail feature of the t-th detail
factor in coarse-to-fine order, D_n, D_{n−1}, …, D_1, with f_{D_k} = f_{B_{k−1}} − f_{B_k} (Eq. 12,
f_{B_0} = f_I). Map k quantizes its source's residual, area-downsampled to h_k × w_k, by the nearest
code, looks it up, brings it back to the latent size (bicubic), applies φ_k, and subtracts that from
the residual (Algorithm 1). The reconstruction is f̂ = Σ_k φ_k(z_k) (Algorithm 2); as the sources sum
to f_I, f̂ approximates f_I.

How the residuals chain (`residual`), two readings of Algorithm 1:
- ``independent``: each source keeps its own residual (the literal reading: one chain per source); what
  the base chain leaves after its last map is never corrected, and the detail chains' errors add to it;
- ``shared``: a source's chain starts from its feature plus what the chains before it left, so the
  detail maps of D_t quantize f_{D_t} + (the uncorrected remainder so far), and the last map the global
  residual f_I − f̂ — Algorithm 1's f_I, updated at every step, is this running remainder;
- ``independent+global``: the independent chains, then one more full-resolution map (source `GLOBAL`) on
  the global residual f_I − f̂ — reading Algorithm 1's f_I as one final map (CART's "14 steps" = 10 base
  scales + 3 detail maps + 1).
With one source (order 0) `independent` and `shared` are VAR's quantizer.

Order 0 (one source, f_I) with VAR's scales is exactly VAR's VectorQuantizer2: same lookups, same φ
blending and partial sharing, same loss, same parameter and buffer names, so VAR's released weights load.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nextdetail.models.configs import TokenizerSpec

GLOBAL = -1  # the source of a map on the global residual f_I − f̂ (`residual="independent+global"`)


@dataclass(frozen=True)
class TokenMap:
    side: int  # h_k = w_k
    source: int  # 0: the base f_{B_n}; t ≥ 1: the t-th detail factor, coarse to fine (D_n … D_1); GLOBAL

    @property
    def kind(self) -> str:
        return "base" if self.source == 0 else "global" if self.source == GLOBAL else "detail"


def token_schedule(base_patch_nums: tuple[int, ...], order: int, detail_depth: int, latent_side: int,
                   global_map: bool = False) -> tuple[TokenMap, ...]:
    """B = len(base_patch_nums) multi-scale base maps, then `detail_depth` full-resolution maps for
    each of the `order` detail factors: M = B + order · detail_depth (CART: (M − B)/n per factor); with
    `global_map`, one more full-resolution map on what all the chains left (f_I − f̂)."""
    if not base_patch_nums or list(base_patch_nums) != sorted(base_patch_nums) or base_patch_nums[-1] > latent_side:
        raise ValueError(f"patch_nums {base_patch_nums} must be increasing and end at most at the latent side {latent_side}")
    if order and detail_depth < 1:
        raise ValueError("detail_depth must be ≥ 1 when the decomposition order is ≥ 1")
    base = [TokenMap(p, 0) for p in base_patch_nums]
    details = [TokenMap(latent_side, t) for t in range(1, order + 1) for _ in range(detail_depth)]
    return tuple(base + details + ([TokenMap(latent_side, GLOBAL)] if global_map else []))


def schedule_of(spec: TokenizerSpec) -> tuple[TokenMap, ...]:
    """The token schedule a tokenizer architecture quantizes over."""
    return token_schedule(tuple(spec.patch_nums), spec.order, spec.detail_depth, spec.latent_side,
                          global_map=spec.residual == "independent+global")


class Phi(nn.Conv2d):
    """φ: a 3×3 convolution blended with the identity, h ↦ (1 − r) h + r conv(h) (VAR's quant_resi)."""

    def __init__(self, embed_dim: int, quant_resi: float) -> None:
        super().__init__(embed_dim, embed_dim, kernel_size=3, stride=1, padding=1)
        self.resi_ratio = abs(quant_resi)

    def forward(self, h: Tensor) -> Tensor:
        return h.mul(1 - self.resi_ratio) + super().forward(h).mul_(self.resi_ratio)


class PhiPartiallyShared(nn.Module):
    """K φ's shared by M maps: map k uses the φ whose tick is nearest to k / (M − 1) (VAR's rule)."""

    def __init__(self, qresi_ls: nn.ModuleList) -> None:
        super().__init__()
        self.qresi_ls = qresi_ls
        k = len(qresi_ls)
        self.ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)

    def __getitem__(self, at_from_0_to_1: float) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - at_from_0_to_1)))]


@dataclass
class QuantOutput:
    f_hat: Tensor  # (B, C, h, w) Σ φ_k(z_k), straight-through to the sources' sum (f_I)
    vq_loss: Tensor  # () mean over maps of β‖sg(f̂_s) − f_s‖² + ‖f̂_s − sg(f_s)‖², per source s
    indices: list[Tensor]  # M × (B, h_k, w_k) int64


class MultiScaleQuantizer(nn.Module):
    """Residual quantization of one or more source feature maps over a token schedule, one codebook."""

    def __init__(
        self, vocab_size: int, embed_dim: int, schedule: tuple[TokenMap, ...], beta: float = 0.25,
        using_znorm: bool = False, quant_resi: float = 0.5, share_quant_resi: int = 4,
        residual: str = "shared", normalized_codes: bool = False,
    ) -> None:
        super().__init__()
        if share_quant_resi < 2:
            raise ValueError("share_quant_resi must be ≥ 2 (VAR's partially shared φ; its released tokenizer uses 4)")
        if residual not in ("independent", "shared", "independent+global"):
            raise ValueError(f"residual must be independent, shared or independent+global, got {residual!r}")
        if (residual == "independent+global") != any(m.source == GLOBAL for m in schedule):
            raise ValueError(f"residual={residual}: the schedule must end with one map on the global residual exactly "
                             "when the residual reading is independent+global (quant.schedule_of)")
        self.residual = residual
        self.vocab_size, self.Cvae, self.beta, self.using_znorm = vocab_size, embed_dim, beta, using_znorm
        self.schedule = tuple(schedule)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.normalized_codes = normalized_codes
        if normalized_codes:
            # LlamaGen normalizes codes to the unit sphere; in a residual chain a unit code would overshoot every
            # residual after the first map, so map k's code is s_k·ê with a learned scale per map (log-parametrized:
            # s_k > 0). Given the scale, the L2-nearest code is the one of largest cosine: lookup and code agree.
            # The scales start at the least-squares fit to the first training batch (`code_scale_fitted`).
            self.log_code_scale_M = nn.Parameter(torch.zeros(len(self.schedule)))
            self.register_buffer("code_scale_fitted", torch.zeros((), dtype=torch.bool))
        self.quant_resi = PhiPartiallyShared(nn.ModuleList([Phi(embed_dim, quant_resi) for _ in range(share_quant_resi)]))
        # Per-map EMA of code hits (VAR's name and layout: (M, V)); the codebook-health statistics.
        self.register_buffer("ema_vocab_hit_SV", torch.full((len(self.schedule), vocab_size), 0.0))
        self.record_hit = 0
        self.recent: Tensor | None = None  # (N, C) a sample of recently quantized residuals: dead-code restarts

    @property
    def n_sources(self) -> int:
        return 1 + max(m.source for m in self.schedule)  # the global map reads the others' residuals, no source

    def _starts_carried_chain(self, k: int) -> bool:
        """Whether map k is the first of a detail source's chain that, with `residual="shared"`, starts from what
        the previous source's chain left."""
        return (self.residual == "shared" and k > 0 and self.schedule[k].source > 0
                and self.schedule[k].source != self.schedule[k - 1].source)

    def phi(self, k: int) -> Phi:
        m = len(self.schedule)
        return self.quant_resi[k / (m - 1) if m > 1 else 0.0]

    def lookup(self, rest_NC: Tensor) -> Tensor:
        """Nearest code of each row: L2, or cosine when `using_znorm` or `normalized_codes` (N, C) → (N,)."""
        if self.using_znorm or self.normalized_codes:
            return (F.normalize(rest_NC, dim=-1) @ F.normalize(self.embedding.weight.data, dim=-1).T).argmax(1)
        e = self.embedding.weight.data  # (V, C)
        d = rest_NC.square().sum(1, keepdim=True) + e.square().sum(1) - 2 * rest_NC @ e.T  # (N, V)
        return d.argmin(1)

    def codes(self, k: int, idx_Bhw: Tensor) -> Tensor:
        """Map k's code vectors: e(z), or s_k·e(z)/‖e(z)‖ with `normalized_codes`. (B, h_k, w_k) → (B, C, h_k, w_k)."""
        e = self.embedding(idx_Bhw)  # (B, h_k, w_k, C)
        if self.normalized_codes:
            e = F.normalize(e, dim=-1) * self.log_code_scale_M[k].exp()
        return e.permute(0, 3, 1, 2)

    @torch.no_grad()
    def _fit_code_scale(self, k: int, rest_NC: Tensor, idx_N: Tensor) -> None:
        """s_k = mean over rows of r·ê(z): the scale that minimizes ‖r − s·ê‖² for the chosen codes — over the
        global batch when data-parallel (every rank holds an equal slice), so all ranks keep one model."""
        fit = (rest_NC * F.normalize(self.embedding.weight[idx_N], dim=-1)).sum(1).mean()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(fit)
            fit = fit / torch.distributed.get_world_size()
        self.log_code_scale_M[k] = fit.clamp_min(1e-4).log()

    def _to_latent(self, k: int, idx_Bhw: Tensor, side: int) -> Tensor:
        """φ_k(up(lookup(r_k))): (B, h_k, w_k) → (B, C, side, side)."""
        h = self.codes(k, idx_Bhw)  # (B, C, h_k, w_k)
        if idx_Bhw.shape[-1] != side:
            h = F.interpolate(h, size=(side, side), mode="bicubic")
        return self.phi(k)(h)

    def _check_sources(self, sources: list[Tensor]) -> None:
        if len(sources) != self.n_sources:
            raise ValueError(f"the token schedule needs {self.n_sources} source feature maps (base + details), got {len(sources)}")
        if any(s.shape != sources[0].shape for s in sources):
            raise ValueError(f"source feature maps differ in shape: {[tuple(s.shape) for s in sources]}")

    def forward(self, sources: list[Tensor], present: list[Tensor] | None = None) -> QuantOutput:
        """Algorithm 1 with gradients: `sources` = [f_{B_n}, f_{D_n}, …, f_{D_1}], each (B, C, h, w).
        `present` (per map, (B, h_k, w_k) bool; a quadtree state): the returned f̂ is the mixed-scale
        reconstruction of only those tokens (`indices_to_f_mixed`), so the decoder learns to decode any
        truncation (NDP); the codes and φ still learn from the full residual chain."""
        self._check_sources(sources)
        dtype = sources[0].dtype
        sources = [s.float() for s in sources]
        b, c, _, ww = sources[0].shape
        rest = [s.detach().clone() for s in sources]  # per-source residuals (+ the global one, last)
        targets = list(sources)  # what each chain approximates (shared: its feature + the carry)
        f_hat_src = [torch.zeros_like(s) for s in sources]  # per-chain partial reconstructions
        vq_loss = sources[0].new_zeros(())
        indices: list[Tensor] = []
        recent: list[Tensor] = []
        with torch.autocast(sources[0].device.type, enabled=False):
            for k, tm in enumerate(self.schedule):
                s = tm.source
                if self._starts_carried_chain(k):
                    carry = rest[s - 1]  # what the previous chain left (detached: a target, like the residual)
                    rest[s], targets[s] = rest[s] + carry, targets[s] + carry
                if s == GLOBAL and len(rest) == len(sources):  # the global chain starts from what all others left
                    rest.append(torch.stack(rest).sum(0))
                    targets.append(rest[-1].clone())
                    f_hat_src.append(torch.zeros_like(rest[-1]))
                rest_k = rest[s] if tm.side == ww else F.interpolate(rest[s], size=(tm.side, tm.side), mode="area")
                rest_NC = rest_k.permute(0, 2, 3, 1).reshape(-1, c)  # (B·h_k·w_k, C)
                idx_N = self.lookup(rest_NC)
                if self.training and self.normalized_codes and not self.code_scale_fitted:
                    self._fit_code_scale(k, rest_NC, idx_N)
                if self.training:
                    self._record(k, idx_N)
                    recent.append(rest_NC[torch.randint(len(rest_NC), (min(len(rest_NC), 256),), device=rest_NC.device)])
                idx_Bhw = idx_N.view(b, tm.side, tm.side)
                h = self._to_latent(k, idx_Bhw, ww)  # (B, C, h, w)
                f_hat_src[s] = f_hat_src[s] + h
                rest[s] = rest[s] - h.detach()
                vq_loss = vq_loss + F.mse_loss(f_hat_src[s].data, targets[s]).mul_(self.beta) + \
                    F.mse_loss(f_hat_src[s], targets[s].detach())
                indices.append(idx_Bhw)
        if recent:
            self.recent = torch.cat(recent)
        if self.training and self.normalized_codes:
            self.code_scale_fitted.fill_(True)
        target = torch.stack(sources).sum(0)  # Σ sources = f_I
        value = torch.stack(f_hat_src).sum(0).data if present is None else \
            self.indices_to_f_mixed(indices, present, ww).float()
        f_hat = (value - target.detach()).add_(target)  # straight-through
        return QuantOutput(f_hat.to(dtype), vq_loss / len(self.schedule), indices)

    @torch.no_grad()
    def _record(self, k: int, idx_N: Tensor) -> None:
        hits = torch.bincount(idx_N, minlength=self.vocab_size).float()
        if self.record_hit == 0:
            self.ema_vocab_hit_SV[k].copy_(hits)
        elif self.record_hit < 100:
            self.ema_vocab_hit_SV[k].mul_(0.9).add_(hits.mul(0.1))
        else:
            self.ema_vocab_hit_SV[k].mul_(0.99).add_(hits.mul(0.01))
        if k == len(self.schedule) - 1:
            self.record_hit += 1

    @torch.no_grad()
    def f_to_indices(self, sources: list[Tensor]) -> list[Tensor]:
        """Algorithm 1 (no gradients): the M token maps, (B, h_k, w_k) each."""
        self._check_sources(sources)
        c, ww = sources[0].shape[1], sources[0].shape[-1]
        rest = [s.float().clone() for s in sources]
        indices = []
        for k, tm in enumerate(self.schedule):
            if self._starts_carried_chain(k):
                rest[tm.source] += rest[tm.source - 1]
            if tm.source == GLOBAL and len(rest) == len(sources):
                rest.append(torch.stack(rest).sum(0))
            r = rest[tm.source] if tm.side == ww else F.interpolate(rest[tm.source], size=(tm.side, tm.side), mode="area")
            idx_Bhw = self.lookup(r.permute(0, 2, 3, 1).reshape(-1, c)).view(r.shape[0], tm.side, tm.side)
            rest[tm.source] -= self._to_latent(k, idx_Bhw, ww)
            indices.append(idx_Bhw)
        return indices

    @torch.no_grad()
    def indices_to_f(self, indices: list[Tensor], latent_side: int, cumulative: bool = False) -> Tensor | list[Tensor]:
        """Algorithm 2: f̂ = Σ_k φ_k(z_k) (B, C, h, w); with `cumulative`, the M partial sums."""
        if len(indices) != len(self.schedule):
            raise ValueError(f"expected {len(self.schedule)} token maps, got {len(indices)}")
        f_hat, partial = None, []
        for k, idx in enumerate(indices):
            h = self._to_latent(k, idx, latent_side)
            f_hat = h if f_hat is None else f_hat + h
            partial.append(f_hat)
        return partial if cumulative else f_hat

    @torch.no_grad()
    def indices_to_f_mixed(self, indices: list[Tensor], present: list[Tensor], latent_side: int) -> Tensor:
        """Algorithm 2 over a quadtree state (NDP's mixed-scale decoding): map k contributes
        φ_k(up(e(z_k) ⊙ present_k)) only inside the region its present tokens cover, so a region left
        at a coarse level decodes from its coarse tokens alone; absent tokens are never read. With every
        token present this is `indices_to_f` exactly. (B, C, side, side)."""
        if len(indices) != len(self.schedule) or len(present) != len(indices):
            raise ValueError(f"expected {len(self.schedule)} token maps and presence masks, got "
                             f"{len(indices)} / {len(present)}")
        f_hat = None
        for k, (idx, keep) in enumerate(zip(indices, present, strict=True)):
            h = self.masked_to_latent(k, idx, keep, latent_side)
            f_hat = h if f_hat is None else f_hat + h
        return f_hat

    def masked_to_latent(self, k: int, idx_Bhw: Tensor, keep_Bhw: Tensor, side: int) -> Tensor:
        """`_to_latent` of only the tokens in `keep_Bhw` (bool, like idx), zero outside their region:
        φ_k(up(e(z_k) ⊙ keep)) ⊙ up(keep). (B, C, side, side)."""
        e = self.codes(k, idx_Bhw.clamp(0, self.vocab_size - 1))  # (B, C, h_k, w_k)
        keep_B1hw = keep_Bhw.unsqueeze(1).to(e.dtype)
        e = e * keep_B1hw
        if idx_Bhw.shape[-1] != side:
            e = F.interpolate(e, size=(side, side), mode="bicubic")
            keep_B1hw = F.interpolate(keep_B1hw, size=(side, side), mode="nearest")
        return self.phi(k)(e) * keep_B1hw

    @torch.no_grad()
    def next_inputs(self, indices: list[Tensor], latent_side: int) -> Tensor:
        """The transformer's teacher-forcing input (VAR's `idxBl_to_var_input`): for maps 2 … M, the
        reconstruction of the maps before, f̂_{k−1} = Σ_{j<k} φ_j(z_j), area-resampled to map k's size
        and flattened: (B, L − h_1·w_1, C)."""
        step, out = NextInput(self, latent_side), []
        for k in range(len(self.schedule) - 1):
            out.append(step(k, indices[k]))
        return torch.cat(out, dim=1)

    # ---- codebook health -------------------------------------------------------------------

    @torch.no_grad()
    def usage(self) -> list[dict[str, float]]:
        """Per token map: the fraction of codes in use (EMA hits above 1 % of uniform) and the perplexity."""
        out = []
        for hits in self.ema_vocab_hit_SV:
            total = float(hits.sum())
            p = hits / max(total, 1e-12)
            perplexity = float(torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())) if total > 0 else 0.0
            used = float((hits > 0.01 * total / self.vocab_size).float().mean()) if total > 0 else 0.0
            out.append({"usage": used, "perplexity": perplexity})
        return out

    @torch.no_grad()
    def restart_dead_codes(self, threshold: float = 0.01, generator: torch.Generator | None = None) -> int:
        """Re-initialise codes no map has used lately (summed EMA hits below `threshold` × uniform)
        from recently quantized residuals, with a little noise; returns how many were restarted."""
        if self.recent is None or self.record_hit == 0:
            return 0
        hits = self.ema_vocab_hit_SV.sum(0)
        dead = (hits < threshold * float(hits.sum()) / self.vocab_size).nonzero().flatten()
        if len(dead) == 0:
            return 0
        pick = torch.randint(len(self.recent), (len(dead),), generator=generator, device="cpu").to(self.recent.device)
        fresh = self.recent[pick]
        noise = torch.randn(fresh.shape, generator=generator, device="cpu").to(fresh.device)
        fresh = fresh + 0.01 * fresh.std() * noise
        self.embedding.weight.data[dead] = fresh.to(self.embedding.weight.dtype)
        self.ema_vocab_hit_SV[:, dead] = float(hits.sum()) / self.vocab_size / len(self.schedule)  # a grace period
        return len(dead)


class NextInput:
    """Sampling's counterpart of `MultiScaleQuantizer.next_inputs`: called with map k's tokens, adds
    φ_k(z_k) to the running reconstruction and returns map k+1's input (B, h_{k+1}·w_{k+1}, C)."""

    def __init__(self, quantizer: MultiScaleQuantizer, latent_side: int) -> None:
        self.quantizer, self.latent_side, self.f_hat = quantizer, latent_side, None

    @torch.no_grad()
    def __call__(self, k: int, idx_Bhw: Tensor, keep_Bl: Tensor | None = None) -> Tensor:
        """`keep_Bl` (B, h_k·w_k) bool: only those tokens of map k exist (CART's detail dial)."""
        if keep_Bl is None:
            h = self.quantizer._to_latent(k, idx_Bhw, self.latent_side)  # (B, C, side, side)
        else:
            h = self.quantizer.masked_to_latent(k, idx_Bhw, keep_Bl.view(idx_Bhw.shape), self.latent_side)
        self.f_hat = h if self.f_hat is None else self.f_hat + h
        nxt = self.quantizer.schedule[k + 1].side
        f = self.f_hat if nxt == self.latent_side else F.interpolate(self.f_hat, size=(nxt, nxt), mode="area")
        return f.flatten(2).transpose(1, 2)  # (B, h·w, C)
