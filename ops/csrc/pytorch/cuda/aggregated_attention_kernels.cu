// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CUDA kernels of the aggregated-attention op: a fused flash-style forward (one online softmax over
// the 3x3 window and the pooled keys; only out and the fp32 log-sum-exp are written) and a
// recomputing backward in three kernels (query side, pooled-key side, window keys/values gather),
// and with the pooled bias in table form a fourth that gathers the table's gradient.
// The kernels, their grids and their order are those of common/cuda/ (the code the CPU replay runs
// too); this file only supplies CUDA's indices, barrier and launch.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/cuda/aggregated_attention_blocks.cuh"
#include "common/cuda/aggregated_attention_launch.cuh"
#include "pytorch/cuda/aggregated_attention_cuda.h"

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

// One entry point for every kernel descriptor of aggregated_attention_blocks.cuh: the block body
// with its shared memory, compiled for the descriptor's launch bounds.
template <typename Kernel>
__global__ void __launch_bounds__(Kernel::kThreads, Kernel::kMinBlocks)
    kernel(const typename Kernel::Params p) {
  __shared__ typename Kernel::Shared shared;
  Kernel::body(CudaContext{}, p, shared);
}

// Launches on one stream; the grid and block size were checked by launch_kernel_checked.
struct CudaLauncher {
  cudaStream_t stream;
  template <typename Kernel>
  void launch(const Launch& launch, const typename Kernel::Params& p) const {
    const dim3 grid(static_cast<unsigned>(launch.grid[0]), static_cast<unsigned>(launch.grid[1]),
                    static_cast<unsigned>(launch.grid[2]));
    kernel<Kernel><<<grid, launch.threads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

template <typename scalar_t>
void launch_aggregated_attention_forward(const ForwardParams<scalar_t>& p, cudaStream_t stream) {
  run_forward_kernels(p, CudaLauncher{stream});
}

template <typename scalar_t>
void launch_aggregated_attention_backward(const BackwardParams<scalar_t>& p,
                                          const Launch& pool_launch, cudaStream_t stream) {
  run_backward_kernels(p, pool_launch, CudaLauncher{stream});
}

template <typename acc_t>
void launch_aggregated_attention_table_grad(const TableGradParams<acc_t>& p, cudaStream_t stream) {
  run_table_grad_kernel(p, CudaLauncher{stream});
}

template void launch_aggregated_attention_table_grad<float>(const TableGradParams<float>&,
                                                            cudaStream_t);

#define TNX_INSTANTIATE(T)                                                                       \
  template void launch_aggregated_attention_forward<T>(const ForwardParams<T>&, cudaStream_t);   \
  template void launch_aggregated_attention_backward<T>(const BackwardParams<T>&, const Launch&, \
                                                        cudaStream_t);
TNX_INSTANTIATE(float)
TNX_INSTANTIATE(c10::Half)
TNX_INSTANTIATE(c10::BFloat16)
#undef TNX_INSTANTIATE

}  // namespace transnext_mm
