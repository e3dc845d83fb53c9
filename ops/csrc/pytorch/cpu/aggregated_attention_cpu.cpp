// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CPU kernels of the aggregated-attention op. Work is split into chunks of kRows queries of one
// (batch, head). fp32 with head dim 8/16/24/32 (TransNeXt's is 24): tiles of 4 queries whose
// pooled scores, softmax and pooled values stay in registers / L1 (see "forward, fp32" and
// "backward, fp32" below). Otherwise, per chunk, the pooled scores q @ k_pool^T come from one BLAS
// call into a small buffer that stays in cache, the window scores, bias, softmax and token-weight
// aggregation are fused in vectorisable row loops, and a second BLAS call applies the pooled
// values. The B x heads x N x (9 + Np) score tensor is never materialised; backward recomputes the
// chunk's scores from the saved log-sum-exp. The row loops are compiled for AVX-512, AVX2 and
// baseline x86-64 and picked at load time (GCC target_clones), so the build stays portable.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/aggregated_attention_geometry.h"
#include "pytorch/aggregated_attention.h"
#include "pytorch/cpu/vector_math.h"

namespace transnext_mm {
namespace {

constexpr int64_t kRows = 128;  // queries per chunk: the (kRows, Np) score buffers fit in L2
// Backward: chunks of one head are grouped (at most kMaxGroups groups, independent of the thread
// count, so results are deterministic); each group owns a partial sum of d k_pool / d v_pool.
constexpr int64_t kMaxGroups = 16;
// In the table form each group also owns a partial table gradient, so a large table (one with a
// resized axis folded in) gets fewer groups: their partials hold about 2^24 entries at most.
constexpr int64_t kMaxPartialEntries = int64_t(1) << 24;

// Row products of length d. D > 0: fp32 rows of the compile-time length D (a multiple of 8),
// whole 8-float vectors; D = 0: any d (a vectorised loop whose remainder and reduction cost
// several times the arithmetic at TransNeXt's head dim).
template <int D = 0, typename T>
TNX_ALWAYS_INLINE T dot_row(const T* a, const T* b, int64_t d) {
  if constexpr (D > 0) {
    static_assert(std::is_same_v<T, float> && D % 8 == 0);
    v8f acc = load8(a) * load8(b);
    for (int c = 8; c < D; c += 8) acc += load8(a + c) * load8(b + c);
    return hsum8(acc);
  } else {
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < d; ++c) sum += a[c] * b[c];
    return sum;
  }
}

template <typename T>
TNX_ALWAYS_INLINE void axpy_row(T* y, T alpha, const T* x, int64_t d) {
#pragma omp simd
  for (int64_t c = 0; c < d; ++c) y[c] += alpha * x[c];
}

// out = sum over the window's j of weights[j] * x.row(rows[j]), rows[j] < 0 skipped (D as for
// dot_row: the sum stays in registers).
template <int D = 0, typename T>
TNX_ALWAYS_INLINE void window_sum(T* out, const T* weights, const int64_t* rows, Rows<const T> x,
                                  int64_t d) {
  if constexpr (D > 0) {
    v8f acc[D / 8] = {};
    for (int j = 0; j < kWindowArea; ++j) {
      if (rows[j] < 0) continue;
      const float* x_row = x.row(rows[j]);
      for (int b = 0; b < D / 8; ++b) acc[b] += weights[j] * load8(x_row + 8 * b);
    }
    for (int b = 0; b < D / 8; ++b) store8(out + 8 * b, acc[b]);
  } else {
    std::fill(out, out + d, T(0));
    for (int j = 0; j < kWindowArea; ++j)
      if (rows[j] >= 0) axpy_row(out, weights[j], x.row(rows[j]), d);
  }
}

// Matrix views of raw buffers for at::mm_out / addmm_ (MKL / oneDNN underneath).
template <typename T>
at::Tensor matrix(const T* data, int64_t rows, int64_t cols, int64_t row_stride = -1) {
  return at::from_blob(const_cast<T*>(data), {rows, cols}, {row_stride < 0 ? cols : row_stride, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

struct Shape {
  int64_t batch, heads, tokens, pool, d, height, width;
};

Shape shape_of(const at::Tensor& q, const at::Tensor& k_pool, int64_t height, int64_t width) {
  return {q.size(0), q.size(1), q.size(2), k_pool.size(2), q.size(3), height, width};
}

// The pooled-path bias of all heads, in one of two forms:
// - materialised: dense (heads, N, Np);
// - the table form (e.g. a function of the query-key offset): entry (i, p) of head h, with
//   i = (y, x) and p = (py, px) on the Hk x Wk pooled grid, is the sum over taps k of
//   row_weights[k, y, py] * table[h * table_size + index_rows[k, y, py] + index_cols[x, px]]
//   (one tap of weight 1 when row_weights is null; index_rows / row_weights (taps, H, Hk)).
//   Forward gathers each query's row from the table; backward accumulates the table's gradient
//   directly.
template <typename T>
struct PoolBias {
  const T* dense;  // nullptr in the table form
  const T* table;
  const int64_t *index_rows, *index_cols;
  const T* row_weights;  // nullptr: one tap of weight 1
  int64_t table_size, pool_h, pool_w, taps, tap_stride;
  bool cols_unit_step;   // one tap, index_cols[x + 1, px] = index_cols[x, px] + 1 (gather_bias_8)
  bool cols_contiguous;  // index_cols[x, px + 1] = index_cols[x, px] + 1 (a folded axis)
};

// One chunk of rows [i0, i0 + rows) of one (batch, head): that (batch, head)'s rows, the head's
// bias / window biases and the (batch, head)'s token weights. In the table form `bias` is null,
// `table` the head's table and `bias_buf` a per-thread (8, Np) buffer for gathered rows.
template <typename T>
struct Chunk {
  Rows<const T> q, k, v, grad;
  const T *bias, *rpb, *token_weight;
  const T* table;
  const int64_t *index_rows, *index_cols;
  const T* row_weights;
  int64_t pool_h, pool_w, taps, tap_stride;
  bool cols_unit_step, cols_contiguous;
  T* bias_buf;
  int64_t i0, rows, tokens, pool, d, height, width;
};

// The weight of tap k of pooled row py in a query row's weights (1 without row_weights).
template <typename T>
TNX_ALWAYS_INLINE T tap_weight(const Chunk<T>& c, const T* weights, int64_t k, int64_t py) {
  return weights == nullptr ? T(1) : weights[k * c.tap_stride + py];
}

// The pooled bias row of query i at (y, x): the dense row, or gathered from the table into
// c.bias_buf (the taps' weighted sum; a contiguous run of entries per tap and pooled row where
// the columns are contiguous).
template <typename T>
TNX_ALWAYS_INLINE const T* bias_row(const Chunk<T>& c, int64_t i, int64_t y, int64_t x) {
  if (c.table == nullptr) return c.bias + i * c.pool;
  const int64_t* rows = c.index_rows + y * c.pool_h;
  const int64_t* cols = c.index_cols + x * c.pool_w;
  const T* weights = c.row_weights == nullptr ? nullptr : c.row_weights + y * c.pool_h;
  T* out = c.bias_buf;
  for (int64_t py = 0; py < c.pool_h; ++py, out += c.pool_w) {
    for (int64_t k = 0; k < c.taps; ++k) {
      const T w = tap_weight(c, weights, k, py);
      const T* __restrict__ table_row = c.table + rows[k * c.tap_stride + py];
      T* __restrict__ o = out;
      if (c.cols_contiguous) {
        const T* __restrict__ src = table_row + cols[0];
        if (k == 0) {
#pragma omp simd
          for (int64_t px = 0; px < c.pool_w; ++px) o[px] = w * src[px];
        } else {
#pragma omp simd
          for (int64_t px = 0; px < c.pool_w; ++px) o[px] += w * src[px];
        }
      } else if (k == 0) {
        for (int64_t px = 0; px < c.pool_w; ++px) o[px] = w * table_row[cols[px]];
      } else {
        for (int64_t px = 0; px < c.pool_w; ++px) o[px] += w * table_row[cols[px]];
      }
    }
  }
  return c.bias_buf;
}

// m[k] = row k of an 8 x 8 block -> m[k] = column k.
TNX_ALWAYS_INLINE void transpose8x8(v8f (&m)[8]) {
  typedef int v8i __attribute__((vector_size(32)));
  v8f a[8], b[8];
  for (int k = 0; k < 8; k += 2) {  // pairs of rows interleaved
    a[k] = __builtin_shuffle(m[k], m[k + 1], v8i{0, 8, 1, 9, 2, 10, 3, 11});
    a[k + 1] = __builtin_shuffle(m[k], m[k + 1], v8i{4, 12, 5, 13, 6, 14, 7, 15});
  }
  for (int k = 0; k < 8; k += 4) {  // two columns of four rows per vector
    b[k] = __builtin_shuffle(a[k], a[k + 2], v8i{0, 1, 8, 9, 2, 3, 10, 11});
    b[k + 1] = __builtin_shuffle(a[k], a[k + 2], v8i{4, 5, 12, 13, 6, 7, 14, 15});
    b[k + 2] = __builtin_shuffle(a[k + 1], a[k + 3], v8i{0, 1, 8, 9, 2, 3, 10, 11});
    b[k + 3] = __builtin_shuffle(a[k + 1], a[k + 3], v8i{4, 5, 12, 13, 6, 7, 14, 15});
  }
  for (int k = 0; k < 4; ++k) {  // columns 2k and 2k + 1: rows 0-3 from b[k], 4-7 from b[k + 4]
    m[2 * k] = __builtin_shuffle(b[k], b[k + 4], v8i{0, 1, 2, 3, 8, 9, 10, 11});
    m[2 * k + 1] = __builtin_shuffle(b[k], b[k + 4], v8i{4, 5, 6, 7, 12, 13, 14, 15});
  }
}

// out[j] = a . x.row(rows[j]) for the window's 9 neighbours j (0 where rows[j] < 0), fp32 rows of
// D floats (a multiple of 8): the products of neighbours 0-7 are summed across lanes together,
// with one 8 x 8 transpose instead of 8 horizontal sums.
template <int D>
TNX_ALWAYS_INLINE void window_dots(const float* a, Rows<const float> x, const int64_t* rows,
                                   float* out) {
  static_assert(D % 8 == 0 && kWindowArea == 9);
  v8f a_vec[D / 8];
  for (int b = 0; b < D / 8; ++b) a_vec[b] = load8(a + 8 * b);
  v8f m[8];
  for (int j = 0; j < 8; ++j) {
    m[j] = v8f{};
    if (rows[j] < 0) continue;
    const float* x_row = x.row(rows[j]);
    for (int b = 0; b < D / 8; ++b) m[j] += a_vec[b] * load8(x_row + 8 * b);
  }
  transpose8x8(m);
  store8(out, ((m[0] + m[1]) + (m[2] + m[3])) + ((m[4] + m[5]) + (m[6] + m[7])));
  out[8] = rows[8] < 0 ? 0.f : dot_row<D>(a, x.row(rows[8]), D);
}

// Table form, fp32, column indices stepping by one (c.cols_unit_step, as log-CPB's offsets): the
// pooled bias rows of the 8 queries (y, x0) .. (y, x0 + 7) into block (8 x Np). For one pooled
// key the 8 queries' entries are 8 consecutive table entries: one vector load per key and an 8 x 8
// transpose in registers instead of 64 scalar gathers (and their index loads).
TNX_ALWAYS_INLINE void gather_bias_8(const Chunk<float>& c, int64_t y, int64_t x0, float* block) {
  const int64_t* rows = c.index_rows + y * c.pool_h;
  const int64_t* cols = c.index_cols + x0 * c.pool_w;  // query (y, x0 + t): cols[px] + t
  for (int64_t py = 0; py < c.pool_h; ++py) {
    const float* table_row = c.table + rows[py];
    float* out = block + py * c.pool_w;
    int64_t px = 0;
    for (; px + 8 <= c.pool_w; px += 8) {
      v8f m[8];
      for (int k = 0; k < 8; ++k) m[k] = load8(table_row + cols[px + k]);
      transpose8x8(m);
      for (int t = 0; t < 8; ++t) store8(out + t * c.pool + px, m[t]);
    }
    for (; px < c.pool_w; ++px)
      for (int t = 0; t < 8; ++t) out[t * c.pool + px] = table_row[cols[px] + t];
  }
}

// The pooled bias rows of a chunk's queries, asked for in increasing order: bias_row, except
// that in the fp32 table form with unit-step column indices, where 8 queries of one image row
// remain in the chunk, their 8 rows are gathered at once (gather_bias_8) into c.bias_buf
// (8 x Np) and handed out one by one.
template <typename T>
struct BiasRows {
  const Chunk<T>& c;
  int64_t block_first = -1;  // first query of the rows in c.bias_buf, -1: none

  TNX_ALWAYS_INLINE const T* row(int64_t i, int64_t y, int64_t x) {
    if constexpr (std::is_same_v<T, float>) {
      if (c.table != nullptr && c.cols_unit_step) {
        if (block_first >= 0 && i - block_first < 8) return c.bias_buf + (i - block_first) * c.pool;
        if (x + 8 <= c.width && i + 8 <= c.i0 + c.rows) {
          gather_bias_8(c, y, x, c.bias_buf);
          block_first = i;
          return c.bias_buf;
        }
      }
    }
    block_first = -1;  // bias_row overwrites the first row of c.bias_buf
    return bias_row(c, i, y, x);
  }
};

// Adds the pooled score gradient row `ds` (Np,) of query (y, x) to the table gradient `dtable`
// of its head, weighted per tap. The entries of one tap and row are distinct (distinct pooled
// bins have distinct offsets); the taps are added one after the other.
template <typename T>
TNX_ALWAYS_INLINE void add_table_grad(const Chunk<T>& c, int64_t y, int64_t x, const T* ds,
                                      T* dtable) {
  const int64_t* rows = c.index_rows + y * c.pool_h;
  const int64_t* cols = c.index_cols + x * c.pool_w;
  const T* weights = c.row_weights == nullptr ? nullptr : c.row_weights + y * c.pool_h;
  for (int64_t py = 0; py < c.pool_h; ++py, ds += c.pool_w) {
    for (int64_t k = 0; k < c.taps; ++k) {
      const T w = tap_weight(c, weights, k, py);
      T* table_row = dtable + rows[k * c.tap_stride + py];
      if (c.cols_contiguous) {
        T* __restrict__ dst = table_row + cols[0];
        const T* __restrict__ src = ds;
#pragma omp simd
        for (int64_t px = 0; px < c.pool_w; ++px) dst[px] += w * src[px];
      } else {
        for (int64_t px = 0; px < c.pool_w; ++px) table_row[cols[px]] += w * ds[px];
      }
    }
  }
}

// The table-gradient counterpart of gather_bias_8: adds the ds rows of the 8 queries (y, x0) ..
// (y, x0 + 7) (row stride `stride`) to dtable. Transposed into `scratch` (Np x 8) first, so that
// each pooled key's 8 values are one vector add onto 8 consecutive entries; the adds go pooled row
// by pooled row for each pooled column, so that consecutive adds touch different table rows (the
// keys of one pooled row may step by less than 8 entries, and overlapping adds in a row would
// stall on their stores).
TNX_ALWAYS_INLINE void add_table_grad_8(const Chunk<float>& c, int64_t y, int64_t x0,
                                        const float* ds, int64_t stride, float* dtable,
                                        float* scratch) {
  int64_t p = 0;
  for (; p + 8 <= c.pool; p += 8) {
    v8f m[8];
    for (int t = 0; t < 8; ++t) m[t] = load8(ds + t * stride + p);
    transpose8x8(m);
    for (int k = 0; k < 8; ++k) store8(scratch + (p + k) * 8, m[k]);
  }
  for (; p < c.pool; ++p)
    for (int t = 0; t < 8; ++t) scratch[p * 8 + t] = ds[t * stride + p];
  const int64_t* rows = c.index_rows + y * c.pool_h;
  const int64_t* cols = c.index_cols + x0 * c.pool_w;
  for (int64_t px = 0; px < c.pool_w; ++px)
    for (int64_t py = 0; py < c.pool_h; ++py) {
      float* dst = dtable + rows[py] + cols[px];
      store8(dst, load8(dst) + load8(scratch + (py * c.pool_w + px) * 8));
    }
}

// ---------------------------------------------------------------------------------- forward
// Softmax of one query over its 9 window scores `local` (biases included; entries of out-of-image
// neighbours, nbr[j] < 0, are ignored) and its pooled scores `srow`, to which the pooled bias row
// `brow` is added first. On exit both hold unnormalised probabilities (0 outside the image),
// `row_max` the shift; returns the denominator.
template <typename T>
TNX_ALWAYS_INLINE T softmax_row(T* __restrict__ srow, const T* __restrict__ brow, int64_t Np,
                                T* __restrict__ local, const int64_t* __restrict__ nbr,
                                T& row_max) {
  row_max = local[kCenter];
  for (int j = 0; j < kWindowArea; ++j)
    if (nbr[j] >= 0) row_max = std::max(row_max, local[j]);
  T m = row_max;
#pragma omp simd reduction(max : m)
  for (int64_t p = 0; p < Np; ++p) {
    const T s = srow[p] + brow[p];
    srow[p] = s;
    m = s > m ? s : m;
  }
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t p = 0; p < Np; ++p) {
    srow[p] = exp_nonpositive(srow[p] - m);
    sum += srow[p];
  }
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < kWindowArea; ++j) {
    local[j] = nbr[j] >= 0 ? exp_nonpositive(local[j] - m) : T(0);
    sum += local[j];
  }
  row_max = m;
  return sum;
}

// scores: (rows, Np) = q @ k_pool^T on entry, unnormalised probabilities on exit. window:
// (rows, d) window output; inv_sum: 1 / softmax denominators; lse: (rows,) log-sum-exp.
template <typename T>
TNX_ALWAYS_INLINE void forward_rows_impl(const Chunk<T>& c, T* scores, T* window, T* inv_sum,
                                         T* lse) {
  const int64_t Np = c.pool, d = c.d;
  BiasRows<T> bias_rows{c};
  for (int64_t r = 0; r < c.rows; ++r) {
    const int64_t i = c.i0 + r, y = i / c.width, x = i % c.width;
    T* __restrict__ srow = scores + r * Np;
    const T* __restrict__ brow = bias_rows.row(i, y, x);
    const T* q_i = c.q.row(i);
    T local[kWindowArea];
    int64_t nbr[kWindowArea];
    for (int j = 0; j < kWindowArea; ++j) {
      nbr[j] = window_neighbor(y, x, j, c.height, c.width);
      local[j] = nbr[j] >= 0 ? dot_row(q_i, c.k.row(nbr[j]), d) + c.rpb[j] : T(0);
    }
    T row_max;
    const T sum = softmax_row(srow, brow, Np, local, nbr, row_max);
    const T inv = T(1) / sum;
    inv_sum[r] = inv;
    lse[r] = row_max + std::log(sum);
    const T* tw = c.token_weight + i * kWindowArea;
    T weights[kWindowArea];
    for (int j = 0; j < kWindowArea; ++j) weights[j] = local[j] * inv + tw[j];
    window_sum(window + r * d, weights, nbr, c.v, d);
  }
}

// out rows (stride out_stride) = pooled * inv_sum + window, row by row.
template <typename T>
TNX_ALWAYS_INLINE void combine_rows_impl(T* out, int64_t out_stride, const T* pooled,
                                         const T* inv_sum, const T* window, int64_t rows,
                                         int64_t d) {
  for (int64_t r = 0; r < rows; ++r) {
#pragma omp simd
    for (int64_t e = 0; e < d; ++e)
      out[r * out_stride + e] = pooled[r * d + e] * inv_sum[r] + window[r * d + e];
  }
}

// --------------------------------------------------------------------------------- backward
// probs: (rows, Np) = q @ k_pool^T on entry, probabilities on exit; dprobs: grad @ v_pool^T on
// entry, d scores (ds) on exit; both with row stride `stride` (>= Np). Writes the window's ds /
// weights / d token_weight, accumulates d bias_pool (dense: over the batch, the first batch element
// writes; table form: added to the head's table gradient `dbias`) and the window part of dq.
template <int D = 0, typename T>
TNX_ALWAYS_INLINE void backward_rows_impl(const Chunk<T>& c, const T* lse, T* probs, T* dprobs,
                                          int64_t stride, T* ds_local, T* weight_local,
                                          T* dtoken_weight, T* dbias, bool first_batch,
                                          T* dq_window) {
  const int64_t Np = c.pool, d = c.d;
  BiasRows<T> bias_rows{c};
  for (int64_t r = 0; r < c.rows; ++r) {
    const int64_t i = c.i0 + r, y = i / c.width, x = i % c.width;
    T* __restrict__ prow = probs + r * stride;
    T* __restrict__ dprow = dprobs + r * stride;
    const T* __restrict__ brow = bias_rows.row(i, y, x);
    const T *q_i = c.q.row(i), *g_i = c.grad.row(i);
    const T lse_i = lse[i];
    T delta = 0;
#pragma omp simd reduction(+ : delta)
    for (int64_t p = 0; p < Np; ++p) {
      prow[p] = exp_nonpositive(prow[p] + brow[p] - lse_i);
      delta += prow[p] * dprow[p];
    }
    T attn[kWindowArea], grad_dot_v[kWindowArea];
    int64_t nbr[kWindowArea];
    for (int j = 0; j < kWindowArea; ++j) nbr[j] = window_neighbor(y, x, j, c.height, c.width);
    if constexpr (D > 0) {
      window_dots<D>(q_i, c.k, nbr, attn);
      window_dots<D>(g_i, c.v, nbr, grad_dot_v);
    } else {
      for (int j = 0; j < kWindowArea; ++j) {
        attn[j] = nbr[j] < 0 ? T(0) : dot_row(q_i, c.k.row(nbr[j]), d);
        grad_dot_v[j] = nbr[j] < 0 ? T(0) : dot_row(g_i, c.v.row(nbr[j]), d);
      }
    }
    for (int j = 0; j < kWindowArea; ++j) attn[j] += c.rpb[j] - lse_i;
    // The nine exponentials in one vector loop (outside the image: probability 0).
#pragma omp simd reduction(+ : delta)
    for (int j = 0; j < kWindowArea; ++j) {
      attn[j] = nbr[j] >= 0 ? exp_nonpositive(attn[j]) : T(0);
      delta += attn[j] * grad_dot_v[j];
    }
#pragma omp simd
    for (int64_t p = 0; p < Np; ++p) dprow[p] = prow[p] * (dprow[p] - delta);
    if (dbias != nullptr && c.table != nullptr) {
      bool in_block = false;
      if constexpr (std::is_same_v<T, float>) {
        // Rows of a gathered 8-query block add theirs at the block's last row; its bias rows in
        // c.bias_buf are used up by then, so that buffer holds the transposed ds.
        in_block = bias_rows.block_first >= 0;
        if (in_block && i == bias_rows.block_first + 7)
          add_table_grad_8(c, y, x - 7, dprobs + (r - 7) * stride, stride, dbias, c.bias_buf);
      }
      if (!in_block) add_table_grad(c, y, x, dprow, dbias);
    } else if (dbias != nullptr) {
      T* dbrow = dbias + i * Np;
      if (first_batch) {
        std::copy(dprow, dprow + Np, dbrow);
      } else {
#pragma omp simd
        for (int64_t p = 0; p < Np; ++p) dbrow[p] += dprow[p];
      }
    }
    const T* tw = c.token_weight + i * kWindowArea;
    T ds[kWindowArea];
    for (int j = 0; j < kWindowArea; ++j) {
      ds[j] = attn[j] * (grad_dot_v[j] - delta);
      ds_local[i * kWindowArea + j] = ds[j];
      weight_local[i * kWindowArea + j] = nbr[j] >= 0 ? attn[j] + tw[j] : T(0);
      dtoken_weight[i * kWindowArea + j] = grad_dot_v[j];
    }
    window_sum<D>(dq_window + r * d, ds, nbr, c.k, d);
  }
}

// d k and d v of the window path for key rows [n0, n1) of one (batch, head), gathered from the
// queries that saw them (no scatter, no atomics). D as for dot_row.
template <int D = 0, typename T>
TNX_ALWAYS_INLINE void window_grad_rows_impl(const Chunk<T>& c, const T* ds_local,
                                             const T* weight_local, int64_t n0, int64_t n1,
                                             Rows<T> dk, Rows<T> dv) {
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t y = n / c.width, x = n % c.width;
    int64_t queries[kWindowArea];  // the query that sees key n as its neighbour j
    T ds[kWindowArea], weights[kWindowArea];
    for (int j = 0; j < kWindowArea; ++j) {
      const int64_t i = window_neighbor(y, x, kWindowArea - 1 - j, c.height, c.width);
      queries[j] = i;
      ds[j] = i < 0 ? T(0) : ds_local[i * kWindowArea + j];
      weights[j] = i < 0 ? T(0) : weight_local[i * kWindowArea + j];
    }
    window_sum<D>(dk.row(n), ds, queries, c.q, c.d);
    window_sum<D>(dv.row(n), weights, queries, c.grad, c.d);
  }
}

// Multi-versioned entry points (one per dtype; templates cannot be cloned).
#define TNX_DEFINE_ROW_KERNELS(T)                                                                 \
  TNX_CPU_CLONES void forward_rows(const Chunk<T>& c, T* scores, T* window, T* inv_sum, T* lse) { \
    forward_rows_impl(c, scores, window, inv_sum, lse);                                           \
  }                                                                                               \
  TNX_CPU_CLONES void combine_rows(T* out, int64_t out_stride, const T* pooled, const T* inv_sum, \
                                   const T* window, int64_t rows, int64_t d) {                    \
    combine_rows_impl(out, out_stride, pooled, inv_sum, window, rows, d);                         \
  }                                                                                               \
  TNX_CPU_CLONES void backward_rows(const Chunk<T>& c, const T* lse, T* probs, T* dprobs,         \
                                    T* ds_local, T* weight_local, T* dtoken_weight, T* dbias,     \
                                    bool first_batch, T* dq_window) {                             \
    backward_rows_impl(c, lse, probs, dprobs, c.pool, ds_local, weight_local, dtoken_weight,      \
                       dbias, first_batch, dq_window);                                            \
  }                                                                                               \
  TNX_CPU_CLONES void window_grad_rows(const Chunk<T>& c, const T* ds_local,                      \
                                       const T* weight_local, int64_t n0, int64_t n1, Rows<T> dk, \
                                       Rows<T> dv) {                                              \
    window_grad_rows_impl(c, ds_local, weight_local, n0, n1, dk, dv);                             \
  }
TNX_DEFINE_ROW_KERNELS(float)
TNX_DEFINE_ROW_KERNELS(double)
#undef TNX_DEFINE_ROW_KERNELS

// ------------------------------------------------------- forward, fp32, head dim 8/16/24/32
// The TransNeXt head dim (24) is small, so BLAS runs the chunk's two products far below peak
// (K = 24 for the scores, N = 24 for the pooled values) and pays its call overhead 2x per chunk.
// This path keeps everything of a tile of kTile queries in registers / L1 instead: the pooled
// scores come from register-blocked FMAs against k_pool^T, the softmax runs on the tile's score
// rows, and the pooled values are accumulated in registers (8-float vectors, see v8f).
constexpr int64_t kTile = 4;  // queries per register tile
// Pooled keys per register tile: 3 vectors. With kTile queries that is 12 accumulators, the 3
// vectors of k_pool^T and the broadcast query entry: the 16 vector registers of AVX2. A tile of 4
// vectors (32 keys) spilt two accumulators to the stack on AVX2 and folded every k_pool^T load
// into its FMA (4x the loads), so the loop waited on loads, not on FMAs.
constexpr int64_t kScoreVectors = 3;
constexpr int64_t kPadKeys = 8;  // np_pad: Np rounded up to whole vectors

// scores (R x 8V) at columns [p0, p0 + 8V) = q rows (R x D) @ kpT (D x np_pad).
template <int D, int R, int V>
TNX_ALWAYS_INLINE void score_block(const float* const* q, const float* kpT, int64_t np_pad,
                                   int64_t p0, float* scores) {
  v8f acc[R][V] = {};
  for (int c = 0; c < D; ++c) {
    const float* k_row = kpT + c * np_pad + p0;
    v8f k[V];
    for (int b = 0; b < V; ++b) k[b] = load8(k_row + 8 * b);
    for (int r = 0; r < R; ++r) {
      const float qc = q[r][c];
      for (int b = 0; b < V; ++b) acc[r][b] += qc * k[b];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < V; ++b) store8(scores + r * np_pad + p0 + 8 * b, acc[r][b]);
}

// scores (R x np_pad) = q rows (R x D) @ kpT (D x np_pad); np_pad is a multiple of kPadKeys and
// kpT's padding columns are zero. (Adding the bias here, while the block is in registers, was
// measured slower: the bias rows stream from memory and stall the FMA loop.)
template <int D, int R>
TNX_ALWAYS_INLINE void tile_scores(const float* const* q, const float* kpT, int64_t np_pad,
                                   float* scores) {
  static_assert(kScoreVectors == 3, "the tails below are blocks of 1 and 2 vectors");
  constexpr int64_t block = 8 * kScoreVectors;
  int64_t p0 = 0;
  for (; p0 + block <= np_pad; p0 += block)
    score_block<D, R, kScoreVectors>(q, kpT, np_pad, p0, scores);
  if (np_pad - p0 == 16)
    score_block<D, R, 2>(q, kpT, np_pad, p0, scores);
  else if (np_pad - p0 == 8)
    score_block<D, R, 1>(q, kpT, np_pad, p0, scores);
}

// acc (R x D) = probs rows (R x Np, row stride np_pad) @ v_pool (Np x D).
template <int D, int R>
TNX_ALWAYS_INLINE void tile_pooled_values(const float* probs, int64_t np_pad, const float* vp,
                                          int64_t Np, v8f (*acc)[D / 8]) {
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < D / 8; ++b) acc[r][b] = v8f{};
  for (int64_t p = 0; p < Np; ++p) {
    v8f v_row[D / 8];
    for (int b = 0; b < D / 8; ++b) v_row[b] = load8(vp + p * D + 8 * b);
    for (int r = 0; r < R; ++r) {
      const float w = probs[r * np_pad + p];
      for (int b = 0; b < D / 8; ++b) acc[r][b] += w * v_row[b];
    }
  }
}

// R queries starting at i0 (all in one (batch, head)): scores, softmax, output rows, lse.
template <int D, int R>
TNX_ALWAYS_INLINE void forward_tile(const Chunk<float>& c, BiasRows<float>& bias_rows, int64_t i0,
                                    const float* kpT, int64_t np_pad, const float* vp,
                                    float* scores, Rows<float> out, float* lse) {
  const int64_t Np = c.pool;
  const float* q[R];
  for (int r = 0; r < R; ++r) q[r] = c.q.row(i0 + r);
  tile_scores<D, R>(q, kpT, np_pad, scores);
  float local[R][kWindowArea], inv_sum[R];
  int64_t nbr[R][kWindowArea];
  for (int r = 0; r < R; ++r) {
    const int64_t i = i0 + r, y = i / c.width, x = i % c.width;
    float* __restrict__ srow = scores + r * np_pad;
    const float* __restrict__ brow = bias_rows.row(i, y, x);
    for (int j = 0; j < kWindowArea; ++j) {
      nbr[r][j] = window_neighbor(y, x, j, c.height, c.width);
      local[r][j] = nbr[r][j] >= 0 ? dot_row<D>(q[r], c.k.row(nbr[r][j]), D) + c.rpb[j] : 0.f;
    }
    float row_max;
    const float sum = softmax_row(srow, brow, Np, local[r], nbr[r], row_max);
    inv_sum[r] = 1.f / sum;
    lse[i] = row_max + std::log(sum);
  }
  v8f acc[R][D / 8];
  tile_pooled_values<D, R>(scores, np_pad, vp, Np, acc);
  for (int r = 0; r < R; ++r) {
    const int64_t i = i0 + r;
    const float* tw = c.token_weight + i * kWindowArea;
    for (int b = 0; b < D / 8; ++b) acc[r][b] *= inv_sum[r];
    for (int j = 0; j < kWindowArea; ++j) {
      if (nbr[r][j] < 0) continue;
      const float w = local[r][j] * inv_sum[r] + tw[j];
      const float* v_row = c.v.row(nbr[r][j]);
      for (int b = 0; b < D / 8; ++b) acc[r][b] += w * load8(v_row + 8 * b);
    }
    float* out_row = out.row(i);
    for (int b = 0; b < D / 8; ++b) store8(out_row + 8 * b, acc[r][b]);
  }
}

template <int D>
TNX_ALWAYS_INLINE void forward_tiles_impl(const Chunk<float>& c, const float* kpT, int64_t np_pad,
                                          const float* vp, float* scores, Rows<float> out,
                                          float* lse) {
  int64_t i = c.i0;
  const int64_t end = c.i0 + c.rows;
  BiasRows<float> bias_rows{c};
  for (; i + kTile <= end; i += kTile)
    forward_tile<D, kTile>(c, bias_rows, i, kpT, np_pad, vp, scores, out, lse);
  for (; i < end; ++i) forward_tile<D, 1>(c, bias_rows, i, kpT, np_pad, vp, scores, out, lse);
}

#define TNX_DEFINE_TILE_KERNEL(D)                                                                 \
  TNX_CPU_CLONES void forward_tiles_d##D(const Chunk<float>& c, const float* kpT, int64_t np_pad, \
                                         const float* vp, float* scores, Rows<float> out,         \
                                         float* lse) {                                            \
    forward_tiles_impl<D>(c, kpT, np_pad, vp, scores, out, lse);                                  \
  }
TNX_DEFINE_TILE_KERNEL(8)
TNX_DEFINE_TILE_KERNEL(16)
TNX_DEFINE_TILE_KERNEL(24)
TNX_DEFINE_TILE_KERNEL(32)
#undef TNX_DEFINE_TILE_KERNEL

using TileKernel = void (*)(const Chunk<float>&, const float*, int64_t, const float*, float*,
                            Rows<float>, float*);

// The kernel for head dim d among those compiled for 8, 16, 24 and 32; nullptr for other dims.
template <typename Kernel>
Kernel kernel_for_head_dim(int64_t d, Kernel d8, Kernel d16, Kernel d24, Kernel d32) {
  switch (d) {
    case 8:
      return d8;
    case 16:
      return d16;
    case 24:
      return d24;
    case 32:
      return d32;
    default:
      return nullptr;
  }
}

// ------------------------------------------------------ backward, fp32, head dim 8/16/24/32
// The chunk's five products with the forward's register tiles instead of BLAS calls (which run
// far below peak at these shapes and pay their overhead per chunk): probs = q @ k_pool^T and
// dprobs = grad @ v_pool^T (tile_scores), dq_pool = ds @ k_pool (tile_pooled_values), and the
// rank-`rows` updates d k_pool += ds^T @ q and d v_pool += probs^T @ grad, in blocks of pooled
// keys whose accumulators stay in registers while the chunk's rows stream from L1. The rows are
// added in order, so the partial sums do not depend on the thread count.

// out (P x D, rows of D) += a^T @ x for P pooled keys: a (rows x P) has row stride a_stride, x
// holds rows [i0, i0 + rows).
template <int D, int P>
TNX_ALWAYS_INLINE void rank_update_block(const float* a, int64_t a_stride, Rows<const float> x,
                                         int64_t i0, int64_t rows, float* out) {
  v8f acc[P][D / 8];
  for (int pp = 0; pp < P; ++pp)
    for (int b = 0; b < D / 8; ++b) acc[pp][b] = load8(out + pp * D + 8 * b);
  for (int64_t r = 0; r < rows; ++r) {
    const float* x_row = x.row(i0 + r);
    v8f xv[D / 8];
    for (int b = 0; b < D / 8; ++b) xv[b] = load8(x_row + 8 * b);
    const float* a_row = a + r * a_stride;
    for (int pp = 0; pp < P; ++pp) {
      const float w = a_row[pp];
      for (int b = 0; b < D / 8; ++b) acc[pp][b] += w * xv[b];
    }
  }
  for (int pp = 0; pp < P; ++pp)
    for (int b = 0; b < D / 8; ++b) store8(out + pp * D + 8 * b, acc[pp][b]);
}

// out (Np x D) += a^T @ x, a: (rows x Np) with row stride a_stride.
template <int D>
TNX_ALWAYS_INLINE void rank_update(const float* a, int64_t a_stride, int64_t Np,
                                   Rows<const float> x, int64_t i0, int64_t rows, float* out) {
  constexpr int P = D <= 16 ? 8 : 4;  // keeps the P x D accumulators in registers
  int64_t p = 0;
  for (; p + P <= Np; p += P) rank_update_block<D, P>(a + p, a_stride, x, i0, rows, out + p * D);
  for (; p < Np; ++p) rank_update_block<D, 1>(a + p, a_stride, x, i0, rows, out + p * D);
}

// What one chunk's tiled backward reads and writes besides the chunk itself.
struct TileBackward {
  const float *lse, *kpT, *vpT, *kp;  // the (batch, head)'s lse, padded k_pool^T / v_pool^T, k_pool
  int64_t np_pad;
  float *probs, *dprobs;  // (kRows x np_pad) buffers
  float *ds_local, *weight_local, *dtoken_weight, *dbias;
  bool first_batch;
  float* dq_window;  // (kRows x D) buffer
  Rows<float> dq;
  float *dkp, *dvp;  // the chunk's group's partial sums (Np x D)
};

template <int D, int R>
TNX_ALWAYS_INLINE void backward_tile_scores(const Chunk<float>& c, int64_t i,
                                            const TileBackward& a) {
  const float *q[R], *g[R];
  for (int r = 0; r < R; ++r) {
    q[r] = c.q.row(i + r);
    g[r] = c.grad.row(i + r);
  }
  const int64_t offset = (i - c.i0) * a.np_pad;
  tile_scores<D, R>(q, a.kpT, a.np_pad, a.probs + offset);
  tile_scores<D, R>(g, a.vpT, a.np_pad, a.dprobs + offset);
}

// dq rows = ds @ k_pool + the window part.
template <int D, int R>
TNX_ALWAYS_INLINE void backward_tile_dq(const Chunk<float>& c, int64_t i, const TileBackward& a) {
  const int64_t r0 = i - c.i0;
  v8f acc[R][D / 8];
  tile_pooled_values<D, R>(a.dprobs + r0 * a.np_pad, a.np_pad, a.kp, c.pool, acc);
  for (int r = 0; r < R; ++r) {
    float* dq_row = a.dq.row(i + r);
    const float* window_row = a.dq_window + (r0 + r) * D;
    for (int b = 0; b < D / 8; ++b) store8(dq_row + 8 * b, acc[r][b] + load8(window_row + 8 * b));
  }
}

template <int D>
TNX_ALWAYS_INLINE void backward_tiles_impl(const Chunk<float>& c, const TileBackward& a) {
  const int64_t end = c.i0 + c.rows;
  int64_t i = c.i0;
  for (; i + kTile <= end; i += kTile) backward_tile_scores<D, kTile>(c, i, a);
  for (; i < end; ++i) backward_tile_scores<D, 1>(c, i, a);
  backward_rows_impl<D>(c, a.lse, a.probs, a.dprobs, a.np_pad, a.ds_local, a.weight_local,
                        a.dtoken_weight, a.dbias, a.first_batch, a.dq_window);
  for (i = c.i0; i + kTile <= end; i += kTile) backward_tile_dq<D, kTile>(c, i, a);
  for (; i < end; ++i) backward_tile_dq<D, 1>(c, i, a);
  rank_update<D>(a.dprobs, a.np_pad, c.pool, c.q, c.i0, c.rows, a.dkp);
  rank_update<D>(a.probs, a.np_pad, c.pool, c.grad, c.i0, c.rows, a.dvp);
}

#define TNX_DEFINE_BACKWARD_TILE_KERNEL(D)                                                     \
  TNX_CPU_CLONES void backward_tiles_d##D(const Chunk<float>& c, const TileBackward& a) {      \
    backward_tiles_impl<D>(c, a);                                                              \
  }                                                                                            \
  TNX_CPU_CLONES void window_grad_rows_d##D(const Chunk<float>& c, const float* ds_local,      \
                                            const float* weight_local, int64_t n0, int64_t n1, \
                                            Rows<float> dk, Rows<float> dv) {                  \
    window_grad_rows_impl<D>(c, ds_local, weight_local, n0, n1, dk, dv);                       \
  }
TNX_DEFINE_BACKWARD_TILE_KERNEL(8)
TNX_DEFINE_BACKWARD_TILE_KERNEL(16)
TNX_DEFINE_BACKWARD_TILE_KERNEL(24)
TNX_DEFINE_BACKWARD_TILE_KERNEL(32)
#undef TNX_DEFINE_BACKWARD_TILE_KERNEL

using BackwardTileKernel = void (*)(const Chunk<float>&, const TileBackward&);
using WindowGradKernel = void (*)(const Chunk<float>&, const float*, const float*, int64_t, int64_t,
                                  Rows<float>, Rows<float>);

// x (B * heads, Np, d) -> (B * heads, d, np_pad) with zero padding columns.
std::vector<float> transpose_pooled(const float* x, int64_t bh_count, int64_t Np, int64_t d,
                                    int64_t np_pad) {
  std::vector<float> xT(bh_count * d * np_pad, 0.f);
  for (int64_t bh = 0; bh < bh_count; ++bh)
    for (int64_t p = 0; p < Np; ++p)
      for (int64_t c = 0; c < d; ++c) xT[(bh * d + c) * np_pad + p] = x[(bh * Np + p) * d + c];
  return xT;
}

int64_t padded_pool(int64_t Np) { return (Np + kPadKeys - 1) / kPadKeys * kPadKeys; }

// Raw pointers and layouts of the op's (B, heads, N, d) tensors.
struct Layouts {
  RowLayout q, k, v, grad, out, dq, dk, dv;
};

template <typename T>
Chunk<T> chunk_of(const Shape& s, const Layouts& l, int64_t bh, const T* q, const T* k, const T* v,
                  const T* grad, const PoolBias<T>& bias, const T* rpb, const T* token_weight,
                  T* bias_buf) {
  const int64_t h = bh % s.heads;
  Chunk<T> c;
  c.q = l.q.rows(q, bh, s.heads);
  c.k = l.k.rows(k, bh, s.heads);
  c.v = l.v.rows(v, bh, s.heads);
  c.grad = grad == nullptr ? Rows<const T>{nullptr, 0} : l.grad.rows(grad, bh, s.heads);
  c.bias = bias.dense == nullptr ? nullptr : bias.dense + h * s.tokens * s.pool;
  c.table = bias.dense == nullptr ? bias.table + h * bias.table_size : nullptr;
  c.index_rows = bias.index_rows;
  c.index_cols = bias.index_cols;
  c.row_weights = bias.row_weights;
  c.pool_h = bias.pool_h;
  c.pool_w = bias.pool_w;
  c.taps = bias.taps;
  c.tap_stride = bias.tap_stride;
  c.cols_unit_step = bias.cols_unit_step;
  c.cols_contiguous = bias.cols_contiguous;
  c.bias_buf = bias_buf;
  c.rpb = rpb + h * kWindowArea;
  c.token_weight = token_weight + bh * s.tokens * kWindowArea;
  c.i0 = c.rows = 0;
  c.tokens = s.tokens;
  c.pool = s.pool;
  c.d = s.d;
  c.height = s.height;
  c.width = s.width;
  return c;
}

template <typename T>
void forward_impl(const T* q, const T* k, const T* v, const T* k_pool, const T* v_pool,
                  const T* rpb, const PoolBias<T>& bias, const T* token_weight, T* out, T* lse,
                  const Shape& s, const Layouts& l) {
  const int64_t N = s.tokens, Np = s.pool, d = s.d;
  const int64_t chunks = (N + kRows - 1) / kRows;
  if constexpr (std::is_same_v<T, float>) {
    if (const TileKernel kernel = kernel_for_head_dim<TileKernel>(
            d, forward_tiles_d8, forward_tiles_d16, forward_tiles_d24, forward_tiles_d32)) {
      // k_pool^T per (batch, head), padded with zero columns to whole vectors.
      const int64_t np_pad = padded_pool(Np);
      const std::vector<float> kpT = transpose_pooled(k_pool, s.batch * s.heads, Np, d, np_pad);
      // Tasks go chunk by chunk through every (batch, head): the backbone's q, k, v rows hold
      // all heads, so consecutive tasks share their cache lines.
      at::parallel_for(0, s.batch * s.heads * chunks, 1, [&](int64_t begin, int64_t end) {
        std::vector<float> scores(kTile * std::max<int64_t>(np_pad, 1)), bias_buf(8 * Np);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t bh = task % (s.batch * s.heads);
          Chunk<float> c = chunk_of(s, l, bh, q, k, v, static_cast<const float*>(nullptr), bias,
                                    rpb, token_weight, bias_buf.data());
          c.i0 = task / (s.batch * s.heads) * kRows;
          c.rows = std::min(kRows, N - c.i0);
          kernel(c, kpT.data() + bh * d * np_pad, np_pad, v_pool + bh * Np * d, scores.data(),
                 l.out.rows(out, bh, s.heads), lse + bh * N);
        }
      });
      return;
    }
  }
  at::parallel_for(0, s.batch * s.heads * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scores(kRows * std::max<int64_t>(Np, 1)), pooled(kRows * d), window(kRows * d),
        inv_sum(kRows), bias_buf(8 * Np);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task % (s.batch * s.heads);
      Chunk<T> c = chunk_of(s, l, bh, q, k, v, static_cast<const T*>(nullptr), bias, rpb,
                            token_weight, bias_buf.data());
      c.i0 = task / (s.batch * s.heads) * kRows;
      c.rows = std::min(kRows, N - c.i0);
      const T *kp_bh = k_pool + bh * Np * d, *vp_bh = v_pool + bh * Np * d;
      auto score_view = matrix(scores.data(), c.rows, Np);
      if (Np > 0)
        at::mm_out(score_view, matrix(c.q.row(c.i0), c.rows, d, c.q.stride),
                   matrix(kp_bh, Np, d).t());
      forward_rows(c, scores.data(), window.data(), inv_sum.data(), lse + bh * N + c.i0);
      const Rows<T> out_bh = l.out.rows(out, bh, s.heads);
      if (Np > 0) {
        auto pooled_view = matrix(pooled.data(), c.rows, d);
        at::mm_out(pooled_view, score_view, matrix(vp_bh, Np, d));
      } else {
        std::fill(pooled.begin(), pooled.end(), T(0));
      }
      combine_rows(out_bh.row(c.i0), out_bh.stride, pooled.data(), inv_sum.data(), window.data(),
                   c.rows, d);
    }
  });
}

template <typename T>
void backward_impl(const T* grad, const T* q, const T* k, const T* v, const T* k_pool,
                   const T* v_pool, const T* rpb, const PoolBias<T>& bias, const T* token_weight,
                   const T* lse, T* dq, T* dk, T* dv, T* dtoken_weight, T* dbias, T* ds_local,
                   T* weight_local, T* dkp_partial, T* dvp_partial, int64_t groups, const Shape& s,
                   const Layouts& l) {
  const int64_t N = s.tokens, Np = s.pool, d = s.d, B = s.batch, heads = s.heads;
  const int64_t chunks = (N + kRows - 1) / kRows;
  const int64_t chunks_per_group = (chunks + groups - 1) / groups;
  // d bias_pool of head h: dense, the head's rows; table form, the (group, head) partial sum of
  // its table gradient (groups x heads x table_size, zero on entry).
  auto dbias_of = [&](int64_t h, int64_t group) -> T* {
    if (dbias == nullptr) return nullptr;
    if (bias.dense != nullptr) return dbias + h * N * Np;
    return dbias + (group * heads + h) * bias.table_size;
  };
  // fp32 with head dim 8/16/24/32: the register-tiled chunks, on padded k_pool^T / v_pool^T, and
  // the window gradient pass in whole vectors.
  BackwardTileKernel tiled = nullptr;
  WindowGradKernel window_grad = nullptr;
  int64_t np_pad = Np;
  std::vector<float> kpT, vpT;
  if constexpr (std::is_same_v<T, float>) {
    tiled = kernel_for_head_dim<BackwardTileKernel>(d, backward_tiles_d8, backward_tiles_d16,
                                                    backward_tiles_d24, backward_tiles_d32);
    window_grad = kernel_for_head_dim<WindowGradKernel>(
        d, window_grad_rows_d8, window_grad_rows_d16, window_grad_rows_d24, window_grad_rows_d32);
    if (tiled != nullptr) {
      np_pad = padded_pool(Np);
      kpT = transpose_pooled(k_pool, B * heads, Np, d, np_pad);
      vpT = transpose_pooled(v_pool, B * heads, Np, d, np_pad);
    }
  }
  at::parallel_for(0, heads * groups, 1, [&](int64_t begin, int64_t end) {
    const int64_t buffer = kRows * std::max<int64_t>(np_pad, 1);
    std::vector<T> probs(buffer), dprobs(buffer), dq_pool(kRows * d), dq_window(kRows * d),
        ones(kRows, T(1)), bias_buf(8 * Np);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t h = task / groups, group = task % groups;
      const int64_t chunk_end = std::min(chunks, (group + 1) * chunks_per_group);
      for (int64_t b = 0; b < B; ++b) {
        const int64_t bh = b * heads + h;
        Chunk<T> c = chunk_of(s, l, bh, q, k, v, grad, bias, rpb, token_weight, bias_buf.data());
        const Rows<T> dq_bh = l.dq.rows(dq, bh, s.heads);
        const T *kp_bh = k_pool + bh * Np * d, *vp_bh = v_pool + bh * Np * d;
        const int64_t slot = ((group * B + b) * heads + h) * Np * d;
        for (int64_t chunk = group * chunks_per_group; chunk < chunk_end; ++chunk) {
          c.i0 = chunk * kRows;
          c.rows = std::min(kRows, N - c.i0);
          if constexpr (std::is_same_v<T, float>) {
            if (tiled != nullptr) {
              const TileBackward args{lse + bh * N,
                                      kpT.data() + bh * d * np_pad,
                                      vpT.data() + bh * d * np_pad,
                                      kp_bh,
                                      np_pad,
                                      probs.data(),
                                      dprobs.data(),
                                      ds_local + bh * N * kWindowArea,
                                      weight_local + bh * N * kWindowArea,
                                      dtoken_weight + bh * N * kWindowArea,
                                      dbias_of(h, group),
                                      b == 0,
                                      dq_window.data(),
                                      dq_bh,
                                      dkp_partial + slot,
                                      dvp_partial + slot};
              tiled(c, args);
              continue;
            }
          }
          auto prob_view = matrix(probs.data(), c.rows, Np);
          auto dprob_view = matrix(dprobs.data(), c.rows, Np);
          auto q_rows = matrix(c.q.row(c.i0), c.rows, d, c.q.stride);
          auto g_rows = matrix(c.grad.row(c.i0), c.rows, d, c.grad.stride);
          if (Np > 0) {
            at::mm_out(prob_view, q_rows, matrix(kp_bh, Np, d).t());
            at::mm_out(dprob_view, g_rows, matrix(vp_bh, Np, d).t());
          }
          backward_rows(c, lse + bh * N, probs.data(), dprobs.data(),
                        ds_local + bh * N * kWindowArea, weight_local + bh * N * kWindowArea,
                        dtoken_weight + bh * N * kWindowArea, dbias_of(h, group), b == 0,
                        dq_window.data());
          if (Np > 0) {
            auto dq_pool_view = matrix(dq_pool.data(), c.rows, d);
            at::mm_out(dq_pool_view, dprob_view, matrix(kp_bh, Np, d));
            matrix(dkp_partial + slot, Np, d).addmm_(dprob_view.t(), q_rows);
            matrix(dvp_partial + slot, Np, d).addmm_(prob_view.t(), g_rows);
          } else {
            std::fill(dq_pool.begin(), dq_pool.end(), T(0));
          }
          combine_rows(dq_bh.row(c.i0), dq_bh.stride, dq_pool.data(), ones.data(), dq_window.data(),
                       c.rows, d);
        }
      }
    }
  });
  // Window keys / values: needs every query's ds, hence a second pass.
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, B * heads * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, n0 = (task % blocks) * kRows, n1 = std::min(N, n0 + kRows);
      const Chunk<T> c =
          chunk_of(s, l, bh, q, k, v, grad, bias, rpb, token_weight, static_cast<T*>(nullptr));
      const T *ds_bh = ds_local + bh * N * kWindowArea,
              *weight_bh = weight_local + bh * N * kWindowArea;
      const Rows<T> dk_bh = l.dk.rows(dk, bh, s.heads), dv_bh = l.dv.rows(dv, bh, s.heads);
      if constexpr (std::is_same_v<T, float>) {
        if (window_grad != nullptr) {
          window_grad(c, ds_bh, weight_bh, n0, n1, dk_bh, dv_bh);
          continue;
        }
      }
      window_grad_rows(c, ds_bh, weight_bh, n0, n1, dk_bh, dv_bh);
    }
  });
}

// The bias of the kernels: dense when index_rows is undefined, else the table form (one tap when
// row_weights is undefined).
template <typename T>
PoolBias<T> pool_bias_of(const at::Tensor& bias, const at::Tensor& index_rows,
                         const at::Tensor& index_cols, const at::Tensor& row_weights) {
  PoolBias<T> b{};
  if (!index_rows.defined()) {
    b.dense = bias.data_ptr<T>();
    return b;
  }
  const int64_t width = index_cols.size(0), pool_w = index_cols.size(1);
  const int64_t* cols = index_cols.data_ptr<int64_t>();
  bool unit_step = true, contiguous = true;
  for (int64_t e = 0; e + pool_w < width * pool_w && unit_step; ++e)
    unit_step = cols[e + pool_w] == cols[e] + 1;
  for (int64_t e = 0; e < width * pool_w && contiguous; ++e)
    contiguous = e % pool_w == 0 || cols[e] == cols[e - 1] + 1;
  b.table = bias.data_ptr<T>();
  b.index_rows = index_rows.data_ptr<int64_t>();
  b.index_cols = cols;
  b.row_weights = row_weights.defined() ? row_weights.data_ptr<T>() : nullptr;
  b.table_size = bias.size(1);
  b.pool_h = index_rows.size(-1);
  b.pool_w = pool_w;
  b.taps = row_weights.defined() ? index_rows.size(0) : 1;
  b.tap_stride = index_rows.size(-2) * b.pool_h;
  b.cols_unit_step = unit_step && !row_weights.defined();
  b.cols_contiguous = contiguous;
  return b;
}

std::vector<at::Tensor> forward_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& k_pool, const at::Tensor& v_pool,
                                    const at::Tensor& rpb, const at::Tensor& bias,
                                    const at::Tensor& index_rows, const at::Tensor& index_cols,
                                    const at::Tensor& row_weights, const at::Tensor& token_weight,
                                    int64_t height, int64_t width) {
  const Shape s = shape_of(q, k_pool, height, width);
  auto out = empty_rows_like(q);
  auto lse = at::empty({s.batch, s.heads, s.tokens}, q.options());
  if (q.numel() == 0) return {out.zero_(), lse.zero_()};
  Layouts l;
  l.q = row_layout(q);
  l.k = row_layout(k);
  l.v = row_layout(v);
  l.out = row_layout(out);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "aggregated_attention_forward_cpu", [&] {
    forward_impl<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                           k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(),
                           rpb.data_ptr<scalar_t>(),
                           pool_bias_of<scalar_t>(bias, index_rows, index_cols, row_weights),
                           token_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                           lse.data_ptr<scalar_t>(), s, l);
  });
  return {out, lse};
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_out_in, const at::Tensor& q_in,
                                     const at::Tensor& k_in, const at::Tensor& v_in,
                                     const at::Tensor& k_pool, const at::Tensor& v_pool,
                                     const at::Tensor& rpb, const at::Tensor& bias,
                                     const at::Tensor& index_rows, const at::Tensor& index_cols,
                                     const at::Tensor& row_weights, const at::Tensor& token_weight,
                                     const at::Tensor& out, const at::Tensor& lse, int64_t height,
                                     int64_t width, bool bias_grad) {
  // The backward reads q, k, v and grad_out head by head, several times: per-head copies of
  // (B, N, heads, d) layouts (the backbone's views) cost less than reading those rows strided.
  // The input gradients keep the inputs' layouts.
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous(),
                   grad_out = grad_out_in.contiguous();
  const Shape s = shape_of(q, k_pool, height, width);
  const bool table = index_rows.defined();
  const int64_t chunks = (s.tokens + kRows - 1) / kRows;
  int64_t groups = std::max<int64_t>(1, std::min(chunks, kMaxGroups));
  if (table) {
    const int64_t entries = std::max<int64_t>(1, s.heads * bias.size(1));
    groups = std::min(groups, std::max<int64_t>(2, kMaxPartialEntries / entries));
  }
  auto dq = empty_rows_like(q_in), dk = empty_rows_like(k_in), dv = empty_rows_like(v_in);
  auto dtoken_weight = at::empty_like(token_weight);
  auto ds_local = at::empty_like(token_weight), weight_local = at::empty_like(token_weight);
  // Dense: (heads, N, Np), written in full. Table form: per-group partial sums, reduced below.
  at::Tensor dbias;
  if (!bias_grad)
    dbias = at::empty(
        table ? std::vector<int64_t>{0, bias.size(1)} : std::vector<int64_t>{0, s.tokens, s.pool},
        bias.options());
  else if (table)
    dbias = at::zeros({groups, s.heads, bias.size(1)}, bias.options());
  else
    dbias = at::empty_like(bias);
  auto dkp_partial = at::zeros({groups, s.batch, s.heads, s.pool, s.d}, q.options());
  auto dvp_partial = at::zeros_like(dkp_partial);
  if (q.numel() == 0) {
    return {dq,
            dk,
            dv,
            at::zeros_like(k_pool),
            at::zeros_like(v_pool),
            at::zeros_like(rpb),
            bias_grad ? at::zeros_like(bias) : dbias,
            dtoken_weight.zero_()};
  }
  const Layouts l{row_layout(q),   row_layout(k),  row_layout(v),  row_layout(grad_out),
                  row_layout(out), row_layout(dq), row_layout(dk), row_layout(dv)};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "aggregated_attention_backward_cpu", [&] {
    backward_impl<scalar_t>(
        grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
        v.data_ptr<scalar_t>(), k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(),
        rpb.data_ptr<scalar_t>(), pool_bias_of<scalar_t>(bias, index_rows, index_cols, row_weights),
        token_weight.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
        dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), dtoken_weight.data_ptr<scalar_t>(),
        bias_grad ? dbias.data_ptr<scalar_t>() : nullptr, ds_local.data_ptr<scalar_t>(),
        weight_local.data_ptr<scalar_t>(), dkp_partial.data_ptr<scalar_t>(),
        dvp_partial.data_ptr<scalar_t>(), groups, s, l);
  });
  return {dq,
          dk,
          dv,
          dkp_partial.sum(0),
          dvp_partial.sum(0),
          ds_local.sum(at::IntArrayRef{0, 2}),
          table && bias_grad ? dbias.sum(0) : dbias,
          dtoken_weight};
}

}  // namespace

std::vector<at::Tensor> aggregated_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb, const at::Tensor& bias,
    const at::Tensor& token_weight, int64_t height, int64_t width) {
  return forward_cpu(q, k, v, k_pool, v_pool, rpb, bias, at::Tensor(), at::Tensor(), at::Tensor(),
                     token_weight, height, width);
}

std::vector<at::Tensor> aggregated_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
    const at::Tensor& bias, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad) {
  return backward_cpu(grad_out, q, k, v, k_pool, v_pool, rpb, bias, at::Tensor(), at::Tensor(),
                      at::Tensor(), token_weight, out, lse, height, width, bias_grad);
}

std::vector<at::Tensor> aggregated_attention_table_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb, const at::Tensor& bias_table,
    const at::Tensor& index_rows, const at::Tensor& index_cols, const at::Tensor& row_weights,
    const at::Tensor& token_weight, int64_t height, int64_t width) {
  return forward_cpu(q, k, v, k_pool, v_pool, rpb, bias_table, index_rows, index_cols, row_weights,
                     token_weight, height, width);
}

std::vector<at::Tensor> aggregated_attention_table_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
    const at::Tensor& bias_table, const at::Tensor& index_rows, const at::Tensor& index_cols,
    const at::Tensor& row_weights, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad) {
  return backward_cpu(grad_out, q, k, v, k_pool, v_pool, rpb, bias_table, index_rows, index_cols,
                      row_weights, token_weight, out, lse, height, width, bias_grad);
}

}  // namespace transnext_mm
