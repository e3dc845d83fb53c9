// Copyright (c) transnext-mm contributors. All rights reserved.
#include "pytorch/cosine_qk.h"

#include <c10/util/Exception.h>

#include <initializer_list>

namespace transnext_mm {

namespace {

// Checks q, k, query_embedding, scale and learnable_tokens (and the tensors in `more`: same
// device and dtype); returns T, the learnable tokens per head.
int64_t check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& query_embedding,
                     const at::Tensor& scale, const at::Tensor& learnable_tokens,
                     std::initializer_list<at::Tensor> more) {
  TORCH_CHECK(q.dim() == 4, "cosine_queries_keys: q must be (B, heads, N, d), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes(), "cosine_queries_keys: k must have q's shape ", q.sizes(),
              ", got ", k.sizes());
  const int64_t heads = q.size(1), N = q.size(2), d = q.size(3);
  TORCH_CHECK(query_embedding.sizes() == at::IntArrayRef({heads, 1, d}),
              "cosine_queries_keys: query_embedding must have shape (", heads, ", 1, ", d,
              "), got ", query_embedding.sizes());
  TORCH_CHECK(scale.sizes() == at::IntArrayRef({heads, N, 1}),
              "cosine_queries_keys: scale must have shape (", heads, ", ", N, ", 1), got ",
              scale.sizes());
  TORCH_CHECK(learnable_tokens.dim() == 3 && learnable_tokens.size(0) == heads &&
                  learnable_tokens.size(1) == d,
              "cosine_queries_keys: learnable_tokens must have shape (", heads, ", ", d,
              ", T), got ", learnable_tokens.sizes());
  const int64_t T = learnable_tokens.size(2);
  TORCH_CHECK(T <= 16, "cosine_queries_keys: at most 16 learnable tokens per head, got ", T);
  for (const auto& t : {k, query_embedding, scale, learnable_tokens}) {
    TORCH_CHECK(t.device() == q.device() && t.scalar_type() == q.scalar_type(),
                "cosine_queries_keys: all inputs must match q's device and dtype (", q.device(),
                ", ", q.scalar_type(), ")");
  }
  for (const auto& t : more) {
    TORCH_CHECK(t.device() == q.device() && t.scalar_type() == q.scalar_type(),
                "cosine_queries_keys: all inputs must match q's device and dtype (", q.device(),
                ", ", q.scalar_type(), ")");
  }
  TORCH_CHECK(q.device().is_cpu(), "cosine_queries_keys: CPU kernel only, got device ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "cosine_queries_keys: CPU kernel for float32 / float64, got ", q.scalar_type());
  return T;
}

}  // namespace

std::vector<at::Tensor> cosine_queries_keys_forward(const at::Tensor& q, const at::Tensor& k,
                                                    const at::Tensor& query_embedding,
                                                    const at::Tensor& scale,
                                                    const at::Tensor& learnable_tokens,
                                                    const at::Tensor& learnable_bias) {
  const int64_t T = check_inputs(q, k, query_embedding, scale, learnable_tokens, {learnable_bias});
  TORCH_CHECK(learnable_bias.sizes() == at::IntArrayRef({q.size(1), 1, T}),
              "cosine_queries_keys: learnable_bias must have shape (", q.size(1), ", 1, ", T,
              "), got ", learnable_bias.sizes());
  return cosine_queries_keys_forward_cpu(q, k, query_embedding.contiguous(), scale.contiguous(),
                                         learnable_tokens.contiguous(),
                                         learnable_bias.contiguous());
}

std::vector<at::Tensor> cosine_queries_keys_backward(
    const at::Tensor& grad_q, const at::Tensor& grad_k, const at::Tensor& grad_token_weight,
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& query_embedding,
    const at::Tensor& scale, const at::Tensor& learnable_tokens) {
  const int64_t T = check_inputs(q, k, query_embedding, scale, learnable_tokens,
                                 {grad_q, grad_k, grad_token_weight});
  TORCH_CHECK(grad_q.sizes() == q.sizes() && grad_k.sizes() == q.sizes(),
              "cosine_queries_keys: grad_q and grad_k must have q's shape ", q.sizes(), ", got ",
              grad_q.sizes(), " and ", grad_k.sizes());
  TORCH_CHECK(grad_token_weight.sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), T}),
              "cosine_queries_keys: grad_token_weight must have shape (", q.size(0), ", ",
              q.size(1), ", ", q.size(2), ", ", T, "), got ", grad_token_weight.sizes());
  return cosine_queries_keys_backward_cpu(grad_q, grad_k, grad_token_weight, q, k,
                                          query_embedding.contiguous(), scale.contiguous(),
                                          learnable_tokens.contiguous());
}

}  // namespace transnext_mm
