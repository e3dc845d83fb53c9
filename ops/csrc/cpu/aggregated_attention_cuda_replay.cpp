// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Sequential CPU replay of the CUDA kernels in cuda/aggregated_attention_cuda.cu: the same grid,
// blocks, tiles, chunking and per-thread code (common/aggregated_attention_common.h), with every
// "thread" of a block run in turn between the barriers. Used by the tests to check the CUDA math
// (all dtypes, including fp16 / bf16 storage with fp32 accumulation) on machines without a GPU.
// Slow by design; not used for real work.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <vector>

#include "../common/aggregated_attention_common.h"
#include "../pytorch/aggregated_attention.h"

namespace transnext_mm {
namespace {

template <typename scalar_t, typename HD>
void replay_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
                    const at::Tensor& bias, const at::Tensor& token_weight, at::Tensor& out,
                    at::Tensor& lse, int64_t height, int64_t width) {
  using Thread = ForwardThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  const int64_t batch_heads = q.size(0) * q.size(1), heads = q.size(1), N = q.size(2);
  const int64_t Np = k_pool.size(2);
  const int d = static_cast<int>(q.size(3));
  std::vector<acc_t> kp_tile(Thread::kTile * HD::kMax), vp_tile(Thread::kTile * HD::kMax);
  std::vector<Thread> threads(kQueryThreads);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kptr = k.data_ptr<scalar_t>();
  const scalar_t *vptr = v.data_ptr<scalar_t>(), *kpp = k_pool.data_ptr<scalar_t>();
  const scalar_t *vpp = v_pool.data_ptr<scalar_t>(), *rp = rpb.data_ptr<scalar_t>();
  const scalar_t *bp = bias.data_ptr<scalar_t>(), *twp = token_weight.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  acc_t* lp = lse.data_ptr<acc_t>();
  const RowLayout q_layout = row_layout(q), k_layout = row_layout(k), v_layout = row_layout(v),
                  out_layout = row_layout(out);
  for (int64_t bh = 0; bh < batch_heads; ++bh) {
    const int64_t h = bh % heads, rows = bh * N;
    for (int64_t block = 0; block * kQueryThreads < N; ++block) {
      auto index = [&](int t) { return block * kQueryThreads + t; };
      for (int t = 0; t < kQueryThreads; ++t)
        if (index(t) < N)
          threads[t].window(q_layout.rows(qp, bh, heads), k_layout.rows(kptr, bh, heads),
                            v_layout.rows(vptr, bh, heads), rp + h * kWindowArea,
                            twp + (rows + index(t)) * kWindowArea, index(t), height, width, d);
      for (int64_t p0 = 0; p0 < Np; p0 += Thread::kTile) {
        const int count = static_cast<int>(tnx_min<int64_t>(Thread::kTile, Np - p0));
        const int64_t offset = (bh * Np + p0) * d;
        for (int t = 0; t < kQueryThreads; ++t) {
          load_tile(kp_tile.data(), HD::kMax, kpp + offset, d, count, d, t, kQueryThreads);
          load_tile(vp_tile.data(), HD::kMax, vpp + offset, d, count, d, t, kQueryThreads);
        }
        for (int t = 0; t < kQueryThreads; ++t)
          if (index(t) < N)
            threads[t].pool_tile(kp_tile.data(), vp_tile.data(), count,
                                 bp + (h * N + index(t)) * Np + p0, d);
      }
      for (int t = 0; t < kQueryThreads; ++t)
        if (index(t) < N)
          threads[t].finish(out_layout.rows(op, bh, heads).row(index(t)), lp + rows + index(t), d);
    }
  }
}

template <typename scalar_t, typename HD>
void replay_backward_query(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& k_pool,
                           const at::Tensor& v_pool, const at::Tensor& rpb,
                           const at::Tensor& bias, const at::Tensor& token_weight,
                           const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                           at::Tensor& dtoken_weight, at::Tensor& ds_local,
                           at::Tensor& weight_local, at::Tensor& delta, int64_t height,
                           int64_t width) {
  using Thread = BackwardQueryThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  constexpr int kTile = TileRows<HD::kMax, acc_t>::value;
  const int64_t batch_heads = q.size(0) * q.size(1), heads = q.size(1), N = q.size(2);
  const int64_t Np = k_pool.size(2);
  const int d = static_cast<int>(q.size(3));
  std::vector<acc_t> kp_tile(kTile * HD::kMax), vp_tile(kTile * HD::kMax);
  std::vector<Thread> threads(kQueryThreads);
  const scalar_t *gp = grad_out.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>();
  const scalar_t *kptr = k.data_ptr<scalar_t>(), *vptr = v.data_ptr<scalar_t>();
  const scalar_t *kpp = k_pool.data_ptr<scalar_t>(), *vpp = v_pool.data_ptr<scalar_t>();
  const scalar_t *rp = rpb.data_ptr<scalar_t>(), *bp = bias.data_ptr<scalar_t>();
  const scalar_t *twp = token_weight.data_ptr<scalar_t>(), *op = out.data_ptr<scalar_t>();
  const acc_t* lp = lse.data_ptr<acc_t>();
  const RowLayout q_layout = row_layout(q), k_layout = row_layout(k), v_layout = row_layout(v),
                  out_layout = row_layout(out), grad_layout = row_layout(grad_out),
                  dq_layout = row_layout(dq);
  for (int64_t bh = 0; bh < batch_heads; ++bh) {
    const int64_t h = bh % heads, rows = bh * N;
    for (int64_t block = 0; block * kQueryThreads < N; ++block) {
      auto index = [&](int t) { return block * kQueryThreads + t; };
      for (int t = 0; t < kQueryThreads; ++t) {
        const int64_t i = index(t), row = rows + i;
        if (i < N)
          threads[t].window(q_layout.rows(qp, bh, heads), k_layout.rows(kptr, bh, heads),
                            v_layout.rows(vptr, bh, heads), rp + h * kWindowArea,
                            twp + row * kWindowArea, out_layout.rows(op, bh, heads).row(i),
                            grad_layout.rows(gp, bh, heads).row(i), lp[row], i, height, width, d,
                            ds_local.data_ptr<acc_t>() + row * kWindowArea,
                            weight_local.data_ptr<acc_t>() + row * kWindowArea,
                            dtoken_weight.data_ptr<scalar_t>() + row * kWindowArea,
                            delta.data_ptr<acc_t>() + row);
      }
      for (int64_t p0 = 0; p0 < Np; p0 += kTile) {
        const int count = static_cast<int>(tnx_min<int64_t>(kTile, Np - p0));
        const int64_t offset = (bh * Np + p0) * d;
        for (int t = 0; t < kQueryThreads; ++t) {
          load_tile(kp_tile.data(), HD::kMax, kpp + offset, d, count, d, t, kQueryThreads);
          load_tile(vp_tile.data(), HD::kMax, vpp + offset, d, count, d, t, kQueryThreads);
        }
        for (int t = 0; t < kQueryThreads; ++t)
          if (index(t) < N)
            threads[t].pool_tile(kp_tile.data(), vp_tile.data(), count,
                                 bp + (h * N + index(t)) * Np + p0, d);
      }
      for (int t = 0; t < kQueryThreads; ++t)
        if (index(t) < N)
          threads[t].finish(dq_layout.rows(dq.data_ptr<scalar_t>(), bh, heads).row(index(t)), d);
    }
  }
}

template <typename scalar_t, typename HD>
void replay_backward_pool(const at::Tensor& grad_out, const at::Tensor& q,
                          const at::Tensor& k_pool, const at::Tensor& v_pool,
                          const at::Tensor& bias, const at::Tensor& lse, const at::Tensor& delta,
                          at::opmath_type<scalar_t>* dbias, at::Tensor& dkp_partial,
                          at::Tensor& dvp_partial, int64_t chunk_len) {
  using Thread = BackwardPoolThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  const int64_t batch = q.size(0), heads = q.size(1), N = q.size(2), Np = k_pool.size(2);
  const int d = static_cast<int>(q.size(3));
  const int64_t chunks = (N + chunk_len - 1) / chunk_len;
  std::vector<acc_t> q_tile(Thread::kTile * HD::kMax), g_tile(Thread::kTile * HD::kMax);
  std::vector<acc_t> lse_tile(Thread::kTile), delta_tile(Thread::kTile);
  std::vector<Thread> threads(kPoolThreads);
  const scalar_t *gp = grad_out.data_ptr<scalar_t>(), *qp = q.data_ptr<scalar_t>();
  const scalar_t *kpp = k_pool.data_ptr<scalar_t>(), *vpp = v_pool.data_ptr<scalar_t>();
  const scalar_t* bp = bias.data_ptr<scalar_t>();
  const acc_t *lp = lse.data_ptr<acc_t>(), *dp = delta.data_ptr<acc_t>();
  const RowLayout q_layout = row_layout(q), grad_layout = row_layout(grad_out);
  for (int64_t h = 0; h < heads; ++h) {
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      for (int64_t key_block = 0; key_block * kPoolThreads < Np; ++key_block) {
        auto index = [&](int t) { return key_block * kPoolThreads + t; };
        const int64_t i_begin = chunk * chunk_len, i_end = tnx_min(N, i_begin + chunk_len);
        for (int64_t b = 0; b < batch; ++b) {
          const int64_t bh = b * heads + h;
          const Rows<const scalar_t> q_bh = q_layout.rows(qp, bh, heads);
          const Rows<const scalar_t> g_bh = grad_layout.rows(gp, bh, heads);
          for (int t = 0; t < kPoolThreads; ++t)
            if (index(t) < Np)
              threads[t].begin(kpp + (bh * Np + index(t)) * d, vpp + (bh * Np + index(t)) * d, d);
          for (int64_t i0 = i_begin; i0 < i_end; i0 += Thread::kTile) {
            const int count = static_cast<int>(tnx_min<int64_t>(Thread::kTile, i_end - i0));
            const int64_t row = bh * N + i0;
            for (int t = 0; t < kPoolThreads; ++t) {
              load_tile(q_tile.data(), HD::kMax, q_bh.row(i0), q_bh.stride, count, d, t,
                        kPoolThreads);
              load_tile(g_tile.data(), HD::kMax, g_bh.row(i0), g_bh.stride, count, d, t,
                        kPoolThreads);
              for (int e = t; e < count; e += kPoolThreads) {
                lse_tile[e] = lp[row + e];
                delta_tile[e] = dp[row + e];
              }
            }
            for (int t = 0; t < kPoolThreads; ++t) {
              if (index(t) >= Np) continue;
              const int64_t column = (h * N + i0) * Np + index(t);
              threads[t].query_tile(q_tile.data(), g_tile.data(), lse_tile.data(),
                                    delta_tile.data(), count, bp + column,
                                    dbias == nullptr ? nullptr : dbias + column, Np, b == 0, d);
            }
          }
          for (int t = 0; t < kPoolThreads; ++t) {
            if (index(t) >= Np) continue;
            const int64_t slot = ((chunk * batch + b) * heads + h) * Np + index(t);
            threads[t].finish(dkp_partial.data_ptr<acc_t>() + slot * d,
                              dvp_partial.data_ptr<acc_t>() + slot * d, d);
          }
        }
      }
    }
  }
}

}  // namespace

std::vector<at::Tensor> aggregated_attention_forward_cuda_replay(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb, const at::Tensor& bias,
    const at::Tensor& token_weight, int64_t height, int64_t width) {
  auto out = empty_rows_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)},
                       q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, q.scalar_type(), "replay_forward", [&] {
        dispatch_head_dim(q.size(3), [&](auto head_dim) {
          replay_forward<scalar_t, decltype(head_dim)>(q, k, v, k_pool, v_pool, rpb, bias,
                                                       token_weight, out, lse, height, width);
        });
      });
  return {out, lse};
}

std::vector<at::Tensor> aggregated_attention_backward_cuda_replay(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
    const at::Tensor& bias, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad) {
  const int64_t batch = q.size(0), heads = q.size(1), N = q.size(2), d = q.size(3);
  const int64_t Np = k_pool.size(2);
  const auto acc_options = q.options().dtype(lse.scalar_type());
  auto dq = empty_rows_like(q), dk = empty_rows_like(k), dv = empty_rows_like(v);
  auto dtoken_weight = at::empty_like(token_weight);
  auto ds_local = at::empty({batch, heads, N, kWindowArea}, acc_options);
  auto weight_local = at::empty_like(ds_local);
  auto delta = at::empty({batch, heads, N}, acc_options);
  auto dbias = at::empty({bias_grad ? heads : 0, N, Np}, acc_options);
  at::Tensor dkp_partial, dvp_partial;
  TORCH_CHECK(q.numel() > 0, "aggregated_attention replay: empty input");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, q.scalar_type(), "replay_backward", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        dispatch_head_dim(d, [&](auto head_dim) {
          using HD = decltype(head_dim);
          replay_backward_query<scalar_t, HD>(grad_out, q, k, v, k_pool, v_pool, rpb, bias,
                                              token_weight, out, lse, dq, dtoken_weight,
                                              ds_local, weight_local, delta, height, width);
          const int64_t chunk_len = pool_grad_chunk_len(batch, heads, N, Np);
          dkp_partial = at::empty({(N + chunk_len - 1) / chunk_len, batch, heads, Np, d},
                                  acc_options);
          dvp_partial = at::empty_like(dkp_partial);
          replay_backward_pool<scalar_t, HD>(grad_out, q, k_pool, v_pool, bias, lse, delta,
                                             bias_grad ? dbias.data_ptr<acc_t>() : nullptr,
                                             dkp_partial, dvp_partial, chunk_len);
        });
        const scalar_t *qp = q.data_ptr<scalar_t>(), *gp = grad_out.data_ptr<scalar_t>();
        const acc_t *dsp = ds_local.data_ptr<acc_t>(), *wp = weight_local.data_ptr<acc_t>();
        const RowLayout q_layout = row_layout(q), grad_layout = row_layout(grad_out),
                        dk_layout = row_layout(dk), dv_layout = row_layout(dv);
        for (int64_t idx = 0; idx < q.numel(); ++idx) {  // one CUDA thread per element
          const int c = static_cast<int>(idx % d);
          const int64_t n = (idx / d) % N, bh = idx / (d * N);
          acc_t grad_k, grad_v;
          gather_window_grads(q_layout.rows(qp, bh, heads), grad_layout.rows(gp, bh, heads),
                              dsp + bh * N * kWindowArea, wp + bh * N * kWindowArea, n, c, height,
                              width, &grad_k, &grad_v);
          dk_layout.rows(dk.data_ptr<scalar_t>(), bh, heads).row(n)[c] =
              static_cast<scalar_t>(grad_k);
          dv_layout.rows(dv.data_ptr<scalar_t>(), bh, heads).row(n)[c] =
              static_cast<scalar_t>(grad_v);
        }
      });
  return {dq,
          dk,
          dv,
          dkp_partial.sum(0).to(q.scalar_type()),
          dvp_partial.sum(0).to(q.scalar_type()),
          ds_local.sum({0, 2}).to(rpb.scalar_type()),
          bias_grad ? dbias.to(bias.scalar_type()) : dbias,
          dtoken_weight};
}

}  // namespace transnext_mm
