// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Host glue of the CUDA kernels, shared by the CUDA launchers (aggregated_attention_cuda.cpp) and
// their CPU replay (replay/aggregated_attention_cuda_replay.cpp): output and scratch allocation,
// kernel parameters, the pooled-key plan, and the final reductions of the partial sums. A
// `Backend` runs the kernels:
//   template <typename scalar_t> static void forward(const ForwardParams<scalar_t>&);
//   template <typename scalar_t> static void backward(const BackwardParams<scalar_t>&,
//                                                     const Launch& pool_launch);
//   template <typename acc_t> static void table_grad(const TableGradParams<acc_t>&);
// The pooled bias is dense (heads, N, Np), or in table form when index_rows / index_cols are
// defined (bias is then the (heads, table_size) table; see PoolBiasView). Inputs are checked and
// made row-addressable by the caller (pytorch/aggregated_attention.cpp).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <vector>

#include "common/aggregated_attention_geometry.h"
#include "common/cuda/aggregated_attention_blocks.cuh"
#include "common/cuda/aggregated_attention_launch.cuh"
#include "pytorch/aggregated_attention.h"
#include "pytorch/versioned_tensor_cache.h"

namespace transnext_mm {

inline AttentionSizes attention_sizes(const at::Tensor& q, const at::Tensor& k_pool, int64_t height,
                                      int64_t width) {
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 128,
              "aggregated_attention: the CUDA kernels support head dims 1..128, got ", q.size(3));
  return {
      q.size(0), q.size(1), q.size(2), k_pool.size(2), height, width, static_cast<int>(q.size(3))};
}

// The sum over dim 0 of per-group / per-chunk partial sums. With one slice (one batch group, one
// query chunk: the usual case for the bias gradient) that slice is the sum: a view, no copy of
// the whole slab.
inline at::Tensor sum_partials(const at::Tensor& partial) {
  return partial.size(0) == 1 ? partial.select(0, 0) : partial.sum(0);
}

// The kernels' view of the pooled bias: dense when index_rows is undefined, else the table form
// (one tap when row_weights is undefined).
template <typename scalar_t>
PoolBiasView<scalar_t> pool_bias_view(const at::Tensor& bias, const at::Tensor& index_rows,
                                      const at::Tensor& index_cols, const at::Tensor& row_weights) {
  using acc_t = at::opmath_type<scalar_t>;
  if (!index_rows.defined())
    return {bias.data_ptr<scalar_t>(), nullptr, nullptr, nullptr, nullptr, 0, 0, 0, 0};
  const bool taps = row_weights.defined();
  return {nullptr,
          bias.data_ptr<scalar_t>(),
          index_rows.data_ptr<int64_t>(),
          index_cols.data_ptr<int64_t>(),
          taps ? row_weights.data_ptr<acc_t>() : nullptr,
          bias.size(1),
          static_cast<int>(index_rows.size(-1)),
          static_cast<int>(index_cols.size(1)),
          taps ? static_cast<int>(index_rows.size(0)) : 1};
}

// An index tensor's flat positions grouped by value, as TableGradParams reads them
// (IndexGroupsView), built with device ops only: nothing is read back, so the backward does not
// wait for the device. The members of a value are ascending (a stable sort).
struct IndexGroups {
  at::Tensor values, offsets, members, sorted;

  IndexGroupsView view() const {
    return {values.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), members.data_ptr<int64_t>(),
            sorted.data_ptr<int64_t>() + sorted.numel() - 1, values.numel()};
  }
};

// `index` must have at least one entry.
inline IndexGroups group_by_value(const at::Tensor& index) {
  const auto flat = index.reshape(-1);
  const int64_t n = flat.numel();
  const auto [sorted, order] = at::sort(flat, /*stable=*/true, 0, false);
  // Each sorted entry's slot: the number of distinct values before its own.
  auto is_new = at::ones({n}, flat.options().dtype(at::kBool));
  if (n > 1)
    is_new.narrow(0, 1, n - 1).copy_(sorted.narrow(0, 1, n - 1) != sorted.narrow(0, 0, n - 1));
  const auto slot = is_new.cumsum(0) - 1;
  // offsets[k]: the first sorted entry in slot k; n past the distinct values.
  const auto offsets = at::searchsorted(slot, at::arange(n + 1, slot.options()));
  const auto starts = offsets.narrow(0, 0, n);
  const auto values =
      at::where(starts < n, sorted.gather(0, starts.clamp_max(n - 1)), at::Scalar(kNoIndexValue));
  return {values, offsets, order, sorted};
}

// group_by_value(index), built once per index tensor, version and stream (see
// VersionedTensorCache; the groups are device memory written on the stream that built them, so a
// call on another stream builds its own). Never destroyed: device memory released after the device
// runtime has shut down can crash at exit.
inline IndexGroups cached_groups(const at::Tensor& index) {
  static auto* cache = new VersionedTensorCache<1, IndexGroups>(64);
  const int64_t stream =
      c10::impl::getDeviceGuardImpl(index.device().type())->getStream(index.device()).id();
  if (auto hit = cache->find({index}, stream)) return *hit;
  IndexGroups groups = group_by_value(index);
  cache->add({index}, stream, groups);
  return groups;
}

// The table gradient (heads, table_size) in the accumulation type from the d bias_pool partial
// sums (groups, heads, N, Np) that the backward kernels wrote.
template <typename Backend>
at::Tensor table_grad(const at::Tensor& dbias_partial, const at::Tensor& bias_table,
                      const at::Tensor& index_rows, const at::Tensor& index_cols,
                      const at::Tensor& row_weights, const AttentionSizes& sizes) {
  auto dtable = at::zeros({sizes.heads, bias_table.size(1)}, dbias_partial.options());
  if (dtable.numel() == 0 || dbias_partial.numel() == 0) return dtable;
  const IndexGroups rows = cached_groups(index_rows), cols = cached_groups(index_cols);
  AT_DISPATCH_FLOATING_TYPES(dbias_partial.scalar_type(), "aggregated_attention_table_grad", [&] {
    TableGradParams<scalar_t> p;
    p.sizes = sizes;
    p.dbias_partial = dbias_partial.data_ptr<scalar_t>();
    p.groups = dbias_partial.size(0);
    p.table_size = bias_table.size(1);
    p.pool_h = static_cast<int>(index_rows.size(-1));
    p.pool_w = static_cast<int>(index_cols.size(1));
    p.rows = rows.view();
    p.cols = cols.view();
    p.row_weights = row_weights.defined() ? row_weights.data_ptr<scalar_t>() : nullptr;
    p.dtable = dtable.data_ptr<scalar_t>();
    Backend::template table_grad<scalar_t>(p);
  });
  return dtable;
}

template <typename Backend>
std::vector<at::Tensor> kernel_forward(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& k_pool,
                                       const at::Tensor& v_pool, const at::Tensor& rpb,
                                       const at::Tensor& bias, const at::Tensor& index_rows,
                                       const at::Tensor& index_cols, const at::Tensor& row_weights,
                                       const at::Tensor& token_weight, int64_t height,
                                       int64_t width, int query_split = 0) {
  auto out = empty_rows_like(q);
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)},
                       q.options().dtype(at::toOpMathType(q.scalar_type())));
  if (q.numel() == 0) return {out, lse};
  const AttentionSizes sizes = attention_sizes(q, k_pool, height, width);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, q.scalar_type(), "aggregated_attention", [&] {
        ForwardParams<scalar_t> p{
            sizes,
            q.data_ptr<scalar_t>(),
            k.data_ptr<scalar_t>(),
            v.data_ptr<scalar_t>(),
            k_pool.data_ptr<scalar_t>(),
            v_pool.data_ptr<scalar_t>(),
            rpb.data_ptr<scalar_t>(),
            pool_bias_view<scalar_t>(bias, index_rows, index_cols, row_weights),
            token_weight.data_ptr<scalar_t>(),
            out.data_ptr<scalar_t>(),
            lse.data_ptr<at::opmath_type<scalar_t>>(),
            row_layout(q),
            row_layout(k),
            row_layout(v),
            row_layout(out),
            query_split};
        Backend::template forward<scalar_t>(p);
      });
  return {out, lse};
}

template <typename Backend>
std::vector<at::Tensor> kernel_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb,
    const at::Tensor& bias, const at::Tensor& index_rows, const at::Tensor& index_cols,
    const at::Tensor& row_weights, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad,
    int64_t target_blocks = kPoolGradTargetBlocks) {
  const int64_t batch = q.size(0), heads = q.size(1), N = q.size(2), d = q.size(3);
  const int64_t Np = k_pool.size(2);
  const bool table = index_rows.defined();
  // No bias gradient: an empty tensor of the bias's rank.
  const auto no_bias_grad = [&] {
    return table ? at::empty({0, bias.size(1)}, bias.options())
                 : at::empty({0, N, Np}, bias.options());
  };
  if (q.numel() == 0) {
    return {empty_rows_like(q),
            empty_rows_like(k),
            empty_rows_like(v),
            at::zeros_like(k_pool),
            at::zeros_like(v_pool),
            at::zeros_like(rpb),
            bias_grad ? at::zeros_like(bias) : no_bias_grad(),
            at::zeros_like(token_weight)};
  }
  const AttentionSizes sizes = attention_sizes(q, k_pool, height, width);
  const PoolGradPlan plan = pool_grad_plan(sizes, bias_grad, target_blocks);
  const auto acc_options = q.options().dtype(lse.scalar_type());
  auto dq = empty_rows_like(q), dk = empty_rows_like(k), dv = empty_rows_like(v);
  auto dtoken_weight = at::empty_like(token_weight);
  auto ds_local = at::empty({batch, heads, N, kWindowArea}, acc_options);
  auto weight_local = at::empty_like(ds_local);
  auto delta = at::empty({batch, heads, N}, acc_options);
  // Every element is written by the first batch element of its group (none when Np = 0).
  auto dbias_partial = at::empty({bias_grad ? plan.groups : 0, heads, N, Np}, acc_options);
  // (Np = 0: the pooled-key kernel does not run and these sums are empty.)
  auto dkp_partial = at::empty({plan.chunks, batch, heads, Np, d}, acc_options);
  auto dvp_partial = at::empty_like(dkp_partial);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::Half, at::ScalarType::BFloat16, q.scalar_type(), "aggregated_attention", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        BackwardParams<scalar_t> p;
        p.sizes = sizes;
        p.grad_out = grad_out.data_ptr<scalar_t>();
        p.q = q.data_ptr<scalar_t>();
        p.k = k.data_ptr<scalar_t>();
        p.v = v.data_ptr<scalar_t>();
        p.k_pool = k_pool.data_ptr<scalar_t>();
        p.v_pool = v_pool.data_ptr<scalar_t>();
        p.rpb = rpb.data_ptr<scalar_t>();
        p.bias = pool_bias_view<scalar_t>(bias, index_rows, index_cols, row_weights);
        p.token_weight = token_weight.data_ptr<scalar_t>();
        p.out = out.data_ptr<scalar_t>();
        p.lse = lse.data_ptr<acc_t>();
        p.dq = dq.data_ptr<scalar_t>();
        p.dk = dk.data_ptr<scalar_t>();
        p.dv = dv.data_ptr<scalar_t>();
        p.dtoken_weight = dtoken_weight.data_ptr<scalar_t>();
        p.ds_local = ds_local.data_ptr<acc_t>();
        p.weight_local = weight_local.data_ptr<acc_t>();
        p.delta = delta.data_ptr<acc_t>();
        p.dbias_partial = bias_grad ? dbias_partial.data_ptr<acc_t>() : nullptr;
        p.dkp_partial = dkp_partial.data_ptr<acc_t>();
        p.dvp_partial = dvp_partial.data_ptr<acc_t>();
        p.chunk_len = plan.chunk_len;
        p.group_len = plan.group_len;
        p.pool_lanes = plan.lanes;
        p.grad_layout = row_layout(grad_out);
        p.q_layout = row_layout(q);
        p.k_layout = row_layout(k);
        p.v_layout = row_layout(v);
        p.out_layout = row_layout(out);
        p.dq_layout = row_layout(dq);
        p.dk_layout = row_layout(dk);
        p.dv_layout = row_layout(dv);
        Backend::template backward<scalar_t>(p, plan.launch);
      });
  at::Tensor dbias;
  if (!bias_grad)
    dbias = no_bias_grad();
  else if (table)
    dbias = table_grad<Backend>(dbias_partial, bias, index_rows, index_cols, row_weights, sizes);
  else
    dbias = sum_partials(dbias_partial);
  return {dq,
          dk,
          dv,
          sum_partials(dkp_partial).to(q.scalar_type()),
          sum_partials(dvp_partial).to(q.scalar_type()),
          ds_local.sum(at::IntArrayRef{0, 2}).to(rpb.scalar_type()),
          dbias.to(bias.scalar_type()),
          dtoken_weight};
}

}  // namespace transnext_mm
