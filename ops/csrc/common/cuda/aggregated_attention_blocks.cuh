// Copyright (c) transnext-mm contributors. All rights reserved.
//
// Block bodies of the aggregated-attention CUDA kernels, the kernel descriptors and their launch
// sequence, written once for the CUDA kernels and their CPU replay (see
// common/cuda/aggregated_attention_thread.cuh for how the kernel headers fit together).
//
// Each body is the code of one thread block, templated over a context `Ctx` that supplies
//   ctx.thread()  (threadIdx.x)      ctx.threads() (blockDim.x)
//   ctx.block(a)  (blockIdx.x/y/z)   ctx.grid(a)   (gridDim.x/y/z)     ctx.sync() (__syncthreads)
// and over the block's shared memory (a struct the CUDA kernel declares __shared__). The CUDA
// kernels (pytorch/cuda/aggregated_attention_kernels.cu) are one generic entry point; the replay
// (replay/aggregated_attention_cuda_replay.cpp) runs every thread of a block as a fiber that yields
// at ctx.sync(), in reverse thread order, over the grid that the launch plans
// (aggregated_attention_launch.cuh) compute for both. A missing barrier lets a thread read shared
// memory that others have not written yet (the replay fills it with NaN first) or have
// overwritten already, so the replay's results go wrong.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <type_traits>

#include "common/aggregated_attention_geometry.h"
#include "common/cuda/aggregated_attention_launch.cuh"
#include "common/cuda/aggregated_attention_thread.cuh"

namespace transnext_mm {

// q, k, v, out (and grad_out, dq, dk, dv) are (B, heads, N, d) with contiguous channels and the
// given strides; every other tensor is contiguous.
template <typename scalar_t>
struct ForwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  AttentionSizes sizes;
  const scalar_t *q, *k, *v, *k_pool, *v_pool, *rpb;
  PoolBiasView<scalar_t> bias;
  const scalar_t* token_weight;
  scalar_t* out;
  acc_t* lse;  // (B, heads, N)
  RowLayout q_layout, k_layout, v_layout, out_layout;
  int query_split;  // threads per query (1, 2 or 4); 0: the launch plan's choice (query_split)
};

template <typename scalar_t>
struct BackwardParams {
  using acc_t = at::opmath_type<scalar_t>;
  AttentionSizes sizes;
  const scalar_t *grad_out, *q, *k, *v, *k_pool, *v_pool, *rpb;
  PoolBiasView<scalar_t> bias;
  const scalar_t *token_weight, *out;
  const acc_t* lse;
  scalar_t *dq, *dk, *dv, *dtoken_weight;
  acc_t *ds_local, *weight_local;  // (B, heads, N, 9) scratch
  acc_t* delta;                    // (B, heads, N) scratch
  acc_t* dbias_partial;  // (groups, heads, N, Np), summed over groups; null: no bias gradient
  acc_t *dkp_partial, *dvp_partial;  // (chunks, B, heads, Np, d), summed over chunks
  int64_t chunk_len;                 // queries per block of the pooled-key kernel
  int64_t group_len;                 // batch elements per block of the pooled-key kernel
  int pool_lanes;                    // batch lanes of a pooled-key block (pool_grad_plan)
  RowLayout grad_layout, q_layout, k_layout, v_layout, out_layout, dq_layout, dk_layout, dv_layout;
};

// ---------------------------------------------------------------------------------------------
// Block bodies.
//
// Shared memory of the query-side kernels: a tile of pooled keys / values, and the block's
// queries' bias_pool entries for those keys (one row per thread, padded by one so that the
// threads of a warp reading their rows hit distinct banks).
template <typename acc_t, int kTile, int kMaxD>
struct PoolTiles {
  static_assert(kQueryThreads % kTile == 0, "load_bias_tile needs whole rows per pass");
  static constexpr int kBiasStride = kTile + 1;
  alignas(16) acc_t kp[kTile * kMaxD];
  alignas(16) acc_t vp[kTile * kMaxD];
  acc_t bias[kQueryThreads * kBiasStride];
};

// The query-side kernels' block index on their 1-D grid (see query_launch; the grid has one
// block per (query block, head, batch element), fewer than 2^31, so 32-bit arithmetic decodes it
// without 64-bit divisions, which are calls on the GPU). `queries`: queries per block.
struct QueryBlock {
  int64_t b, h, bh, first_query;
};

template <typename Ctx>
C10_HOST_DEVICE inline QueryBlock query_block(const Ctx& ctx, const AttentionSizes& s,
                                              int queries) {
  const uint32_t index = static_cast<uint32_t>(ctx.block(0));
  const uint32_t batch = static_cast<uint32_t>(s.batch), heads = static_cast<uint32_t>(s.heads);
  const uint32_t bh_index = index / batch;
  QueryBlock blk;
  blk.b = index - bh_index * batch;
  blk.h = bh_index % heads;
  blk.bh = blk.b * s.heads + blk.h;
  blk.first_query = static_cast<int64_t>(bh_index / heads) * queries;
  return blk;
}

// Streams this (batch, head)'s pooled keys / values through shared-memory tiles, with the
// block's bias_pool rows of head h for each tile (a dense bias read coalesced, a row segment per
// warp; once per block), calling use(kp_tile, vp_tile, bias_row, count) for every
// tile between the barriers; bias_row is row `row` (this thread's query in the block) of the
// bias tile. `queries`: the block's queries.
template <typename HD, typename acc_t, int kTile, typename scalar_t, typename Ctx, typename Use>
C10_HOST_DEVICE inline void for_each_pool_tile(
    const Ctx& ctx, PoolTiles<acc_t, kTile, HD::kMax>& sh, const scalar_t* k_pool,
    const scalar_t* v_pool, const PoolBiasView<scalar_t>& bias, int64_t h, const AttentionSizes& s,
    int64_t bh, int64_t first_query, int queries, int row, Use&& use) {
  constexpr int kStride = PoolTiles<acc_t, kTile, HD::kMax>::kBiasStride;
  const int rows = static_cast<int>(tnx_min<int64_t>(queries, s.tokens - first_query));
  for (int64_t p0 = 0; p0 < s.pool; p0 += kTile) {
    const int count = static_cast<int>(tnx_min<int64_t>(kTile, s.pool - p0));
    const int64_t offset = (bh * s.pool + p0) * s.d;
    load_tile(sh.kp, HD::kMax, k_pool + offset, s.d, count, s.d, ctx.thread(), ctx.threads());
    load_tile(sh.vp, HD::kMax, v_pool + offset, s.d, count, s.d, ctx.thread(), ctx.threads());
    load_bias_tile<kTile, kStride>(sh.bias, bias, h, first_query, p0, s, rows, count, ctx.thread(),
                                   ctx.threads());
    ctx.sync();  // the tile is complete
    use(sh.kp, sh.vp, sh.bias + row * kStride, count);
    ctx.sync();  // every thread is done with it before the next tile overwrites it
  }
}

// Forward: one thread per query (or `split` threads per query, see query_split); window, then
// pooled keys.
template <typename scalar_t, typename HD>
using ForwardTiles = PoolTiles<at::opmath_type<scalar_t>,
                               TileRows<HD::kMax, at::opmath_type<scalar_t>>::value, HD::kMax>;

// With split queries, part r > 0 of a query hands its online-softmax state (max, sum,
// accumulator: kMax + 2 values) to part 0 through shared memory once the tiles are done, so the
// two share the space. (Exact variants only: the generic one would need 66 KiB.)
template <typename scalar_t, typename HD>
struct ForwardShared {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kPartialStride = HD::kMax + 2;
  static constexpr int kPartialRows = HD::kExactDim ? kQueryThreads : 1;
  union {
    ForwardTiles<scalar_t, HD> tiles;
    acc_t partial[kPartialRows * kPartialStride];  // [thread][max, sum, accumulator]
  };
};

template <typename scalar_t, typename HD, typename Ctx>
C10_HOST_DEVICE void forward_block(const Ctx& ctx, const ForwardParams<scalar_t>& p,
                                   ForwardShared<scalar_t, HD>& sh) {
  using Thread = ForwardThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  const AttentionSizes& s = p.sizes;
  // Thread (query q, part r) is thread q * split + r: the parts of a query are neighbours.
  // split is 1, 2 or 4: shifts and masks (cheap enough for the compiler to recompute them
  // rather than hold them in registers through the window).
  const int split = p.query_split, shift = split >> 1;
  const int queries = ctx.threads() >> shift;
  const int local = ctx.thread() >> shift, part = ctx.thread() & (split - 1);
  const QueryBlock blk = query_block(ctx, s, queries);
  const int64_t bh = blk.bh, h = blk.h;
  const int64_t i = blk.first_query + local;
  const bool active = i < s.tokens;
  Thread thread;
  if (active) {
    if (part == 0)
      thread.window(p.q_layout.rows(p.q, bh, s.heads), p.k_layout.rows(p.k, bh, s.heads),
                    p.v_layout.rows(p.v, bh, s.heads), p.rpb + h * kWindowArea,
                    p.token_weight + (bh * s.tokens + i) * kWindowArea, i, s.height, s.width, s.d);
    else
      thread.start_pooled(p.q_layout.rows(p.q, bh, s.heads).row(i), s.d);
  }
  for_each_pool_tile<HD, acc_t, Thread::kTile>(
      ctx, sh.tiles, p.k_pool, p.v_pool, p.bias, h, s, bh, blk.first_query, queries, local,
      [&](const acc_t* kp, const acc_t* vp, const acc_t* bias, int count) {
        if (active) thread.pool_tile(kp, vp, count, bias, part, split, s.d);
      });
  if (split > 1) {
    // The tiles are done (for_each_pool_tile ends with a barrier): their space takes the parts'
    // states. Part 0 merges parts 1..split-1 in order (deterministic).
    acc_t* partial = sh.partial + ctx.thread() * ForwardShared<scalar_t, HD>::kPartialStride;
    if (active && part != 0) thread.store_state(partial, s.d);
    ctx.sync();
    if (active && part == 0)
      for (int r = 1; r < split; ++r)
        thread.merge_state(partial + r * ForwardShared<scalar_t, HD>::kPartialStride, s.d);
  }
  if (active && part == 0)
    thread.finish(p.out_layout.rows(p.out, bh, s.heads).row(i), p.lse + bh * s.tokens + i, s.d);
}

// Backward, query side (same grid as the forward): dq, the window's ds / weights, d token_weight
// and delta (with fp16 / bf16 storage after a first pass over the pooled keys).
template <typename scalar_t, typename HD, typename Ctx>
C10_HOST_DEVICE void backward_query_block(const Ctx& ctx, const BackwardParams<scalar_t>& p,
                                          ForwardTiles<scalar_t, HD>& sh) {
  using Thread = BackwardQueryThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  constexpr int kTile = TileRows<HD::kMax, acc_t>::value;
  const AttentionSizes& s = p.sizes;
  const QueryBlock blk = query_block(ctx, s, ctx.threads());
  const int64_t bh = blk.bh, h = blk.h;
  const int64_t i = blk.first_query + ctx.thread();
  const bool active = i < s.tokens;
  const int64_t row = bh * s.tokens + i;
  Thread thread;
  if (active)
    thread.window_begin(
        p.q_layout.rows(p.q, bh, s.heads), p.k_layout.rows(p.k, bh, s.heads),
        p.v_layout.rows(p.v, bh, s.heads), p.rpb + h * kWindowArea,
        p.token_weight + row * kWindowArea, p.out_layout.rows(p.out, bh, s.heads).row(i),
        p.grad_layout.rows(p.grad_out, bh, s.heads).row(i), p.lse[row], i, s.height, s.width, s.d);
  if constexpr (Thread::kExactDelta) {
    for_each_pool_tile<HD, acc_t, kTile>(
        ctx, sh, p.k_pool, p.v_pool, p.bias, h, s, bh, blk.first_query, ctx.threads(), ctx.thread(),
        [&](const acc_t* kp, const acc_t* vp, const acc_t* bias, int count) {
          if (active) thread.delta_tile(kp, vp, count, bias, s.d);
        });
  }
  if (active)
    thread.window_grads(p.k_layout.rows(p.k, bh, s.heads), p.token_weight + row * kWindowArea, i,
                        s.height, s.width, s.d, p.ds_local + row * kWindowArea,
                        p.weight_local + row * kWindowArea, p.dtoken_weight + row * kWindowArea,
                        p.delta + row);
  for_each_pool_tile<HD, acc_t, kTile>(
      ctx, sh, p.k_pool, p.v_pool, p.bias, h, s, bh, blk.first_query, ctx.threads(), ctx.thread(),
      [&](const acc_t* kp, const acc_t* vp, const acc_t* bias, int count) {
        if (active) thread.pool_tile(kp, vp, count, bias, s.d);
      });
  if (active) thread.finish(p.dq_layout.rows(p.dq, bh, s.heads).row(i), s.d);
}

// Backward, pooled-key side (grid: pool_grad_plan). Thread (lane, key_column) of a block of
// `lanes` lanes of `keys` = threads / lanes columns owns pooled key key_tile * keys + key_column
// for batch element b_begin + pass + lane of each pass (`lanes` batch elements) over its batch
// group, streaming the block's query chunk through shared-memory tiles: per tile, the q / g / lse /
// delta rows of each lane's batch element and one bias_pool tile (tile queries x block keys) that
// all lanes share, so bias_pool is read once per tile and pass instead of once per batch element.
// The lanes' ds go to a ds tile; after the barrier the block sums them over the lanes, in lane
// order (deterministic; the order in which one thread would have accumulated the batch), onto the
// group's partial sum and writes each d bias_pool element once per tile and pass. Reads and writes
// of bias_pool and its gradient are coalesced (consecutive threads, consecutive keys).
//
// Queries per lane and tile: 16, fewer for wide heads, so that four lanes' q and g tiles stay
// within 16 KiB.
template <int kMaxD, typename acc_t>
struct PoolTileRows {
  static constexpr int value = kMaxD * sizeof(acc_t) <= 128   ? 16
                               : kMaxD * sizeof(acc_t) <= 256 ? 8
                                                              : 4;
};

template <typename scalar_t, typename HD>
struct PoolGradShared {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kRows = PoolTileRows<HD::kMax, acc_t>::value;
  alignas(16) acc_t q[kPoolMaxLanes * kRows * HD::kMax];  // [lane][query][channel]
  alignas(16) acc_t g[kPoolMaxLanes * kRows * HD::kMax];
  acc_t lse[kPoolMaxLanes * kRows];    // [lane][query]
  acc_t delta[kPoolMaxLanes * kRows];  // [lane][query]
  acc_t bias[kRows * kPoolThreads];    // [query][key column], row stride `keys`
  acc_t ds[kRows * kPoolThreads];      // [lane][query][key column]
};

template <typename scalar_t, typename HD, typename Ctx>
C10_HOST_DEVICE void backward_pool_block(const Ctx& ctx, const BackwardParams<scalar_t>& p,
                                         PoolGradShared<scalar_t, HD>& sh) {
  using Thread = BackwardPoolThread<scalar_t, HD>;
  using acc_t = typename Thread::acc_t;
  constexpr int kRows = PoolGradShared<scalar_t, HD>::kRows;
  const AttentionSizes& s = p.sizes;
  // The head dim as a constant in the exact variants (the tile loads divide by it).
  const int d = HD::kExactDim ? HD::kMax : s.d;
  const int lanes = p.pool_lanes, keys = ctx.threads() / lanes;
  const int lane = ctx.thread() / keys, key_column = ctx.thread() % keys;
  // Block and thread indices in 32 bits (they fit; fewer registers, no 64-bit divisions); 64-bit
  // arithmetic only for offsets.
  const int groups = static_cast<int>((s.batch + p.group_len - 1) / p.group_len);
  const int key_tile = static_cast<int>(ctx.block(0)) / groups;
  const int group = static_cast<int>(ctx.block(0)) - key_tile * groups;
  const int key = key_tile * keys + key_column;
  const bool key_active = key < s.pool;
  const int chunk = static_cast<int>(ctx.block(1)), h = static_cast<int>(ctx.block(2));
  const int64_t i_begin = chunk * p.chunk_len, b_begin = group * p.group_len;
  // Queries of the chunk and batch elements of the group (32-bit loop counters: fewer registers).
  const int chunk_count = static_cast<int>(tnx_min(s.tokens - i_begin, p.chunk_len));
  const int group_count = static_cast<int>(tnx_min(s.batch - b_begin, p.group_len));
  // This column of the group's d bias_pool partial sum (dense (heads, N, Np) slabs, also in the
  // table form), from the chunk's first query on.
  const int64_t column = (h * s.tokens + i_begin) * s.pool + key;
  acc_t* dbias_column = p.dbias_partial == nullptr
                            ? nullptr
                            : p.dbias_partial + group * s.heads * s.tokens * s.pool + column;
  for (int pass = 0; pass < group_count; pass += lanes) {
    const int pass_lanes = tnx_min(lanes, group_count - pass);
    const int b = static_cast<int>(b_begin) + pass + lane;
    const bool active = key_active && lane < pass_lanes;
    const int64_t bh = static_cast<int64_t>(b) * s.heads + h;
    Thread thread;
    if (active)
      thread.begin(p.k_pool + (bh * s.pool + key) * d, p.v_pool + (bh * s.pool + key) * d, d);
    for (int i = 0; i < chunk_count; i += kRows) {
      const int count = tnx_min(kRows, chunk_count - i);
      const int64_t i0 = i_begin + i;
      for (int l = 0; l < pass_lanes; ++l) {
        const int64_t lane_bh = (b_begin + pass + l) * s.heads + h;
        const Rows<const scalar_t> q_bh = p.q_layout.rows(p.q, lane_bh, s.heads);
        const Rows<const scalar_t> g_bh = p.grad_layout.rows(p.grad_out, lane_bh, s.heads);
        load_tile(sh.q + l * kRows * HD::kMax, HD::kMax, q_bh.row(i0), q_bh.stride, count, d,
                  ctx.thread(), ctx.threads());
        load_tile(sh.g + l * kRows * HD::kMax, HD::kMax, g_bh.row(i0), g_bh.stride, count, d,
                  ctx.thread(), ctx.threads());
        for (int t = ctx.thread(); t < count; t += ctx.threads()) {
          sh.lse[l * kRows + t] = p.lse[lane_bh * s.tokens + i0 + t];
          sh.delta[l * kRows + t] = p.delta[lane_bh * s.tokens + i0 + t];
        }
      }
      // The bias tile: thread (lane, key_column) loads its column of every lanes-th query row.
      if (key_active)
        for (int t = lane; t < count; t += lanes)
          sh.bias[t * keys + key_column] = static_cast<acc_t>(p.bias.at(h, i0 + t, key, s));
      ctx.sync();  // the tiles are complete
      if (active)
        thread.query_tile(
            sh.q + lane * kRows * HD::kMax, sh.g + lane * kRows * HD::kMax, sh.lse + lane * kRows,
            sh.delta + lane * kRows, count, sh.bias + key_column,
            dbias_column == nullptr ? nullptr : sh.ds + lane * kRows * keys + key_column, keys, d);
      ctx.sync();  // the ds tile is complete; every thread is done with the q / g / bias tiles
      // d bias_pool of the tile: the lanes' ds summed onto the group's partial sum (the first
      // pass starts it). The next tile's loads cannot overwrite the ds tile before every thread
      // has passed this point: they write it only after the next barrier.
      if (dbias_column != nullptr && key_active) {
        for (int t = lane; t < count; t += lanes) {
          acc_t* out = dbias_column + (i + t) * s.pool;
          acc_t sum = pass == 0 ? acc_t(0) : *out;
          for (int l = 0; l < pass_lanes; ++l) sum += sh.ds[(l * kRows + t) * keys + key_column];
          *out = sum;
        }
      }
    }
    if (active) {
      const int64_t slot =
          ((static_cast<int64_t>(chunk) * s.batch + b) * s.heads + h) * s.pool + key;
      thread.finish(p.dkp_partial + slot * d, p.dvp_partial + slot * d, d);
    }
  }
}

// Window keys / values (grid: gather_launch; no shared memory): one thread per (batch, head,
// key position, channel), grid-stride.
template <typename scalar_t, typename Ctx>
C10_HOST_DEVICE void window_grad_block(const Ctx& ctx, const BackwardParams<scalar_t>& p) {
  using acc_t = at::opmath_type<scalar_t>;
  const AttentionSizes& s = p.sizes;
  const int64_t total = s.batch * s.heads * s.tokens * s.d;
  for (int64_t idx = ctx.block(0) * ctx.threads() + ctx.thread(); idx < total;
       idx += static_cast<int64_t>(ctx.threads()) * ctx.grid(0)) {
    const int c = static_cast<int>(idx % s.d);
    const int64_t n = (idx / s.d) % s.tokens;
    const int64_t bh = idx / (static_cast<int64_t>(s.d) * s.tokens);
    acc_t grad_k, grad_v;
    gather_window_grads(
        p.q_layout.rows(p.q, bh, s.heads), p.grad_layout.rows(p.grad_out, bh, s.heads),
        p.ds_local + bh * s.tokens * kWindowArea, p.weight_local + bh * s.tokens * kWindowArea, n,
        c, s.height, s.width, &grad_k, &grad_v);
    p.dk_layout.rows(p.dk, bh, s.heads).row(n)[c] = static_cast<scalar_t>(grad_k);
    p.dv_layout.rows(p.dv, bh, s.heads).row(n)[c] = static_cast<scalar_t>(grad_v);
  }
}

// Table form, backward: the table gradient from the pooled-key kernel's d bias_pool partial sums
// (grid: run_table_grad_kernel, grid-stride; no shared memory). One thread per (head, table
// entry e) gathers every (query, pooled key) pair and tap whose entry is e (index_rows[k, y, py] +
// index_cols[x, px] = e), weighted by the tap's row weight, through the index groups below, in a
// fixed order: no atomics, the same result on every run.
//
// An index tensor grouped by value, as the host glue builds it on the device without reading
// anything back (no synchronisation): `values` holds the distinct values ascending, then
// kNoIndexValue up to `slots` entries (one per index entry, as the number of distinct values is
// not known on the host); the k-th value is held by the flat positions members[offsets[k] ..
// offsets[k + 1]), ascending; `max` points to the largest value.
constexpr int64_t kNoIndexValue = INT64_MAX;

struct IndexGroupsView {
  const int64_t *values, *offsets, *members, *max;
  int64_t slots;
};

// The first slot whose value is >= v (the padding compares greater than any index).
C10_HOST_DEVICE inline int64_t lower_bound_slot(const IndexGroupsView& g, int64_t v) {
  int64_t lo = 0, hi = g.slots;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (g.values[mid] < v)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

template <typename T>
struct TableGradParams {
  using acc_t = T;
  AttentionSizes sizes;
  const acc_t* dbias_partial;  // (groups, heads, N, Np)
  int64_t groups, table_size;
  int pool_h, pool_w;
  // index_rows (flat positions (k * H + y) * pool_h + py) and index_cols (x * pool_w + px) by
  // value.
  IndexGroupsView rows, cols;
  const acc_t* row_weights;  // (taps, H, pool_h), flat as index_rows; null: one tap of weight 1
  acc_t* dtable;             // (heads, table_size)
};

template <typename acc_t, typename Ctx>
C10_HOST_DEVICE void table_grad_block(const Ctx& ctx, const TableGradParams<acc_t>& p) {
  const AttentionSizes& s = p.sizes;
  const int64_t total = s.heads * p.table_size;
  const int64_t slab = s.tokens * s.pool;  // one head's (N, Np) entries
  const int64_t col_min = p.cols.values[0], col_max = *p.cols.max;
  const int64_t tap_stride = s.height * p.pool_h;
  for (int64_t idx = ctx.block(0) * ctx.threads() + ctx.thread(); idx < total;
       idx += static_cast<int64_t>(ctx.threads()) * ctx.grid(0)) {
    const int64_t h = idx / p.table_size, e = idx - h * p.table_size;
    // The row values whose column partner c = e - value can occur, i.e. the values in
    // [e - col_max, e - col_min], ascending (descending c); each c is looked up among the
    // column values.
    acc_t sum = 0;
    for (int64_t r = lower_bound_slot(p.rows, e - col_max); r < p.rows.slots; ++r) {
      const int64_t row_value = p.rows.values[r];
      if (row_value > e - col_min) break;  // also at the padding
      const int64_t c = e - row_value;
      const int64_t slot = lower_bound_slot(p.cols, c);  // c <= col_max: slot < cols.slots
      if (p.cols.values[slot] != c) continue;
      for (int64_t a = p.rows.offsets[r]; a < p.rows.offsets[r + 1]; ++a) {
        const int64_t member = p.rows.members[a], position = member % tap_stride;
        const int64_t y = position / p.pool_h, py = position % p.pool_h;
        acc_t tap_sum = 0;
        for (int64_t b = p.cols.offsets[slot]; b < p.cols.offsets[slot + 1]; ++b) {
          const int64_t x = p.cols.members[b] / p.pool_w, px = p.cols.members[b] % p.pool_w;
          const acc_t* entry =
              p.dbias_partial + h * slab + (y * s.width + x) * s.pool + py * p.pool_w + px;
          for (int64_t g = 0; g < p.groups; ++g) tap_sum += entry[g * s.heads * slab];
        }
        sum += p.row_weights == nullptr ? tap_sum : p.row_weights[member] * tap_sum;
      }
    }
    p.dtable[idx] = sum;
  }
}

// Calls fn(HeadDim<...>{}) with the kernel variant for head dimension d: exact variants (rows in
// registers, loops unrolled) for 16, 24 (every released TransNeXt), 32, 48 and 64; the generic
// one (rolled loops over up to 128 channels, rows in local memory) otherwise.
template <typename Fn>
inline void dispatch_head_dim(int64_t d, Fn&& fn) {
  TORCH_CHECK(d >= 1 && d <= 128,
              "aggregated_attention: the CUDA kernels support head dims 1..128, got ", d);
  switch (d) {
    case 16:
      fn(HeadDim<16, true>{});
      break;
    case 24:
      fn(HeadDim<24, true>{});
      break;
    case 32:
      fn(HeadDim<32, true>{});
      break;
    case 48:
      fn(HeadDim<48, true>{});
      break;
    case 64:
      fn(HeadDim<64, true>{});
      break;
    default:
      fn(HeadDim<128, false>{});
  }
}

// =============================================================================================
// The kernels and their launch sequence, written once for the GPU and the replay.
//
// A kernel is a descriptor: its block body, its shared memory, and the block size and minimum
// resident blocks per SM it is compiled for (__launch_bounds__(kThreads, kMinBlocks)). A
// `Launcher` runs one kernel over a grid:
//   template <typename Kernel> void launch(const Launch&, const typename Kernel::Params&) const;
// the CUDA one (pytorch/cuda/aggregated_attention_kernels.cu) as kernel<Kernel><<<grid, threads>>>,
// the replay (replay/aggregated_attention_cuda_replay.cpp) block by block with fibers. Which
// kernels run, in which order, with which grids and shared memory, is decided only here.
struct NoShared {};

// Query-side kernels of the small exact head dims (every released model has 24): 3 resident
// blocks of 128 threads, i.e. at most 168 registers. With one-argument launch bounds ptxas (CUDA
// 13.0, sm_90) also settles on 168 registers for the fp32 forward but spills 24 bytes to local
// memory; asked for 3 blocks it allocates the same 168 without spills. Wider heads keep no
// occupancy target (their rows need the registers).
template <typename HD>
constexpr int kQueryMinBlocks = HD::kExactDim && HD::kMax <= 24 ? 3 : 1;

// Pooled-key gradient kernel: each thread holds four rows (k_pool, v_pool and their gradients)
// in registers. For the exact head dims up to 24, 3 resident blocks of 128 threads (at most 168
// registers, 12 warps per SM; ptxas, CUDA 13.0, sm_90: no spills). At head dim 32 the four rows
// alone take 128 registers and 168 spill, so wider heads keep no occupancy target.
template <typename HD>
constexpr int kPoolMinBlocks = HD::kExactDim && HD::kMax <= 24 ? 3 : 1;

template <typename scalar_t, typename HD>
struct ForwardKernel {
  using Params = ForwardParams<scalar_t>;
  using Shared = ForwardShared<scalar_t, HD>;
  static constexpr int kThreads = kQueryThreads;
  static constexpr int kMinBlocks = kQueryMinBlocks<HD>;
  static constexpr const char* kName = "forward";
  template <typename Ctx>
  C10_HOST_DEVICE static void body(const Ctx& ctx, const Params& p, Shared& sh) {
    forward_block<scalar_t, HD>(ctx, p, sh);
  }
};

template <typename scalar_t, typename HD>
struct BackwardQueryKernel {
  using Params = BackwardParams<scalar_t>;
  using Shared = ForwardTiles<scalar_t, HD>;
  static constexpr int kThreads = kQueryThreads;
  static constexpr int kMinBlocks = kQueryMinBlocks<HD>;
  static constexpr const char* kName = "backward_query";
  template <typename Ctx>
  C10_HOST_DEVICE static void body(const Ctx& ctx, const Params& p, Shared& sh) {
    backward_query_block<scalar_t, HD>(ctx, p, sh);
  }
};

template <typename scalar_t, typename HD>
struct BackwardPoolKernel {
  using Params = BackwardParams<scalar_t>;
  using Shared = PoolGradShared<scalar_t, HD>;
  static constexpr int kThreads = kPoolThreads;
  static constexpr int kMinBlocks = kPoolMinBlocks<HD>;
  static constexpr const char* kName = "backward_pool";
  template <typename Ctx>
  C10_HOST_DEVICE static void body(const Ctx& ctx, const Params& p, Shared& sh) {
    backward_pool_block<scalar_t, HD>(ctx, p, sh);
  }
};

template <typename scalar_t>
struct WindowGradKernel {
  using Params = BackwardParams<scalar_t>;
  using Shared = NoShared;
  static constexpr int kThreads = kGatherThreads;
  static constexpr int kMinBlocks = 1;
  static constexpr const char* kName = "window_grad";
  template <typename Ctx>
  C10_HOST_DEVICE static void body(const Ctx& ctx, const Params& p, Shared&) {
    window_grad_block<scalar_t>(ctx, p);
  }
};

template <typename acc_t>
struct TableGradKernel {
  using Params = TableGradParams<acc_t>;
  using Shared = NoShared;
  static constexpr int kThreads = kGatherThreads;
  static constexpr int kMinBlocks = 1;
  static constexpr const char* kName = "table_grad";
  template <typename Ctx>
  C10_HOST_DEVICE static void body(const Ctx& ctx, const Params& p, Shared&) {
    table_grad_block<acc_t>(ctx, p);
  }
};

// What a GPU would refuse: a block size other than the kernel's, a grid beyond CUDA's limits,
// more static shared memory than 48 KiB (fp64 runs only in the replay and is not held to it).
template <typename Kernel, typename Launcher>
inline void launch_kernel_checked(const Launch& launch, const typename Kernel::Params& p,
                                  const Launcher& launcher) {
  TORCH_CHECK(launch.threads == Kernel::kThreads, "aggregated_attention: kernel ", Kernel::kName,
              " is compiled for ", Kernel::kThreads, " threads per block, launched with ",
              launch.threads);
  TORCH_CHECK(launch.grid[0] >= 1 && launch.grid[0] <= kMaxGridX && launch.grid[1] >= 1 &&
                  launch.grid[1] <= kMaxGridYZ && launch.grid[2] >= 1 &&
                  launch.grid[2] <= kMaxGridYZ,
              "aggregated_attention: kernel ", Kernel::kName, " grid (", launch.grid[0], ", ",
              launch.grid[1], ", ", launch.grid[2], ") is outside CUDA's limits");
  using acc_t = typename Kernel::Params::acc_t;
  static_assert(std::is_same_v<acc_t, double> || sizeof(typename Kernel::Shared) <= 48 * 1024,
                "a kernel's static shared memory must fit in 48 KiB");
  launcher.template launch<Kernel>(launch, p);
}

// The forward, with the launch plan's query split unless the caller chose one (the tests).
template <typename scalar_t, typename Launcher>
void run_forward_kernels(const ForwardParams<scalar_t>& p, const Launcher& launcher) {
  ForwardParams<scalar_t> params = p;
  if (params.query_split == 0) params.query_split = query_split(p.sizes);
  TORCH_CHECK(params.query_split == 1 || (exact_head_dim(p.sizes.d) &&
                                          (params.query_split == 2 || params.query_split == 4)),
              "aggregated_attention: query split ", params.query_split, " for head dim ", p.sizes.d,
              " (1, or 2 / 4 with an exact head-dim variant)");
  dispatch_head_dim(p.sizes.d, [&](auto head_dim) {
    using HD = decltype(head_dim);
    launch_kernel_checked<ForwardKernel<scalar_t, HD>>(query_launch(p.sizes, params.query_split),
                                                       params, launcher);
  });
}

// Query side (dq, window ds, delta), then the pooled keys (needs delta; none when Np = 0), then
// the window keys / values (need the window ds).
template <typename scalar_t, typename Launcher>
void run_backward_kernels(const BackwardParams<scalar_t>& p, const Launch& pool_launch,
                          const Launcher& launcher) {
  dispatch_head_dim(p.sizes.d, [&](auto head_dim) {
    using HD = decltype(head_dim);
    launch_kernel_checked<BackwardQueryKernel<scalar_t, HD>>(query_launch(p.sizes), p, launcher);
    if (p.sizes.pool > 0) {
      TORCH_CHECK(p.pool_lanes >= 1 && p.pool_lanes <= kPoolMaxLanes &&
                      pool_launch.threads % p.pool_lanes == 0 &&
                      (pool_launch.threads / p.pool_lanes) % 32 == 0,
                  "aggregated_attention: ", p.pool_lanes,
                  " batch lanes do not split a pooled-key block into whole warps");
      launch_kernel_checked<BackwardPoolKernel<scalar_t, HD>>(pool_launch, p, launcher);
    }
  });
  launch_kernel_checked<WindowGradKernel<scalar_t>>(gather_launch(p.sizes), p, launcher);
}

// Table form: the table gradient, after run_backward_kernels has written the d bias_pool partial
// sums (heads x table_size > 0).
template <typename acc_t, typename Launcher>
void run_table_grad_kernel(const TableGradParams<acc_t>& p, const Launcher& launcher) {
  const int64_t total = p.sizes.heads * p.table_size;
  TORCH_CHECK(total > 0, "aggregated_attention: empty bias table");
  launch_kernel_checked<TableGradKernel<acc_t>>(grid_stride_launch(total), p, launcher);
}

}  // namespace transnext_mm
