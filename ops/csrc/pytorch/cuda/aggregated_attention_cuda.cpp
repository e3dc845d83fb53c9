// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CUDA launchers of the aggregated-attention op: the glue shared with the CPU replay
// (aggregated_attention_glue.h) with a backend that launches the kernels on the current
// stream of the inputs' device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <type_traits>
#include <vector>

#include "pytorch/cuda/aggregated_attention_cuda.h"
#include "pytorch/cuda/aggregated_attention_glue.h"

namespace transnext_mm {
namespace {

// fp32, fp16 and bf16 (fp32 accumulation); fp64 stays on the CPU / PyTorch paths.
struct CudaBackend {
  template <typename scalar_t>
  static void forward(const ForwardParams<scalar_t>& p) {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "aggregated_attention: no CUDA kernel for float64");
    } else {
      launch_aggregated_attention_forward(p, c10::cuda::getCurrentCUDAStream());
    }
  }
  template <typename scalar_t>
  static void backward(const BackwardParams<scalar_t>& p, const Launch& pool_launch) {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "aggregated_attention: no CUDA kernel for float64");
    } else {
      launch_aggregated_attention_backward(p, pool_launch, c10::cuda::getCurrentCUDAStream());
    }
  }
  template <typename acc_t>
  static void table_grad(const TableGradParams<acc_t>& p) {
    if constexpr (std::is_same_v<acc_t, double>) {
      TORCH_CHECK(false, "aggregated_attention: no CUDA kernel for float64");
    } else {
      launch_aggregated_attention_table_grad(p, c10::cuda::getCurrentCUDAStream());
    }
  }
};

}  // namespace

std::vector<at::Tensor> aggregated_attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb, const at::Tensor& bias,
    const at::Tensor& token_weight, int64_t height, int64_t width) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  return kernel_forward<CudaBackend>(q, k, v, k_pool, v_pool, rpb, bias, at::Tensor(), at::Tensor(),
                                     at::Tensor(), token_weight, height, width);
}

std::vector<at::Tensor> aggregated_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
    const at::Tensor& bias, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  return kernel_backward<CudaBackend>(grad_out, q, k, v, k_pool, v_pool, rpb, bias, at::Tensor(),
                                      at::Tensor(), at::Tensor(), token_weight, out, lse, height,
                                      width, bias_grad);
}

std::vector<at::Tensor> aggregated_attention_table_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb, const at::Tensor& bias_table,
    const at::Tensor& index_rows, const at::Tensor& index_cols, const at::Tensor& row_weights,
    const at::Tensor& token_weight, int64_t height, int64_t width) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  return kernel_forward<CudaBackend>(q, k, v, k_pool, v_pool, rpb, bias_table, index_rows,
                                     index_cols, row_weights, token_weight, height, width);
}

std::vector<at::Tensor> aggregated_attention_table_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
    const at::Tensor& bias_table, const at::Tensor& index_rows, const at::Tensor& index_cols,
    const at::Tensor& row_weights, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  return kernel_backward<CudaBackend>(grad_out, q, k, v, k_pool, v_pool, rpb, bias_table,
                                      index_rows, index_cols, row_weights, token_weight, out, lse,
                                      height, width, bias_grad);
}

}  // namespace transnext_mm
