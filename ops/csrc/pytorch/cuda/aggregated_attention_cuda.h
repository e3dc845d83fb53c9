// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Interface between the CUDA launchers (aggregated_attention_cuda.cpp: tensors, guards, buffers,
// through the glue shared with the replay) and the kernels (aggregated_attention_kernels.cu: raw
// pointers only, so nvcc never parses the ATen operator headers and compiles in seconds).
#pragma once

#include <cuda_runtime_api.h>

#include "common/cuda/aggregated_attention_blocks.cuh"
#include "common/cuda/aggregated_attention_launch.cuh"

namespace transnext_mm {

// Each checks every launch (C10_CUDA_KERNEL_LAUNCH_CHECK). The forward and backward are
// instantiated for float, c10::Half and c10::BFloat16, the table gradient for float (the
// accumulation type of all three).
template <typename scalar_t>
void launch_aggregated_attention_forward(const ForwardParams<scalar_t>& params,
                                         cudaStream_t stream);
template <typename scalar_t>
void launch_aggregated_attention_backward(const BackwardParams<scalar_t>& params,
                                          const Launch& pool_launch, cudaStream_t stream);
template <typename acc_t>
void launch_aggregated_attention_table_grad(const TableGradParams<acc_t>& params,
                                            cudaStream_t stream);

}  // namespace transnext_mm
