// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CUDA kernels of the aggregated-attention op: a fused flash-style forward (one online softmax over
// the 3x3 window and the pooled keys; only out and the fp32 log-sum-exp are written) and a
// recomputing backward in three kernels (query side, pooled-key side, window keys/values gather).
// The per-thread math is in common/aggregated_attention_common.h; this file holds the launch glue.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../common/aggregated_attention_common.h"

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
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "aggregated_attention: too many tokens");
  return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(std::min(batch_heads, kMaxGridY)));
}

}  // namespace

std::vector<at::Tensor> aggregated_attention_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb, const at::Tensor& bias,
    const at::Tensor& token_weight, int64_t height, int64_t width) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t batch = q.size(0), heads = q.size(1), num_tokens = q.size(2), d = q.size(3);
  const int64_t num_pool = k_pool.size(2);
  auto out = at::empty_like(q);
  auto lse = at::empty({batch, heads, num_tokens}, q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, q.scalar_type(),
      "aggregated_attention_forward_cuda", [&] {
        dispatch_head_dim(d, [&](auto head_dim) {
          using HD = decltype(head_dim);
          forward_kernel<scalar_t, HD><<<query_grid(num_tokens, batch * heads), kQueryThreads, 0,
                                         stream>>>(
              q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
              k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(), rpb.data_ptr<scalar_t>(),
              bias.data_ptr<scalar_t>(), token_weight.data_ptr<scalar_t>(),
              out.data_ptr<scalar_t>(), lse.data_ptr<at::opmath_type<scalar_t>>(),
              batch * heads, heads, num_tokens, num_pool, height, width, static_cast<int>(d));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return {out, lse};
}

std::vector<at::Tensor> aggregated_attention_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
    const at::Tensor& bias, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  const int64_t batch = q.size(0), heads = q.size(1), num_tokens = q.size(2), d = q.size(3);
  const int64_t num_pool = k_pool.size(2);
  const auto acc_options = q.options().dtype(lse.scalar_type());
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  auto dtoken_weight = at::empty_like(token_weight);
  auto ds_local = at::empty({batch, heads, num_tokens, kWindowArea}, acc_options);
  auto weight_local = at::empty_like(ds_local);
  auto delta = at::empty({batch, heads, num_tokens}, acc_options);
  // Every element is written by the first batch element's pass of the pooled-key kernel.
  auto dbias = at::empty({bias_grad ? heads : 0, num_tokens, num_pool}, acc_options);
  at::Tensor dkp_partial, dvp_partial;
  if (q.numel() == 0) {
    return {dq, dk, dv, at::zeros_like(k_pool), at::zeros_like(v_pool), at::zeros_like(rpb),
            bias_grad ? at::zeros_like(bias) : dbias, dtoken_weight.zero_()};
  }
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, q.scalar_type(),
      "aggregated_attention_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dispatch_head_dim(d, [&](auto head_dim) {
          using HD = decltype(head_dim);
          backward_query_kernel<scalar_t, HD><<<query_grid(num_tokens, batch * heads),
                                                kQueryThreads, 0, stream>>>(
              grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
              v.data_ptr<scalar_t>(), k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(),
              rpb.data_ptr<scalar_t>(), bias.data_ptr<scalar_t>(),
              token_weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
              lse.data_ptr<acc_t>(), dq.data_ptr<scalar_t>(), dtoken_weight.data_ptr<scalar_t>(),
              ds_local.data_ptr<acc_t>(), weight_local.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
              batch * heads, heads, num_tokens, num_pool, height, width, static_cast<int>(d));
          C10_CUDA_KERNEL_LAUNCH_CHECK();

          if (num_pool > 0) {
            constexpr int kTile = BackwardPoolThread<scalar_t, HD>::kTile;
            const int64_t chunk_len =
                pool_grad_chunk_len(batch, heads, num_tokens, num_pool, kTile);
            const int64_t chunks = (num_tokens + chunk_len - 1) / chunk_len;
            TORCH_CHECK(chunks <= kMaxGridY && heads <= kMaxGridY,
                        "aggregated_attention: too many heads or query chunks for the grid");
            dkp_partial = at::empty({chunks, batch, heads, num_pool, d}, acc_options);
            dvp_partial = at::empty_like(dkp_partial);
            const dim3 grid(static_cast<unsigned>((num_pool + kPoolThreads - 1) / kPoolThreads),
                            static_cast<unsigned>(chunks), static_cast<unsigned>(heads));
            backward_pool_kernel<scalar_t, HD><<<grid, kPoolThreads, 0, stream>>>(
                grad_out.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(),
                k_pool.data_ptr<scalar_t>(), v_pool.data_ptr<scalar_t>(),
                bias.data_ptr<scalar_t>(), lse.data_ptr<acc_t>(), delta.data_ptr<acc_t>(),
                bias_grad ? dbias.data_ptr<acc_t>() : nullptr, dkp_partial.data_ptr<acc_t>(),
                dvp_partial.data_ptr<acc_t>(), batch, heads, num_tokens, num_pool, chunk_len,
                static_cast<int>(d));
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        });

        const int64_t total = q.numel();
        const int64_t blocks = std::min<int64_t>((total + kGatherThreads - 1) / kGatherThreads,
                                                 int64_t(1) << 20);
        window_grad_kernel<scalar_t><<<static_cast<unsigned>(blocks), kGatherThreads, 0, stream>>>(
            q.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(), ds_local.data_ptr<acc_t>(),
            weight_local.data_ptr<acc_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
            total, num_tokens, height, width, static_cast<int>(d));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });

  auto dk_pool = num_pool > 0 ? dkp_partial.sum(0).to(q.scalar_type()) : at::zeros_like(k_pool);
  auto dv_pool = num_pool > 0 ? dvp_partial.sum(0).to(q.scalar_type()) : at::zeros_like(v_pool);
  auto drpb = ds_local.sum({0, 2}).to(rpb.scalar_type());
  return {dq, dk, dv, dk_pool, dv_pool, drpb, bias_grad ? dbias.to(bias.scalar_type()) : dbias,
          dtoken_weight};
}

}  // namespace transnext_mm
