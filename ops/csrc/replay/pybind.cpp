// Copyright (c) transnext-mm contributors. All rights reserved.
//
// transnext_mm._ext_replay: the CPU replay of the aggregated-attention CUDA kernels, for the
// tests. Built only when asked for (TRANSNEXT_MM_WITH_REPLAY=1, see setup.py); not part of the
// wheel.
#include <torch/extension.h>

#include "common/cuda/aggregated_attention_launch.cuh"
#include "replay/aggregated_attention_replay.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CPU replay of transnext_mm's aggregated-attention CUDA kernels (tests)";
  m.def("aggregated_attention_forward_replay", &transnext_mm::aggregated_attention_forward_replay,
        "CPU replay of the CUDA forward kernel (tests)");
  m.def("aggregated_attention_backward_replay", &transnext_mm::aggregated_attention_backward_replay,
        "CPU replay of the CUDA backward kernels (tests)");
  m.def("aggregated_attention_table_forward_replay",
        &transnext_mm::aggregated_attention_table_forward_replay,
        "CPU replay of the CUDA forward kernel, pooled bias in table form (tests)");
  m.def("aggregated_attention_table_backward_replay",
        &transnext_mm::aggregated_attention_table_backward_replay,
        "CPU replay of the CUDA backward kernels, pooled bias in table form (tests)");
  m.attr("pool_grad_target_blocks") = transnext_mm::kPoolGradTargetBlocks;
  m.def("aggregated_attention_launch_plans", &transnext_mm::aggregated_attention_launch_plans,
        "Grids of the CUDA kernels for given sizes (tests)");
  m.def("cuda_replay_selftest", &transnext_mm::cuda_replay_selftest,
        "Checks of the CUDA replay's barrier model (tests)");
}
