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
// dbias_pool) and stream pooled keys / queries (and the block's bias_pool entries) through
// shared-memory tiles. Everything a kernel does is written once here, for host and device: the
// per-thread math (the structs below), the block bodies (thread indexing, barriers, grid-stride
// loops), the launch plans and the launch sequence (run_forward_kernels / run_backward_kernels).
// The CUDA build wraps the bodies in __global__ entry points; the CPU build replays the very same
// bodies, block by block, with fibers (cpu/aggregated_attention_cuda_replay.cpp), so the tests
// check the CUDA code, barriers and launch arithmetic included, on machines without a GPU.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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

// Head-dimension loops. kExact (d == kMaxD; see dispatch_head_dim) unrolls them fully so the
// per-thread rows live in registers; the generic variant (any d <= kMaxD) keeps them rolled, which
// is slower (rows live in local memory) but cheap to compile.
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

// 16-byte vector loads / stores of rows: for the exact head dims (whose rows are whole packs),
// when the row is 16-byte aligned; element by element otherwise. Both visit the channels in the
// same order, so results do not depend on the path.
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

template <typename HD, typename T>
C10_HOST_DEVICE inline bool vector_path(const T* row) {
  if constexpr (HD::kExactDim && sizeof(T) <= 16 && HD::kMax % Pack16<T>::kSize == 0)
    return (reinterpret_cast<uintptr_t>(row) & 15) == 0;
  return false;
}

template <typename T>
C10_HOST_DEVICE inline Pack16<T> load_pack(const T* src) {
#if defined(__CUDA_ARCH__)
  return *reinterpret_cast<const Pack16<T>*>(src);
#else
  Pack16<T> pack;
  std::memcpy(static_cast<void*>(&pack), src, sizeof(pack));
  return pack;
#endif
}

template <typename T>
C10_HOST_DEVICE inline void store_pack(T* dst, const Pack16<T>& pack) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<Pack16<T>*>(dst) = pack;
#else
  std::memcpy(static_cast<void*>(dst), &pack, sizeof(pack));
#endif
}

// Calls fn(c, value) for the d channels of the row at src, values converted to acc_t.
template <typename HD, typename acc_t, typename T, typename Fn>
C10_HOST_DEVICE inline void for_each_value(const T* src, int d, Fn&& fn) {
  if constexpr (HD::kExactDim && sizeof(T) <= 16 && HD::kMax % Pack16<T>::kSize == 0) {
    if (vector_path<HD>(src)) {
      constexpr int kSize = Pack16<T>::kSize;
      TNX_UNROLL
      for (int c = 0; c < HD::kMax; c += kSize) {
        const Pack16<T> pack = load_pack(src + c);
        TNX_UNROLL
        for (int e = 0; e < kSize; ++e) fn(c + e, static_cast<acc_t>(pack.v[e]));
      }
      return;
    }
  }
  for_each_dim<HD>(d, [&](int c) { fn(c, static_cast<acc_t>(src[c])); });
}

// Writes value(c) for the d channels of the row at dst.
template <typename HD, typename T, typename Fn>
C10_HOST_DEVICE inline void store_row(T* dst, int d, Fn&& value) {
  if constexpr (HD::kExactDim && sizeof(T) <= 16 && HD::kMax % Pack16<T>::kSize == 0) {
    if (vector_path<HD>(static_cast<const T*>(dst))) {
      constexpr int kSize = Pack16<T>::kSize;
      TNX_UNROLL
      for (int c = 0; c < HD::kMax; c += kSize) {
        Pack16<T> pack;
        TNX_UNROLL
        for (int e = 0; e < kSize; ++e) pack.v[e] = static_cast<T>(value(c + e));
        store_pack(dst + c, pack);
      }
      return;
    }
  }
  for_each_dim<HD>(d, [&](int c) { dst[c] = static_cast<T>(value(c)); });
}

template <typename HD, typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline acc_t dot(const acc_t* a, const scalar_t* b, int d) {
  acc_t sum = 0;
  for_each_value<HD, acc_t>(b, d, [&](int c, acc_t x) { sum += a[c] * x; });
  return sum;
}

template <typename HD, typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void axpy(acc_t* y, acc_t alpha, const scalar_t* x, int d) {
  for_each_value<HD, acc_t>(x, d, [&](int c, acc_t value) { y[c] += alpha * value; });
}

template <typename HD, typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void load_row(acc_t* dst, const scalar_t* src, int d) {
  for_each_value<HD, acc_t>(src, d, [&](int c, acc_t value) { dst[c] = value; });
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

// Cooperative load of a bias tile: `rows` rows of `count` <= kTile elements (row stride
// src_stride) into dst (row stride kStride). Thread t loads column t % kTile of every
// (threads / kTile)-th row: a warp reads whole row segments (coalesced), without divisions.
// Needs threads % kTile == 0.
template <int kTile, int kStride, typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void load_bias_tile(acc_t* dst, const scalar_t* src, int64_t src_stride,
                                           int rows, int count, int thread, int num_threads) {
  const int column = thread % kTile;
  if (column >= count) return;
  for (int r = thread / kTile; r < rows; r += num_threads / kTile)
    dst[r * kStride + column] = static_cast<acc_t>(src[r * src_stride + column]);
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

  // A tile of `count` pooled keys/values (row stride HD::kMax) and this query's biases for them
  // (its row of the block's bias tile). Rescales only when a key raises the running max, which
  // becomes rare after the first keys; no per-tile score array, so the tile loop need not be
  // unrolled (registers, compile time).
  C10_HOST_DEVICE void pool_tile(const acc_t* kp_tile, const acc_t* vp_tile, int count,
                                 const acc_t* bias, int d) {
    for (int t = 0; t < count; ++t) {
      const acc_t score = dot<HD>(q, kp_tile + t * HD::kMax, d) + bias[t];
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
    store_row<HD>(out_row, d, [&](int c) { return acc[c] * inv + extra[c]; });
    *lse = running_max + tnx_log(running_sum);
  }
};

// ---------------------------------------------------------------------------------------------
// Backward, query side: one thread per query; gives dq, the window's ds / weights (for the
// dk / dv gather), d token_weight and delta (for the pooled-key kernel).
//
// delta = sum_k a_k (g . value_k). With fp32 / fp64 storage it is g . out minus the token term;
// with fp16 / bf16 storage `out` is rounded, so delta is recomputed in the accumulation type from
// the probabilities instead (kExactDelta: one more pass over the pooled keys, delta_tile()).
template <typename scalar_t, typename HD>
struct BackwardQueryThread {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr bool kExactDelta = !std::is_same_v<scalar_t, acc_t>;
  acc_t q[HD::kMax], g[HD::kMax], dq[HD::kMax];
  acc_t lse, delta;
  acc_t prob[kWindowArea], grad_dot_v[kWindowArea];  // the window's a_j and g . v[nbr(j)]

  C10_HOST_DEVICE void window_begin(Rows<const scalar_t> q_bh, Rows<const scalar_t> k_bh,
                                    Rows<const scalar_t> v_bh, const scalar_t* rpb_h,
                                    const scalar_t* tw_row, const scalar_t* out_row,
                                    const scalar_t* grad_row, acc_t lse_i, int64_t i,
                                    int64_t height, int64_t width, int d) {
    load_row<HD>(q, q_bh.row(i), d);
    load_row<HD>(g, grad_row, d);
    lse = lse_i;
    const int64_t y = i / width, x = i % width;
    delta = kExactDelta ? acc_t(0) : dot<HD>(g, out_row, d);
    TNX_UNROLL
    for (int j = 0; j < kWindowArea; ++j) {
      const int64_t nbr = window_neighbor(y, x, j, height, width);
      grad_dot_v[j] = nbr >= 0 ? dot<HD>(g, v_bh.row(nbr), d) : acc_t(0);
      prob[j] = nbr >= 0
                    ? tnx_exp(dot<HD>(q, k_bh.row(nbr), d) + static_cast<acc_t>(rpb_h[j]) - lse)
                    : acc_t(0);
      if constexpr (kExactDelta)
        delta += prob[j] * grad_dot_v[j];
      else
        delta -= static_cast<acc_t>(tw_row[j]) * grad_dot_v[j];  // out minus the token term
    }
  }

  // kExactDelta only: the pooled keys' part of delta.
  C10_HOST_DEVICE void delta_tile(const acc_t* kp_tile, const acc_t* vp_tile, int count,
                                  const acc_t* bias, int d) {
    for (int t = 0; t < count; ++t) {
      const acc_t p = tnx_exp(dot<HD>(q, kp_tile + t * HD::kMax, d) + bias[t] - lse);
      delta += p * dot<HD>(g, vp_tile + t * HD::kMax, d);
    }
  }

  // ds_local_row / weight_local_row: (9,) accumulation-type rows of the (B, heads, N, 9) buffers.
  C10_HOST_DEVICE void window_grads(Rows<const scalar_t> k_bh, const scalar_t* tw_row, int64_t i,
                                    int64_t height, int64_t width, int d, acc_t* ds_local_row,
                                    acc_t* weight_local_row, scalar_t* dtw_row, acc_t* delta_out) {
    const int64_t y = i / width, x = i % width;
    fill<HD>(dq, acc_t(0), d);
    TNX_UNROLL
    for (int j = 0; j < kWindowArea; ++j) {
      dtw_row[j] = static_cast<scalar_t>(grad_dot_v[j]);
      const int64_t nbr = window_neighbor(y, x, j, height, width);
      if (nbr < 0) {
        ds_local_row[j] = 0;
        weight_local_row[j] = 0;
        continue;
      }
      const acc_t ds = prob[j] * (grad_dot_v[j] - delta);
      axpy<HD>(dq, ds, k_bh.row(nbr), d);
      ds_local_row[j] = ds;
      weight_local_row[j] = prob[j] + static_cast<acc_t>(tw_row[j]);
    }
    *delta_out = delta;
  }

  C10_HOST_DEVICE void pool_tile(const acc_t* kp_tile, const acc_t* vp_tile, int count,
                                 const acc_t* bias, int d) {
    for (int t = 0; t < count; ++t) {
      const acc_t* key = kp_tile + t * HD::kMax;
      const acc_t p = tnx_exp(dot<HD>(q, key, d) + bias[t] - lse);
      const acc_t ds = p * (dot<HD>(g, vp_tile + t * HD::kMax, d) - delta);
      axpy<HD>(dq, ds, key, d);
    }
  }

  C10_HOST_DEVICE void finish(scalar_t* dq_row, int d) const {
    store_row<HD>(dq_row, d, [&](int c) { return dq[c]; });
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
    store_row<HD>(dkp_row, d, [&](int c) { return dkp[c]; });
    store_row<HD>(dvp_row, d, [&](int c) { return dvp[c]; });
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

// =============================================================================================
// Kernel bodies, written once for the CUDA kernels and their CPU replay.
//
// Each body is the code of one thread block, templated over a context `Ctx` that supplies
//   ctx.thread()  (threadIdx.x)      ctx.threads() (blockDim.x)
//   ctx.block(a)  (blockIdx.x/y/z)   ctx.grid(a)   (gridDim.x/y/z)     ctx.sync() (__syncthreads)
// and over the block's shared memory (a struct the CUDA kernel declares __shared__). The CUDA
// kernels (cuda/aggregated_attention_kernels.cu) are one generic entry point; the replay
// (cpu/aggregated_attention_cuda_replay.cpp) runs every thread of a block as a fiber that yields at
// ctx.sync(), in reverse thread order, over the grid that the launch plans below compute for both.
// A missing barrier lets a thread read shared memory that others have not written yet (the replay
// fills it with NaN first) or have overwritten already, so the replay's results go wrong.

struct AttentionSizes {
  int64_t batch, heads, tokens, pool, height, width;
  int d;
};

// q, k, v, out (and grad_out, dq, dk, dv) are (B, heads, N, d) with contiguous channels and the
// given strides; every other tensor is contiguous.
template <typename scalar_t>
struct ForwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  AttentionSizes sizes;
  const scalar_t *q, *k, *v, *k_pool, *v_pool, *rpb, *bias, *token_weight;
  scalar_t* out;
  acc_t* lse;  // (B, heads, N)
  RowLayout q_layout, k_layout, v_layout, out_layout;
};

template <typename scalar_t>
struct BackwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  AttentionSizes sizes;
  const scalar_t *grad_out, *q, *k, *v, *k_pool, *v_pool, *rpb, *bias, *token_weight, *out;
  const acc_t* lse;
  scalar_t *dq, *dk, *dv, *dtoken_weight;
  acc_t *ds_local, *weight_local;  // (B, heads, N, 9) scratch
  acc_t* delta;                    // (B, heads, N) scratch
  acc_t* dbias_partial;  // (groups, heads, N, Np), summed over groups; null: no bias gradient
  acc_t *dkp_partial, *dvp_partial;  // (chunks, B, heads, Np, d), summed over chunks
  int64_t chunk_len;                 // queries per block of the pooled-key kernel
  int64_t group_len;                 // batch elements per block of the pooled-key kernel
  RowLayout grad_layout, q_layout, k_layout, v_layout, out_layout, dq_layout, dk_layout, dv_layout;
};

// ---------------------------------------------------------------------------------------------
// Launch plans (host code shared by the CUDA launchers and the replay).
constexpr int kQueryThreads = 128;   // forward and dq kernels: one query per thread
constexpr int kPoolThreads = 64;     // pooled-key gradient kernel: one pooled key per thread
constexpr int kGatherThreads = 256;  // window dk / dv gather: one element per thread
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;

struct Launch {
  int64_t grid[3];
  int threads;
};

// Query-side kernels (forward, dq): one block per (query block, head, batch element) on a 1-D
// grid, the batch element varying fastest, so that the blocks that read the same bias_pool slab
// (head h, the block's queries) run side by side and share it in L2. Any batch x heads fits.
inline Launch query_launch(const AttentionSizes& s) {
  const int64_t query_blocks = (s.tokens + kQueryThreads - 1) / kQueryThreads;
  const int64_t blocks = query_blocks * s.heads * s.batch;
  TORCH_CHECK(blocks >= 1 && blocks <= kMaxGridX,
              "aggregated_attention: the CUDA kernels take at most 2^31 - 1 blocks of ",
              kQueryThreads, " queries per (batch, head), got ", blocks);
  return {{blocks, 1, 1}, kQueryThreads};
}

inline Launch gather_launch(const AttentionSizes& s) {
  const int64_t total = s.batch * s.heads * s.tokens * s.d;
  return {{std::min<int64_t>((total + kGatherThreads - 1) / kGatherThreads, int64_t(1) << 20), 1,
           1},
          kGatherThreads};
}

// Pooled-key gradient: grid (key tiles x batch groups, query chunks, heads), the group varying
// fastest, so that the blocks sharing a bias_pool slab (head, chunk, key tile) run side by side.
// Each block owns d bias_pool[h, chunk, keys] for its batch group, accumulated over the group's
// batch elements by the owning thread (no atomics) into per-group partial sums, which the
// launcher sums over the groups. Chunks and groups are sized to fill a GPU (about kTargetBlocks
// blocks) while the per-chunk dk_pool / dv_pool partials (chunks, B, heads, Np, d) and the
// per-group bias partials (groups, heads, N, Np) stay bounded.
struct PoolGradPlan {
  int64_t chunk_len, chunks, group_len, groups;
  Launch launch;
};

constexpr int64_t kPoolGradTargetBlocks = 1024;

inline PoolGradPlan pool_grad_plan(const AttentionSizes& s, bool bias_grad,
                                   int64_t target_blocks = kPoolGradTargetBlocks) {
  constexpr int64_t kGranule = 32;
  const int64_t kTargetBlocks = std::max<int64_t>(1, target_blocks);
  constexpr int64_t kMaxPartial = int64_t(1) << 24;  // elements of each kind of partial sums
  const int64_t batch = std::max<int64_t>(s.batch, 1), heads = std::max<int64_t>(s.heads, 1);
  const int64_t key_tiles = std::max<int64_t>(1, (s.pool + kPoolThreads - 1) / kPoolThreads);
  const int64_t granules = std::max<int64_t>(1, (s.tokens + kGranule - 1) / kGranule);
  int64_t chunks = (kTargetBlocks + heads * key_tiles - 1) / (heads * key_tiles);
  const int64_t chunk_slab = std::max<int64_t>(1, batch * heads * s.pool * s.d);
  chunks = std::min({chunks, granules, std::max<int64_t>(1, kMaxPartial / chunk_slab), kMaxGridYZ});
  const int64_t chunk_len = ((granules + chunks - 1) / chunks) * kGranule;
  chunks = std::max<int64_t>(1, (s.tokens + chunk_len - 1) / chunk_len);
  int64_t groups = (kTargetBlocks + heads * key_tiles * chunks - 1) / (heads * key_tiles * chunks);
  groups = std::min(groups, batch);
  const int64_t bias_slab = std::max<int64_t>(1, heads * s.tokens * s.pool);
  if (bias_grad) groups = std::min(groups, std::max<int64_t>(1, kMaxPartial / bias_slab));
  groups = std::max<int64_t>(1, groups);
  const int64_t group_len = (batch + groups - 1) / groups;
  groups = (batch + group_len - 1) / group_len;
  return {chunk_len, chunks, group_len, groups, {{key_tiles * groups, chunks, heads}, kPoolThreads}};
}

// ---------------------------------------------------------------------------------------------
// Block bodies.
//
// Shared memory of the query-side kernels: a tile of pooled keys / values, and the block's
// queries' bias_pool entries for those keys (one row per thread, padded by one so that the
// threads of a warp reading their rows hit distinct banks).
template <typename acc_t, int kTile, int kMaxD>
struct PoolTiles {
  static_assert(kQueryThreads % kTile == 0, "load_bias_tile needs whole rows per pass");
  static constexpr int kBiasStride = kTile + 1;
  alignas(16) acc_t kp[kTile * kMaxD];
  alignas(16) acc_t vp[kTile * kMaxD];
  acc_t bias[kQueryThreads * kBiasStride];
};

// The query-side kernels' block index on their 1-D grid (see query_launch; the grid has one
// block per (query block, head, batch element), fewer than 2^31, so 32-bit arithmetic decodes it
// without 64-bit divisions, which are calls on the GPU).
struct QueryBlock {
  int64_t b, h, bh, first_query;
};

template <typename Ctx>
C10_HOST_DEVICE inline QueryBlock query_block(const Ctx& ctx, const AttentionSizes& s) {
  const uint32_t index = static_cast<uint32_t>(ctx.block(0));
  const uint32_t batch = static_cast<uint32_t>(s.batch), heads = static_cast<uint32_t>(s.heads);
  const uint32_t bh_index = index / batch;
  QueryBlock blk;
  blk.b = index - bh_index * batch;
  blk.h = bh_index % heads;
  blk.bh = blk.b * s.heads + blk.h;
  blk.first_query = static_cast<int64_t>(bh_index / heads) * ctx.threads();
  return blk;
}

// Streams this (batch, head)'s pooled keys / values through shared-memory tiles, with the
// block's bias_pool rows for each tile (bias_h: the head's (N, Np) slab; read coalesced, a row
// segment per warp, once per block), calling use(kp_tile, vp_tile, bias_row, count) for every
// tile between the barriers; bias_row is this thread's query's row of the bias tile.
template <typename HD, typename acc_t, int kTile, typename scalar_t, typename Ctx, typename Use>
C10_HOST_DEVICE inline void for_each_pool_tile(const Ctx& ctx, PoolTiles<acc_t, kTile, HD::kMax>& sh,
                                               const scalar_t* k_pool, const scalar_t* v_pool,
                                               const scalar_t* bias_h, const AttentionSizes& s,
                                               int64_t bh, int64_t first_query, Use&& use) {
  constexpr int kStride = PoolTiles<acc_t, kTile, HD::kMax>::kBiasStride;
  const int rows = static_cast<int>(tnx_min<int64_t>(ctx.threads(), s.tokens - first_query));
  for (int64_t p0 = 0; p0 < s.pool; p0 += kTile) {
    const int count = static_cast<int>(tnx_min<int64_t>(kTile, s.pool - p0));
    const int64_t offset = (bh * s.pool + p0) * s.d;
    load_tile(sh.kp, HD::kMax, k_pool + offset, s.d, count, s.d, ctx.thread(), ctx.threads());
    load_tile(sh.vp, HD::kMax, v_pool + offset, s.d, count, s.d, ctx.thread(), ctx.threads());
    load_bias_tile<kTile, kStride>(sh.bias, bias_h + first_query * s.pool + p0, s.pool, rows,
                                   count, ctx.thread(), ctx.threads());
    ctx.sync();  // the tile is complete
    use(sh.kp, sh.vp, sh.bias + ctx.thread() * kStride, count);
    ctx.sync();  // every thread is done with it before the next tile overwrites it
  }
}

// Forward: one thread per query; window, then pooled keys.
template <typename scalar_t, typename HD>
using ForwardShared = PoolTiles<at::opmath_type<scalar_t>,
                                TileRows<HD::kMax, at::opmath_type<scalar_t>>::value, HD::kMax>;

template <typename scalar_t, typename HD, typename Ctx>
C10_HOST_DEVICE void forward_block(const Ctx& ctx, const ForwardParams<scalar_t>& p,
                                   ForwardShared<scalar_t, HD>& sh) {
  using Thread = ForwardThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  const AttentionSizes& s = p.sizes;
  const QueryBlock blk = query_block(ctx, s);
  const int64_t bh = blk.bh, h = blk.h;
  const int64_t i = blk.first_query + ctx.thread();
  const bool active = i < s.tokens;
  Thread thread;
  if (active)
    thread.window(p.q_layout.rows(p.q, bh, s.heads), p.k_layout.rows(p.k, bh, s.heads),
                  p.v_layout.rows(p.v, bh, s.heads), p.rpb + h * kWindowArea,
                  p.token_weight + (bh * s.tokens + i) * kWindowArea, i, s.height, s.width,
                  s.d);
  for_each_pool_tile<HD, acc_t, Thread::kTile>(
      ctx, sh, p.k_pool, p.v_pool, p.bias + h * s.tokens * s.pool, s, bh, blk.first_query,
      [&](const acc_t* kp, const acc_t* vp, const acc_t* bias, int count) {
        if (active) thread.pool_tile(kp, vp, count, bias, s.d);
      });
  if (active)
    thread.finish(p.out_layout.rows(p.out, bh, s.heads).row(i), p.lse + bh * s.tokens + i, s.d);
}

// Backward, query side (same grid as the forward): dq, the window's ds / weights, d token_weight
// and delta (with fp16 / bf16 storage after a first pass over the pooled keys).
template <typename scalar_t, typename HD, typename Ctx>
C10_HOST_DEVICE void backward_query_block(const Ctx& ctx, const BackwardParams<scalar_t>& p,
                                          ForwardShared<scalar_t, HD>& sh) {
  using Thread = BackwardQueryThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  constexpr int kTile = TileRows<HD::kMax, acc_t>::value;
  const AttentionSizes& s = p.sizes;
  const QueryBlock blk = query_block(ctx, s);
  const int64_t bh = blk.bh, h = blk.h;
  const int64_t i = blk.first_query + ctx.thread();
  const bool active = i < s.tokens;
  const int64_t row = bh * s.tokens + i;
  const scalar_t* bias_h = p.bias + h * s.tokens * s.pool;
  Thread thread;
  if (active)
    thread.window_begin(p.q_layout.rows(p.q, bh, s.heads), p.k_layout.rows(p.k, bh, s.heads),
                        p.v_layout.rows(p.v, bh, s.heads), p.rpb + h * kWindowArea,
                        p.token_weight + row * kWindowArea,
                        p.out_layout.rows(p.out, bh, s.heads).row(i),
                        p.grad_layout.rows(p.grad_out, bh, s.heads).row(i), p.lse[row], i,
                        s.height, s.width, s.d);
  if constexpr (Thread::kExactDelta) {
    for_each_pool_tile<HD, acc_t, kTile>(
        ctx, sh, p.k_pool, p.v_pool, bias_h, s, bh, blk.first_query,
        [&](const acc_t* kp, const acc_t* vp, const acc_t* bias, int count) {
          if (active) thread.delta_tile(kp, vp, count, bias, s.d);
        });
  }
  if (active)
    thread.window_grads(p.k_layout.rows(p.k, bh, s.heads), p.token_weight + row * kWindowArea,
                        i, s.height, s.width, s.d, p.ds_local + row * kWindowArea,
                        p.weight_local + row * kWindowArea,
                        p.dtoken_weight + row * kWindowArea, p.delta + row);
  for_each_pool_tile<HD, acc_t, kTile>(
      ctx, sh, p.k_pool, p.v_pool, bias_h, s, bh, blk.first_query,
      [&](const acc_t* kp, const acc_t* vp, const acc_t* bias, int count) {
        if (active) thread.pool_tile(kp, vp, count, bias, s.d);
      });
  if (active) thread.finish(p.dq_layout.rows(p.dq, bh, s.heads).row(i), s.d);
}

// Backward, pooled-key side (grid: pool_grad_plan): one thread per pooled key, streaming the
// block's query chunk through shared-memory tiles for each batch element of its group. Its bias
// and d bias reads / writes are coalesced (consecutive threads, consecutive keys).
template <typename scalar_t, typename HD>
struct PoolGradShared {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kTile = TileRows<HD::kMax, acc_t>::value;
  alignas(16) acc_t q[kTile * HD::kMax];
  alignas(16) acc_t g[kTile * HD::kMax];
  acc_t lse[kTile];
  acc_t delta[kTile];
};

template <typename scalar_t, typename HD, typename Ctx>
C10_HOST_DEVICE void backward_pool_block(const Ctx& ctx, const BackwardParams<scalar_t>& p,
                                         PoolGradShared<scalar_t, HD>& sh) {
  using Thread = BackwardPoolThread<scalar_t, HD>;
  constexpr int kTile = PoolGradShared<scalar_t, HD>::kTile;
  const AttentionSizes& s = p.sizes;
  const int64_t groups = (s.batch + p.group_len - 1) / p.group_len;
  const int64_t key_tile = ctx.block(0) / groups, group = ctx.block(0) % groups;
  const int64_t key = key_tile * ctx.threads() + ctx.thread();
  const bool active = key < s.pool;
  const int64_t chunk = ctx.block(1), h = ctx.block(2);
  const int64_t i_begin = chunk * p.chunk_len;
  const int64_t i_end = tnx_min(s.tokens, i_begin + p.chunk_len);
  const int64_t b_begin = group * p.group_len;
  const int64_t b_end = tnx_min(s.batch, b_begin + p.group_len);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t bh = b * s.heads + h;
    const Rows<const scalar_t> q_bh = p.q_layout.rows(p.q, bh, s.heads);
    const Rows<const scalar_t> g_bh = p.grad_layout.rows(p.grad_out, bh, s.heads);
    Thread thread;
    if (active)
      thread.begin(p.k_pool + (bh * s.pool + key) * s.d, p.v_pool + (bh * s.pool + key) * s.d,
                   s.d);
    for (int64_t i0 = i_begin; i0 < i_end; i0 += kTile) {
      const int count = static_cast<int>(tnx_min<int64_t>(kTile, i_end - i0));
      load_tile(sh.q, HD::kMax, q_bh.row(i0), q_bh.stride, count, s.d, ctx.thread(),
                ctx.threads());
      load_tile(sh.g, HD::kMax, g_bh.row(i0), g_bh.stride, count, s.d, ctx.thread(),
                ctx.threads());
      for (int t = ctx.thread(); t < count; t += ctx.threads()) {
        sh.lse[t] = p.lse[bh * s.tokens + i0 + t];
        sh.delta[t] = p.delta[bh * s.tokens + i0 + t];
      }
      ctx.sync();
      if (active) {
        const int64_t column = (h * s.tokens + i0) * s.pool + key;
        thread.query_tile(sh.q, sh.g, sh.lse, sh.delta, count, p.bias + column,
                          p.dbias_partial == nullptr
                              ? nullptr
                              : p.dbias_partial + group * s.heads * s.tokens * s.pool + column,
                          s.pool, b == b_begin, s.d);
      }
      ctx.sync();
    }
    if (active) {
      const int64_t slot = ((chunk * s.batch + b) * s.heads + h) * s.pool + key;
      thread.finish(p.dkp_partial + slot * s.d, p.dvp_partial + slot * s.d, s.d);
    }
  }
}

// Window keys / values (grid: gather_launch; no shared memory): one thread per (batch, head,
// key position, channel), grid-stride.
template <typename scalar_t, typename Ctx>
C10_HOST_DEVICE void window_grad_block(const Ctx& ctx, const BackwardParams<scalar_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const AttentionSizes& s = p.sizes;
  const int64_t total = s.batch * s.heads * s.tokens * s.d;
  for (int64_t idx = ctx.block(0) * ctx.threads() + ctx.thread(); idx < total;
       idx += static_cast<int64_t>(ctx.threads()) * ctx.grid(0)) {
    const int c = static_cast<int>(idx % s.d);
    const int64_t n = (idx / s.d) % s.tokens;
    const int64_t bh = idx / (static_cast<int64_t>(s.d) * s.tokens);
    acc_t grad_k, grad_v;
    gather_window_grads(p.q_layout.rows(p.q, bh, s.heads),
                        p.grad_layout.rows(p.grad_out, bh, s.heads),
                        p.ds_local + bh * s.tokens * kWindowArea,
                        p.weight_local + bh * s.tokens * kWindowArea, n, c, s.height, s.width,
                        &grad_k, &grad_v);
    p.dk_layout.rows(p.dk, bh, s.heads).row(n)[c] = static_cast<scalar_t>(grad_k);
    p.dv_layout.rows(p.dv, bh, s.heads).row(n)[c] = static_cast<scalar_t>(grad_v);
  }
}

// Calls fn(HeadDim<...>{}) with the kernel variant for head dimension d: exact variants (rows in
// registers, loops unrolled) for 16, 24 (every released TransNeXt), 32, 48 and 64; the generic
// one (rolled loops over up to 128 channels, rows in local memory) otherwise.
template <typename Fn>
inline void dispatch_head_dim(int64_t d, Fn&& fn) {
  TORCH_CHECK(d >= 1 && d <= 128,
              "aggregated_attention: the CUDA kernels support head dims 1..128, got ", d);
  switch (d) {
    case 16: fn(HeadDim<16, true>{}); break;
    case 24: fn(HeadDim<24, true>{}); break;
    case 32: fn(HeadDim<32, true>{}); break;
    case 48: fn(HeadDim<48, true>{}); break;
    case 64: fn(HeadDim<64, true>{}); break;
    default: fn(HeadDim<128, false>{});
  }
}

// =============================================================================================
// The kernels and their launch sequence, written once for the GPU and the replay.
//
// A kernel is a descriptor: its block body, its shared memory, and the block size and minimum
// resident blocks per SM it is compiled for (__launch_bounds__(kThreads, kMinBlocks)). A
// `Launcher` runs one kernel over a grid:
//   template <typename Kernel> void launch(const Launch&, const typename Kernel::Params&) const;
// the CUDA one (cuda/aggregated_attention_kernels.cu) as kernel<Kernel><<<grid, threads>>>, the
// replay (cpu/aggregated_attention_cuda_replay.cpp) block by block with fibers. Which kernels
// run, in which order, with which grids and shared memory, is decided only here.
struct NoShared {};

// Query-side kernels of the small exact head dims (every released model has 24): 3 resident
// blocks of 128 threads, i.e. at most 168 registers. With one-argument launch bounds ptxas (CUDA
// 13.0, sm_90) also settles on 168 registers for the fp32 forward but spills 24 bytes to local
// memory; asked for 3 blocks it allocates the same 168 without spills. Wider heads keep no
// occupancy target (their rows need the registers).
template <typename HD>
constexpr int kQueryMinBlocks = HD::kExactDim && HD::kMax <= 24 ? 3 : 1;

template <typename scalar_t, typename HD>
struct ForwardKernel {
  using Params = ForwardParams<scalar_t>;
  using Shared = ForwardShared<scalar_t, HD>;
  static constexpr int kThreads = kQueryThreads;
  static constexpr int kMinBlocks = kQueryMinBlocks<HD>;
  static constexpr const char* kName = "forward";
  template <typename Ctx>
  C10_HOST_DEVICE static void body(const Ctx& ctx, const Params& p, Shared& sh) {
    forward_block<scalar_t, HD>(ctx, p, sh);
  }
};

template <typename scalar_t, typename HD>
struct BackwardQueryKernel {
  using Params = BackwardParams<scalar_t>;
  using Shared = ForwardShared<scalar_t, HD>;
  static constexpr int kThreads = kQueryThreads;
  static constexpr int kMinBlocks = kQueryMinBlocks<HD>;
  static constexpr const char* kName = "backward_query";
  template <typename Ctx>
  C10_HOST_DEVICE static void body(const Ctx& ctx, const Params& p, Shared& sh) {
    backward_query_block<scalar_t, HD>(ctx, p, sh);
  }
};

template <typename scalar_t, typename HD>
struct BackwardPoolKernel {
  using Params = BackwardParams<scalar_t>;
  using Shared = PoolGradShared<scalar_t, HD>;
  static constexpr int kThreads = kPoolThreads;
  static constexpr int kMinBlocks = 1;
  static constexpr const char* kName = "backward_pool";
  template <typename Ctx>
  C10_HOST_DEVICE static void body(const Ctx& ctx, const Params& p, Shared& sh) {
    backward_pool_block<scalar_t, HD>(ctx, p, sh);
  }
};

template <typename scalar_t>
struct WindowGradKernel {
  using Params = BackwardParams<scalar_t>;
  using Shared = NoShared;
  static constexpr int kThreads = kGatherThreads;
  static constexpr int kMinBlocks = 1;
  static constexpr const char* kName = "window_grad";
  template <typename Ctx>
  C10_HOST_DEVICE static void body(const Ctx& ctx, const Params& p, Shared&) {
    window_grad_block<scalar_t>(ctx, p);
  }
};

// What a GPU would refuse: a block size other than the kernel's, a grid beyond CUDA's limits,
// more static shared memory than 48 KiB (fp64 runs only in the replay and is not held to it).
template <typename Kernel, typename Launcher>
inline void launch_kernel_checked(const Launch& launch, const typename Kernel::Params& p,
                                  const Launcher& launcher) {
  TORCH_CHECK(launch.threads == Kernel::kThreads, "aggregated_attention: kernel ", Kernel::kName,
              " is compiled for ", Kernel::kThreads, " threads per block, launched with ",
              launch.threads);
  TORCH_CHECK(launch.grid[0] >= 1 && launch.grid[0] <= kMaxGridX && launch.grid[1] >= 1 &&
                  launch.grid[1] <= kMaxGridYZ && launch.grid[2] >= 1 &&
                  launch.grid[2] <= kMaxGridYZ,
              "aggregated_attention: kernel ", Kernel::kName, " grid (", launch.grid[0], ", ",
              launch.grid[1], ", ", launch.grid[2], ") is outside CUDA's limits");
  using acc_t = typename Kernel::Params::acc_t;
  static_assert(std::is_same_v<acc_t, double> || sizeof(typename Kernel::Shared) <= 48 * 1024,
                "a kernel's static shared memory must fit in 48 KiB");
  launcher.template launch<Kernel>(launch, p);
}

template <typename scalar_t, typename Launcher>
void run_forward_kernels(const ForwardParams<scalar_t>& p, const Launcher& launcher) {
  dispatch_head_dim(p.sizes.d, [&](auto head_dim) {
    using HD = decltype(head_dim);
    launch_kernel_checked<ForwardKernel<scalar_t, HD>>(query_launch(p.sizes), p, launcher);
  });
}

// Query side (dq, window ds, delta), then the pooled keys (needs delta; none when Np = 0), then
// the window keys / values (need the window ds).
template <typename scalar_t, typename Launcher>
void run_backward_kernels(const BackwardParams<scalar_t>& p, const Launch& pool_launch,
                          const Launcher& launcher) {
  dispatch_head_dim(p.sizes.d, [&](auto head_dim) {
    using HD = decltype(head_dim);
    launch_kernel_checked<BackwardQueryKernel<scalar_t, HD>>(query_launch(p.sizes), p, launcher);
    if (p.sizes.pool > 0)
      launch_kernel_checked<BackwardPoolKernel<scalar_t, HD>>(pool_launch, p, launcher);
  });
  launch_kernel_checked<WindowGradKernel<scalar_t>>(gather_launch(p.sizes), p, launcher);
}

}  // namespace transnext_mm
