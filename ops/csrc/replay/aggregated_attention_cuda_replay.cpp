// Copyright (c) transnext-mm contributors. All rights reserved.
//
// CPU replay of the CUDA kernels: the same block bodies (common/cuda/), launch plans and host glue
// (pytorch/cuda/aggregated_attention_glue.h) as the CUDA build, run on CPU tensors. Every block of
// the grid runs its threads as fibers (ucontext) with their own stacks, so per-thread locals live
// as on the GPU; ctx.sync() is a real barrier: a thread yields there, and the block moves on only
// when every thread has arrived. Between two barriers the threads run one after the other in
// *reverse* order, and shared memory starts as NaN, so code that reads shared memory without the
// barrier that makes it valid reads NaN or another tile's data and the results go wrong; a barrier
// that not every thread reaches fails with an error. Used by the tests to check the CUDA code (all
// dtypes, including fp16 / bf16 storage with fp32 accumulation) on machines without a GPU. Slow by
// design; not used for real work.
#include <ucontext.h>

#include <cstring>
#include <memory>
#include <vector>

#include "replay/aggregated_attention_replay.h"

#include "common/cuda/aggregated_attention_blocks.cuh"
#include "common/cuda/aggregated_attention_launch.cuh"
#include "pytorch/aggregated_attention_checks.h"
#include "pytorch/cuda/aggregated_attention_glue.h"

namespace transnext_mm {
namespace {

class FiberBlock;

// The kernel-body context of the replay (see the Ctx contract in
// common/cuda/aggregated_attention_blocks.cuh).
struct ReplayContext {
  FiberBlock* block_state;
  int index;
  int thread() const { return index; }
  int threads() const;
  int64_t block(int axis) const;
  int64_t grid(int axis) const;
  void sync() const;
};

// One thread block: `threads` fibers running body(ctx) to completion, barrier by barrier.
class FiberBlock {
 public:
  static constexpr size_t kStackBytes = 256 << 10;

  explicit FiberBlock(int threads)
      : threads_(threads), fibers_(threads), done_(threads), stacks_(threads) {
    for (auto& stack : stacks_) stack.reset(new char[kStackBytes]);
  }

  template <typename Body>
  void run(const int64_t (&block)[3], const int64_t (&grid)[3], Body& body) {
    std::copy(block, block + 3, block_);
    std::copy(grid, grid + 3, grid_);
    body_ = &body;
    invoke_ = [](void* b, const ReplayContext& ctx) { (*static_cast<Body*>(b))(ctx); };
    for (int t = 0; t < threads_; ++t) {
      done_[t] = 0;
      TORCH_CHECK(getcontext(&fibers_[t]) == 0, "replay: getcontext failed");
      fibers_[t].uc_stack.ss_sp = stacks_[t].get();
      fibers_[t].uc_stack.ss_size = kStackBytes;
      fibers_[t].uc_link = &scheduler_;
      makecontext(&fibers_[t], &FiberBlock::fiber_main, 0);
    }
    while (true) {
      int waiting = 0, finished = 0;
      for (int t = threads_ - 1; t >= 0; --t) {  // reverse order between barriers
        if (done_[t]) continue;
        current_ = this;
        current_index_ = t;
        TORCH_CHECK(swapcontext(&scheduler_, &fibers_[t]) == 0, "replay: swapcontext failed");
        ++(done_[t] ? finished : waiting);
      }
      if (waiting == 0) break;
      TORCH_CHECK(finished == 0, "replay: ", finished, " threads of block (", block_[0], ", ",
                  block_[1], ", ", block_[2], ") exited while ", waiting,
                  " wait at a barrier (a __syncthreads not reached by every thread)");
    }
  }

  int threads() const { return threads_; }
  int64_t block(int axis) const { return block_[axis]; }
  int64_t grid(int axis) const { return grid_[axis]; }
  void barrier(int index) {
    TORCH_CHECK(swapcontext(&fibers_[index], &scheduler_) == 0, "replay: swapcontext failed");
  }

 private:
  static void fiber_main() {
    FiberBlock* self = current_;
    const int index = current_index_;
    self->invoke_(self->body_, ReplayContext{self, index});
    self->done_[index] = 1;
  }  // returns to uc_link: the scheduler

  static thread_local FiberBlock* current_;
  static thread_local int current_index_;
  int threads_;
  int64_t block_[3] = {0, 0, 0}, grid_[3] = {1, 1, 1};
  std::vector<ucontext_t> fibers_;
  std::vector<char> done_;
  std::vector<std::unique_ptr<char[]>> stacks_;
  ucontext_t scheduler_;
  void* body_ = nullptr;
  void (*invoke_)(void*, const ReplayContext&) = nullptr;
};

thread_local FiberBlock* FiberBlock::current_ = nullptr;
thread_local int FiberBlock::current_index_ = 0;

int ReplayContext::threads() const { return block_state->threads(); }
int64_t ReplayContext::block(int axis) const { return block_state->block(axis); }
int64_t ReplayContext::grid(int axis) const { return block_state->grid(axis); }
void ReplayContext::sync() const { block_state->barrier(index); }

// Runs body(ctx, shared) over the grid of `launch`, block after block; shared memory is filled
// with NaN (all bits set) before each block.
template <typename Shared, typename Body>
void replay_grid(const Launch& launch, Body&& body) {
  FiberBlock fibers(launch.threads);
  auto shared = std::make_unique<Shared>();
  auto run = [&](const ReplayContext& ctx) { body(ctx, *shared); };
  int64_t index[3];
  for (index[2] = 0; index[2] < launch.grid[2]; ++index[2])
    for (index[1] = 0; index[1] < launch.grid[1]; ++index[1])
      for (index[0] = 0; index[0] < launch.grid[0]; ++index[0]) {
        std::memset(static_cast<void*>(shared.get()), 0xFF, sizeof(Shared));
        fibers.run(index, launch.grid, run);
      }
}

// The replay's launcher for the kernels' launch sequence (run_forward_kernels /
// run_backward_kernels): the kernels, grids and checks of the GPU, blocks run one by one.
struct ReplayLauncher {
  template <typename Kernel>
  void launch(const Launch& launch, const typename Kernel::Params& p) const {
    replay_grid<typename Kernel::Shared>(
        launch,
        [&](const ReplayContext& ctx, typename Kernel::Shared& sh) { Kernel::body(ctx, p, sh); });
  }
};

struct ReplayBackend {
  template <typename scalar_t>
  static void forward(const ForwardParams<scalar_t>& p) {
    run_forward_kernels(p, ReplayLauncher{});
  }
  template <typename scalar_t>
  static void backward(const BackwardParams<scalar_t>& p, const Launch& pool_launch) {
    run_backward_kernels(p, pool_launch, ReplayLauncher{});
  }
  template <typename acc_t>
  static void table_grad(const TableGradParams<acc_t>& p) {
    run_table_grad_kernel(p, ReplayLauncher{});
  }
};

// The barrier model's self-test body: values pass through shared memory to the mirrored thread.
struct SelftestShared {
  float values[64];
};

void selftest_block(const ReplayContext& ctx, SelftestShared& sh, const std::string& mode,
                    float* out) {
  sh.values[ctx.thread()] = static_cast<float>(ctx.thread());
  if (mode == "barrier" || (mode == "divergent" && ctx.thread() != 0)) ctx.sync();
  out[ctx.thread()] = sh.values[ctx.threads() - 1 - ctx.thread()];
}

std::vector<int64_t> launch_row(const Launch& launch) {
  return {launch.grid[0], launch.grid[1], launch.grid[2], launch.threads};
}

}  // namespace

std::map<std::string, std::vector<int64_t>> aggregated_attention_launch_plans(
    int64_t batch, int64_t heads, int64_t tokens, int64_t pool, int64_t d, bool bias_grad,
    int64_t pool_target_blocks) {
  const AttentionSizes s{batch, heads, tokens, pool, 1, tokens, static_cast<int>(d)};
  const PoolGradPlan plan = pool_grad_plan(s, bias_grad, pool_target_blocks);
  auto pool_row = launch_row(plan.launch);
  pool_row.push_back(plan.chunk_len);
  pool_row.push_back(plan.group_len);
  pool_row.push_back(plan.lanes);
  const int split = query_split(s);
  auto forward_row = launch_row(query_launch(s, split));
  forward_row.push_back(split);
  return {{"forward", forward_row},
          {"backward_query", launch_row(query_launch(s))},
          {"pool_grad", pool_row},
          {"gather", launch_row(gather_launch(s))}};
}

at::Tensor cuda_replay_selftest(const std::string& mode) {
  TORCH_CHECK(mode == "barrier" || mode == "no_barrier" || mode == "divergent",
              "cuda_replay_selftest: mode must be 'barrier', 'no_barrier' or 'divergent', got '",
              mode, "'");
  auto out = at::empty({64}, at::kFloat);
  replay_grid<SelftestShared>({{1, 1, 1}, 64}, [&](const ReplayContext& ctx, SelftestShared& sh) {
    selftest_block(ctx, sh, mode, out.data_ptr<float>());
  });
  return out;
}

std::vector<at::Tensor> aggregated_attention_forward_replay(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb_local, const at::Tensor& bias_pool,
    const at::Tensor& token_weight, int64_t height, int64_t width, int64_t query_split) {
  TORCH_CHECK(q.device().is_cpu(), "aggregated_attention replay: expects CPU tensors");
  const auto t =
      checked_forward(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height, width);
  return kernel_forward<ReplayBackend>(t[0], t[1], t[2], t[3], t[4], t[5], t[6], at::Tensor(),
                                       at::Tensor(), at::Tensor(), t[7], height, width,
                                       static_cast<int>(query_split));
}

std::vector<at::Tensor> aggregated_attention_backward_replay(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb_local,
    const at::Tensor& bias_pool, const at::Tensor& token_weight, const at::Tensor& out,
    const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad,
    int64_t pool_target_blocks) {
  TORCH_CHECK(q.device().is_cpu(), "aggregated_attention replay: expects CPU tensors");
  const auto t = checked_backward(grad_out, q, k, v, k_pool, v_pool, rpb_local, bias_pool,
                                  token_weight, out, lse, height, width);
  return kernel_backward<ReplayBackend>(t[8], t[0], t[1], t[2], t[3], t[4], t[5], t[6],
                                        at::Tensor(), at::Tensor(), at::Tensor(), t[7], t[9], t[10],
                                        height, width, bias_grad, pool_target_blocks);
}

std::vector<at::Tensor> aggregated_attention_table_forward_replay(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_pool,
    const at::Tensor& v_pool, const at::Tensor& rpb_local, const at::Tensor& bias_table,
    const at::Tensor& index_rows, const at::Tensor& index_cols,
    const c10::optional<at::Tensor>& row_weights, const at::Tensor& token_weight, int64_t height,
    int64_t width, int64_t query_split) {
  TORCH_CHECK(q.device().is_cpu(), "aggregated_attention replay: expects CPU tensors");
  const auto t = checked_table_forward(q, k, v, k_pool, v_pool, rpb_local, bias_table, index_rows,
                                       index_cols, row_weights, token_weight, height, width);
  return kernel_forward<ReplayBackend>(t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[8], t[9], t[10],
                                       t[7], height, width, static_cast<int>(query_split));
}

std::vector<at::Tensor> aggregated_attention_table_backward_replay(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& k_pool, const at::Tensor& v_pool, const at::Tensor& rpb_local,
    const at::Tensor& bias_table, const at::Tensor& index_rows, const at::Tensor& index_cols,
    const c10::optional<at::Tensor>& row_weights, const at::Tensor& token_weight,
    const at::Tensor& out, const at::Tensor& lse, int64_t height, int64_t width, bool bias_grad,
    int64_t pool_target_blocks) {
  TORCH_CHECK(q.device().is_cpu(), "aggregated_attention replay: expects CPU tensors");
  const auto t =
      checked_table_backward(grad_out, q, k, v, k_pool, v_pool, rpb_local, bias_table, index_rows,
                             index_cols, row_weights, token_weight, out, lse, height, width);
  return kernel_backward<ReplayBackend>(t[8], t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[11],
                                        t[12], t[13], t[7], t[9], t[10], height, width, bias_grad,
                                        pool_target_blocks);
}

}  // namespace transnext_mm
