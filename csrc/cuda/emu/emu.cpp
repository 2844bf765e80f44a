// The CPU emulation runtime (emu.h) and a C API that runs the CSR kernels of
// csrc/cuda/sparse_kernels.cuh through the same dispatch and launch shapes as
// csrc/cuda/kernels.cu. Built by tests/gpu/test_cuda_emulation.py with a host
// C++ compiler and the CUDA headers, loaded with ctypes; buffers as in
// csrc/cuda/kernels.h (host memory here).

#include "emu.h"

#include <condition_variable>
#include <cstdio>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "../dispatch.h"
#include "../kernels.h"
#include "../sparse_kernels.cuh"

namespace emu {

thread_local uint3 tl_thread_idx;
thread_local uint3 tl_block_idx;
dim3 g_grid_dim;
dim3 g_block_dim;

namespace {

class Barrier {
 public:
  explicit Barrier(int count) : count_(count) {}
  void wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const long gen = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  int count_;
  int arrived_ = 0;
  long generation_ = 0;
};

struct BlockState {
  std::unique_ptr<Barrier> block_barrier;
  std::mutex groups_mu;
  std::map<std::pair<int, unsigned>, std::unique_ptr<Barrier>> groups;  // (warp, lane mask) -> barrier
  std::vector<unsigned char> slots;  // shuffle exchange: 8 bytes per thread
};

BlockState* g_block = nullptr;

Barrier& group_barrier(unsigned mask) {
  const int warp = static_cast<int>(tl_thread_idx.x) / 32;
  const int lane = static_cast<int>(tl_thread_idx.x) % 32;
  if (!(mask & (1u << lane))) {
    fprintf(stderr, "emu: lane %d of warp %d used a mask 0x%08x without itself\n", lane, warp, mask);
    abort();
  }
  std::lock_guard<std::mutex> lock(g_block->groups_mu);
  auto& b = g_block->groups[{warp, mask}];
  if (!b) b = std::make_unique<Barrier>(__builtin_popcount(mask));
  return *b;
}

}  // namespace

void syncthreads() { g_block->block_barrier->wait(); }

void syncwarp(unsigned mask) { group_barrier(mask).wait(); }

void exchange(unsigned mask, const void* value, int src, void* out, int bytes) {
  const int tid = static_cast<int>(tl_thread_idx.x);
  const int warp_base = tid / 32 * 32;
  Barrier& barrier = group_barrier(mask);
  memcpy(&g_block->slots[static_cast<size_t>(tid) * 8], value, bytes);
  barrier.wait();
  memcpy(out, &g_block->slots[static_cast<size_t>(warp_base + src) * 8], bytes);
  barrier.wait();  // nobody overwrites its slot before every lane has read
}

void launch(dim3 grid, dim3 block, const std::function<void()>& fn) {
  g_grid_dim = grid;
  g_block_dim = block;
  // One OS thread per CUDA thread for the whole launch; the threads walk the
  // blocks together, with a barrier between blocks so that no thread starts the
  // next block (and overwrites the static "shared memory") early.
  BlockState state;
  state.block_barrier = std::make_unique<Barrier>(static_cast<int>(block.x));
  state.slots.assign(static_cast<size_t>(block.x) * 8, 0);
  g_block = &state;
  std::vector<std::thread> threads;
  threads.reserve(block.x);
  for (unsigned t = 0; t < block.x; ++t) {
    threads.emplace_back([=, &fn, &state] {
      tl_thread_idx = make_uint3(t, 0, 0);
      for (unsigned by = 0; by < grid.y; ++by) {
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          tl_block_idx = make_uint3(bx, by, 0);
          fn();
          state.block_barrier->wait();
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  g_block = nullptr;
}

}  // namespace emu

namespace sc = ::sparsestart::cuda;

extern "C" {

// Launch shape the GPU would use: {subwarp, vec, grid_x, grid_y}. kind 0 = spmm (rows = R), 1 = sddmm (rows = C).
void emu_shape(int kind, int dtype, int64_t rows, int64_t N, int aligned, int64_t* out4) {
  const sc::Shape s = kind == 0 ? sc::spmm_shape(static_cast<sc::DType>(dtype), rows, N, aligned != 0)
                                : sc::sddmm_shape(static_cast<sc::DType>(dtype), rows, N, aligned != 0);
  out4[0] = s.subwarp;
  out4[1] = s.vec;
  out4[2] = s.grid_x;
  out4[3] = s.grid_y;
}

// As sc::launch_csr_spmm; `grid_y_cap` (> 0) lowers the 65535 cap on grid.y to exercise the column-tile loop.
int emu_csr_spmm(int dtype, int index_type, const void* values, const void* ptr, const void* idx, const void* slot,
                 const int32_t* order, const void* x, void* out, int64_t R, int64_t N, int grid_y_cap) {
  if (R <= 0 || N <= 0) return 0;
  const bool aligned = reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  sc::Shape s = sc::spmm_shape(static_cast<sc::DType>(dtype), R, N, aligned);
  if (grid_y_cap > 0 && s.grid_y > static_cast<unsigned>(grid_y_cap)) s.grid_y = static_cast<unsigned>(grid_y_cap);
  const bool ok = sc::dispatch(static_cast<sc::DType>(dtype), static_cast<sc::IndexType>(index_type), s.subwarp,
                               s.vec, [&](auto t, auto i, auto sw, auto vec) {
    using T = typename decltype(t)::type;
    using I = typename decltype(i)::type;
    emu::launch(dim3(s.grid_x, s.grid_y), dim3(sc::kBlockThreads), [&] {
      sc::csr_spmm_kernel<T, I, decltype(sw)::value, decltype(vec)::value>(
          static_cast<const T*>(values), static_cast<const I*>(ptr), static_cast<const I*>(idx),
          static_cast<const I*>(slot), order, static_cast<const T*>(x), static_cast<T*>(out), R, N);
    });
  });
  return ok ? 0 : 1;
}

int emu_csr_sddmm(int dtype, int index_type, const void* ptr, const void* idx, const void* slot, const void* a,
                  const void* b, void* dv, int64_t R, int64_t N, int64_t capacity) {
  if (R <= 0 || N <= 0 || capacity <= 0) return 0;
  const bool aligned = reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
  const sc::Shape s = sc::sddmm_shape(static_cast<sc::DType>(dtype), capacity, N, aligned);
  const bool ok = sc::dispatch(static_cast<sc::DType>(dtype), static_cast<sc::IndexType>(index_type), s.subwarp,
                               s.vec, [&](auto t, auto i, auto sw, auto vec) {
    using T = typename decltype(t)::type;
    using I = typename decltype(i)::type;
    emu::launch(dim3(s.grid_x, s.grid_y), dim3(sc::kBlockThreads), [&] {
      sc::csr_sddmm_kernel<T, I, decltype(sw)::value, decltype(vec)::value>(
          static_cast<const I*>(ptr), static_cast<const I*>(idx), static_cast<const I*>(slot),
          static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(dv), R, N);
    });
  });
  return ok ? 0 : 1;
}

}  // extern "C"
