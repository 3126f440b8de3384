"""Ambrosio–Tortorelli minimization of the Mumford–Shah functional (CART Eq. 8) and the base/detail
decomposition built on it (CART Eq. 10). Batched torch, one code path for CPU and CUDA, float32.

Energy, per image, discretized on the pixel grid (CART Eq. 8)::

    E(u, s) = Σ_c Σ_p (u − f)²  +  α Σ_p (1 − s_p)² Σ_c |∇u_c|²_p  +  λ Σ_p (ε |∇s|²_p + s_p² / (4ε))

- Scale: f is RGB in [0, 1] (not [0, 255]) and the pixel spacing is 1. α therefore has units of
  pixels²: the u-step is a diffusion whose length scale in flat regions is √α pixels (α = 10 →
  about 3 px per decomposition order, independent of resolution). The edge term switches on where
  α|∇u|² exceeds about λ/(4ε): with the paper's α = 10, λ = 0.01 and ε = 0.01 (the value of the
  widely used reference implementation of this smoothing that works on [0, 1] images with unit
  spacing), s is ½ at a per-pixel gradient of ≈ 0.16, i.e. a step of 16 % of the intensity range.
  On [0, 255] images the same α and λ would mean something else entirely.
- ∇ is the forward difference, (∂ₓu)_p = u_{p+x̂} − u_p, and it is zero across the image border
  (Neumann boundary: nothing flows out). The difference owned by pixel p is weighted by that
  pixel's (1 − s_p)². s is one map shared by the three channels (the vectorial model).
- ε: fixed at `epsilon`, or decreased geometrically from `epsilon_start` to `epsilon` over the outer
  iterations (a continuation schedule: wide edge zones first, sharp ones at the end).

Alternating minimization, each step the exact minimizer of E in one block (so E never increases):
- s-step (u fixed):  (α G + λ/(4ε)) s + λε ∇ᵀ∇ s = α G,         G_p = Σ_c |∇u_c|²_p
- u-step (s fixed):  (I + α ∇ᵀ W ∇) u = f   per channel,         W = diag((1 − s)²)
  i.e. (I − α div((1 − s)² ∇)) u = f. Both are symmetric positive definite and solved by
  matrix-free Jacobi-preconditioned conjugate gradients, warm-started from the previous outer
  iteration; CG decreases the block energy monotonically from its start point, so stopping at a
  tolerance keeps the energy monotone. Both matrices are M-matrices: u stays within f's range.

Order-n decomposition (Eq. 10): B₀ = I, B_k = AT(B_{k−1}), D_k = B_{k−1} − B_k, hence
I = B_n + D_n + … + D_1 exactly up to float rounding.

Defaults (3 alternations, CG to a 3 % relative residual) were chosen by measurement on 256² photos:
against the minimizer reached after 30 alternations at 1e-6, 1 alternation gives ≈ 31–32 dB PSNR,
3 give ≈ 36 dB, 4 at 1e-3 ≈ 39 dB, at 1.5× / 2.5× the cost; the edges are in place after the first.

Speed: on a CPU the whole minimization runs compiled (`_at_cpu.cpp`, built by torch on first use,
~45 s once, then cached): one image at a time (images in parallel over torch's threads), one channel
system at a time so its vectors stay in cache, ~14 floats moved per pixel per CG iteration instead
of the eager ops' ~48 plus their set-up passes. Without a compiler the eager path computes the same
(tests compare both, iteration counts included). On CUDA the eager ops run as they are, batched.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class ATConfig:
    """Solver settings (names follow CART Eq. 8: α, λ, ε)."""

    alpha: float = 10.0
    lambda_: float = 0.01
    epsilon: float = 0.01
    epsilon_start: float | None = None  # None: constant ε; else geometric schedule epsilon_start → epsilon
    outer_iterations: int = 3  # alternations of s-step and u-step (at most)
    outer_tol: float = 1e-3  # an image stops once its relative change of u per alternation is below this
    cg_tol: float = 3e-2  # relative residual (preconditioned norm) of each linear solve
    cg_max_iter: int = 40

    @classmethod
    def from_settings(cls, d: Any, side: int | None = None) -> ATConfig:
        """The solver of a `DecomposeConfig` (`decompose.*`) for images `side` px wide (α scaled to it when
        `decompose.alpha_reference_px` is set)."""
        alpha = d.alpha if side is None else d.alpha_at(side)
        return cls(alpha=alpha, lambda_=d.lambda_, epsilon=d.epsilon, epsilon_start=d.epsilon_start,
                   outer_iterations=d.outer_iterations, outer_tol=d.outer_tol, cg_tol=d.cg_tol,
                   cg_max_iter=d.cg_max_iter)

    def epsilon_at(self, k: int) -> float:
        if self.epsilon_start is None or self.outer_iterations <= 1:
            return self.epsilon
        t = k / (self.outer_iterations - 1)
        return self.epsilon_start * (self.epsilon / self.epsilon_start) ** t


def check_images(x: Tensor, name: str = "images") -> None:
    """Raise a one-line error for input the solver cannot take."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor (B, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor in [0, 1], got dtype {x.dtype}; convert with x.float() / 255")
    if x.ndim != 4:
        raise ValueError(f"{name}: expected rank 4 (B, C, H, W), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name}: empty tensor of shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < 2:
        raise ValueError(f"{name}: images must be at least 2×2 pixels, got {tuple(x.shape[-2:])}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or Inf values")


# ---------------------------------------------------------------------------------------------
# Stencils, written as in-place ops on slices into preallocated buffers: the weighted 5-point
# operator costs ~8 memory passes and no temporaries (F.pad + cat versions cost 5–10× more).
# Systems are (B, C, H, W) maps; the weights are (B, 1, …) and broadcast over the channels.


def _dot(a: Tensor, b: Tensor, scratch: Tensor) -> Tensor:
    """Per-system dot products over (H, W): (B, C, H, W) × (B, C, H, W) → (B, C, 1, 1). The product
    goes to a reused buffer: a fresh 3×256² temporary costs more (mmap + page faults) than the math."""
    return torch.mul(a, b, out=scratch).sum((-2, -1), keepdim=True)


class _Stencil:
    """out = d ⊙ x + ∇ᵀ (w ∇ x): wx (B, 1, H, W−1) weighs the x-differences, wy (B, 1, H−1, W) the
    y-differences, d broadcasts to x. It also owns the CG vectors of its shape: every solve of an
    alternation reuses them (a fresh 3×256² buffer costs page faults on each allocation)."""

    def __init__(self, like: Tensor) -> None:
        b, c, h, w = like.shape
        self.gx = like.new_empty(b, c, h, w - 1)
        self.gy = like.new_empty(b, c, h - 1, w)
        self.r, self.z, self.p, self.ap, self.scratch = (torch.empty_like(like) for _ in range(5))

    def apply(self, x: Tensor, d: Tensor | None, wx: Tensor, wy: Tensor, out: Tensor) -> Tensor:
        gx, gy = self.gx, self.gy
        torch.sub(x[..., 1:], x[..., :-1], out=gx).mul_(wx)  # w ∂ₓx          (B, C, H, W−1)
        torch.sub(x[..., 1:, :], x[..., :-1, :], out=gy).mul_(wy)  # w ∂ᵧx     (B, C, H−1, W)
        if d is None:  # d = 1
            out.copy_(x)
        else:
            torch.mul(x, d, out=out)
        out[..., :-1].sub_(gx)  # ∂ₓᵀ g: −g at the owning pixel, +g at its right neighbour
        out[..., 1:].add_(gx)
        out[..., :-1, :].sub_(gy)
        out[..., 1:, :].add_(gy)
        return out


def _degree(wx: Tensor, wy: Tensor) -> Tensor:
    """Σ of the weights of the differences touching each pixel: the operator's diagonal minus d."""
    b, _, h, w1 = wx.shape
    deg = wx.new_zeros(b, 1, h, w1 + 1)
    deg[..., :-1] += wx
    deg[..., 1:] += wx
    deg[..., :-1, :] += wy
    deg[..., 1:, :] += wy
    return deg


_KERNELS: Any = None  # the compiled module; False once unavailable


def _x86_isa() -> str:
    """'avx2' when this CPU has AVX2 and FMA (≈20 % faster kernels), else 'base' (any x86-64 / other)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return "base"
    return "avx2" if "avx2" in flags and "fma" in flags else "base"


def _build_location(isa: str) -> tuple[str, Path, Path]:
    """Where the compiled solver is built: named by the ISA and the source's hash, with the source
    copied in, so every checkout of the same code on a machine shares one build (torch rebuilds when
    a source *path* changes — two checkouts would otherwise rebuild in turn, racing each other), and
    a home directory shared by different machines keeps one build per ISA."""
    import hashlib

    code = Path(__file__).with_name("_at_cpu.cpp").read_bytes()
    name = f"nextdetail_at_cpu_{isa}_{hashlib.sha256(code).hexdigest()[:12]}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    build_dir = root / name
    build_dir.mkdir(parents=True, exist_ok=True)
    source = build_dir / "_at_cpu.cpp"
    if not source.exists() or source.read_bytes() != code:
        tmp = source.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(code)
        tmp.replace(source)  # atomic: a concurrent builder never reads half a file
    return name, source, build_dir


def cpu_kernels() -> Any:
    """The CPU solver of `_at_cpu.cpp`, compiled on first use (~1 min, then cached by torch under
    ~/.cache/torch_extensions); None when NEXTDETAIL_CPU_KERNELS=0 or no compiler is found — the
    eager path then computes the same thing several times slower."""
    global _KERNELS
    if _KERNELS is None:
        if os.environ.get("NEXTDETAIL_CPU_KERNELS", "1") == "0":
            _KERNELS = False
        else:
            try:
                # its import warns "No CUDA runtime is found" on every CPU-only process (each Dask worker)
                logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
                from torch.utils.cpp_extension import load

                isa = _x86_isa()
                flags = ["-O3", "-fopenmp-simd", *(["-mavx2", "-mfma"] if isa == "avx2" else [])]
                name, source, build_dir = _build_location(isa)
                _KERNELS = load(name=name, extra_cflags=flags, verbose=False, sources=[str(source)],
                                build_directory=str(build_dir))
            except Exception as err:  # no compiler / ninja: slower, same results
                warnings.warn(f"nextdetail: compiled CPU solver unavailable ({type(err).__name__}: {str(err)[:200]}); "
                              "using the eager path", stacklevel=2)
                _KERNELS = False
    return _KERNELS or None


def pcg(
    d: Tensor | None, wx: Tensor, wy: Tensor, rhs: Tensor, x: Tensor, tol: float, max_iter: int,
    active: Tensor | None = None, stencil: _Stencil | None = None,
) -> tuple[Tensor, int]:
    """Jacobi-preconditioned CG for (diag(d) + ∇ᵀ W ∇) x = rhs, every (H, W) system of the batch at once.

    x (B, C, H, W) is the warm start and is updated in place. A system stops (its x frozen) as soon
    as its preconditioned residual norm is below `tol` times that of rhs, or from the start where
    `active` (B, 1, 1, 1) is False; so a result never depends on which other images share the batch,
    nor on how often the host checks for completion. Returns (x, iterations run).
    """
    tiny = torch.finfo(rhs.dtype).tiny
    stencil = stencil or _Stencil(x)
    r, z, p, ap, scratch = stencil.r, stencil.z, stencil.p, stencil.ap, stencil.scratch
    inv_diag = _degree(wx, wy).add_(1.0 if d is None else d).reciprocal_()  # (B, 1, H, W)
    stencil.apply(x, d, wx, wy, out=r)
    torch.sub(rhs, r, out=r)  # r = rhs − A x
    torch.mul(r, inv_diag, out=z)
    p.copy_(z)
    rz = _dot(r, z, scratch)  # (B, C, 1, 1)
    threshold = (tol * tol) * _dot(rhs, torch.mul(rhs, inv_diag, out=ap), scratch)
    running = rz > threshold
    if active is not None:
        running &= active
    # A host sync costs ~10 µs on a CPU but stalls a GPU queue: check for completion less often there.
    check_every = 1 if x.device.type == "cpu" else 8
    it = 0
    while it < max_iter:
        if it % check_every == 0 and not bool(running.any()):
            break
        stencil.apply(p, d, wx, wy, out=ap)
        step = torch.where(running, rz / _dot(p, ap, scratch).clamp_min(tiny), 0.0)
        x.addcmul_(p, step)
        r.addcmul_(ap, step, value=-1.0)
        torch.mul(r, inv_diag, out=z)
        rz_next = _dot(r, z, scratch)
        p.mul_(torch.where(running, rz_next / rz.clamp_min(tiny), 0.0)).add_(z)
        rz = rz_next
        running &= rz > threshold
        it += 1
    return x, it


# ---------------------------------------------------------------------------------------------


def gradient_energy(u: Tensor) -> Tensor:
    """G_p = Σ_c |∇u_c|²_p with forward differences owned by p (zero across the border): (B, H, W)."""
    g = torch.zeros(u.shape[0], *u.shape[-2:], device=u.device, dtype=u.dtype)
    g[:, :, :-1] += (u[..., :, 1:] - u[..., :, :-1]).square().sum(1)
    g[:, :-1, :] += (u[..., 1:, :] - u[..., :-1, :]).square().sum(1)
    return g


def at_energy(f: Tensor, u: Tensor, s: Tensor, cfg: ATConfig, epsilon: float | None = None) -> Tensor:
    """E(u, s) of Eq. 8 per image, in float64 (for tests and diagnostics): (B,)."""
    eps = cfg.epsilon if epsilon is None else epsilon
    f, u, s = f.double(), u.double(), s.double()
    fidelity = (u - f).square().sum((1, 2, 3))
    smooth = cfg.alpha * ((1 - s).square() * gradient_energy(u)).sum((1, 2))
    ds = torch.zeros_like(s)
    ds[:, :, :-1] += (s[:, :, 1:] - s[:, :, :-1]).square()
    ds[:, :-1, :] += (s[:, 1:, :] - s[:, :-1, :]).square()
    edges = cfg.lambda_ * (eps * ds + s.square() / (4 * eps)).sum((1, 2))
    return fidelity + smooth + edges


@dataclass
class ATResult:
    u: Tensor  # (B, C, H, W) the smoothed image
    s: Tensor  # (B, H, W) the edge indicator, ≈1 on edges
    outer_iterations: int
    cg_iterations: list[tuple[int, int]]  # (s-step, u-step) CG iterations per alternation
    energies: list[Tensor] | None = None  # (B,) after each alternation when track_energy


def ambrosio_tortorelli(f: Tensor, cfg: ATConfig = ATConfig(), track_energy: bool = False) -> ATResult:
    """Minimize Eq. 8 for a batch f (B, C, H, W) in [0, 1]; returns u (same shape) and s (B, H, W)."""
    check_images(f, "f")
    return _minimize(f, cfg, track_energy)


def _minimize(f: Tensor, cfg: ATConfig, track_energy: bool = False) -> ATResult:
    f = f.float().contiguous()
    kernels = cpu_kernels() if f.device.type == "cpu" and not track_energy else None
    if kernels is not None:
        return _minimize_cpu(kernels, f, cfg)
    b, _, h, w = f.shape
    u = f.clone()
    s = f.new_zeros(b, 1, h, w)
    u_prev = torch.empty_like(u)
    iters: list[tuple[int, int]] = []
    energies: list[Tensor] | None = [at_energy(f, u, s[:, 0], cfg, cfg.epsilon_at(0))] if track_energy else None
    active = torch.ones(b, 1, 1, 1, dtype=torch.bool, device=f.device)  # images still alternating
    u_work, s_work = _Stencil(u), _Stencil(s)
    k = 0
    for k in range(cfg.outer_iterations):
        eps = cfg.epsilon_at(k)
        # s-step: (αG + λ/(4ε)) s + λε ∇ᵀ∇ s = αG
        g = gradient_energy(u).mul_(cfg.alpha).unsqueeze(1)  # (B, 1, H, W)
        w_s = f.new_full((1, 1, 1, 1), cfg.lambda_ * eps)
        _, it_s = pcg(g + cfg.lambda_ / (4 * eps), w_s.expand(b, 1, h, w - 1), w_s.expand(b, 1, h - 1, w),
                      g, s, cfg.cg_tol, cfg.cg_max_iter, active, s_work)
        # u-step: (I + α ∇ᵀ W ∇) u = f per channel, W = (1 − s)² shared by the channels.
        weight = (1 - s).square_().mul_(cfg.alpha)  # (B, 1, H, W)
        u_prev.copy_(u)
        _, it_u = pcg(None, weight[..., :-1], weight[..., :-1, :], f, u, cfg.cg_tol, cfg.cg_max_iter, active,
                      u_work)
        iters.append((it_s, it_u))
        if energies is not None:
            energies.append(at_energy(f, u, s[:, 0], cfg, eps))
        # An image whose u barely moved is done: frozen from here on, whatever its batch does.
        change = (u - u_prev).flatten(1).norm(dim=1) / u_prev.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,)
        active &= (change >= cfg.outer_tol).view(b, 1, 1, 1)
        if not bool(active.any()):
            break
    return ATResult(u=u, s=s[:, 0], outer_iterations=k + 1, cg_iterations=iters, energies=energies)


def _minimize_cpu(kernels: Any, f: Tensor, cfg: ATConfig) -> ATResult:
    """`_minimize` by the compiled CPU solver: the same alternations and per-system stopping, one image
    at a time over torch's intra-op threads. Iteration counts are the batch's most, as the batched path reports."""
    epsilons = [cfg.epsilon_at(k) for k in range(cfg.outer_iterations)]
    u, s, iterations, alternations = kernels.minimize(f, cfg.alpha, cfg.lambda_, epsilons, cfg.outer_tol,
                                                      cfg.cg_tol, cfg.cg_max_iter)
    k = int(alternations.max())
    most = iterations[:, :k].amax(0)  # (K, 2)
    return ATResult(u=u, s=s, outer_iterations=k, cg_iterations=[(int(a), int(b)) for a, b in most])


def decompose(images: Tensor, order: int, cfg: ATConfig = ATConfig(), stats: list[ATResult] | None = None) -> Tensor:
    """Order-n base factors of CART Eq. 10: (B, C, H, W) → (n, B, C, H, W) holding B_1 … B_n.
    `stats`, if given, receives each order's `ATResult` (iteration counts)."""
    check_images(images, "images")
    if order < 1:
        raise ValueError(f"order must be ≥ 1, got {order}")
    bases = []
    current = images.float()
    for _ in range(order):
        result = _minimize(current, cfg)  # B_{k−1} came out of the solver: finite, no need to check again
        if stats is not None:
            stats.append(result)
        current = result.u
        bases.append(current)
    return torch.stack(bases)


def details(images: Tensor, bases: Tensor) -> Tensor:
    """D_1 … D_n from B_0 = images and B_1 … B_n: D_k = B_{k−1} − B_k, (n, B, C, H, W)."""
    previous = torch.cat([images.float().unsqueeze(0), bases[:-1].float()])
    return previous - bases.float()
