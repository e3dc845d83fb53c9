// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CPU kernels of the log-CPB MLP, out = fc2(relu(fc1(p))) for 2-d points p, with a wide hidden
// layer (512) and few outputs (the heads). PyTorch runs it as two GEMMs whose (points, hidden)
// activations go through memory several times more in the backward (recompute, ReLU mask, the
// hidden gradient, three weight-gradient GEMMs, a column sum). Here nothing of the hidden layer
// leaves the core: in fp32 the forward computes each hidden unit for 16 points in registers and
// adds it into their heads' sums (forward_points_vec), and the backward recomputes a tile of kTile
// points' hidden values 8 units at a time in registers and accumulates every weight gradient from
// them (backward_points_vec); fp64 keeps a tile's hidden rows in L1. The weight gradients
// are summed per block of kBlockPoints points and the blocks' partials added in block order, so the
// result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "pytorch/cpu/vector_math.h"
#include "pytorch/log_cpb_mlp.h"

namespace transnext_mm {
namespace {

constexpr int64_t kTile = 4;            // points per register / L1 tile
constexpr int64_t kBlockPoints = 1024;  // points per weight-gradient partial

// The hidden rows (kTile, hidden) of the points [0, rows) of a tile (rows past the end are zero).
template <typename T>
TNX_ALWAYS_INLINE void hidden_tile(const T* points, int64_t rows, const T* w1x, const T* w1y,
                                   const T* b1, T* hbuf, int64_t hidden) {
  for (int64_t r = 0; r < kTile; ++r) {
    T* __restrict__ h = hbuf + r * hidden;
    if (r >= rows) {
      std::fill(h, h + hidden, T(0));
      continue;
    }
    const T px = points[2 * r], py = points[2 * r + 1];
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      const T pre = w1x[j] * px + w1y[j] * py + b1[j];
      h[j] = pre > T(0) ? pre : T(0);
    }
  }
}

// Points [p0, p1): out rows (heads) = b2 + w2 @ hidden.
template <typename T>
TNX_ALWAYS_INLINE void forward_points_impl(const T* points, int64_t p0, int64_t p1, const T* w1x,
                                           const T* w1y, const T* b1, const T* w2, const T* b2,
                                           T* out, T* hbuf, int64_t hidden, int64_t heads) {
  const T *h0 = hbuf, *h1 = hbuf + hidden, *h2 = hbuf + 2 * hidden, *h3 = hbuf + 3 * hidden;
  for (int64_t i0 = p0; i0 < p1; i0 += kTile) {
    const int64_t rows = std::min(kTile, p1 - i0);
    hidden_tile(points + 2 * i0, rows, w1x, w1y, b1, hbuf, hidden);
    for (int64_t hd = 0; hd < heads; ++hd) {
      const T* __restrict__ w = w2 + hd * hidden;
      T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int64_t j = 0; j < hidden; ++j) {
        s0 += w[j] * h0[j];
        s1 += w[j] * h1[j];
        s2 += w[j] * h2[j];
        s3 += w[j] * h3[j];
      }
      const T sums[kTile] = {s0, s1, s2, s3};
      for (int64_t r = 0; r < rows; ++r) out[(i0 + r) * heads + hd] = b2[hd] + sums[r];
    }
  }
}

// forward_points_impl for fp32, vectorised over the points instead of the hidden units: a tile of
// 16 points (two 8-float vectors) computes each hidden unit in registers and adds it, times fc2's
// weight, to the sums of up to kHeadChunk heads, also in registers. Nothing goes through memory but
// the weights, and no sum needs a horizontal add. Each point's sum runs over the hidden units in
// order, so its value does not depend on the tile or the thread it falls in.
constexpr int kHeadChunk = 4;  // heads per pass: 8 sums, 2 hidden vectors, 4 point vectors

template <int kHeads>
TNX_ALWAYS_INLINE void forward_tile_vec(const v8f (&px)[2], const v8f (&py)[2], const float* w1x,
                                        const float* w1y, const float* b1, const float* w2,
                                        int64_t hidden, v8f (&sums)[2][kHeadChunk]) {
  const v8f zero = {};
  for (int v = 0; v < 2; ++v)
    for (int c = 0; c < kHeads; ++c) sums[v][c] = zero;
  for (int64_t j = 0; j < hidden; ++j) {
    const float wx = w1x[j], wy = w1y[j], b = b1[j];
    v8f h0 = (b + py[0] * wy) + px[0] * wx, h1 = (b + py[1] * wy) + px[1] * wx;  // two FMAs
    h0 = h0 > zero ? h0 : zero;
    h1 = h1 > zero ? h1 : zero;
    for (int c = 0; c < kHeads; ++c) {
      const float w = w2[c * hidden + j];
      sums[0][c] += h0 * w;
      sums[1][c] += h1 * w;
    }
  }
}

TNX_ALWAYS_INLINE void forward_points_vec(const float* points, int64_t p0, int64_t p1,
                                          const float* w1x, const float* w1y, const float* b1,
                                          const float* w2, const float* b2, float* out,
                                          int64_t hidden, int64_t heads) {
  constexpr int64_t kVecTile = 16;
  for (int64_t i0 = p0; i0 < p1; i0 += kVecTile) {
    const int64_t rows = std::min(kVecTile, p1 - i0);
    float xs[kVecTile] = {}, ys[kVecTile] = {};  // points past the end: zero, not stored
    for (int64_t r = 0; r < rows; ++r) {
      xs[r] = points[2 * (i0 + r)];
      ys[r] = points[2 * (i0 + r) + 1];
    }
    const v8f px[2] = {load8(xs), load8(xs + 8)}, py[2] = {load8(ys), load8(ys + 8)};
    for (int64_t hd0 = 0; hd0 < heads; hd0 += kHeadChunk) {
      const int64_t chunk = std::min<int64_t>(kHeadChunk, heads - hd0);
      const float* w = w2 + hd0 * hidden;
      v8f sums[2][kHeadChunk];
      switch (chunk) {
        case 4:
          forward_tile_vec<4>(px, py, w1x, w1y, b1, w, hidden, sums);
          break;
        case 3:
          forward_tile_vec<3>(px, py, w1x, w1y, b1, w, hidden, sums);
          break;
        case 2:
          forward_tile_vec<2>(px, py, w1x, w1y, b1, w, hidden, sums);
          break;
        default:
          forward_tile_vec<1>(px, py, w1x, w1y, b1, w, hidden, sums);
          break;
      }
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < chunk; ++c)
          out[(i0 + r) * heads + hd0 + c] = b2[hd0 + c] + sums[r / 8][c][r % 8];
    }
  }
}

// The forward of points [p0, p1): forward_points_vec where it applies.
template <typename T>
TNX_ALWAYS_INLINE void forward_points_any(const T* points, int64_t p0, int64_t p1, const T* w1x,
                                          const T* w1y, const T* b1, const T* w2, const T* b2,
                                          T* out, T* hbuf, int64_t hidden, int64_t heads) {
  if constexpr (std::is_same_v<T, float>) {
    return forward_points_vec(points, p0, p1, w1x, w1y, b1, w2, b2, out, hidden, heads);
  } else {
    forward_points_impl(points, p0, p1, w1x, w1y, b1, w2, b2, out, hbuf, hidden, heads);
  }
}

// Points [p0, p1): adds their weight gradients to one partial, (3 + heads) x hidden + heads
// values: d w1 (x column), d w1 (y column), d b1, d w2 (heads x hidden), d b2.
template <typename T>
TNX_ALWAYS_INLINE void backward_points_impl(const T* grad, const T* points, int64_t p0, int64_t p1,
                                            const T* w1x, const T* w1y, const T* b1, const T* w2,
                                            T* partial, T* hbuf, T* gbuf, int64_t hidden,
                                            int64_t heads) {
  T *dw1x = partial, *dw1y = partial + hidden, *db1 = partial + 2 * hidden;
  T *dw2 = partial + 3 * hidden, *db2 = partial + (3 + heads) * hidden;
  const T *h0 = hbuf, *h1 = hbuf + hidden, *h2 = hbuf + 2 * hidden, *h3 = hbuf + 3 * hidden;
  T *g0 = gbuf, *g1 = gbuf + hidden, *g2 = gbuf + 2 * hidden, *g3 = gbuf + 3 * hidden;
  for (int64_t i0 = p0; i0 < p1; i0 += kTile) {
    const int64_t rows = std::min(kTile, p1 - i0);
    hidden_tile(points + 2 * i0, rows, w1x, w1y, b1, hbuf, hidden);
    std::fill(gbuf, gbuf + kTile * hidden, T(0));
    T px[kTile] = {0, 0, 0, 0}, py[kTile] = {0, 0, 0, 0};
    for (int64_t r = 0; r < rows; ++r) {
      px[r] = points[2 * (i0 + r)];
      py[r] = points[2 * (i0 + r) + 1];
    }
    for (int64_t hd = 0; hd < heads; ++hd) {
      T g[kTile] = {0, 0, 0, 0};
      for (int64_t r = 0; r < rows; ++r) g[r] = grad[(i0 + r) * heads + hd];
      const T* __restrict__ w = w2 + hd * hidden;
      T* __restrict__ dw = dw2 + hd * hidden;
#pragma omp simd
      for (int64_t j = 0; j < hidden; ++j) {
        g0[j] += g[0] * w[j];
        g1[j] += g[1] * w[j];
        g2[j] += g[2] * w[j];
        g3[j] += g[3] * w[j];
        dw[j] += g[0] * h0[j] + g[1] * h1[j] + g[2] * h2[j] + g[3] * h3[j];
      }
      db2[hd] += g[0] + g[1] + g[2] + g[3];
    }
    // Through the ReLU (the gradient passes where the hidden unit is positive) into fc1.
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      const T m0 = h0[j] > T(0) ? g0[j] : T(0), m1 = h1[j] > T(0) ? g1[j] : T(0);
      const T m2 = h2[j] > T(0) ? g2[j] : T(0), m3 = h3[j] > T(0) ? g3[j] : T(0);
      dw1x[j] += px[0] * m0 + px[1] * m1 + px[2] * m2 + px[3] * m3;
      dw1y[j] += py[0] * m0 + py[1] * m1 + py[2] * m2 + py[3] * m3;
      db1[j] += m0 + m1 + m2 + m3;
    }
  }
}

// backward_points_impl for fp32 with hidden % 8 == 0, in registers: for each 8 hidden units the
// tile's hidden values and their gradients stay in registers while the heads go by, so per head
// only fc2's row and its gradient row pass through memory (instead of the tile's hidden and
// hidden-gradient rows as well). gbuf: heads x kTile values.
TNX_ALWAYS_INLINE void backward_points_vec(const float* grad, const float* points, int64_t p0,
                                           int64_t p1, const float* w1x, const float* w1y,
                                           const float* b1, const float* w2, float* partial,
                                           float* gbuf, int64_t hidden, int64_t heads) {
  float *dw1x = partial, *dw1y = partial + hidden, *db1 = partial + 2 * hidden;
  float *dw2 = partial + 3 * hidden, *db2 = partial + (3 + heads) * hidden;
  const v8f zero = {};
  for (int64_t i0 = p0; i0 < p1; i0 += kTile) {
    const int64_t rows = std::min(kTile, p1 - i0);
    float px[kTile] = {}, py[kTile] = {};  // rows past the end: gradient 0, so they add nothing
    for (int64_t r = 0; r < rows; ++r) {
      px[r] = points[2 * (i0 + r)];
      py[r] = points[2 * (i0 + r) + 1];
    }
    for (int64_t hd = 0; hd < heads; ++hd) {
      float* g = gbuf + hd * kTile;
      for (int64_t r = 0; r < kTile; ++r) g[r] = r < rows ? grad[(i0 + r) * heads + hd] : 0.f;
      db2[hd] += (g[0] + g[1]) + (g[2] + g[3]);
    }
    for (int64_t j = 0; j < hidden; j += 8) {
      const v8f wx = load8(w1x + j), wy = load8(w1y + j), bias = load8(b1 + j);
      v8f h[kTile], gh[kTile];
      for (int r = 0; r < kTile; ++r) {
        const v8f pre = wx * px[r] + wy * py[r] + bias;
        h[r] = pre > zero ? pre : zero;
        gh[r] = zero;
      }
      for (int64_t hd = 0; hd < heads; ++hd) {
        const float* g = gbuf + hd * kTile;
        const v8f w = load8(w2 + hd * hidden + j);
        float* dw = dw2 + hd * hidden + j;
        v8f dw_acc = load8(dw);
        for (int r = 0; r < kTile; ++r) {
          gh[r] += g[r] * w;
          dw_acc += g[r] * h[r];
        }
        store8(dw, dw_acc);
      }
      // Through the ReLU (the gradient passes where the hidden unit is positive) into fc1.
      v8f dx = load8(dw1x + j), dy = load8(dw1y + j), db = load8(db1 + j);
      for (int r = 0; r < kTile; ++r) {
        const v8f m = h[r] > zero ? gh[r] : zero;
        dx += px[r] * m;
        dy += py[r] * m;
        db += m;
      }
      store8(dw1x + j, dx);
      store8(dw1y + j, dy);
      store8(db1 + j, db);
    }
  }
}

// The backward of points [p0, p1): backward_points_vec where it applies.
template <typename T>
TNX_ALWAYS_INLINE void backward_points_any(const T* grad, const T* points, int64_t p0, int64_t p1,
                                           const T* w1x, const T* w1y, const T* b1, const T* w2,
                                           T* partial, T* hbuf, T* gbuf, int64_t hidden,
                                           int64_t heads) {
  if constexpr (std::is_same_v<T, float>) {
    if (hidden % 8 == 0)
      return backward_points_vec(grad, points, p0, p1, w1x, w1y, b1, w2, partial, gbuf, hidden,
                                 heads);
  }
  backward_points_impl(grad, points, p0, p1, w1x, w1y, b1, w2, partial, hbuf, gbuf, hidden, heads);
}

// Multi-versioned entry points (one per dtype; templates cannot be cloned).
#define TNX_DEFINE_MLP_KERNELS(T)                                                                 \
  TNX_CPU_CLONES void forward_points(const T* points, int64_t p0, int64_t p1, const T* w1x,       \
                                     const T* w1y, const T* b1, const T* w2, const T* b2, T* out, \
                                     T* hbuf, int64_t hidden, int64_t heads) {                    \
    forward_points_any(points, p0, p1, w1x, w1y, b1, w2, b2, out, hbuf, hidden, heads);           \
  }                                                                                               \
  TNX_CPU_CLONES void backward_points(                                                            \
      const T* grad, const T* points, int64_t p0, int64_t p1, const T* w1x, const T* w1y,         \
      const T* b1, const T* w2, T* partial, T* hbuf, T* gbuf, int64_t hidden, int64_t heads) {    \
    backward_points_any(grad, points, p0, p1, w1x, w1y, b1, w2, partial, hbuf, gbuf, hidden,      \
                        heads);                                                                   \
  }
TNX_DEFINE_MLP_KERNELS(float)
TNX_DEFINE_MLP_KERNELS(double)
#undef TNX_DEFINE_MLP_KERNELS

}  // namespace

at::Tensor log_cpb_mlp_forward_cpu(const at::Tensor& points, const at::Tensor& weight1,
                                   const at::Tensor& bias1, const at::Tensor& weight2,
                                   const at::Tensor& bias2) {
  const int64_t P = points.size(0), hidden = weight1.size(0), heads = weight2.size(0);
  auto out = at::empty({P, heads}, points.options());
  if (out.numel() == 0) return out;
  const auto w1 = weight1.t().contiguous();  // (2, hidden): the x and y columns
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "log_cpb_mlp_forward_cpu", [&] {
    const scalar_t *p = points.data_ptr<scalar_t>(), *w1x = w1.data_ptr<scalar_t>(),
                   *b1 = bias1.data_ptr<scalar_t>(), *w2 = weight2.data_ptr<scalar_t>(),
                   *b2 = bias2.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, P, kBlockPoints, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> hbuf(kTile * hidden);
      forward_points(p, begin, end, w1x, w1x + hidden, b1, w2, b2, o, hbuf.data(), hidden, heads);
    });
  });
  return out;
}

std::vector<at::Tensor> log_cpb_mlp_backward_cpu(const at::Tensor& grad, const at::Tensor& points,
                                                 const at::Tensor& weight1, const at::Tensor& bias1,
                                                 const at::Tensor& weight2) {
  const int64_t P = points.size(0), hidden = weight1.size(0), heads = weight2.size(0);
  const int64_t blocks = (P + kBlockPoints - 1) / kBlockPoints;
  const int64_t width = (3 + heads) * hidden + heads;
  auto partials = at::zeros({blocks, width}, points.options());
  auto total = at::zeros({width}, points.options());
  const auto w1 = weight1.t().contiguous();
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "log_cpb_mlp_backward_cpu", [&] {
    const scalar_t *g = grad.data_ptr<scalar_t>(), *p = points.data_ptr<scalar_t>(),
                   *w1x = w1.data_ptr<scalar_t>(), *b1 = bias1.data_ptr<scalar_t>(),
                   *w2 = weight2.data_ptr<scalar_t>();
    scalar_t *part = partials.data_ptr<scalar_t>(), *t = total.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> hbuf(kTile * hidden), gbuf(kTile * std::max(hidden, heads));
      for (int64_t block = begin; block < end; ++block) {
        const int64_t p0 = block * kBlockPoints, p1 = std::min(P, p0 + kBlockPoints);
        backward_points(g, p, p0, p1, w1x, w1x + hidden, b1, w2, part + block * width, hbuf.data(),
                        gbuf.data(), hidden, heads);
      }
    });
    // The blocks' partials added in block order.
    at::parallel_for(0, width, 256, [&](int64_t begin, int64_t end) {
      for (int64_t block = 0; block < blocks; ++block) {
        const scalar_t* src = part + block * width;
        for (int64_t i = begin; i < end; ++i) t[i] += src[i];
      }
    });
  });
  auto grad_w1 = total.narrow(0, 0, 2 * hidden).view({2, hidden}).t().contiguous();
  auto grad_b1 = total.narrow(0, 2 * hidden, hidden).clone();
  auto grad_w2 = total.narrow(0, 3 * hidden, heads * hidden).view({heads, hidden}).clone();
  auto grad_b2 = total.narrow(0, (3 + heads) * hidden, heads).clone();
  return {grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace transnext_mm
