// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CUDA kernels of the aggregated-attention op: a fused flash-style forward (one online softmax over
// the 3x3 window and the pooled keys; only out and the fp32 log-sum-exp are written) and a
// recomputing backward in three kernels (query side, pooled-key side, window keys/values gather).
// Each kernel is a wrapper around its block body in common/aggregated_attention_common.h (the
// code the CPU replay runs too), launched with the grid of the shared launch plans.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../common/aggregated_attention_common.h"
#include "aggregated_attention_cuda.h"

namespace transnext_mm {
namespace {

// The kernel-body context on the device: CUDA's indices and barrier.
struct CudaContext {
  __device__ int thread() const { return threadIdx.x; }
  __device__ int threads() const { return blockDim.x; }
  __device__ int64_t block(int axis) const {
    return axis == 0 ? blockIdx.x : axis == 1 ? blockIdx.y : blockIdx.z;
  }
  __device__ int64_t grid(int axis) const {
    return axis == 0 ? gridDim.x : axis == 1 ? gridDim.y : gridDim.z;
  }
  __device__ void sync() const { __syncthreads(); }
};

template <typename scalar_t, typename HD>
__global__ void __launch_bounds__(kQueryThreads) forward_kernel(const ForwardParams<scalar_t> p) {
  __shared__ ForwardShared<scalar_t, HD> shared;
  forward_block<scalar_t, HD>(CudaContext{}, p, shared);
}

template <typename scalar_t, typename HD>
__global__ void __launch_bounds__(kQueryThreads)
    backward_query_kernel(const BackwardParams<scalar_t> p) {
  __shared__ ForwardShared<scalar_t, HD> shared;
  backward_query_block<scalar_t, HD>(CudaContext{}, p, shared);
}

template <typename scalar_t, typename HD>
__global__ void __launch_bounds__(kPoolThreads)
    backward_pool_kernel(const BackwardParams<scalar_t> p) {
  __shared__ PoolGradShared<scalar_t, HD> shared;
  backward_pool_block<scalar_t, HD>(CudaContext{}, p, shared);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kGatherThreads)
    window_grad_kernel(const BackwardParams<scalar_t> p) {
  window_grad_block<scalar_t>(CudaContext{}, p);
}

dim3 grid_of(const Launch& launch) {
  TORCH_CHECK(launch.grid[0] < (int64_t(1) << 31) && launch.grid[1] <= kMaxGridYZ &&
                  launch.grid[2] <= kMaxGridYZ,
              "aggregated_attention: grid too large");
  return dim3(static_cast<unsigned>(launch.grid[0]), static_cast<unsigned>(launch.grid[1]),
              static_cast<unsigned>(launch.grid[2]));
}

}  // namespace

template <typename scalar_t>
void launch_aggregated_attention_forward(const ForwardParams<scalar_t>& p, cudaStream_t stream) {
  const Launch launch = query_launch(p.sizes);
  dispatch_head_dim(p.sizes.d, [&](auto head_dim) {
    forward_kernel<scalar_t, decltype(head_dim)>
        <<<grid_of(launch), launch.threads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_aggregated_attention_backward(const BackwardParams<scalar_t>& p,
                                          const Launch& pool_launch, cudaStream_t stream) {
  const AttentionSizes& s = p.sizes;
  dispatch_head_dim(s.d, [&](auto head_dim) {
    using HD = decltype(head_dim);
    const Launch query = query_launch(s);
    backward_query_kernel<scalar_t, HD><<<grid_of(query), query.threads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (s.pool > 0) {
      backward_pool_kernel<scalar_t, HD>
          <<<grid_of(pool_launch), pool_launch.threads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  const Launch gather = gather_launch(s);
  window_grad_kernel<scalar_t><<<grid_of(gather), gather.threads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define TNX_INSTANTIATE(T)                                                                    \
  template void launch_aggregated_attention_forward<T>(const ForwardParams<T>&, cudaStream_t); \
  template void launch_aggregated_attention_backward<T>(const BackwardParams<T>&,             \
                                                        const Launch&, cudaStream_t);
TNX_INSTANTIATE(float)
TNX_INSTANTIATE(c10::Half)
TNX_INSTANTIATE(c10::BFloat16)
#undef TNX_INSTANTIATE

}  // namespace transnext_mm
