// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Interface between the CUDA launchers (aggregated_attention_cuda.cpp: tensors, guards, buffers)
// and the kernels (aggregated_attention_kernels.cu: raw pointers only, so nvcc never parses the
// ATen operator headers and compiles in seconds).
#pragma once

#include <ATen/OpMathType.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/aggregated_attention_common.h"

namespace transnext_mm {

struct AttentionSizes {
  int64_t batch, heads, tokens, pool, height, width;
  int d;
};

// q, k, v, out (and grad_out, dq, dk, dv) are (B, heads, N, d) with contiguous channels and the
// given strides; every other tensor is contiguous.
template <typename scalar_t>
struct ForwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  AttentionSizes sizes;
  const scalar_t *q, *k, *v, *k_pool, *v_pool, *rpb, *bias, *token_weight;
  scalar_t* out;
  acc_t* lse;  // (B, heads, N)
  RowLayout q_layout, k_layout, v_layout, out_layout;
};

template <typename scalar_t>
struct BackwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  AttentionSizes sizes;
  const scalar_t *grad_out, *q, *k, *v, *k_pool, *v_pool, *rpb, *bias, *token_weight, *out;
  const acc_t* lse;
  scalar_t *dq, *dk, *dv, *dtoken_weight;
  acc_t *ds_local, *weight_local;  // (B, heads, N, 9) scratch
  acc_t* delta;                    // (B, heads, N) scratch
  acc_t* dbias;                    // (heads, N, Np), or null when bias_pool needs no gradient
  acc_t *dkp_partial, *dvp_partial;  // (chunks, B, heads, Np, d), summed by the launcher
  int64_t chunk_len;                 // queries per chunk of the pooled-key kernel
  RowLayout grad_layout, q_layout, k_layout, v_layout, out_layout, dq_layout, dk_layout, dv_layout;
};

// Both check every launch (C10_CUDA_KERNEL_LAUNCH_CHECK). Instantiated for float, c10::Half and
// c10::BFloat16.
template <typename scalar_t>
void launch_aggregated_attention_forward(const ForwardParams<scalar_t>& params,
                                         cudaStream_t stream);
template <typename scalar_t>
void launch_aggregated_attention_backward(const BackwardParams<scalar_t>& params,
                                          cudaStream_t stream);

}  // namespace transnext_mm
