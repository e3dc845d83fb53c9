// Copyright (c) transnext-mm contributors. All rights reserved.
//
// A few values remembered per tuple of tensors at their current versions. The aggregated-attention
// op gets the same index tensors on every step (the layers cache them per grid), and what it
// derives from them on the device (their bounds, read back, which on a GPU waits for the device;
// their grouping by value, a dozen small kernels) only changes when they do. An entry holds
// references to its tensors, so no other tensor can take their place while it lives, and their
// version counters at the time: another tensor or an in-place change (a new version) misses.
// Inference tensors have no version counter and are never cached.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <mutex>
#include <optional>

namespace transnext_mm {

template <size_t kTensors, typename Value>
class VersionedTensorCache {
 public:
  using Tensors = std::array<at::Tensor, kTensors>;

  explicit VersionedTensorCache(size_t capacity) : capacity_(capacity) {}

  // The value stored for exactly these tensors, at their current versions, and this key.
  std::optional<Value> find(const Tensors& tensors, int64_t key) {
    if (!cacheable(tensors)) return std::nullopt;
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& entry : entries_)
      if (matches(entry, tensors, key)) return entry.value;
    return std::nullopt;
  }

  // Stores the value, dropping the oldest entry when full.
  void add(const Tensors& tensors, int64_t key, Value value) {
    if (!cacheable(tensors)) return;
    Entry entry{tensors, {}, key, std::move(value)};
    for (size_t i = 0; i < kTensors; ++i) entry.versions[i] = tensors[i]._version();
    std::lock_guard<std::mutex> lock(mutex_);
    if (entries_.size() >= capacity_) entries_.pop_front();
    entries_.push_back(std::move(entry));
  }

 private:
  struct Entry {
    Tensors tensors;
    std::array<int64_t, kTensors> versions;
    int64_t key;
    Value value;
  };

  static bool cacheable(const Tensors& tensors) {
    for (const auto& t : tensors)
      if (!t.defined() || t.is_inference()) return false;
    return true;
  }

  static bool matches(const Entry& entry, const Tensors& tensors, int64_t key) {
    if (entry.key != key) return false;
    for (size_t i = 0; i < kTensors; ++i)
      if (entry.tensors[i].unsafeGetTensorImpl() != tensors[i].unsafeGetTensorImpl() ||
          entry.versions[i] != tensors[i]._version())
        return false;
    return true;
  }

  size_t capacity_;
  std::mutex mutex_;
  std::deque<Entry> entries_;
};

}  // namespace transnext_mm
