// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Per-thread math of the aggregated-attention CUDA kernels (the formula is in
// common/aggregated_attention_geometry.h), written for host and device.
//
// The CUDA kernels run one thread per query (forward, dq) or per pooled key (dk_pool, dv_pool,
// dbias_pool) and stream pooled keys / queries (and the block's bias_pool entries) through
// shared-memory tiles. The kernel code is written once, in three headers:
//   aggregated_attention_thread.cuh  what one thread computes (this file: head-dim loops, packed
//                                    row loads, tile loads, the per-thread structs below);
//   aggregated_attention_launch.cuh  the launch plans (block sizes and grids; host code);
//   aggregated_attention_blocks.cuh  the block bodies (thread indexing, barriers, grid-stride
//                                    loops), the kernel descriptors and the launch sequence
//                                    (run_forward_kernels / run_backward_kernels).
// The CUDA build wraps the bodies in __global__ entry points
// (pytorch/cuda/aggregated_attention_kernels.cu); the CPU replay runs the very same bodies, block
// by block, with fibers (replay/aggregated_attention_cuda_replay.cpp), so the tests check the CUDA
// code, barriers and launch arithmetic included, on machines without a GPU.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/aggregated_attention_geometry.h"

namespace transnext_mm {

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

// a is read element by element (it may be a per-thread register row), b through
// for_each_value (a vector load when aligned; its address is taken, so it must be memory: a
// global or shared row, never a per-thread array).
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

// Cooperative tile load (run by every thread of a block): `rows` rows of d elements of src (row
// stride src_stride) into dst (row stride dst_stride), converted to the accumulation type.
template <typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void load_tile(acc_t* dst, int dst_stride, const scalar_t* src,
                                      int64_t src_stride, int rows, int d, int thread,
                                      int num_threads) {
  for (int e = thread; e < rows * d; e += num_threads)
    dst[(e / d) * dst_stride + e % d] = static_cast<acc_t>(src[(e / d) * src_stride + e % d]);
}

// The pooled-path bias as the kernels read it. Dense: (heads, N, Np). Table form (see
// PoolBiasTable in transnext_mm/ops/aggregated_attention/shapes.py): entry (i, p) of head h, for
// query i = (y, x) and pooled key p = (py, px) of the pool_h x pool_w grid, is the sum over taps k
// of row_weights[k, y, py] * table[h * table_size + index_rows[k, y, py] + index_cols[x, px]]
// (one tap of weight 1 without row_weights), so the (heads, N, Np) bias is never materialised.
template <typename scalar_t>
struct PoolBiasView {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dense;  // null in the table form
  const scalar_t* table;
  const int64_t *index_rows, *index_cols;
  const acc_t* row_weights;  // (taps, H, pool_h); null: one tap of weight 1
  int64_t table_size;
  int pool_h, pool_w, taps;

  // Entry (i, p) of head h. Grid coordinates in 32 bits (N and Np fit; 64-bit divisions are
  // calls on the GPU).
  C10_HOST_DEVICE acc_t at(int64_t h, int64_t i, int64_t p, const AttentionSizes& s) const {
    if (dense != nullptr) return static_cast<acc_t>(dense[(h * s.tokens + i) * s.pool + p]);
    const uint32_t query = static_cast<uint32_t>(i), key = static_cast<uint32_t>(p);
    const uint32_t width = static_cast<uint32_t>(s.width), pw = static_cast<uint32_t>(pool_w);
    const uint32_t y = query / width, x = query - y * width;
    const uint32_t py = key / pw, px = key - py * pw;
    const scalar_t* head = table + h * table_size;
    const int64_t col = index_cols[static_cast<int64_t>(x) * pool_w + px];
    // One loop for both: a single tap of weight 1 adds its entry to 0 exactly.
    const int64_t tap_stride = s.height * static_cast<int64_t>(pool_h);
    acc_t sum = 0;
    for (int64_t r = static_cast<int64_t>(y) * pool_h + py, k = 0; k < taps; ++k, r += tap_stride)
      sum += (row_weights == nullptr ? acc_t(1) : row_weights[r]) *
             static_cast<acc_t>(head[index_rows[r] + col]);
    return sum;
  }
};

// Cooperative load of a bias tile: the entries of head h for `rows` queries from first_query on
// and `count` <= kTile pooled keys from p0 on, into dst (row stride kStride). Thread t loads
// column t % kTile of every (threads / kTile)-th row: a warp reads whole row segments of a dense
// bias (coalesced). Needs threads % kTile == 0.
template <int kTile, int kStride, typename acc_t, typename scalar_t>
C10_HOST_DEVICE inline void load_bias_tile(acc_t* dst, const PoolBiasView<scalar_t>& bias,
                                           int64_t h, int64_t first_query, int64_t p0,
                                           const AttentionSizes& s, int rows, int count, int thread,
                                           int num_threads) {
  const int column = thread % kTile;
  if (column >= count) return;
  for (int r = thread / kTile; r < rows; r += num_threads / kTile)
    dst[r * kStride + column] = static_cast<acc_t>(bias.at(h, first_query + r, p0 + column, s));
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
    // Neighbours outside the image score -inf (never the max: the centre is always inside).
    // Their indices are recomputed in the second loop rather than kept (9 64-bit registers).
    acc_t scores[kWindowArea];
    TNX_UNROLL
    for (int j = 0; j < kWindowArea; ++j) {
      const int64_t nbr = window_neighbor(y, x, j, height, width);
      scores[j] = nbr >= 0 ? dot<HD>(q, k_bh.row(nbr), d) + static_cast<acc_t>(rpb_h[j])
                           : static_cast<acc_t>(-INFINITY);
    }
    running_max = scores[kCenter];
    TNX_UNROLL
    for (int j = 0; j < kWindowArea; ++j) running_max = tnx_max(running_max, scores[j]);
    running_sum = 0;
    fill<HD>(acc, acc_t(0), d);
    fill<HD>(extra, acc_t(0), d);
    TNX_UNROLL
    for (int j = 0; j < kWindowArea; ++j) {
      const int64_t nbr = window_neighbor(y, x, j, height, width);
      if (nbr < 0) continue;  // v is zero outside the image: no attention, no token term
      const acc_t p = tnx_exp(scores[j] - running_max);
      running_sum += p;
      axpy<HD>(acc, p, v_bh.row(nbr), d);
      axpy<HD>(extra, static_cast<acc_t>(tw_row[j]), v_bh.row(nbr), d);
    }
  }

  // Parts 1.. of a split query (see query_split): no window (part 0 has it), an empty softmax
  // state for the pooled keys of this part.
  C10_HOST_DEVICE void start_pooled(const scalar_t* q_row, int d) {
    load_row<HD>(q, q_row, d);
    running_max = -INFINITY;  // the first key's score replaces it; exp(-inf) = 0 scales
    running_sum = 0;
    fill<HD>(acc, acc_t(0), d);
  }

  // A tile of `count` pooled keys/values (row stride HD::kMax) and this query's biases for them
  // (its row of the block's bias tile); keys part, part + split, ... of it (all with split = 1).
  // Rescales only when a key raises the running max, which becomes rare after the first keys;
  // no per-tile score array, so the tile loop need not be unrolled (registers, compile time).
  C10_HOST_DEVICE void pool_tile(const acc_t* kp_tile, const acc_t* vp_tile, int count,
                                 const acc_t* bias, int part, int split, int d) {
    for (int t = part; t < count; t += split) {
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

  // Split queries: this part's state (max, sum, accumulator) into / merged from a shared-memory
  // row, element by element (registers rows must not have their address taken). A part that saw
  // no key has max -inf and contributes exp(-inf) = 0; part 0's max is finite (the window's
  // centre is always there).
  C10_HOST_DEVICE void store_state(acc_t* dst, int d) const {
    dst[0] = running_max;
    dst[1] = running_sum;
    for_each_dim<HD>(d, [&](int c) { dst[2 + c] = acc[c]; });
  }

  C10_HOST_DEVICE void merge_state(const acc_t* src, int d) {
    const acc_t other_max = src[0];
    const acc_t new_max = tnx_max(running_max, other_max);
    const acc_t mine = tnx_exp(running_max - new_max), other = tnx_exp(other_max - new_max);
    running_sum = running_sum * mine + src[1] * other;
    for_each_dim<HD>(d, [&](int c) { acc[c] = acc[c] * mine + src[2 + c] * other; });
    running_max = new_max;
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
// Backward, pooled-key side: one thread per (pooled key p, batch element) of one head, streaming
// a chunk of queries through shared-memory tiles. Its ds values (d bias_pool[h, i, p] of its
// batch element) go to its lane's ds tile; the block sums them over the batch (see
// backward_pool_block), so no atomics are needed.
template <typename scalar_t, typename HD>
struct BackwardPoolThread {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t kp[HD::kMax], vp[HD::kMax], dkp[HD::kMax], dvp[HD::kMax];

  C10_HOST_DEVICE void begin(const scalar_t* kp_row, const scalar_t* vp_row, int d) {
    load_row<HD>(kp, kp_row, d);
    load_row<HD>(vp, vp_row, d);
    fill<HD>(dkp, acc_t(0), d);
    fill<HD>(dvp, acc_t(0), d);
  }

  // q_tile, g_tile, lse_tile, delta_tile: `count` queries of this thread's batch element (row
  // stride HD::kMax); bias: this key's column of the block's bias tile (stride `stride`); ds_out:
  // this key's column of the lane's ds tile (same stride), null when bias_pool needs no gradient.
  C10_HOST_DEVICE void query_tile(const acc_t* q_tile, const acc_t* g_tile, const acc_t* lse_tile,
                                  const acc_t* delta_tile, int count, const acc_t* bias,
                                  acc_t* ds_out, int stride, int d) {
    for (int t = 0; t < count; ++t) {
      const acc_t* qt = q_tile + t * HD::kMax;
      const acc_t* gt = g_tile + t * HD::kMax;
      // Every row is read element by element: the per-thread rows (kp, vp, dkp, dvp) must not
      // have their address taken (they would live in local memory), and the shared q / g rows
      // so read let the compiler interleave their loads with the arithmetic (with vector reads
      // of them ptxas spilled at 168 registers). One pass over g_t gives both vp . g_t and
      // dvp += p g_t. Products and summation order are those of dot() / axpy().
      acc_t key_dot_q = 0, grad_dot_v = 0;
      for_each_dim<HD>(d, [&](int c) { key_dot_q += kp[c] * qt[c]; });
      const acc_t p = tnx_exp(key_dot_q + bias[t * stride] - lse_tile[t]);
      for_each_dim<HD>(d, [&](int c) {
        grad_dot_v += vp[c] * gt[c];
        dvp[c] += p * gt[c];
      });
      const acc_t ds = p * (grad_dot_v - delta_tile[t]);
      for_each_dim<HD>(d, [&](int c) { dkp[c] += ds * qt[c]; });
      if (ds_out != nullptr) ds_out[t * stride] = ds;
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

}  // namespace transnext_mm
