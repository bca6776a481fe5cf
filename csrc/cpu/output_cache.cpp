// Large CPU outputs (the gradients the ops write) from a small cache of blocks that earlier
// outputs released. A training loop asks for a gradient of the same size every step; a fresh
// one comes from the OS (mmap above glibc's 32 MB threshold) and every page is faulted in and
// zeroed on its first write, which on the benchmark VM took most of a cross-entropy step
// (benchmarks/NOTES.md, CPU section). A block from the cache has its pages already. Like the
// CUDA caching allocator, the cache keeps memory after its tensors are gone: at most
// TORCH_LOSSES_CPU_CACHE_MB (default 1024, 0 turns it off) MiB, the most recently released
// blocks first; torch_losses.empty_cpu_cache() hands it back.
#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>

#include "cpu/cpu_backend.h"

namespace torch_losses {
namespace {

constexpr size_t kPage = 4096;

struct Block {
  void* ptr;
  size_t bytes;
};

int64_t cache_limit_from_env() {
  const char* mb = std::getenv("TORCH_LOSSES_CPU_CACHE_MB");
  if (mb == nullptr || *mb == '\0') return int64_t(1024) << 20;
  char* end = nullptr;
  const long long value = std::strtoll(mb, &end, 10);
  TORCH_CHECK(end != mb && *end == '\0' && value >= 0,
              "torch_losses: TORCH_LOSSES_CPU_CACHE_MB must be a whole number of MiB >= 0, got '",
              mb, "'");
  return static_cast<int64_t>(value) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    const size_t size = (bytes + kPage - 1) / kPage * kPage;
    void* ptr = take(size);
    if (ptr == nullptr) ptr = c10::alloc_cpu(size);
    return {ptr, new Block{ptr, size}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    std::memcpy(dest, src, count);
  }

  int64_t empty() {
    std::deque<Block> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(blocks_);
      cached_bytes_ = 0;
    }
    int64_t freed = 0;
    for (const Block& b : blocks) {
      c10::free_cpu(b.ptr);
      freed += static_cast<int64_t>(b.bytes);
    }
    return freed;
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }

  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: outputs may outlive exit
    return *cache;
  }

 private:
  // The most recently released block of exactly this size, or null.
  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
      if (it->bytes == size) {
        void* ptr = it->ptr;
        cached_bytes_ -= static_cast<int64_t>(size);
        blocks_.erase(std::next(it).base());
        return ptr;
      }
    }
    return nullptr;
  }

  static void release(void* context) {
    Block* block = static_cast<Block*>(context);
    get().keep_or_free(*block);
    delete block;
  }

  void keep_or_free(const Block& block) {
    std::deque<Block> evicted;
    const int64_t bytes = static_cast<int64_t>(block.bytes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (bytes > limit_) {
        evicted.push_back(block);
      } else {
        blocks_.push_back(block);
        cached_bytes_ += bytes;
        while (cached_bytes_ > limit_) {  // the oldest go first
          evicted.push_back(blocks_.front());
          cached_bytes_ -= static_cast<int64_t>(blocks_.front().bytes);
          blocks_.pop_front();
        }
      }
    }
    for (const Block& b : evicted) c10::free_cpu(b.ptr);
  }

  std::mutex mutex_;
  std::deque<Block> blocks_;  // released blocks, oldest first
  int64_t cached_bytes_ = 0;
  const int64_t limit_ = cache_limit_from_env();
};

int64_t empty_cpu_cache() { return OutputCache::get().empty(); }
int64_t cpu_cache_bytes() { return OutputCache::get().cached_bytes(); }

}  // namespace

at::Tensor empty_cpu_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) *
                        static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (bytes < kPrefaultMinBytes) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, &OutputCache::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   options.dtype().toScalarType(), std::nullopt);
}

at::Tensor empty_cpu_output(at::IntArrayRef sizes, at::IntArrayRef strides,
                            const at::TensorOptions& options) {
  const int64_t bytes = c10::multiply_integers(sizes) *
                        static_cast<int64_t>(c10::elementSize(options.dtype().toScalarType()));
  if (bytes < kPrefaultMinBytes) return at::empty_strided(sizes, strides, options);
  return at::detail::empty_strided_generic(sizes, strides, &OutputCache::get(),
                                           c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           options.dtype().toScalarType());
}

TORCH_LIBRARY_IMPL(torch_losses, CompositeExplicitAutograd, m) {
  m.impl("empty_cpu_cache", &empty_cpu_cache);
  m.impl("cpu_cache_bytes", &cpu_cache_bytes);
}

}  // namespace torch_losses
