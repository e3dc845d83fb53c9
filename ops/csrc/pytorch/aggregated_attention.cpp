// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Device dispatch of the aggregated-attention op, after its input checks
// (aggregated_attention_checks.h).
#include "pytorch/aggregated_attention.h"

#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include "pytorch/aggregated_attention_checks.h"

namespace transnext_mm {
namespace {

std::vector<at::Tensor> to_dtype(const std::vector<at::Tensor>& tensors, at::ScalarType dtype) {
  std::vector<at::Tensor> out;
  for (const auto& t : tensors) out.push_back(t.to(dtype));
  return out;
}

}  // namespace

std::vector<at::Tensor> aggregated_attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb_local, const at::Tensor& bias_pool,
    const at::Tensor& token_weight, int64_t height, int64_t width) {
  const auto t =
      checked_forward(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height, width);
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    return aggregated_attention_forward_cuda(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], height,
                                             width);
#else
    TORCH_CHECK(false, "aggregated_attention: transnext_mm._ext was built without CUDA kernels");
#endif
  }
  TORCH_CHECK(q.device().is_cpu(), "aggregated_attention: no kernels for device ", q.device());
  if (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble)
    return aggregated_attention_forward_cpu(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], height,
                                            width);
  // fp16 / bf16 on CPU: compute in fp32, return in the input dtype (lse stays fp32).
  const auto f = to_dtype(t, at::kFloat);
  auto result = aggregated_attention_forward_cpu(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7],
                                                 height, width);
  result[0] = result[0].to(q.scalar_type());
  return result;
}

std::vector<at::Tensor> aggregated_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb_local,
    const at::Tensor& bias_pool, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad) {
  const auto t = checked_backward(grad_out, q, k, v, k_pool, v_pool, rpb_local, bias_pool,
                                  token_weight, out, lse, height, width);
  const at::Tensor& lse_c = t[10];
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    return aggregated_attention_backward_cuda(t[8], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7],
                                              t[9], lse_c, height, width, bias_grad);
#else
    TORCH_CHECK(false, "aggregated_attention: transnext_mm._ext was built without CUDA kernels");
#endif
  }
  TORCH_CHECK(q.device().is_cpu(), "aggregated_attention: no kernels for device ", q.device());
  if (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble)
    return aggregated_attention_backward_cpu(t[8], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7],
                                             t[9], lse_c, height, width, bias_grad);
  const auto f = to_dtype(t, at::kFloat);
  auto grads = aggregated_attention_backward_cpu(f[8], f[0], f[1], f[2], f[3], f[4], f[5], f[6],
                                                 f[7], f[9], lse_c, height, width, bias_grad);
  for (auto& g : grads) g = g.to(q.scalar_type());
  return grads;
}

std::vector<at::Tensor> aggregated_attention_table_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb_local, const at::Tensor& bias_table,
    const at::Tensor& index_rows, const at::Tensor& index_cols,
    const c10::optional<at::Tensor>& row_weights, const at::Tensor& token_weight, int64_t height,
    int64_t width) {
  // t: q, k, v, k_pool, v_pool, rpb_local, bias_table, token_weight, index_rows, index_cols,
  // row_weights.
  const auto t = checked_table_forward(q, k, v, k_pool, v_pool, rpb_local, bias_table, index_rows,
                                       index_cols, row_weights, token_weight, height, width);
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    return aggregated_attention_table_forward_cuda(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[8],
                                                   t[9], t[10], t[7], height, width);
#else
    TORCH_CHECK(false, "aggregated_attention: transnext_mm._ext was built without CUDA kernels");
#endif
  }
  TORCH_CHECK(q.device().is_cpu(), "aggregated_attention: no kernels for device ", q.device());
  if (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble)
    return aggregated_attention_table_forward_cpu(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[8],
                                                  t[9], t[10], t[7], height, width);
  const auto f = to_dtype({t.begin(), t.begin() + 8}, at::kFloat);
  // (row_weights are fp32 already, the accumulation type.)
  auto result = aggregated_attention_table_forward_cpu(f[0], f[1], f[2], f[3], f[4], f[5], f[6],
                                                       t[8], t[9], t[10], f[7], height, width);
  result[0] = result[0].to(q.scalar_type());
  return result;
}

std::vector<at::Tensor> aggregated_attention_table_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb_local,
    const at::Tensor& bias_table, const at::Tensor& index_rows, const at::Tensor& index_cols,
    const c10::optional<at::Tensor>& row_weights, const at::Tensor& token_weight,
    const at::Tensor& out, const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad) {
  // t: q, k, v, k_pool, v_pool, rpb_local, bias_table, token_weight, grad_out, out, lse,
  // index_rows, index_cols, row_weights.
  const auto t =
      checked_table_backward(grad_out, q, k, v, k_pool, v_pool, rpb_local, bias_table, index_rows,
                             index_cols, row_weights, token_weight, out, lse, height, width);
  if (q.is_cuda()) {
#ifdef WITH_CUDA
    return aggregated_attention_table_backward_cuda(t[8], t[0], t[1], t[2], t[3], t[4], t[5], t[6],
                                                    t[11], t[12], t[13], t[7], t[9], t[10], height,
                                                    width, bias_grad);
#else
    TORCH_CHECK(false, "aggregated_attention: transnext_mm._ext was built without CUDA kernels");
#endif
  }
  TORCH_CHECK(q.device().is_cpu(), "aggregated_attention: no kernels for device ", q.device());
  if (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble)
    return aggregated_attention_table_backward_cpu(t[8], t[0], t[1], t[2], t[3], t[4], t[5], t[6],
                                                   t[11], t[12], t[13], t[7], t[9], t[10], height,
                                                   width, bias_grad);
  const auto f = to_dtype({t.begin(), t.begin() + 10}, at::kFloat);
  auto grads = aggregated_attention_table_backward_cpu(f[8], f[0], f[1], f[2], f[3], f[4], f[5],
                                                       f[6], t[11], t[12], t[13], f[7], f[9], t[10],
                                                       height, width, bias_grad);
  for (auto& g : grads) g = g.to(q.scalar_type());
  return grads;
}

}  // namespace transnext_mm
