"""The Ambrosio–Tortorelli solver and the order-n decomposition (CART Eq. 8 and 10)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nextdetail.models.mumford_shah import ATConfig, ambrosio_tortorelli, at_energy, decompose, details
from nextdetail.models.mumford_shah_reference import ambrosio_tortorelli_reference


def _steps_plus_noise(size: int = 64, noise: float = 0.05, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A piecewise-constant RGB image (a square and a half-plane) and the same plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.full((1, 3, size, size), 0.2)
    clean[:, :, :, size // 2 :] = 0.7
    q = size // 4
    clean[:, 0, q : 2 * q, q : 2 * q] = 0.9
    clean[:, 2, q : 2 * q, q : 2 * q] = 0.1
    noisy = clean + noise * torch.randn(clean.shape, generator=g)
    return clean, noisy


def _real_photo(size: int = 48) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255


def test_energy_never_increases_over_outer_iterations():
    _, noisy = _steps_plus_noise(48)
    photo = _real_photo(48)
    for f in (noisy, photo):
        cfg = ATConfig(outer_iterations=8, outer_tol=0.0, cg_tol=1e-4, cg_max_iter=200)
        result = ambrosio_tortorelli(f, cfg, track_energy=True)
        e = torch.stack(result.energies).squeeze(1)  # (iterations + 1,)
        assert len(e) == 9
        assert (e[1:] <= e[:-1] * (1 + 1e-6)).all(), e.tolist()
        assert e[-1] < e[0] * 0.99  # it did minimize something


def test_decreasing_epsilon_schedule():
    _, noisy = _steps_plus_noise(32)
    cfg = ATConfig(epsilon_start=0.1, epsilon=0.01, outer_iterations=4, outer_tol=0.0)
    assert cfg.epsilon_at(0) == pytest.approx(0.1) and cfg.epsilon_at(3) == pytest.approx(0.01)
    result = ambrosio_tortorelli(noisy, cfg)
    assert result.outer_iterations == 4


def test_keeps_step_edges_and_flattens_noise_better_than_a_gaussian_blur():
    clean, noisy = _steps_plus_noise(64, noise=0.05)
    base = ambrosio_tortorelli(noisy, ATConfig(outer_iterations=6)).u
    # A Gaussian of the same smoothing: the u-step's flat-region diffusion has variance 2α per axis.
    sigma = (2 * ATConfig().alpha) ** 0.5
    radius = int(3 * sigma)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    k = k / k.sum()
    pad = torch.nn.functional.pad(noisy, (radius,) * 4, mode="replicate")
    blur = torch.nn.functional.conv2d(pad, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    blur = torch.nn.functional.conv2d(blur, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)

    edge = torch.zeros(64, 64, dtype=torch.bool)  # pixels within 2 px of a step
    jump = (clean[0, :, :, 1:] != clean[0, :, :, :-1]).any(0)
    for dx in range(-2, 3):
        edge[:, max(0, dx) : 63 + min(0, dx)] |= jump[:, max(0, -dx) : 63 - max(0, dx)]
    jump_y = (clean[0, :, 1:, :] != clean[0, :, :-1, :]).any(0)
    for dy in range(-2, 3):
        edge[max(0, dy) : 63 + min(0, dy), :] |= jump_y[max(0, -dy) : 63 - max(0, dy), :]
    flat = ~edge

    def err(x: torch.Tensor, where: torch.Tensor) -> float:
        return float((x - clean)[0][:, where].abs().mean())

    assert err(base, edge) < 0.5 * err(blur, edge), (err(base, edge), err(blur, edge))
    # Noise: the flat-region residual noise is far below the input's.
    assert float((base - clean)[0][:, flat].std()) < 0.35 * float((noisy - clean)[0][:, flat].std())


@pytest.mark.parametrize("image", ["steps", "photo"])
def test_agrees_with_the_scipy_sparse_reference(image):
    f = _steps_plus_noise(24)[1].clamp(0, 1) if image == "steps" else _real_photo(24)
    cfg = ATConfig(outer_iterations=3, outer_tol=0.0, cg_tol=1e-7, cg_max_iter=2000)
    fast = ambrosio_tortorelli(f, cfg)
    u_ref, s_ref = ambrosio_tortorelli_reference(f[0].double().numpy(), cfg)
    u_rel = np.linalg.norm(fast.u[0].double().numpy() - u_ref) / np.linalg.norm(u_ref)
    s_rel = np.linalg.norm(fast.s[0].double().numpy() - s_ref) / max(np.linalg.norm(s_ref), 1e-12)
    assert u_rel < 1e-3 and s_rel < 1e-3, (u_rel, s_rel)


def test_order_n_identity_and_range():
    photo = torch.cat([_real_photo(32), _steps_plus_noise(32)[1].clamp(0, 1)])
    bases = decompose(photo, order=3)
    assert bases.shape == (3, 2, 3, 32, 32)
    d = details(photo, bases)
    recon = bases[-1] + d.sum(0)
    assert torch.allclose(recon, photo, atol=1e-5)
    # The maximum principle: every base stays within the image's range; each is smoother than the last.
    assert bases.min() >= photo.min() - 1e-4 and bases.max() <= photo.max() + 1e-4
    tv = [float((b[..., 1:] - b[..., :-1]).abs().mean()) for b in [photo, *bases]]
    assert tv == sorted(tv, reverse=True), tv


def test_batch_result_does_not_depend_on_batch_companions():
    a, b = _real_photo(32), _steps_plus_noise(32)[1]
    alone = ambrosio_tortorelli(a).u
    together = ambrosio_tortorelli(torch.cat([a, b])).u[:1]
    assert torch.allclose(alone, together, atol=1e-6)


def test_energy_function_matches_the_definition_on_a_tiny_case():
    f = torch.zeros(1, 1, 1, 2)
    u = torch.tensor([[[[0.0, 1.0]]]])
    s = torch.tensor([[[0.5, 0.0]]])
    cfg = ATConfig(alpha=2.0, lambda_=0.1, epsilon=0.5)
    # fidelity 1; smooth: α (1 − 0.5)² · 1² = 0.5; edges: λ (ε · 0.5² + (0.25 + 0) / (4ε)) = 0.1 (0.125 + 0.125)
    assert float(at_energy(f, u, s, cfg)[0]) == pytest.approx(1 + 0.5 + 0.025)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (torch.full((1, 3, 8, 8), float("nan")), "NaN or Inf"),
        (torch.zeros(3, 8, 8), "rank 4"),
        (torch.zeros(0, 3, 8, 8), "empty"),
        (torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "float tensor"),
        (np.zeros((1, 3, 8, 8)), "torch.Tensor"),
    ],
)
def test_bad_input_is_named(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        decompose(bad, order=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_agrees_with_cpu():
    x = torch.cat([_real_photo(64), _steps_plus_noise(64)[1].clamp(0, 1)])
    cpu = decompose(x, 3)
    gpu = decompose(x.cuda(), 3).cpu()
    assert (cpu - gpu).abs().max() < 1e-3


@pytest.mark.parametrize(
    "cfg",
    [
        ATConfig(),
        # an ε schedule, and a tolerance at which the two images stop after different alternations
        ATConfig(epsilon_start=0.05, outer_iterations=6, outer_tol=2e-3, cg_tol=1e-2, cg_max_iter=60),
    ],
)
def test_compiled_cpu_solver_matches_the_eager_path(monkeypatch, cfg):
    import nextdetail.models.mumford_shah as ms

    if ms.cpu_kernels() is None:
        pytest.skip("no C++ compiler: only the eager path exists here")
    photo = _real_photo(40)[..., :28]  # not square: rows and columns must not be mixed up
    x = torch.cat([photo, _steps_plus_noise(40)[1].clamp(0, 1)[..., :28]])
    compiled = ambrosio_tortorelli(x, cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # images run in parallel: the same numbers
    try:
        compiled_2 = ambrosio_tortorelli(x, cfg)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(compiled.u, compiled_2.u)
    if cfg.outer_tol > 1e-3:  # the images stop after different alternations, each as it would alone
        alone = [ambrosio_tortorelli(x[i : i + 1], cfg) for i in range(2)]
        assert alone[0].outer_iterations != alone[1].outer_iterations
        assert compiled.outer_iterations == max(a.outer_iterations for a in alone)
        assert torch.equal(torch.cat([a.u for a in alone]), compiled.u)
    monkeypatch.setattr(ms, "_KERNELS", False)
    assert ms.cpu_kernels() is None
    eager = ambrosio_tortorelli(x, cfg)
    assert (compiled.u - eager.u).abs().max() < 1e-4
    assert (compiled.s - eager.s).abs().max() < 1e-4
    assert compiled.cg_iterations == eager.cg_iterations
    assert compiled.outer_iterations == eager.outer_iterations
