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

template <typename scalar_t, typename HD>
__global__ void __launch_bounds__(kQueryThreads)
    forward_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                   const scalar_t* __restrict__ v, const scalar_t* __restrict__ k_pool,
                   const scalar_t* __restrict__ v_pool, const scalar_t* __restrict__ rpb,
                   const scalar_t* __restrict__ bias, const scalar_t* __restrict__ token_weight,
                   scalar_t* __restrict__ out, at::opmath_type<scalar_t>* __restrict__ lse,
                   int64_t batch_heads, int64_t heads, int64_t num_tokens, int64_t num_pool,
                   int64_t height, int64_t width, int d) {
  using Thread = ForwardThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  __shared__ acc_t kp_tile[Thread::kTile * HD::kMax];
  __shared__ acc_t vp_tile[Thread::kTile * HD::kMax];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < num_tokens;
  for (int64_t bh = blockIdx.y; bh < batch_heads; bh += gridDim.y) {
    const int64_t h = bh % heads;
    const int64_t rows = bh * num_tokens;
    Thread thread;
    if (active)
      thread.window(q + rows * d, k + rows * d, v + rows * d, rpb + h * kWindowArea,
                    token_weight + (rows + i) * kWindowArea, i, height, width, d);
    for (int64_t p0 = 0; p0 < num_pool; p0 += Thread::kTile) {
      const int count = static_cast<int>(tnx_min<int64_t>(Thread::kTile, num_pool - p0));
      const int64_t offset = (bh * num_pool + p0) * d;
      load_tile(kp_tile, HD::kMax, k_pool + offset, count, d, threadIdx.x, blockDim.x);
      load_tile(vp_tile, HD::kMax, v_pool + offset, count, d, threadIdx.x, blockDim.x);
      __syncthreads();
      if (active)
        thread.pool_tile(kp_tile, vp_tile, count, bias + (h * num_tokens + i) * num_pool + p0, d);
      __syncthreads();
    }
    if (active) thread.finish(out + (rows + i) * d, lse + rows + i, d);
  }
}

template <typename scalar_t, typename HD>
__global__ void __launch_bounds__(kQueryThreads) backward_query_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
    const scalar_t* __restrict__ k, const scalar_t* __restrict__ v,
    const scalar_t* __restrict__ k_pool, const scalar_t* __restrict__ v_pool,
    const scalar_t* __restrict__ rpb, const scalar_t* __restrict__ bias,
    const scalar_t* __restrict__ token_weight, const scalar_t* __restrict__ out,
    const at::opmath_type<scalar_t>* __restrict__ lse, scalar_t* __restrict__ dq,
    scalar_t* __restrict__ dtoken_weight, at::opmath_type<scalar_t>* __restrict__ ds_local,
    at::opmath_type<scalar_t>* __restrict__ weight_local,
    at::opmath_type<scalar_t>* __restrict__ delta, int64_t batch_heads, int64_t heads,
    int64_t num_tokens, int64_t num_pool, int64_t height, int64_t width, int d) {
  using Thread = BackwardQueryThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  constexpr int kTile = TileRows<HD::kMax, acc_t>::value;
  __shared__ acc_t kp_tile[kTile * HD::kMax];
  __shared__ acc_t vp_tile[kTile * HD::kMax];
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < num_tokens;
  for (int64_t bh = blockIdx.y; bh < batch_heads; bh += gridDim.y) {
    const int64_t h = bh % heads;
    const int64_t rows = bh * num_tokens;
    const int64_t row = rows + i;
    Thread thread;
    if (active)
      thread.window(q + rows * d, k + rows * d, v + rows * d, rpb + h * kWindowArea,
                    token_weight + row * kWindowArea, out + row * d, grad_out + row * d,
                    lse[row], i, height, width, d, ds_local + row * kWindowArea,
                    weight_local + row * kWindowArea, dtoken_weight + row * kWindowArea,
                    delta + row);
    for (int64_t p0 = 0; p0 < num_pool; p0 += kTile) {
      const int count = static_cast<int>(tnx_min<int64_t>(kTile, num_pool - p0));
      const int64_t offset = (bh * num_pool + p0) * d;
      load_tile(kp_tile, HD::kMax, k_pool + offset, count, d, threadIdx.x, blockDim.x);
      load_tile(vp_tile, HD::kMax, v_pool + offset, count, d, threadIdx.x, blockDim.x);
      __syncthreads();
      if (active)
        thread.pool_tile(kp_tile, vp_tile, count, bias + (h * num_tokens + i) * num_pool + p0, d);
      __syncthreads();
    }
    if (active) thread.finish(dq + row * d, d);
  }
}

// Grid: (key tiles, query chunks, heads); loops over the batch so that each thread alone owns
// d bias_pool[h, chunk, p]. Partial dk_pool / dv_pool per chunk are summed afterwards.
template <typename scalar_t, typename HD>
__global__ void __launch_bounds__(kPoolThreads) backward_pool_kernel(
    const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ q,
    const scalar_t* __restrict__ k_pool, const scalar_t* __restrict__ v_pool,
    const scalar_t* __restrict__ bias, const at::opmath_type<scalar_t>* __restrict__ lse,
    const at::opmath_type<scalar_t>* __restrict__ delta, at::opmath_type<scalar_t>* dbias,
    at::opmath_type<scalar_t>* __restrict__ dkp_partial,
    at::opmath_type<scalar_t>* __restrict__ dvp_partial, int64_t batch, int64_t heads,
    int64_t num_tokens, int64_t num_pool, int64_t chunk_len, int d) {
  using Thread = BackwardPoolThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  __shared__ acc_t q_tile[Thread::kTile * HD::kMax];
  __shared__ acc_t g_tile[Thread::kTile * HD::kMax];
  __shared__ acc_t lse_tile[Thread::kTile];
  __shared__ acc_t delta_tile[Thread::kTile];
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = p < num_pool;
  const int64_t h = blockIdx.z;
  const int64_t i_begin = blockIdx.y * chunk_len;
  const int64_t i_end = tnx_min(num_tokens, i_begin + chunk_len);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t bh = b * heads + h;
    Thread thread;
    if (active) thread.begin(k_pool + (bh * num_pool + p) * d, v_pool + (bh * num_pool + p) * d, d);
    for (int64_t i0 = i_begin; i0 < i_end; i0 += Thread::kTile) {
      const int count = static_cast<int>(tnx_min<int64_t>(Thread::kTile, i_end - i0));
      const int64_t row = bh * num_tokens + i0;
      load_tile(q_tile, HD::kMax, q + row * d, count, d, threadIdx.x, blockDim.x);
      load_tile(g_tile, HD::kMax, grad_out + row * d, count, d, threadIdx.x, blockDim.x);
      for (int t = threadIdx.x; t < count; t += blockDim.x) {
        lse_tile[t] = lse[row + t];
        delta_tile[t] = delta[row + t];
      }
      __syncthreads();
      if (active) {
        const int64_t column = (h * num_tokens + i0) * num_pool + p;
        thread.query_tile(q_tile, g_tile, lse_tile, delta_tile, count, bias + column,
                          dbias == nullptr ? nullptr : dbias + column, num_pool, b == 0, d);
      }
      __syncthreads();
    }
    if (active) {
      const int64_t slot = ((blockIdx.y * batch + b) * heads + h) * num_pool + p;
      thread.finish(dkp_partial + slot * d, dvp_partial + slot * d, d);
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kGatherThreads) window_grad_kernel(
    const scalar_t* __restrict__ q, const scalar_t* __restrict__ grad_out,
    const at::opmath_type<scalar_t>* __restrict__ ds_local,
    const at::opmath_type<scalar_t>* __restrict__ weight_local, scalar_t* __restrict__ dk,
    scalar_t* __restrict__ dv, int64_t total, int64_t num_tokens, int64_t height, int64_t width,
    int d) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int c = static_cast<int>(idx % d);
    const int64_t n = (idx / d) % num_tokens;
    const int64_t bh = idx / (static_cast<int64_t>(d) * num_tokens);
    acc_t grad_k, grad_v;
    gather_window_grads(q + bh * num_tokens * d, grad_out + bh * num_tokens * d,
                        ds_local + bh * num_tokens * kWindowArea,
                        weight_local + bh * num_tokens * kWindowArea, n, c, height, width, d,
                        &grad_k, &grad_v);
    dk[idx] = static_cast<scalar_t>(grad_k);
    dv[idx] = static_cast<scalar_t>(grad_v);
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
        <<<query_grid(s.tokens, s.batch * s.heads), kQueryThreads, 0, stream>>>(
            p.q, p.k, p.v, p.k_pool, p.v_pool, p.rpb, p.bias, p.token_weight, p.out, p.lse,
            s.batch * s.heads, s.heads, s.tokens, s.pool, s.height, s.width, s.d);
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
        <<<query_grid(s.tokens, s.batch * s.heads), kQueryThreads, 0, stream>>>(
            p.grad_out, p.q, p.k, p.v, p.k_pool, p.v_pool, p.rpb, p.bias, p.token_weight, p.out,
            p.lse, p.dq, p.dtoken_weight, p.ds_local, p.weight_local, p.delta,
            s.batch * s.heads, s.heads, s.tokens, s.pool, s.height, s.width, s.d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (s.pool > 0) {
      const int64_t chunks = (s.tokens + p.chunk_len - 1) / p.chunk_len;
      TORCH_CHECK(chunks <= kMaxGridY && s.heads <= kMaxGridY,
                  "aggregated_attention: too many heads or query chunks for the grid");
      const dim3 grid(static_cast<unsigned>((s.pool + kPoolThreads - 1) / kPoolThreads),
                      static_cast<unsigned>(chunks), static_cast<unsigned>(s.heads));
      backward_pool_kernel<scalar_t, HD><<<grid, kPoolThreads, 0, stream>>>(
          p.grad_out, p.q, p.k_pool, p.v_pool, p.bias, p.lse, p.delta, p.dbias, p.dkp_partial,
          p.dvp_partial, s.batch, s.heads, s.tokens, s.pool, p.chunk_len, s.d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  const int64_t total = s.batch * s.heads * s.tokens * s.d;
  const int64_t blocks =
      std::min<int64_t>((total + kGatherThreads - 1) / kGatherThreads, int64_t(1) << 20);
  window_grad_kernel<scalar_t><<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(
      p.q, p.grad_out, p.ds_local, p.weight_local, p.dk, p.dv, total, s.tokens, s.height,
      s.width, s.d);
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
