// Copyright (c) transnext-mm contributors. All rights reserved.
//
// The CPU replay of the aggregated-attention CUDA kernels, a test tool built only when asked for
// (TRANSNEXT_MM_WITH_REPLAY=1) into its own module transnext_mm._ext_replay (replay/pybind.cpp).
#pragma once

#include <ATen/ATen.h>

#include <map>
#include <string>
#include <vector>

namespace transnext_mm {

// CPU replays of the CUDA kernels on CPU tensors. Same arguments, checks and results as
// aggregated_attention_forward / aggregated_attention_backward (pytorch/aggregated_attention.h);
// the forward takes the threads per query (0: the launch plan's choice, query_split; 1, 2 or 4),
// the backward the pooled-key kernel's target block count (kPoolGradTargetBlocks on the GPU; 1
// gives one query chunk and one batch group, the other extreme of its schedule).
std::vector<at::Tensor> aggregated_attention_forward_replay(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb_local, const at::Tensor& bias_pool,
    const at::Tensor& token_weight, int64_t height, int64_t width, int64_t query_split);
std::vector<at::Tensor> aggregated_attention_backward_replay(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb_local,
    const at::Tensor& bias_pool, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad,
    int64_t pool_target_blocks);
// The same with the pooled bias in table form (as aggregated_attention_table_forward /
// aggregated_attention_table_backward).
std::vector<at::Tensor> aggregated_attention_table_forward_replay(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb_local, const at::Tensor& bias_table,
    const at::Tensor& index_rows, const at::Tensor& index_cols,
    const c10::optional<at::Tensor>& row_weights, const at::Tensor& token_weight, int64_t height,
    int64_t width, int64_t query_split);
std::vector<at::Tensor> aggregated_attention_table_backward_replay(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb_local,
    const at::Tensor& bias_table, const at::Tensor& index_rows, const at::Tensor& index_cols,
    const c10::optional<at::Tensor>& row_weights, const at::Tensor& token_weight,
    const at::Tensor& out, const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad,
    int64_t pool_target_blocks);

// The CUDA kernels' launch plans for these sizes, as the replay and the GPU use them:
// {"forward": grid x, y, z, threads, query split}, {"backward_query": grid x, y, z, threads},
// {"pool_grad": ..., chunk_len, group_len, lanes}, {"gather": ...}.
std::map<std::string, std::vector<int64_t>> aggregated_attention_launch_plans(
    int64_t batch, int64_t heads, int64_t tokens, int64_t pool, int64_t d, bool bias_grad,
    int64_t pool_target_blocks);

// Checks of the replay's barrier model (tests): a block of 64 threads passes values through
// shared memory. mode "barrier": with __syncthreads, returns them reversed; "no_barrier": without
// it (stale values: NaN); "divergent": thread 0 skips the barrier (raises).
at::Tensor cuda_replay_selftest(const std::string& mode);

}  // namespace transnext_mm
