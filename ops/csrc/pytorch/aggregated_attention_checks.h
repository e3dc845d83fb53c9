// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Input checks of the aggregated-attention op, shared by its device dispatch
// (pytorch/aggregated_attention.cpp) and the CPU replay of its CUDA kernels (replay/).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "common/aggregated_attention_geometry.h"
#include "pytorch/versioned_tensor_cache.h"

namespace transnext_mm {
namespace detail {

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, "aggregated_attention: ", name, " must have shape ", expected,
              ", got ", t.sizes());
}

// (B, heads, N, d) tensors are read row by row: any strides with contiguous channels will do.
inline bool rows_addressable(const at::Tensor& t) {
  return t.dim() == 4 && (t.stride(3) == 1 || t.size(3) <= 1) && t.stride(0) >= 0 &&
         t.stride(1) >= 0 && t.stride(2) >= 0;
}

// Checks shapes, devices and dtypes; returns the tensors in argument order, q / k / v /
// grad_out / out as they are when rows_addressable, everything else contiguous.
inline std::vector<at::Tensor> checked(const std::vector<std::pair<const char*, at::Tensor>>& named,
                                       int64_t height, int64_t width) {
  const at::Tensor& q = named[0].second;
  TORCH_CHECK(q.dim() == 4, "aggregated_attention: q must be (B, heads, H*W, d), got ", q.sizes());
  TORCH_CHECK(at::isFloatingType(q.scalar_type()),
              "aggregated_attention: inputs must be floating point, got ", q.scalar_type());
  const int64_t B = q.size(0), heads = q.size(1), N = q.size(2), d = q.size(3);
  TORCH_CHECK(height >= 0 && width >= 0 && height * width == N, "aggregated_attention: q has ", N,
              " positions but height*width = ", height, "*", width);
  std::vector<at::Tensor> out;
  for (const auto& [name, t] : named) {
    TORCH_CHECK(t.device() == q.device(), "aggregated_attention: ", name, " is on ", t.device(),
                " but q is on ", q.device());
    TORCH_CHECK(t.scalar_type() == q.scalar_type(), "aggregated_attention: ", name, " has dtype ",
                t.scalar_type(), " but q has ", q.scalar_type());
    const bool per_row = out.size() <= 2 || out.size() >= 8;  // q, k, v, grad_out, out
    out.push_back(per_row && rows_addressable(t) ? t : t.contiguous());
  }
  const at::Tensor& k_pool = out[3];
  TORCH_CHECK(
      k_pool.dim() == 4 && k_pool.size(0) == B && k_pool.size(1) == heads && k_pool.size(3) == d,
      "aggregated_attention: k_pool must have shape (", B, ", ", heads, ", Np, ", d, "), got ",
      k_pool.sizes());
  const int64_t Np = k_pool.size(2);
  check_shape(out[1], "k", q.sizes());
  check_shape(out[2], "v", q.sizes());
  check_shape(out[4], "v_pool", k_pool.sizes());
  check_shape(out[5], "rpb_local", {heads, kWindowArea});
  if (std::string(named[6].first) == "bias_pool") check_shape(out[6], "bias_pool", {heads, N, Np});
  check_shape(out[7], "token_weight", {B, heads, N, kWindowArea});
  return out;
}

// Index pairs (index_rows, index_cols) whose bounds passed the check below for a table size
// (the key): the check reads two values back from the device, so it runs once per pair of
// tensors and their versions (see VersionedTensorCache). Never destroyed: tensors released after
// the device runtime has shut down can crash at exit.
inline VersionedTensorCache<2, bool>& checked_index_pairs() {
  static auto* pairs = new VersionedTensorCache<2, bool>(64);
  return *pairs;
}

// The table form of the pooled bias: bias_table (heads, table_size) in q's dtype, index_cols
// (width, Wk) int64 and either index_rows (height, Hk) int64 (one tap) or, with row_weights,
// index_rows and row_weights (taps, height, Hk), int64 and q's accumulation type (see PoolBiasTable
// in transnext_mm/ops/aggregated_attention/shapes.py), with Hk * Wk = Np and every
// index_rows[..., y, py] + index_cols[x, px] in [0, table_size). Returns index_rows, index_cols and
// row_weights (undefined: one tap of weight 1) contiguous.
inline std::vector<at::Tensor> checked_bias_index(const at::Tensor& q, const at::Tensor& k_pool,
                                                  const at::Tensor& bias_table,
                                                  const at::Tensor& index_rows,
                                                  const at::Tensor& index_cols,
                                                  const c10::optional<at::Tensor>& row_weights,
                                                  int64_t height, int64_t width) {
  TORCH_CHECK(bias_table.dim() == 2 && bias_table.size(0) == q.size(1),
              "aggregated_attention: bias_table must have shape (", q.size(1),
              ", table_size), got ", bias_table.sizes());
  const bool taps = row_weights.has_value() && row_weights->defined();
  TORCH_CHECK(index_rows.dim() == (taps ? 3 : 2) && index_rows.size(-2) == height &&
                  index_rows.scalar_type() == at::kLong && index_rows.device() == q.device(),
              "aggregated_attention: index_rows must be an int64 (", taps ? "taps, " : "", height,
              ", pooled size) tensor on ", q.device(), ", got ", index_rows.scalar_type(), " ",
              index_rows.sizes(), " on ", index_rows.device());
  TORCH_CHECK(index_cols.dim() == 2 && index_cols.size(0) == width &&
                  index_cols.scalar_type() == at::kLong && index_cols.device() == q.device(),
              "aggregated_attention: index_cols must be an int64 (", width,
              ", pooled size) tensor on ", q.device(), ", got ", index_cols.scalar_type(), " ",
              index_cols.sizes(), " on ", index_cols.device());
  if (taps) {
    const auto acc = at::toOpMathType(q.scalar_type());
    TORCH_CHECK(row_weights->sizes() == index_rows.sizes() && index_rows.size(0) > 0 &&
                    row_weights->scalar_type() == acc && row_weights->device() == q.device(),
                "aggregated_attention: row_weights must be a ", acc, " tensor on ", q.device(),
                " of index_rows' shape ", index_rows.sizes(), " with at least one tap, got ",
                row_weights->scalar_type(), " ", row_weights->sizes(), " on ",
                row_weights->device());
  }
  TORCH_CHECK(index_rows.size(-1) * index_cols.size(1) == k_pool.size(2),
              "aggregated_attention: index_rows and index_cols give a pooled grid of ",
              index_rows.size(-1), "x", index_cols.size(1), " but k_pool has ", k_pool.size(2),
              " pooled keys");
  if (index_rows.numel() > 0 && index_cols.numel() > 0 &&
      !checked_index_pairs().find({index_rows, index_cols}, bias_table.size(1))) {
    // One device-to-host copy for both bounds (one synchronisation on a GPU).
    const auto bounds =
        at::stack({index_rows.min() + index_cols.min(), index_rows.max() + index_cols.max()}).cpu();
    const int64_t low = bounds[0].item<int64_t>(), high = bounds[1].item<int64_t>();
    TORCH_CHECK(low >= 0 && high < bias_table.size(1),
                "aggregated_attention: index_rows + index_cols must lie in [0, ",
                bias_table.size(1), "), got [", low, ", ", high, "]");
    checked_index_pairs().add({index_rows, index_cols}, bias_table.size(1), true);
  }
  return {index_rows.contiguous(), index_cols.contiguous(),
          taps ? row_weights->contiguous() : at::Tensor()};
}

}  // namespace detail

// The forward's inputs, checked: q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight.
inline std::vector<at::Tensor> checked_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb_local, const at::Tensor& bias_pool,
    const at::Tensor& token_weight, int64_t height, int64_t width) {
  return detail::checked({{"q", q},
                          {"k", k},
                          {"v", v},
                          {"k_pool", k_pool},
                          {"v_pool", v_pool},
                          {"rpb_local", rpb_local},
                          {"bias_pool", bias_pool},
                          {"token_weight", token_weight}},
                         height, width);
}

// The table-form forward's inputs, checked: q, k, v, k_pool, v_pool, rpb_local, bias_table,
// token_weight, index_rows, index_cols, row_weights (undefined when not given).
inline std::vector<at::Tensor> checked_table_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb_local, const at::Tensor& bias_table,
    const at::Tensor& index_rows, const at::Tensor& index_cols,
    const c10::optional<at::Tensor>& row_weights, const at::Tensor& token_weight, int64_t height,
    int64_t width) {
  auto t = detail::checked({{"q", q},
                            {"k", k},
                            {"v", v},
                            {"k_pool", k_pool},
                            {"v_pool", v_pool},
                            {"rpb_local", rpb_local},
                            {"bias_table", bias_table},
                            {"token_weight", token_weight}},
                           height, width);
  for (auto& index : detail::checked_bias_index(q, t[3], t[6], index_rows, index_cols, row_weights,
                                                height, width))
    t.push_back(index);
  return t;
}

// The backward's inputs, checked, in the order q, k, v, k_pool, v_pool, rpb_local, bias_pool,
// token_weight, grad_out, out, lse.
inline std::vector<at::Tensor> checked_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb_local,
    const at::Tensor& bias_pool, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width) {
  auto t = detail::checked({{"q", q},
                            {"k", k},
                            {"v", v},
                            {"k_pool", k_pool},
                            {"v_pool", v_pool},
                            {"rpb_local", rpb_local},
                            {"bias_pool", bias_pool},
                            {"token_weight", token_weight},
                            {"grad_out", grad_out},
                            {"out", out}},
                           height, width);
  detail::check_shape(t[8], "grad_out", q.sizes());
  detail::check_shape(t[9], "out", q.sizes());
  detail::check_shape(lse, "lse", {q.size(0), q.size(1), q.size(2)});
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::toOpMathType(q.scalar_type()),
              "aggregated_attention: lse must be ", at::toOpMathType(q.scalar_type()), " on ",
              q.device(), ", got ", lse.scalar_type(), " on ", lse.device());
  t.push_back(lse.contiguous());
  return t;
}

// The table-form backward's inputs, checked, in the order q, k, v, k_pool, v_pool, rpb_local,
// bias_table, token_weight, grad_out, out, lse, index_rows, index_cols, row_weights (undefined when
// not given).
inline std::vector<at::Tensor> checked_table_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb_local,
    const at::Tensor& bias_table, const at::Tensor& index_rows, const at::Tensor& index_cols,
    const c10::optional<at::Tensor>& row_weights, const at::Tensor& token_weight,
    const at::Tensor& out, const at::Tensor& lse, int64_t height, int64_t width) {
  auto t = detail::checked({{"q", q},
                            {"k", k},
                            {"v", v},
                            {"k_pool", k_pool},
                            {"v_pool", v_pool},
                            {"rpb_local", rpb_local},
                            {"bias_table", bias_table},
                            {"token_weight", token_weight},
                            {"grad_out", grad_out},
                            {"out", out}},
                           height, width);
  detail::check_shape(t[8], "grad_out", q.sizes());
  detail::check_shape(t[9], "out", q.sizes());
  detail::check_shape(lse, "lse", {q.size(0), q.size(1), q.size(2)});
  TORCH_CHECK(lse.device() == q.device() && lse.scalar_type() == at::toOpMathType(q.scalar_type()),
              "aggregated_attention: lse must be ", at::toOpMathType(q.scalar_type()), " on ",
              q.device(), ", got ", lse.scalar_type(), " on ", lse.device());
  t.push_back(lse.contiguous());
  for (auto& index : detail::checked_bias_index(q, t[3], t[6], index_rows, index_cols, row_weights,
                                                height, width))
    t.push_back(index);
  return t;
}

}  // namespace transnext_mm
