// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Launch plans of the aggregated-attention CUDA kernels: block sizes, grids and the pooled-key
// gradient kernel's schedule. Host code, shared by the CUDA launchers and the CPU replay
// (see common/cuda/aggregated_attention_thread.cuh for how the kernel headers fit together).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

#include "common/aggregated_attention_geometry.h"

namespace transnext_mm {

constexpr int kQueryThreads = 128;   // forward and dq kernels: one query per thread
constexpr int kPoolThreads = 128;    // pooled-key gradient kernel: (batch lane, pooled key)
constexpr int kPoolMaxLanes = 4;     // batch elements a pooled-key block works on at once
constexpr int kGatherThreads = 256;  // window dk / dv gather: one element per thread
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;

struct Launch {
  int64_t grid[3];
  int threads;
};

// Query-side kernels (forward, dq): one block per (query block, head, batch element) on a 1-D
// grid, the batch element varying fastest, so that the blocks that read the same bias_pool slab
// (head h, the block's queries) run side by side and share it in L2. Any batch x heads fits.
// With `split` threads per query (forward only, see query_split) a block has
// kQueryThreads / split queries.
inline Launch query_launch(const AttentionSizes& s, int split = 1) {
  const int64_t queries = kQueryThreads / split;
  const int64_t query_blocks = (s.tokens + queries - 1) / queries;
  const int64_t blocks = query_blocks * s.heads * s.batch;
  TORCH_CHECK(blocks >= 1 && blocks <= kMaxGridX,
              "aggregated_attention: the CUDA kernels take at most 2^31 - 1 blocks of ", queries,
              " queries per (batch, head), got ", blocks);
  return {{blocks, 1, 1}, kQueryThreads};
}

// The head dims with exact (unrolled) kernel variants; see dispatch_head_dim.
inline bool exact_head_dim(int64_t d) {
  return d == 16 || d == 24 || d == 32 || d == 48 || d == 64;
}

// Forward of small grids (late stages at batch 1-2: a few hundred blocks of 128 queries or fewer,
// on a GPU with 132 SMs) splits each query's pooled keys over 2 or 4 threads, which merge their
// online-softmax states in shared memory at the end: up to 4x the blocks, each with 4x fewer
// queries. Only while the grid is below about two blocks per SM (an H100's 132 SMs), with at
// least one pooled key per part, and for the exact head-dim variants (the generic one keeps no
// room in shared memory for the merge).
constexpr int kMaxQuerySplit = 4;
constexpr int64_t kSmallGridBlocks = 2 * 132;

inline int query_split(const AttentionSizes& s) {
  if (!exact_head_dim(s.d)) return 1;
  const int64_t blocks = query_launch(s).grid[0];
  int split = 1;
  while (split < kMaxQuerySplit && blocks * split < kSmallGridBlocks && 2 * split <= s.pool)
    split *= 2;
  return split;
}

// Grid-stride kernels over `total` elements (> 0): kGatherThreads threads a block, at most 2^20
// blocks.
inline Launch grid_stride_launch(int64_t total) {
  return {
      {std::min<int64_t>((total + kGatherThreads - 1) / kGatherThreads, int64_t(1) << 20), 1, 1},
      kGatherThreads};
}

// The window dk / dv gather: one element per (batch, head, key position, channel).
inline Launch gather_launch(const AttentionSizes& s) {
  return grid_stride_launch(s.batch * s.heads * s.tokens * s.d);
}

// Pooled-key gradient: grid (key tiles x batch groups, query chunks, heads), the group varying
// fastest, so that the blocks sharing a bias_pool slab (head, chunk, key tile) run side by side.
// A block is `lanes` batch lanes of kPoolThreads / lanes pooled keys: its lanes work on `lanes`
// batch elements of its group at once, in passes over the group, and share the block's
// shared-memory tile of bias_pool; the block sums the lanes' d bias_pool in a fixed order and
// writes each element once per query tile and pass (no atomics). Across batch groups the bias
// gradients are per-group partial sums (groups, heads, N, Np), across query chunks the
// dk_pool / dv_pool ones (chunks, B, heads, Np, d), which the launcher sums. Chunks and groups
// are sized to fill a GPU (about kTargetBlocks blocks) while the partial sums stay bounded.
struct PoolGradPlan {
  int64_t chunk_len, chunks, group_len, groups;
  int lanes;
  Launch launch;
};

constexpr int64_t kPoolGradTargetBlocks = 1024;

// Batch lanes of a pooled-key block: as many as the batch can keep busy (a power of two, so that
// the lanes' key columns are whole warps).
inline int pool_grad_lanes(int64_t batch) {
  int lanes = 1;
  while (lanes < kPoolMaxLanes && 2 * lanes <= batch) lanes *= 2;
  return lanes;
}

inline PoolGradPlan pool_grad_plan(const AttentionSizes& s, bool bias_grad,
                                   int64_t target_blocks = kPoolGradTargetBlocks) {
  constexpr int64_t kGranule = 32;
  const int64_t kTargetBlocks = std::max<int64_t>(1, target_blocks);
  constexpr int64_t kMaxPartial = int64_t(1) << 24;  // elements of each kind of partial sums
  const int64_t batch = std::max<int64_t>(s.batch, 1), heads = std::max<int64_t>(s.heads, 1);
  const int lanes = pool_grad_lanes(batch);
  const int64_t keys = kPoolThreads / lanes;  // pooled keys per block
  const int64_t key_tiles = std::max<int64_t>(1, (s.pool + keys - 1) / keys);
  const int64_t granules = std::max<int64_t>(1, (s.tokens + kGranule - 1) / kGranule);
  int64_t chunks = (kTargetBlocks + heads * key_tiles - 1) / (heads * key_tiles);
  const int64_t chunk_slab = std::max<int64_t>(1, batch * heads * s.pool * s.d);
  chunks = std::min({chunks, granules, std::max<int64_t>(1, kMaxPartial / chunk_slab), kMaxGridYZ});
  const int64_t chunk_len = ((granules + chunks - 1) / chunks) * kGranule;
  chunks = std::max<int64_t>(1, (s.tokens + chunk_len - 1) / chunk_len);
  int64_t groups = (kTargetBlocks + heads * key_tiles * chunks - 1) / (heads * key_tiles * chunks);
  groups = std::min(groups, (batch + lanes - 1) / lanes);
  const int64_t bias_slab = std::max<int64_t>(1, heads * s.tokens * s.pool);
  if (bias_grad) groups = std::min(groups, std::max<int64_t>(1, kMaxPartial / bias_slab));
  groups = std::max<int64_t>(1, groups);
  // Whole passes of `lanes` batch elements per group (only the last group may have a short one).
  const int64_t group_len = ((batch + groups - 1) / groups + lanes - 1) / lanes * lanes;
  groups = (batch + group_len - 1) / group_len;
  return {chunk_len, chunks, group_len,
          groups,    lanes,  {{key_tiles * groups, chunks, heads}, kPoolThreads}};
}

}  // namespace transnext_mm
