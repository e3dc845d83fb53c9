// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CPU kernel preparing length-scaled cosine attention's queries, keys and token weights (see
// cosine_qk.h) in one pass over each row: PyTorch needs two norms, two divisions, an add, a
// multiply and a batched (N x d) @ (d x 9) product, each a round trip through memory of a
// (B, heads, N, d) tensor. Rows are visited with all their heads, as the linear layers laid them
// out, so each cache line of q and k is read once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "pytorch/cosine_qk.h"
#include "pytorch/cpu/vector_math.h"

namespace transnext_mm {
namespace {

constexpr double kNormEps = 1e-12;  // F.normalize's default

template <typename T>
TNX_ALWAYS_INLINE T norm_divisor(const T* x, int64_t d) {
  T sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t c = 0; c < d; ++c) sq += x[c] * x[c];
  return std::max(std::sqrt(sq), static_cast<T>(kNormEps));
}

constexpr int64_t kTokenLanes = 16;  // token weights per row, padded (TransNeXt has 9)

// Rows [n0, n1) of one batch element, every head (each row's heads are contiguous in q, k and
// the outputs, so the row is read once). qe: (heads, d); scale: (heads, N); tokens: (heads, d,
// kTokenLanes), zero-padded; tbias: (heads, T); q_hat: d scratch values; token_weight: the
// element's (heads, N, T).
template <typename T>
TNX_ALWAYS_INLINE void prepare_rows_impl(const T* q, int64_t q_stride, const T* k, int64_t k_stride,
                                         const T* qe, const T* scale, const T* tokens,
                                         const T* tbias, T* q_out, T* k_out, T* token_weight,
                                         T* q_hat, int64_t n0, int64_t n1, int64_t N, int64_t heads,
                                         int64_t d, int64_t T_) {
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < heads; ++h) {
      const T* __restrict__ q_row = q + n * q_stride + h * d;
      const T* __restrict__ k_row = k + n * k_stride + h * d;
      T* __restrict__ qo = q_out + (n * heads + h) * d;
      T* __restrict__ ko = k_out + (n * heads + h) * d;
      const T* __restrict__ qe_h = qe + h * d;
      const T q_den = norm_divisor(q_row, d), k_den = norm_divisor(k_row, d);
      const T s = scale[h * N + n];
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) {
        q_hat[c] = q_row[c] / q_den;  // division, as F.normalize
        qo[c] = (q_hat[c] + qe_h[c]) * s;
        ko[c] = k_row[c] / k_den;
      }
      T acc[kTokenLanes] = {};
      const T* __restrict__ tok = tokens + h * d * kTokenLanes;
      for (int64_t c = 0; c < d; ++c) {
#pragma omp simd
        for (int64_t t = 0; t < kTokenLanes; ++t) acc[t] += q_hat[c] * tok[c * kTokenLanes + t];
      }
      T* __restrict__ tw = token_weight + (h * N + n) * T_;
      for (int64_t t = 0; t < T_; ++t) tw[t] = acc[t] + tbias[h * T_ + t];
    }
  }
}

#define TNX_DEFINE_PREPARE_ROWS(T)                                                                \
  TNX_CPU_CLONES void prepare_rows(const T* q, int64_t q_stride, const T* k, int64_t k_stride,    \
                                   const T* qe, const T* scale, const T* tokens, const T* tbias,  \
                                   T* q_out, T* k_out, T* token_weight, T* q_hat, int64_t n0,     \
                                   int64_t n1, int64_t N, int64_t heads, int64_t d, int64_t T_) { \
    prepare_rows_impl(q, q_stride, k, k_stride, qe, scale, tokens, tbias, q_out, k_out,           \
                      token_weight, q_hat, n0, n1, N, heads, d, T_);                              \
  }
TNX_DEFINE_PREPARE_ROWS(float)
TNX_DEFINE_PREPARE_ROWS(double)
#undef TNX_DEFINE_PREPARE_ROWS

constexpr int64_t kRowsPerTask = 64;

}  // namespace

std::vector<at::Tensor> cosine_queries_keys_forward_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& query_embedding,
                                                        const at::Tensor& scale,
                                                        const at::Tensor& learnable_tokens,
                                                        const at::Tensor& learnable_bias) {
  const int64_t B = q.size(0), heads = q.size(1), N = q.size(2), d = q.size(3);
  const int64_t T_ = learnable_tokens.size(2);
  // Outputs stored (B, N, heads, d): the layout the attention kernels read rows from.
  auto q_out = at::empty({B, N, heads, d}, q.options());
  auto k_out = at::empty({B, N, heads, d}, q.options());
  auto token_weight = at::empty({B, heads, N, T_}, q.options());
  if (q.numel() > 0) {
    // Read in place when each row's heads and channels are contiguous (heads split out of a
    // linear's output), else from a (B, N, heads, d) copy.
    const auto heads_together = [](const at::Tensor& t) {
      return t.stride(3) == 1 && t.stride(1) == t.size(3)
                 ? t
                 : t.transpose(1, 2).contiguous().transpose(1, 2);
    };
    const auto qq = heads_together(q), kk = heads_together(k);
    const auto tokens = at::constant_pad_nd(learnable_tokens, {0, kTokenLanes - T_}).contiguous();
    const int64_t blocks = (N + kRowsPerTask - 1) / kRowsPerTask;
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cosine_queries_keys_forward_cpu", [&] {
      const scalar_t *q_ptr = qq.data_ptr<scalar_t>(), *k_ptr = kk.data_ptr<scalar_t>();
      const scalar_t *qe = query_embedding.data_ptr<scalar_t>(), *sc = scale.data_ptr<scalar_t>();
      const scalar_t *tok = tokens.data_ptr<scalar_t>(), *tb = learnable_bias.data_ptr<scalar_t>();
      scalar_t *qo = q_out.data_ptr<scalar_t>(), *ko = k_out.data_ptr<scalar_t>(),
               *tw = token_weight.data_ptr<scalar_t>();
      at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> q_hat(d);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / blocks, n0 = task % blocks * kRowsPerTask;
          prepare_rows(q_ptr + b * qq.stride(0), qq.stride(2), k_ptr + b * kk.stride(0),
                       kk.stride(2), qe, sc, tok, tb, qo + b * N * heads * d,
                       ko + b * N * heads * d, tw + b * heads * N * T_, q_hat.data(), n0,
                       std::min(N, n0 + kRowsPerTask), N, heads, d, T_);
        }
      });
    });
  } else {
    token_weight.zero_();
  }
  return {q_out.permute({0, 2, 1, 3}), k_out.permute({0, 2, 1, 3}), token_weight};
}

}  // namespace transnext_mm
