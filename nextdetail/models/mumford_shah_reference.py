"""A slow, obviously-correct reference of `mumford_shah`: the same discretization assembled as
`scipy.sparse` matrices and solved with `scipy.sparse.linalg.cg` (Jacobi preconditioner), one image
and one channel at a time, float64. Used by the tests (agreement) and the benchmark (baseline)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, cg

from nextdetail.models.mumford_shah import ATConfig


def forward_differences(h: int, w: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Dx, Dy on row-major (h, w) images: u[p + x̂] − u[p], zero on the last column / row."""

    def one_axis(n: int) -> sp.csr_matrix:
        d = sp.diags([-np.ones(n), np.ones(n - 1)], [0, 1], shape=(n, n)).tolil()
        d[n - 1, n - 1] = 0.0  # no difference across the border (Neumann)
        return d.tocsr()

    dx = sp.kron(sp.identity(h), one_axis(w), format="csr")
    dy = sp.kron(one_axis(h), sp.identity(w), format="csr")
    return dx, dy


def _solve(a: sp.csr_matrix, b: np.ndarray, x0: np.ndarray, tol: float, max_iter: int) -> np.ndarray:
    inv_diag = 1.0 / a.diagonal()
    m = LinearOperator(a.shape, matvec=lambda v: inv_diag * v, dtype=np.float64)
    x, _ = cg(a, b, x0=x0, rtol=tol, maxiter=max_iter, M=m)
    return x


def ambrosio_tortorelli_reference(f: np.ndarray, cfg: ATConfig = ATConfig()) -> tuple[np.ndarray, np.ndarray]:
    """f: (C, H, W) float in [0, 1] → (u (C, H, W), s (H, W)), alternating exactly as the fast solver."""
    c, h, w = f.shape
    dx, dy = forward_differences(h, w)
    lap = (dx.T @ dx + dy.T @ dy).tocsr()
    fc = f.reshape(c, -1).astype(np.float64)
    u = fc.copy()
    s = np.zeros(h * w)
    for k in range(cfg.outer_iterations):
        eps = cfg.epsilon_at(k)
        g = cfg.alpha * sum((dx @ u[i]) ** 2 + (dy @ u[i]) ** 2 for i in range(c))
        a_s = (sp.diags(g + cfg.lambda_ / (4 * eps)) + cfg.lambda_ * eps * lap).tocsr()
        s = _solve(a_s, g, s, cfg.cg_tol, cfg.cg_max_iter)
        weight = sp.diags(cfg.alpha * (1 - s) ** 2)
        a_u = (sp.identity(h * w) + dx.T @ weight @ dx + dy.T @ weight @ dy).tocsr()
        u_prev = u.copy()
        u = np.stack([_solve(a_u, fc[i], u[i], cfg.cg_tol, cfg.cg_max_iter) for i in range(c)])
        if np.linalg.norm(u - u_prev) / max(np.linalg.norm(u_prev), 1e-12) < cfg.outer_tol:
            break
    return u.reshape(c, h, w), s.reshape(h, w)


def decompose_reference(image: np.ndarray, order: int, cfg: ATConfig = ATConfig()) -> np.ndarray:
    """(C, H, W) → (order, C, H, W) base factors B_1 … B_n."""
    bases, current = [], image
    for _ in range(order):
        current, _ = ambrosio_tortorelli_reference(current, cfg)
        bases.append(current)
    return np.stack(bases)
