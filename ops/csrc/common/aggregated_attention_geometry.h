// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Geometry of the aggregated-attention op, shared by the CPU kernels, the CUDA kernels and the
// host code: the 3x3 window, row views of (B, heads, N, d) tensors and the op's sizes.
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
// The CPU kernels (pytorch/cpu/aggregated_attention_cpu.cpp) compute it in chunks of queries; the
// CUDA kernels (common/cuda/) one thread per query or pooled key.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace transnext_mm {

constexpr int kWindowArea = 9;
constexpr int kCenter = 4;  // the query itself: always inside the image

// Flat index of neighbour j of (y, x) on a height x width grid, or -1 outside the image.
// The queries that see key position (y, x) as their neighbour j are window_neighbor(y, x, 8 - j).
C10_HOST_DEVICE inline int64_t window_neighbor(int64_t y, int64_t x, int j, int64_t height,
                                               int64_t width) {
  const int64_t ny = y + j / 3 - 1;
  const int64_t nx = x + j % 3 - 1;
  return (ny >= 0 && ny < height && nx >= 0 && nx < width) ? ny * width + nx : -1;
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

// Sizes of one call of the op: B, heads, N = height * width queries (and keys), Np pooled keys,
// head dim d.
struct AttentionSizes {
  int64_t batch, heads, tokens, pool, height, width;
  int d;
};

}  // namespace transnext_mm
