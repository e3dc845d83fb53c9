// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CPU kernel preparing length-scaled cosine attention's queries, keys and token weights (see
// cosine_qk.h) in one pass over each row: PyTorch needs two norms, two divisions, an add, a
// multiply and a batched (N x d) @ (d x 9) product, each a round trip through memory of a
// (B, heads, N, d) tensor. Rows are visited with all their heads, as the linear layers laid them
// out, so each cache line of q and k is read once.
//
// The backward visits the rows the same way: per row and head it recomputes the normalised q and
// k, writes their input gradients (through the normalisation) and the scale's gradient, and adds
// the query embedding's, the learnable tokens' and their bias's gradients to one partial per
// block of rows (summed in block order: independent of the number of threads).
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
template <int64_t D, typename T>
TNX_ALWAYS_INLINE void prepare_rows_impl(const T* q, int64_t q_stride, const T* k, int64_t k_stride,
                                         const T* qe, const T* scale, const T* tokens,
                                         const T* tbias, T* q_out, T* k_out, T* token_weight,
                                         T* q_hat, int64_t n0, int64_t n1, int64_t N, int64_t heads,
                                         int64_t head_dim, int64_t T_) {
  const int64_t d = D > 0 ? D : head_dim;
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

// The kernels' loops over a row's channels unroll into whole vectors for TransNeXt's head dim.
constexpr int64_t kHeadDim = 24;

#define TNX_DEFINE_PREPARE_ROWS(T)                                                                \
  TNX_CPU_CLONES void prepare_rows(const T* q, int64_t q_stride, const T* k, int64_t k_stride,    \
                                   const T* qe, const T* scale, const T* tokens, const T* tbias,  \
                                   T* q_out, T* k_out, T* token_weight, T* q_hat, int64_t n0,     \
                                   int64_t n1, int64_t N, int64_t heads, int64_t d, int64_t T_) { \
    specialize_for<kHeadDim>(d == kHeadDim, [&](auto D) TNX_INLINE_LAMBDA {                       \
      prepare_rows_impl<D()>(q, q_stride, k, k_stride, qe, scale, tokens, tbias, q_out, k_out,    \
                             token_weight, q_hat, n0, n1, N, heads, d, T_);                       \
    });                                                                                           \
  }
TNX_DEFINE_PREPARE_ROWS(float)
TNX_DEFINE_PREPARE_ROWS(double)
#undef TNX_DEFINE_PREPARE_ROWS

// The gradient of x / max(|x|, eps) for the output gradient g: (g - x_hat (x_hat . g)) / |x|,
// or g / eps where the norm is clamped.
template <typename T>
TNX_ALWAYS_INLINE void normalize_backward(const T* __restrict__ x, T den, const T* __restrict__ g,
                                          T* __restrict__ dx, int64_t d) {
  if (den <= static_cast<T>(kNormEps)) {
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) dx[c] = g[c] / den;
    return;
  }
  T dot = 0;
#pragma omp simd reduction(+ : dot)
  for (int64_t c = 0; c < d; ++c) dot += x[c] * g[c];
  const T inv = T(1) / den, proj = dot * inv * inv;
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) dx[c] = (g[c] - x[c] * proj) * inv;
}

// Rows [n0, n1) of every batch element and head. g_q / g_k: the output gradients, rows of heads
// with the given strides; g_tw: (B, heads, N, T); dq / dk: (B, N, heads, d); dscale: (heads, N)
// (owned: summed over the batch here); tokens_t: the learnable tokens transposed, (heads, T, d);
// partial: this block's d qe (heads, d), d tokens transposed (heads, T, d) and d token bias
// (heads, T), zero on entry; scratch: 2 d values. Every loop over the d channels of a row runs
// along its lanes: the tokens' terms are T broadcasts each (no sum across lanes per channel).
template <int64_t D, typename T>
TNX_ALWAYS_INLINE void backward_rows_impl(const T* q, const int64_t* q_st, const T* k,
                                          const int64_t* k_st, const T* gq, const int64_t* gq_st,
                                          const T* gk, const int64_t* gk_st, const T* g_tw,
                                          const T* qe, const T* scale, const T* tokens_t, T* dq,
                                          T* dk, T* dscale, T* partial, T* scratch, int64_t n0,
                                          int64_t n1, int64_t B, int64_t N, int64_t heads,
                                          int64_t head_dim, int64_t T_) {
  const int64_t d = D > 0 ? D : head_dim;
  T* dqe = partial;
  T* dtokens_t = partial + heads * d;
  T* dtbias = dtokens_t + heads * T_ * d;
  T *q_hat = scratch, *g_hat = scratch + d;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t h = 0; h < heads; ++h) {
      const T s = scale[h * N + n];
      const T* __restrict__ qe_h = qe + h * d;
      const T* __restrict__ tok = tokens_t + h * T_ * d;
      T* __restrict__ dqe_h = dqe + h * d;
      T* __restrict__ dtok = dtokens_t + h * T_ * d;
      T ds = 0;
      for (int64_t b = 0; b < B; ++b) {
        const T* __restrict__ q_row = q + b * q_st[0] + h * q_st[1] + n * q_st[2];
        const T* __restrict__ k_row = k + b * k_st[0] + h * k_st[1] + n * k_st[2];
        const T* __restrict__ gq_row = gq + b * gq_st[0] + h * gq_st[1] + n * gq_st[2];
        const T* __restrict__ gk_row = gk + b * gk_st[0] + h * gk_st[1] + n * gk_st[2];
        const T* __restrict__ gt = g_tw + ((b * heads + h) * N + n) * T_;
        const T q_den = norm_divisor(q_row, d), k_den = norm_divisor(k_row, d);
#pragma omp simd reduction(+ : ds)
        for (int64_t c = 0; c < d; ++c) {
          q_hat[c] = q_row[c] / q_den;
          ds += gq_row[c] * (q_hat[c] + qe_h[c]);
          dqe_h[c] += gq_row[c] * s;
          g_hat[c] = gq_row[c] * s;
        }
        // q_hat's gradient through the token weights, and the tokens' gradient.
        for (int64_t t = 0; t < T_; ++t) {
          const T g = gt[t];
          const T* __restrict__ tok_t = tok + t * d;
          T* __restrict__ dtok_t = dtok + t * d;
#pragma omp simd
          for (int64_t c = 0; c < d; ++c) {
            g_hat[c] += g * tok_t[c];
            dtok_t[c] += g * q_hat[c];
          }
          dtbias[h * T_ + t] += g;
        }
        normalize_backward(q_row, q_den, g_hat, dq + ((b * N + n) * heads + h) * d, d);
        normalize_backward(k_row, k_den, gk_row, dk + ((b * N + n) * heads + h) * d, d);
      }
      dscale[h * N + n] = ds;
    }
  }
}

#define TNX_DEFINE_BACKWARD_ROWS(T)                                                              \
  TNX_CPU_CLONES void backward_rows(                                                             \
      const T* q, const int64_t* q_st, const T* k, const int64_t* k_st, const T* gq,             \
      const int64_t* gq_st, const T* gk, const int64_t* gk_st, const T* g_tw, const T* qe,       \
      const T* scale, const T* tokens_t, T* dq, T* dk, T* dscale, T* partial, T* scratch,        \
      int64_t n0, int64_t n1, int64_t B, int64_t N, int64_t heads, int64_t d, int64_t T_) {      \
    specialize_for<kHeadDim>(d == kHeadDim, [&](auto D) TNX_INLINE_LAMBDA {                      \
      backward_rows_impl<D()>(q, q_st, k, k_st, gq, gq_st, gk, gk_st, g_tw, qe, scale, tokens_t, \
                              dq, dk, dscale, partial, scratch, n0, n1, B, N, heads, d, T_);     \
    });                                                                                          \
  }
TNX_DEFINE_BACKWARD_ROWS(float)
TNX_DEFINE_BACKWARD_ROWS(double)
#undef TNX_DEFINE_BACKWARD_ROWS

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

std::vector<at::Tensor> cosine_queries_keys_backward_cpu(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_token_weight,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& query_embedding,
    const at::Tensor& scale, const at::Tensor& learnable_tokens) {
  const int64_t B = q.size(0), heads = q.size(1), N = q.size(2), d = q.size(3);
  const int64_t T_ = learnable_tokens.size(2);
  auto dq = at::empty({B, N, heads, d}, q.options());
  auto dk = at::empty({B, N, heads, d}, q.options());
  auto dscale = at::zeros({heads, N, 1}, q.options());
  const int64_t blocks = (N + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t width = heads * d + heads * T_ * d + heads * T_;
  auto partials = at::zeros({std::max<int64_t>(blocks, 1), width}, q.options());
  auto total = at::zeros({width}, q.options());
  // Row strides: the channels of each (q, k and output-gradient) row must be contiguous.
  const auto rows = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
  const auto qq = rows(q), kk = rows(k), gq = rows(grad_q), gk = rows(grad_k);
  const auto gtw = grad_token_weight.contiguous();
  const auto tokens_t = learnable_tokens.transpose(1, 2).contiguous();  // (heads, T, d)
  if (q.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "cosine_queries_keys_backward_cpu", [&] {
      const int64_t q_st[3] = {qq.stride(0), qq.stride(1), qq.stride(2)};
      const int64_t k_st[3] = {kk.stride(0), kk.stride(1), kk.stride(2)};
      const int64_t gq_st[3] = {gq.stride(0), gq.stride(1), gq.stride(2)};
      const int64_t gk_st[3] = {gk.stride(0), gk.stride(1), gk.stride(2)};
      const scalar_t *q_ptr = qq.data_ptr<scalar_t>(), *k_ptr = kk.data_ptr<scalar_t>();
      const scalar_t *gq_ptr = gq.data_ptr<scalar_t>(), *gk_ptr = gk.data_ptr<scalar_t>();
      const scalar_t *gt = gtw.data_ptr<scalar_t>(), *qe = query_embedding.data_ptr<scalar_t>();
      const scalar_t *sc = scale.data_ptr<scalar_t>(), *tok = tokens_t.data_ptr<scalar_t>();
      scalar_t *dq_ptr = dq.data_ptr<scalar_t>(), *dk_ptr = dk.data_ptr<scalar_t>();
      scalar_t *dsc = dscale.data_ptr<scalar_t>(), *part = partials.data_ptr<scalar_t>();
      scalar_t* tot = total.data_ptr<scalar_t>();
      at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<scalar_t> scratch(2 * d);
        for (int64_t block = begin; block < end; ++block) {
          const int64_t n0 = block * kRowsPerTask;
          backward_rows(q_ptr, q_st, k_ptr, k_st, gq_ptr, gq_st, gk_ptr, gk_st, gt, qe, sc, tok,
                        dq_ptr, dk_ptr, dsc, part + block * width, scratch.data(), n0,
                        std::min(N, n0 + kRowsPerTask), B, N, heads, d, T_);
        }
      });
      // The blocks' partials added in block order.
      at::parallel_for(0, width, 256, [&](int64_t begin, int64_t end) {
        for (int64_t block = 0; block < blocks; ++block) {
          const scalar_t* src = part + block * width;
          for (int64_t i = begin; i < end; ++i) tot[i] += src[i];
        }
      });
    });
  } else {
    dq.zero_();
    dk.zero_();
  }
  auto dqe = total.narrow(0, 0, heads * d).view({heads, 1, d}).clone();
  auto dtokens =
      total.narrow(0, heads * d, heads * T_ * d).view({heads, T_, d}).transpose(1, 2).contiguous();
  auto dtbias =
      total.narrow(0, heads * d + heads * T_ * d, heads * T_).view({heads, 1, T_}).clone();
  return {dq.permute({0, 2, 1, 3}), dk.permute({0, 2, 1, 3}), dqe, dscale, dtokens, dtbias};
}

}  // namespace transnext_mm
