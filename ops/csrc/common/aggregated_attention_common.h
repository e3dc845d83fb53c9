// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Math of the aggregated-attention op shared by the CUDA kernels and the CPU code.
//
// For one head, the query i at grid position (y, x) sees its 3x3 window (j = 0..8, row-major
// offsets (-1, -1) .. (1, 1), out-of-image neighbours dropped) and Np pooled keys:
//
//   s_local[j] = q_i . k[nbr(i, j)] + rpb_local[j]      s_pool[p] = q_i . k_pool[p] + bias[i, p]
//   a = softmax([s_local, s_pool])                      lse_i = logsumexp([s_local, s_pool])
//   out_i = sum_j (a_local[j] + token_weight[i, j]) v[nbr(i, j)] + sum_p a_pool[p] v_pool[p]
//
// Backward, with g = dL/dout_i and delta_i = sum_k a_k (g . value_k) = g . (out_i - tw part):
//   ds_k = a_k * (g . value_k - delta_i),  dq_i = sum_k ds_k key_k,
//   dkey_k += ds_k q_i,  dvalue_k += (a_k [+ token_weight]) g,  dtoken_weight[i, j] = g . v[nbr].
//
// The CUDA kernels run one thread per query (forward, dq) or per pooled key (dk_pool, dv_pool,
// dbias_pool) and stream pooled keys / queries through shared-memory tiles. Everything a thread
// computes lives in the structs below, written once for host and device, so that the CPU build can
// replay the kernels' per-thread code (see cpu/aggregated_attention_cuda_replay.cpp) and the tests
// check the CUDA math even on machines without a GPU. Only the launch glue (thread indexing,
// barriers, grid-stride loops) is CUDA-only.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace transnext_mm {

constexpr int kWindowArea = 9;
constexpr int kCenter = 4;  // the query itself: always inside the image

#if defined(__CUDA_ARCH__)
#define TNX_UNROLL _Pragma("unroll")
#else
#define TNX_UNROLL
#endif

C10_HOST_DEVICE inline float tnx_exp(float x) { return ::expf(x); }
C10_HOST_DEVICE inline double tnx_exp(double x) { return ::exp(x); }
C10_HOST_DEVICE inline float tnx_log(float x) { return ::logf(x); }
C10_HOST_DEVICE inline double tnx_log(double x) { return ::log(x); }

template <typename T>
C10_HOST_DEVICE inline T tnx_max(T a, T b) {
  return a > b ? a : b;
}
template <typename T>
C10_HOST_DEVICE inline T tnx_min(T a, T b) {
  return a < b ? a : b;
}

// Flat index of neighbour j of (y, x) on a height x width grid, or -1 outside the image.
// The queries that see key position (y, x) as their neighbour j are window_neighbor(y, x, 8 - j).
C10_HOST_DEVICE inline int64_t window_neighbor(int64_t y, int64_t x, int j, int64_t height,
                                               int64_t width) {
  const int64_t ny = y + j / 3 - 1;
  const int64_t nx = x + j % 3 - 1;
  return (ny >= 0 && ny < height && nx >= 0 && nx < width) ? ny * width + nx : -1;
}

// Head-dimension loops. kExact (d == kMaxD, the released models' 24) unrolls them fully so the
// per-thread rows live in registers; the generic variant (any d <= kMaxD) keeps them rolled, which
// is slower (rows spill to local memory) but cheap to compile.
template <int kMaxD, bool kExact>
struct HeadDim {
  static constexpr int kMax = kMaxD;
  static constexpr bool kExactDim = kExact;
};

template <typename HD, typename Fn>
C10_HOST_DEVICE inline void for_each_dim(int d, Fn&& fn) {
  if constexpr (HD::kExactDim) {
    TNX_UNROLL
    for (int c = 0; c < HD::kMax; ++c) fn(c);
  } else {
    for (int c = 0; c < d; ++c) fn(c);
  }
}

template <typename HD, typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t dot(const acc_t* a, const scalar_t* b, int d) {
  acc_t sum = 0;
  for_each_dim<HD>(d, [&](int c) { sum += a[c] * static_cast<acc_t>(b[c]); });
  return sum;
}

template <typename HD, typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void axpy(acc_t* y, acc_t alpha, const scalar_t* x, int d) {
  for_each_dim<HD>(d, [&](int c) { y[c] += alpha * static_cast<acc_t>(x[c]); });
}

template <typename HD, typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void load_row(acc_t* dst, const scalar_t* src, int d) {
  for_each_dim<HD>(d, [&](int c) { dst[c] = static_cast<acc_t>(src[c]); });
}

template <typename HD, typename acc_t>
C10_HOST_DEVICE inline void fill(acc_t* dst, acc_t value, int d) {
  for_each_dim<HD>(d, [&](int c) { dst[c] = value; });
}

template <typename HD, typename acc_t>
C10_HOST_DEVICE inline void scale_row(acc_t* dst, acc_t value, int d) {
  for_each_dim<HD>(d, [&](int c) { dst[c] *= value; });
}

// Rows of one (batch, head) of a (B, heads, N, d) tensor with contiguous channels: row i starts
// at data + i * stride. Lets the op read q / k / v / grad views (heads split out of a (B, N, C)
// projection) and write outputs in (B, N, heads, d) order without copies.
template <typename T>
struct Rows {
  T* data;
  int64_t stride;
  C10_HOST_DEVICE T* row(int64_t i) const { return data + i * stride; }
};

// Element strides of such a (B, heads, N, d) tensor (the channel stride is 1).
struct RowLayout {
  int64_t batch, head, row;
  template <typename T>
  C10_HOST_DEVICE Rows<T> rows(T* base, int64_t bh, int64_t heads) const {
    return {base + (bh / heads) * batch + (bh % heads) * head, row};
  }
};

// Cooperative tile load (run by every thread of a block): `rows` rows of d elements of src (row
// stride src_stride) into dst (row stride dst_stride), converted to the accumulation type.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void load_tile(acc_t* dst, int dst_stride, const scalar_t* src,
                                      int64_t src_stride, int rows, int d, int thread,
                                      int num_threads) {
  for (int e = thread; e < rows * d; e += num_threads)
    dst[(e / d) * dst_stride + e % d] = static_cast<acc_t>(src[(e / d) * src_stride + e % d]);
}

// Rows of a tile: at most 32, fewer for wide heads, so that two tiles stay within 32 KiB of shared
// memory.
template <int kMaxD, typename acc_t>
struct TileRows {
  static constexpr int value = kMaxD * sizeof(acc_t) <= 256 ? 32 : 16;
};

// ---------------------------------------------------------------------------------------------
// Forward: one thread per query; online softmax over the window, then over pooled-key tiles.
template <typename scalar_t, typename HD>
struct ForwardThread {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kTile = TileRows<HD::kMax, acc_t>::value;  // pooled keys per tile
  acc_t q[HD::kMax], acc[HD::kMax], extra[HD::kMax];
  acc_t running_max, running_sum;

  // q_bh, k_bh, v_bh: this (batch, head)'s rows; rpb_h: the head's 9 window biases.
  C10_HOST_DEVICE void window(Rows<const scalar_t> q_bh, Rows<const scalar_t> k_bh,
                              Rows<const scalar_t> v_bh, const scalar_t* rpb_h,
                              const scalar_t* tw_row, int64_t i, int64_t height, int64_t width,
                              int d) {
    load_row<HD>(q, q_bh.row(i), d);
    const int64_t y = i / width, x = i % width;
    acc_t scores[kWindowArea];
    int64_t nbr[kWindowArea];
    TNX_UNROLL
    for (int j = 0; j < kWindowArea; ++j) {
      nbr[j] = window_neighbor(y, x, j, height, width);
      if (nbr[j] >= 0) scores[j] = dot<HD>(q, k_bh.row(nbr[j]), d) + static_cast<acc_t>(rpb_h[j]);
    }
    running_max = scores[kCenter];
    TNX_UNROLL
    for (int j = 0; j < kWindowArea; ++j)
      if (nbr[j] >= 0) running_max = tnx_max(running_max, scores[j]);
    running_sum = 0;
    fill<HD>(acc, acc_t(0), d);
    fill<HD>(extra, acc_t(0), d);
    TNX_UNROLL
    for (int j = 0; j < kWindowArea; ++j) {
      if (nbr[j] < 0) continue;  // v is zero outside the image: no attention, no token term
      const acc_t p = tnx_exp(scores[j] - running_max);
      running_sum += p;
      axpy<HD>(acc, p, v_bh.row(nbr[j]), d);
      axpy<HD>(extra, static_cast<acc_t>(tw_row[j]), v_bh.row(nbr[j]), d);
    }
  }

  // A tile of `count` pooled keys/values (row stride HD::kMax) and this query's biases for them.
  // Rescales only when a key raises the running max, which becomes rare after the first keys;
  // no per-tile score array, so the tile loop need not be unrolled (registers, compile time).
  C10_HOST_DEVICE void pool_tile(const acc_t* kp_tile, const acc_t* vp_tile, int count,
                                 const scalar_t* bias, int d) {
    for (int t = 0; t < count; ++t) {
      const acc_t score = dot<HD>(q, kp_tile + t * HD::kMax, d) + static_cast<acc_t>(bias[t]);
      if (score > running_max) {
        const acc_t scale = tnx_exp(running_max - score);
        running_sum *= scale;
        scale_row<HD>(acc, scale, d);
        running_max = score;
      }
      const acc_t p = tnx_exp(score - running_max);
      running_sum += p;
      axpy<HD>(acc, p, vp_tile + t * HD::kMax, d);
    }
  }

  C10_HOST_DEVICE void finish(scalar_t* out_row, acc_t* lse, int d) const {
    const acc_t inv = acc_t(1) / running_sum;
    for_each_dim<HD>(d,
                     [&](int c) { out_row[c] = static_cast<scalar_t>(acc[c] * inv + extra[c]); });
    *lse = running_max + tnx_log(running_sum);
  }
};

// ---------------------------------------------------------------------------------------------
// Backward, query side: one thread per query; gives dq, the window's ds / weights (for the
// dk / dv gather), d token_weight and delta (for the pooled-key kernel).
template <typename scalar_t, typename HD>
struct BackwardQueryThread {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t q[HD::kMax], g[HD::kMax], dq[HD::kMax];
  acc_t lse, delta;

  // ds_local_row / weight_local_row: (9,) accumulation-type rows of the (B, heads, N, 9) buffers.
  C10_HOST_DEVICE void window(Rows<const scalar_t> q_bh, Rows<const scalar_t> k_bh,
                              Rows<const scalar_t> v_bh, const scalar_t* rpb_h,
                              const scalar_t* tw_row, const scalar_t* out_row,
                              const scalar_t* grad_row, acc_t lse_i, int64_t i, int64_t height,
                              int64_t width, int d, acc_t* ds_local_row, acc_t* weight_local_row,
                              scalar_t* dtw_row, acc_t* delta_out) {
    load_row<HD>(q, q_bh.row(i), d);
    load_row<HD>(g, grad_row, d);
    lse = lse_i;
    const int64_t y = i / width, x = i % width;
    int64_t nbr[kWindowArea];
    acc_t grad_dot_v[kWindowArea];
    delta = dot<HD>(g, out_row, d);
    TNX_UNROLL
    for (int j = 0; j < kWindowArea; ++j) {
      nbr[j] = window_neighbor(y, x, j, height, width);
      grad_dot_v[j] = nbr[j] >= 0 ? dot<HD>(g, v_bh.row(nbr[j]), d) : acc_t(0);
      delta -= static_cast<acc_t>(tw_row[j]) * grad_dot_v[j];  // out minus the token term
    }
    fill<HD>(dq, acc_t(0), d);
    TNX_UNROLL
    for (int j = 0; j < kWindowArea; ++j) {
      dtw_row[j] = static_cast<scalar_t>(grad_dot_v[j]);
      if (nbr[j] < 0) {
        ds_local_row[j] = 0;
        weight_local_row[j] = 0;
        continue;
      }
      const scalar_t* key = k_bh.row(nbr[j]);
      const acc_t a = tnx_exp(dot<HD>(q, key, d) + static_cast<acc_t>(rpb_h[j]) - lse);
      const acc_t ds = a * (grad_dot_v[j] - delta);
      axpy<HD>(dq, ds, key, d);
      ds_local_row[j] = ds;
      weight_local_row[j] = a + static_cast<acc_t>(tw_row[j]);
    }
    *delta_out = delta;
  }

  C10_HOST_DEVICE void pool_tile(const acc_t* kp_tile, const acc_t* vp_tile, int count,
                                 const scalar_t* bias, int d) {
    for (int t = 0; t < count; ++t) {
      const acc_t* key = kp_tile + t * HD::kMax;
      const acc_t p = tnx_exp(dot<HD>(q, key, d) + static_cast<acc_t>(bias[t]) - lse);
      const acc_t ds = p * (dot<HD>(g, vp_tile + t * HD::kMax, d) - delta);
      axpy<HD>(dq, ds, key, d);
    }
  }

  C10_HOST_DEVICE void finish(scalar_t* dq_row, int d) const {
    for_each_dim<HD>(d, [&](int c) { dq_row[c] = static_cast<scalar_t>(dq[c]); });
  }
};

// ---------------------------------------------------------------------------------------------
// Backward, pooled-key side: one thread per pooled key p of one (batch, head), streaming a chunk
// of queries through shared-memory tiles. The thread owns d bias_pool[h, i, p] for its chunk and
// accumulates it over the batch (first batch writes), so no atomics are needed.
template <typename scalar_t, typename HD>
struct BackwardPoolThread {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kTile = TileRows<HD::kMax, acc_t>::value;
  acc_t kp[HD::kMax], vp[HD::kMax], dkp[HD::kMax], dvp[HD::kMax];

  C10_HOST_DEVICE void begin(const scalar_t* kp_row, const scalar_t* vp_row, int d) {
    load_row<HD>(kp, kp_row, d);
    load_row<HD>(vp, vp_row, d);
    fill<HD>(dkp, acc_t(0), d);
    fill<HD>(dvp, acc_t(0), d);
  }

  // q_tile, g_tile: `count` queries (row stride HD::kMax); bias / dbias: this key's column for
  // those queries (stride num_pool); dbias may be null when bias_pool needs no gradient.
  C10_HOST_DEVICE void query_tile(const acc_t* q_tile, const acc_t* g_tile, const acc_t* lse_tile,
                                  const acc_t* delta_tile, int count, const scalar_t* bias,
                                  acc_t* dbias, int64_t num_pool, bool first_batch, int d) {
    for (int t = 0; t < count; ++t) {
      const acc_t* qt = q_tile + t * HD::kMax;
      const acc_t* gt = g_tile + t * HD::kMax;
      const acc_t p =
          tnx_exp(dot<HD>(qt, kp, d) + static_cast<acc_t>(bias[t * num_pool]) - lse_tile[t]);
      const acc_t ds = p * (dot<HD>(gt, vp, d) - delta_tile[t]);
      axpy<HD>(dkp, ds, qt, d);
      axpy<HD>(dvp, p, gt, d);
      if (dbias != nullptr) dbias[t * num_pool] = first_batch ? ds : dbias[t * num_pool] + ds;
    }
  }

  C10_HOST_DEVICE void finish(acc_t* dkp_row, acc_t* dvp_row, int d) const {
    for_each_dim<HD>(d, [&](int c) {
      dkp_row[c] = dkp[c];
      dvp_row[c] = dvp[c];
    });
  }
};

// ---------------------------------------------------------------------------------------------
// Backward, window keys/values: gather, for key position n and channel c, the contributions of the
// (up to 9) queries whose window contains n. No scatter, hence no atomics.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline void gather_window_grads(Rows<const scalar_t> q_bh,
                                                Rows<const scalar_t> grad_bh,
                                                const acc_t* ds_local_bh,
                                                const acc_t* weight_local_bh, int64_t n, int c,
                                                int64_t height, int64_t width, acc_t* dk,
                                                acc_t* dv) {
  const int64_t y = n / width, x = n % width;
  acc_t sum_k = 0, sum_v = 0;
  TNX_UNROLL
  for (int j = 0; j < kWindowArea; ++j) {
    const int64_t i = window_neighbor(y, x, kWindowArea - 1 - j, height, width);
    if (i < 0) continue;
    sum_k += ds_local_bh[i * kWindowArea + j] * static_cast<acc_t>(q_bh.row(i)[c]);
    sum_v += weight_local_bh[i * kWindowArea + j] * static_cast<acc_t>(grad_bh.row(i)[c]);
  }
  *dk = sum_k;
  *dv = sum_v;
}

// ---------------------------------------------------------------------------------------------
// Host-side launch parameters shared by the CUDA launchers and their CPU replay.
constexpr int kQueryThreads = 128;  // forward and dq kernels: one query per thread
constexpr int kPoolThreads = 64;    // pooled-key gradient kernel: one pooled key per thread

// Query chunk length of the pooled-key gradient kernel: enough (heads x key tiles x chunks) blocks
// to fill a GPU, while the (chunks, B, heads, Np, d) partial sums stay bounded. Any length works
// (the last tile of a chunk may be partial); multiples of 32 keep tiles full.
inline int64_t pool_grad_chunk_len(int64_t batch, int64_t heads, int64_t num_tokens,
                                   int64_t num_pool) {
  constexpr int64_t kGranule = 32;
  const int64_t key_tiles = std::max<int64_t>(1, (num_pool + kPoolThreads - 1) / kPoolThreads);
  int64_t chunks = (1024 + heads * key_tiles - 1) / (heads * key_tiles);
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, 256 / std::max<int64_t>(batch, 1)));
  chunks = std::max<int64_t>(1, std::min(chunks, (num_tokens + kGranule - 1) / kGranule));
  const int64_t per_chunk = (num_tokens + chunks - 1) / chunks;
  return std::max<int64_t>(1, (per_chunk + kGranule - 1) / kGranule) * kGranule;
}

// Calls fn(HeadDim<...>{}) with the kernel variant for head dimension d.
template <typename Fn>
inline void dispatch_head_dim(int64_t d, Fn&& fn) {
  TORCH_CHECK(d >= 1 && d <= 128,
              "aggregated_attention: the CUDA kernels support head dims 1..128, got ", d);
  if (d == 24) {  // every released TransNeXt
    fn(HeadDim<24, true>{});
  } else {
    fn(HeadDim<128, false>{});
  }
}

}  // namespace transnext_mm
