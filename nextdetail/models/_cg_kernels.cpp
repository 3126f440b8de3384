// Fused CPU kernels for the Ambrosio–Tortorelli conjugate-gradient solver (mumford_shah.py).
//
// Eager torch needs ~48 float reads/writes per pixel per CG iteration (one memory pass per op);
// these three loops need ~15, which is what a memory-bound iteration costs. Same arithmetic as the
// eager path: y = d ⊙ x + ∇ᵀ (w ∇ x) with forward differences owned by the left/upper pixel.
//
// Layout: every map is contiguous (N, H, W) float32, N = B · C systems; the weights and the
// diagonal are (B, H, ·): system n uses those of image n / C.
#include <torch/extension.h>

namespace {

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(), name,
              ": expected a contiguous float32 CPU tensor");
}

}  // namespace

// ap = A p for every system; returns p·ap per system (N,) in float64.
torch::Tensor apply_dot(torch::Tensor p, torch::Tensor d, torch::Tensor wx, torch::Tensor wy,
                        torch::Tensor ap, int64_t channels) {
  check(p, "p"); check(wx, "wx"); check(wy, "wy"); check(ap, "ap");
  const bool has_d = d.numel() > 0;
  if (has_d) check(d, "d");
  const int64_t n_sys = p.size(0), h = p.size(1), w = p.size(2), hw = h * w;
  auto out = torch::empty({n_sys}, torch::kFloat64);
  double* dots = out.data_ptr<double>();
  for (int64_t n = 0; n < n_sys; ++n) {
    const int64_t m = n / channels;
    const float* P = p.data_ptr<float>() + n * hw;
    float* AP = ap.data_ptr<float>() + n * hw;
    const float* WX = wx.data_ptr<float>() + m * h * (w - 1);
    const float* WY = wy.data_ptr<float>() + m * (h - 1) * w;
    const float* D = has_d ? d.data_ptr<float>() + m * hw : nullptr;
    double total = 0.0;
    for (int64_t i = 0; i < h; ++i) {
      const float* row = P + i * w;
      const float* up = i > 0 ? row - w : nullptr;
      const float* down = i < h - 1 ? row + w : nullptr;
      const float* wx_row = WX + i * (w - 1);
      const float* wy_row = i < h - 1 ? WY + i * w : nullptr;       // this row's y-differences
      const float* wy_up = i > 0 ? WY + (i - 1) * w : nullptr;     // the row above's
      float* out_row = AP + i * w;
      const float* d_row = D ? D + i * w : nullptr;
      float acc = 0.f;
      if (up && down) {
        // Interior row: centre, both directions and the dot product in one vectorized pass.
        float v0 = (d_row ? d_row[0] : 1.f) * row[0] - wx_row[0] * (row[1] - row[0])
                   - wy_row[0] * (down[0] - row[0]) + wy_up[0] * (row[0] - up[0]);
        out_row[0] = v0;
        acc += v0 * row[0];
        if (d_row) {
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 1; j < w - 1; ++j) {
            const float c = row[j];
            const float v = d_row[j] * c - wx_row[j] * (row[j + 1] - c) + wx_row[j - 1] * (c - row[j - 1])
                            - wy_row[j] * (down[j] - c) + wy_up[j] * (c - up[j]);
            out_row[j] = v;
            acc += v * c;
          }
        } else {
#pragma omp simd reduction(+ : acc)
          for (int64_t j = 1; j < w - 1; ++j) {
            const float c = row[j];
            const float v = c - wx_row[j] * (row[j + 1] - c) + wx_row[j - 1] * (c - row[j - 1])
                            - wy_row[j] * (down[j] - c) + wy_up[j] * (c - up[j]);
            out_row[j] = v;
            acc += v * c;
          }
        }
        const int64_t l = w - 1;
        const float vl = (d_row ? d_row[l] : 1.f) * row[l] + wx_row[l - 1] * (row[l] - row[l - 1])
                         - wy_row[l] * (down[l] - row[l]) + wy_up[l] * (row[l] - up[l]);
        out_row[l] = vl;
        acc += vl * row[l];
        total += acc;
        continue;
      }
      // First / last row: x-direction and centre (ends apart, so the loop has no branch), then y.
      const float d0 = d_row ? d_row[0] : 1.f, d_last = d_row ? d_row[w - 1] : 1.f;
      out_row[0] = d0 * row[0] - wx_row[0] * (row[1] - row[0]);
      for (int64_t j = 1; j < w - 1; ++j)
        out_row[j] = (d_row ? d_row[j] : 1.f) * row[j] - wx_row[j] * (row[j + 1] - row[j])
                     + wx_row[j - 1] * (row[j] - row[j - 1]);
      out_row[w - 1] = d_last * row[w - 1] + wx_row[w - 2] * (row[w - 1] - row[w - 2]);
      if (down) {
        for (int64_t j = 0; j < w; ++j) out_row[j] -= wy_row[j] * (down[j] - row[j]);
      }
      if (up) {
        for (int64_t j = 0; j < w; ++j) out_row[j] += wy_up[j] * (row[j] - up[j]);
      }
      for (int64_t j = 0; j < w; ++j) acc += out_row[j] * row[j];
      total += acc;
    }
    dots[n] = total;
  }
  return out;
}

// x += a p; r -= a ap; z = r ⊙ inv_diag; returns r·z per system (N,) in float64. a: (N,) float32.
torch::Tensor update(torch::Tensor x, torch::Tensor r, torch::Tensor z, torch::Tensor p, torch::Tensor ap,
                     torch::Tensor inv_diag, torch::Tensor a, int64_t channels) {
  check(x, "x"); check(r, "r"); check(z, "z"); check(p, "p"); check(ap, "ap"); check(inv_diag, "inv_diag");
  check(a, "a");
  const int64_t n_sys = x.size(0), hw = x.size(1) * x.size(2);
  auto out = torch::empty({n_sys}, torch::kFloat64);
  double* dots = out.data_ptr<double>();
  for (int64_t n = 0; n < n_sys; ++n) {
    const float step = a.data_ptr<float>()[n];
    float* X = x.data_ptr<float>() + n * hw;
    float* R = r.data_ptr<float>() + n * hw;
    float* Z = z.data_ptr<float>() + n * hw;
    const float* P = p.data_ptr<float>() + n * hw;
    const float* AP = ap.data_ptr<float>() + n * hw;
    const float* INV = inv_diag.data_ptr<float>() + (n / channels) * hw;
    double total = 0.0;
    constexpr int64_t block = 4096;  // float partial sums over short blocks, summed in double
    for (int64_t s = 0; s < hw; s += block) {
      const int64_t e = std::min(hw, s + block);
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t k = s; k < e; ++k) {
        X[k] += step * P[k];
        const float rk = R[k] - step * AP[k];
        R[k] = rk;
        const float zk = rk * INV[k];
        Z[k] = zk;
        acc += rk * zk;
      }
      total += acc;
    }
    dots[n] = total;
  }
  return out;
}

// z = r ⊙ inv_diag; returns r·z and rhs·(rhs ⊙ inv_diag) per system, (N, 2) in float64.
torch::Tensor precondition(torch::Tensor r, torch::Tensor rhs, torch::Tensor inv_diag, torch::Tensor z,
                           int64_t channels) {
  check(r, "r"); check(rhs, "rhs"); check(inv_diag, "inv_diag"); check(z, "z");
  const int64_t n_sys = r.size(0), hw = r.size(1) * r.size(2);
  auto out = torch::empty({n_sys, 2}, torch::kFloat64);
  double* dots = out.data_ptr<double>();
  for (int64_t n = 0; n < n_sys; ++n) {
    const float* R = r.data_ptr<float>() + n * hw;
    const float* B = rhs.data_ptr<float>() + n * hw;
    const float* INV = inv_diag.data_ptr<float>() + (n / channels) * hw;
    float* Z = z.data_ptr<float>() + n * hw;
    double rz = 0.0, bb = 0.0;
    constexpr int64_t block = 4096;
    for (int64_t s = 0; s < hw; s += block) {
      const int64_t e = std::min(hw, s + block);
      float acc_rz = 0.f, acc_bb = 0.f;
#pragma omp simd reduction(+ : acc_rz, acc_bb)
      for (int64_t k = s; k < e; ++k) {
        const float zk = R[k] * INV[k];
        Z[k] = zk;
        acc_rz += R[k] * zk;
        acc_bb += B[k] * B[k] * INV[k];
      }
      rz += acc_rz;
      bb += acc_bb;
    }
    dots[2 * n] = rz;
    dots[2 * n + 1] = bb;
  }
  return out;
}

// p = z + beta p per system. beta: (N,) float32.
void xpby(torch::Tensor p, torch::Tensor z, torch::Tensor beta) {
  check(p, "p"); check(z, "z"); check(beta, "beta");
  const int64_t n_sys = p.size(0), hw = p.size(1) * p.size(2);
  for (int64_t n = 0; n < n_sys; ++n) {
    const float b = beta.data_ptr<float>()[n];
    float* P = p.data_ptr<float>() + n * hw;
    const float* Z = z.data_ptr<float>() + n * hw;
#pragma omp simd
    for (int64_t k = 0; k < hw; ++k) P[k] = Z[k] + b * P[k];
  }
}

// G = Σ_c |∇u_c|² per pixel with forward differences owned by the pixel: u (B, C, H, W) → g (B, H, W).
torch::Tensor gradient_energy(torch::Tensor u) {
  check(u, "u");
  const int64_t b = u.size(0), c = u.size(1), h = u.size(2), w = u.size(3), hw = h * w;
  auto g = torch::zeros({b, h, w}, u.options());
  for (int64_t n = 0; n < b; ++n) {
    float* G = g.data_ptr<float>() + n * hw;
    for (int64_t ch = 0; ch < c; ++ch) {
      const float* U = u.data_ptr<float>() + (n * c + ch) * hw;
      for (int64_t i = 0; i < h; ++i) {
        const float* row = U + i * w;
        float* g_row = G + i * w;
#pragma omp simd
        for (int64_t j = 0; j < w - 1; ++j) {
          const float dx = row[j + 1] - row[j];
          g_row[j] += dx * dx;
        }
        if (i < h - 1) {
          const float* down = row + w;
#pragma omp simd
          for (int64_t j = 0; j < w; ++j) {
            const float dy = down[j] - row[j];
            g_row[j] += dy * dy;
          }
        }
      }
    }
  }
  return g;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("apply_dot", &apply_dot, "ap = A p and p·ap per system");
  m.def("update", &update, "x += a p; r -= a ap; z = r/diag; r·z per system");
  m.def("xpby", &xpby, "p = z + beta p per system");
  m.def("precondition", &precondition, "z = r/diag; r·z and rhs·rhs/diag per system");
  m.def("gradient_energy", &gradient_energy, "Σ_c |∇u_c|² per pixel");
}
