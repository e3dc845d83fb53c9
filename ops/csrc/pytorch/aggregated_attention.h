// Copyright (c) transnext-mm contributors. All rights reserved.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "common/aggregated_attention_geometry.h"

namespace transnext_mm {

// Strides of a (B, heads, N, d) tensor whose channels are contiguous.
inline RowLayout row_layout(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// A (B, heads, N, d) output stored as (B, N, heads, d): `out.transpose(1, 2).reshape(B, N, C)`
// (what the attention layer does next) is then a view, not a copy.
inline at::Tensor empty_rows_like(const at::Tensor& t) {
  return at::empty({t.size(0), t.size(2), t.size(1), t.size(3)}, t.options()).permute({0, 2, 1, 3});
}

// Returns {out, lse}; lse (B, heads, N) is in the accumulation type (fp32, or fp64 for fp64 input).
std::vector<at::Tensor> aggregated_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb_local, const at::Tensor& bias_pool,
    const at::Tensor& token_weight, int64_t height, int64_t width);

// Returns the gradients of {q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight};
// the bias_pool gradient is an empty (0, N, Np) tensor when bias_grad is false.
std::vector<at::Tensor> aggregated_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb_local,
    const at::Tensor& bias_pool, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad);

// The same with the pooled bias in table form: entry (i, p) of head h, for query i at
// (y, x) and pooled key p at (py, px) of the Hk x Wk pooled grid, is
// bias_table[h, index_rows[y, py] + index_cols[x, px]]; bias_table is (heads, table_size),
// index_rows (H, Hk) and index_cols (W, Wk) int64. With row_weights, a weighted sum over taps:
// sum_k row_weights[k, y, py] * bias_table[h, index_rows[k, y, py] + index_cols[x, px]], with
// index_rows and row_weights (taps, H, Hk), the weights in the accumulation type. The backward
// returns the gradient of bias_table in place of bias_pool's (an empty (0, table_size) tensor
// when bias_grad is false).
std::vector<at::Tensor> aggregated_attention_table_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb_local, const at::Tensor& bias_table,
    const at::Tensor& index_rows, const at::Tensor& index_cols,
    const c10::optional<at::Tensor>& row_weights, const at::Tensor& token_weight, int64_t height,
    int64_t width);
std::vector<at::Tensor> aggregated_attention_table_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb_local,
    const at::Tensor& bias_table, const at::Tensor& index_rows, const at::Tensor& index_cols,
    const c10::optional<at::Tensor>& row_weights, const at::Tensor& token_weight,
    const at::Tensor& out, const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad);

// Backends (row_weights undefined: one tap of weight 1).
std::vector<at::Tensor> aggregated_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb, const at::Tensor& bias,
    const at::Tensor& token_weight, int64_t height, int64_t width);
std::vector<at::Tensor> aggregated_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
    const at::Tensor& bias, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad);
std::vector<at::Tensor> aggregated_attention_table_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb, const at::Tensor& bias_table,
    const at::Tensor& index_rows, const at::Tensor& index_cols, const at::Tensor& row_weights,
    const at::Tensor& token_weight, int64_t height, int64_t width);
std::vector<at::Tensor> aggregated_attention_table_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
    const at::Tensor& bias_table, const at::Tensor& index_rows, const at::Tensor& index_cols,
    const at::Tensor& row_weights, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad);
#ifdef WITH_CUDA
std::vector<at::Tensor> aggregated_attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb, const at::Tensor& bias,
    const at::Tensor& token_weight, int64_t height, int64_t width);
std::vector<at::Tensor> aggregated_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
    const at::Tensor& bias, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad);
std::vector<at::Tensor> aggregated_attention_table_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb, const at::Tensor& bias_table,
    const at::Tensor& index_rows, const at::Tensor& index_cols, const at::Tensor& row_weights,
    const at::Tensor& token_weight, int64_t height, int64_t width);
std::vector<at::Tensor> aggregated_attention_table_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
    const at::Tensor& bias_table, const at::Tensor& index_rows, const at::Tensor& index_cols,
    const at::Tensor& row_weights, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad);
#endif

}  // namespace transnext_mm
