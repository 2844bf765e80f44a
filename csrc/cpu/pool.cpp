// The output-buffer pool of pool.h.

#include "pool.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace sparsestart {
namespace cpu {
namespace {

constexpr size_t kAlignment = 64;  // a cache line: what torch's CPU allocator gives too

int64_t initial_limit() {
  const char* env = std::getenv("SPARSESTART_POOL_LIMIT_MB");
  if (env == nullptr || *env == '\0') return int64_t{1} << 30;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  TORCH_CHECK_VALUE(end != env && *end == '\0' && mb >= 0, "SPARSESTART_POOL_LIMIT_MB=", env,
                    ": give a whole number of MiB >= 0 (0 turns the output-buffer pool off)");
  return static_cast<int64_t>(mb) << 20;
}

struct Pool {
  std::mutex mutex;
  std::unordered_map<size_t, std::vector<void*>> free_blocks;  // byte size -> kept blocks
  int64_t held = 0, hits = 0, misses = 0;
  std::atomic<int64_t> limit{initial_limit()};

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      auto it = free_blocks.find(bytes);
      if (it != free_blocks.end() && !it->second.empty()) {
        void* p = it->second.back();
        it->second.pop_back();
        held -= static_cast<int64_t>(bytes);
        ++hits;
        return p;
      }
      ++misses;
    }
    void* p = nullptr;
    TORCH_CHECK(posix_memalign(&p, kAlignment, bytes) == 0 && p != nullptr, "sparsestart: out of memory allocating ",
                bytes, " bytes for an op's output");
    return p;
  }

  void give_back(void* p, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      if (held + static_cast<int64_t>(bytes) <= limit.load()) {
        free_blocks[bytes].push_back(p);
        held += static_cast<int64_t>(bytes);
        return;
      }
    }
    std::free(p);
  }

  void set_limit(int64_t bytes) {
    std::vector<void*> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex);
      limit = bytes;
      for (auto it = free_blocks.begin(); it != free_blocks.end() && held > bytes; ++it) {
        while (!it->second.empty() && held > bytes) {
          dropped.push_back(it->second.back());
          it->second.pop_back();
          held -= static_cast<int64_t>(it->first);
        }
      }
    }
    for (void* p : dropped) std::free(p);
  }
};

// Never destroyed: tensors freed during interpreter shutdown still return their blocks to it.
Pool& pool() {
  static Pool* instance = new Pool();
  return *instance;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const int64_t bytes = numel * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  if (bytes < kMinPooledBytes || options.device().type() != c10::DeviceType::CPU || pool().limit.load() == 0) {
    return at::empty(sizes, options);
  }
  const size_t n = static_cast<size_t>(bytes);
  void* p = pool().take(n);
  return at::from_blob(p, sizes, [n](void* data) { pool().give_back(data, n); }, options);
}

at::Tensor pooled_zeros(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return pooled_empty(sizes, options).zero_();
}

PoolStats pool_stats() {
  auto& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  return {p.held, p.limit.load(), p.hits, p.misses};
}

void pool_set_limit(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "output pool limit must be >= 0 bytes, got ", bytes);
  pool().set_limit(bytes);
}

}  // namespace cpu
}  // namespace sparsestart
