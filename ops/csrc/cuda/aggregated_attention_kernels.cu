// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CUDA kernels of the aggregated-attention op: a fused flash-style forward (one online softmax over
// the 3x3 window and the pooled keys; only out and the fp32 log-sum-exp are written) and a
// recomputing backward in three kernels (query side, pooled-key side, window keys/values gather).
// The per-thread math is in common/aggregated_attention_common.h; this file holds the launch glue.
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "../common/aggregated_attention_common.h"
#include "aggregated_attention_cuda.h"

namespace transnext_mm {
namespace {

constexpr int64_t kMaxGridY = 65535;

constexpr int kGatherThreads = 256;

// One thread per query: window, then pooled keys streamed through shared-memory tiles.
template <typename scalar_t, typename HD>
__global__ void __launch_bounds__(kQueryThreads) forward_kernel(const ForwardParams<scalar_t> p) {
  using Thread = ForwardThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  __shared__ acc_t kp_tile[Thread::kTile * HD::kMax];
  __shared__ acc_t vp_tile[Thread::kTile * HD::kMax];
  const AttentionSizes& s = p.sizes;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < s.tokens;
  for (int64_t bh = blockIdx.y; bh < s.batch * s.heads; bh += gridDim.y) {
    const int64_t h = bh % s.heads;
    Thread thread;
    if (active)
      thread.window(p.q_layout.rows(p.q, bh, s.heads), p.k_layout.rows(p.k, bh, s.heads),
                    p.v_layout.rows(p.v, bh, s.heads), p.rpb + h * kWindowArea,
                    p.token_weight + (bh * s.tokens + i) * kWindowArea, i, s.height, s.width,
                    s.d);
    for (int64_t p0 = 0; p0 < s.pool; p0 += Thread::kTile) {
      const int count = static_cast<int>(tnx_min<int64_t>(Thread::kTile, s.pool - p0));
      const int64_t offset = (bh * s.pool + p0) * s.d;
      load_tile(kp_tile, HD::kMax, p.k_pool + offset, s.d, count, s.d, threadIdx.x, blockDim.x);
      load_tile(vp_tile, HD::kMax, p.v_pool + offset, s.d, count, s.d, threadIdx.x, blockDim.x);
      __syncthreads();
      if (active)
        thread.pool_tile(kp_tile, vp_tile, count, p.bias + (h * s.tokens + i) * s.pool + p0, s.d);
      __syncthreads();
    }
    if (active)
      thread.finish(p.out_layout.rows(p.out, bh, s.heads).row(i), p.lse + bh * s.tokens + i, s.d);
  }
}

// One thread per query: dq, the window's ds / weights, d token_weight and delta.
template <typename scalar_t, typename HD>
__global__ void __launch_bounds__(kQueryThreads)
    backward_query_kernel(const BackwardParams<scalar_t> p) {
  using Thread = BackwardQueryThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  constexpr int kTile = TileRows<HD::kMax, acc_t>::value;
  __shared__ acc_t kp_tile[kTile * HD::kMax];
  __shared__ acc_t vp_tile[kTile * HD::kMax];
  const AttentionSizes& s = p.sizes;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < s.tokens;
  for (int64_t bh = blockIdx.y; bh < s.batch * s.heads; bh += gridDim.y) {
    const int64_t h = bh % s.heads;
    const int64_t row = bh * s.tokens + i;
    Thread thread;
    if (active)
      thread.window(p.q_layout.rows(p.q, bh, s.heads), p.k_layout.rows(p.k, bh, s.heads),
                    p.v_layout.rows(p.v, bh, s.heads), p.rpb + h * kWindowArea,
                    p.token_weight + row * kWindowArea,
                    p.out_layout.rows(p.out, bh, s.heads).row(i),
                    p.grad_layout.rows(p.grad_out, bh, s.heads).row(i), p.lse[row], i, s.height,
                    s.width, s.d, p.ds_local + row * kWindowArea,
                    p.weight_local + row * kWindowArea, p.dtoken_weight + row * kWindowArea,
                    p.delta + row);
    for (int64_t p0 = 0; p0 < s.pool; p0 += kTile) {
      const int count = static_cast<int>(tnx_min<int64_t>(kTile, s.pool - p0));
      const int64_t offset = (bh * s.pool + p0) * s.d;
      load_tile(kp_tile, HD::kMax, p.k_pool + offset, s.d, count, s.d, threadIdx.x, blockDim.x);
      load_tile(vp_tile, HD::kMax, p.v_pool + offset, s.d, count, s.d, threadIdx.x, blockDim.x);
      __syncthreads();
      if (active)
        thread.pool_tile(kp_tile, vp_tile, count, p.bias + (h * s.tokens + i) * s.pool + p0, s.d);
      __syncthreads();
    }
    if (active) thread.finish(p.dq_layout.rows(p.dq, bh, s.heads).row(i), s.d);
  }
}

// Grid: (key tiles, query chunks, heads); loops over the batch so that each thread alone owns
// d bias_pool[h, chunk, p]. Partial dk_pool / dv_pool per chunk are summed afterwards.
template <typename scalar_t, typename HD>
__global__ void __launch_bounds__(kPoolThreads)
    backward_pool_kernel(const BackwardParams<scalar_t> p) {
  using Thread = BackwardPoolThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  __shared__ acc_t q_tile[Thread::kTile * HD::kMax];
  __shared__ acc_t g_tile[Thread::kTile * HD::kMax];
  __shared__ acc_t lse_tile[Thread::kTile];
  __shared__ acc_t delta_tile[Thread::kTile];
  const AttentionSizes& s = p.sizes;
  const int64_t key = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = key < s.pool;
  const int64_t h = blockIdx.z;
  const int64_t i_begin = blockIdx.y * p.chunk_len;
  const int64_t i_end = tnx_min(s.tokens, i_begin + p.chunk_len);
  for (int64_t b = 0; b < s.batch; ++b) {
    const int64_t bh = b * s.heads + h;
    const Rows<const scalar_t> q_bh = p.q_layout.rows(p.q, bh, s.heads);
    const Rows<const scalar_t> g_bh = p.grad_layout.rows(p.grad_out, bh, s.heads);
    Thread thread;
    if (active)
      thread.begin(p.k_pool + (bh * s.pool + key) * s.d, p.v_pool + (bh * s.pool + key) * s.d,
                   s.d);
    for (int64_t i0 = i_begin; i0 < i_end; i0 += Thread::kTile) {
      const int count = static_cast<int>(tnx_min<int64_t>(Thread::kTile, i_end - i0));
      load_tile(q_tile, HD::kMax, q_bh.row(i0), q_bh.stride, count, s.d, threadIdx.x,
                blockDim.x);
      load_tile(g_tile, HD::kMax, g_bh.row(i0), g_bh.stride, count, s.d, threadIdx.x,
                blockDim.x);
      for (int t = threadIdx.x; t < count; t += blockDim.x) {
        lse_tile[t] = p.lse[bh * s.tokens + i0 + t];
        delta_tile[t] = p.delta[bh * s.tokens + i0 + t];
      }
      __syncthreads();
      if (active) {
        const int64_t column = (h * s.tokens + i0) * s.pool + key;
        thread.query_tile(q_tile, g_tile, lse_tile, delta_tile, count, p.bias + column,
                          p.dbias == nullptr ? nullptr : p.dbias + column, s.pool, b == 0, s.d);
      }
      __syncthreads();
    }
    if (active) {
      const int64_t slot = ((blockIdx.y * s.batch + b) * s.heads + h) * s.pool + key;
      thread.finish(p.dkp_partial + slot * s.d, p.dvp_partial + slot * s.d, s.d);
    }
  }
}

// One thread per (batch, head, key position, channel) of dk / dv.
template <typename scalar_t>
__global__ void __launch_bounds__(kGatherThreads)
    window_grad_kernel(const BackwardParams<scalar_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  const AttentionSizes& s = p.sizes;
  const int64_t total = s.batch * s.heads * s.tokens * s.d;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int c = static_cast<int>(idx % s.d);
    const int64_t n = (idx / s.d) % s.tokens;
    const int64_t bh = idx / (static_cast<int64_t>(s.d) * s.tokens);
    acc_t grad_k, grad_v;
    gather_window_grads(p.q_layout.rows(p.q, bh, s.heads),
                        p.grad_layout.rows(p.grad_out, bh, s.heads),
                        p.ds_local + bh * s.tokens * kWindowArea,
                        p.weight_local + bh * s.tokens * kWindowArea, n, c, s.height, s.width,
                        &grad_k, &grad_v);
    p.dk_layout.rows(p.dk, bh, s.heads).row(n)[c] = static_cast<scalar_t>(grad_k);
    p.dv_layout.rows(p.dv, bh, s.heads).row(n)[c] = static_cast<scalar_t>(grad_v);
  }
}

dim3 query_grid(int64_t num_tokens, int64_t batch_heads) {
  const int64_t blocks = (num_tokens + kQueryThreads - 1) / kQueryThreads;
  TORCH_CHECK(blocks < (int64_t(1) << 31), "aggregated_attention: too many tokens");
  return dim3(static_cast<unsigned>(blocks),
              static_cast<unsigned>(std::min(batch_heads, kMaxGridY)));
}

}  // namespace

template <typename scalar_t>
void launch_aggregated_attention_forward(const ForwardParams<scalar_t>& p, cudaStream_t stream) {
  const AttentionSizes& s = p.sizes;
  dispatch_head_dim(s.d, [&](auto head_dim) {
    forward_kernel<scalar_t, decltype(head_dim)>
        <<<query_grid(s.tokens, s.batch * s.heads), kQueryThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
void launch_aggregated_attention_backward(const BackwardParams<scalar_t>& p,
                                          cudaStream_t stream) {
  const AttentionSizes& s = p.sizes;
  dispatch_head_dim(s.d, [&](auto head_dim) {
    using HD = decltype(head_dim);
    backward_query_kernel<scalar_t, HD>
        <<<query_grid(s.tokens, s.batch * s.heads), kQueryThreads, 0, stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (s.pool > 0) {
      const int64_t chunks = (s.tokens + p.chunk_len - 1) / p.chunk_len;
      TORCH_CHECK(chunks <= kMaxGridY && s.heads <= kMaxGridY,
                  "aggregated_attention: too many heads or query chunks for the grid");
      const dim3 grid(static_cast<unsigned>((s.pool + kPoolThreads - 1) / kPoolThreads),
                      static_cast<unsigned>(chunks), static_cast<unsigned>(s.heads));
      backward_pool_kernel<scalar_t, HD><<<grid, kPoolThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  const int64_t total = s.batch * s.heads * s.tokens * s.d;
  const int64_t blocks =
      std::min<int64_t>((total + kGatherThreads - 1) / kGatherThreads, int64_t(1) << 20);
  window_grad_kernel<scalar_t><<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define TNX_INSTANTIATE(T)                                                                    \
  template void launch_aggregated_attention_forward<T>(const ForwardParams<T>&, cudaStream_t); \
  template void launch_aggregated_attention_backward<T>(const BackwardParams<T>&, cudaStream_t);
TNX_INSTANTIATE(float)
TNX_INSTANTIATE(c10::Half)
TNX_INSTANTIATE(c10::BFloat16)
#undef TNX_INSTANTIATE

}  // namespace transnext_mm
