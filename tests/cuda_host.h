// CUDA's execution model on the host, for tests/cuda_harness.py: a CUDA source (optim's
// `cuda_source(dtype)`, or any other) compiled by g++ after this header runs each launch
// as grid x block host threads. `threadIdx` / `blockIdx` / `blockDim` / `gridDim` are
// thread-locals, the 32 lanes of a warp meet at a barrier for `__shfl_down_sync` /
// `__shfl_sync` / `__syncwarp`, atomics are `std::atomic_ref` operations and
// `__threadfence` a full fence. cuda_harness.py appends, after the source, one
// `extern "C" int launch_<name>(grid, block, args)` per entry point, calling
// `optim_launch` below. Not a header to include: its text is the start of the file g++
// compiles (its hash keys the cache).

// ---------------------------------------------------------------- CUDA on the host
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's spellings, for the host.
#define __global__
#define __device__
#define __forceinline__ inline
using std::sqrt;

struct optim_uint3 { unsigned int x = 0, y = 0, z = 0; };
thread_local optim_uint3 threadIdx, blockIdx, blockDim, gridDim;

// A warp's 32 lanes (host threads) meet here at every shuffle and __syncwarp (a
// yielding spin barrier). Lanes that diverge around a shuffle would hang on a GPU;
// here they abort with a message.
class OptimWarp {
 public:
  void sync() {
    const unsigned int generation = generation_.load();
    if (arrived_.fetch_add(1) == 31) {
      arrived_.store(0);
      generation_.fetch_add(1);
      return;
    }
    const auto start = std::chrono::steady_clock::now();
    for (unsigned long spins = 1; generation_.load() == generation; ++spins) {
      std::this_thread::yield();
      if (spins % 4096 == 0 &&
          std::chrono::steady_clock::now() - start > std::chrono::seconds(120)) {
        std::fprintf(stderr, "cuda harness: a warp's lanes diverged at a shuffle\n");
        std::abort();
      }
    }
  }
  unsigned long long slot[32];

 private:
  std::atomic<unsigned int> arrived_{0};
  std::atomic<unsigned int> generation_{0};
};
thread_local OptimWarp* optim_this_warp = nullptr;

inline void optim_check_mask(unsigned int mask) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "cuda harness: only full-warp shuffles are emulated\n");
    std::abort();
  }
}

template <typename V>
V optim_shuffle(V value, unsigned int source, bool in_range) {
  static_assert(sizeof(V) <= sizeof(unsigned long long), "shuffle of a wide type");
  OptimWarp& warp = *optim_this_warp;
  std::memcpy(&warp.slot[threadIdx.x % 32], &value, sizeof(V));
  warp.sync();
  V out = value;
  if (in_range) {
    std::memcpy(&out, &warp.slot[source], sizeof(V));
  }
  warp.sync();  // nobody overwrites a slot before every lane has read
  return out;
}

template <typename V>
V __shfl_down_sync(unsigned int mask, V value, unsigned int delta) {
  optim_check_mask(mask);
  const unsigned int lane = threadIdx.x % 32;
  return optim_shuffle(value, lane + delta, lane + delta < 32);
}

template <typename V>
V __shfl_sync(unsigned int mask, V value, int source) {
  optim_check_mask(mask);
  return optim_shuffle(value, static_cast<unsigned int>(source) % 32, true);
}

inline void __syncwarp(unsigned int mask = 0xffffffffu) {
  optim_check_mask(mask);
  optim_this_warp->sync();
}

inline unsigned int atomicAdd(unsigned int* address, unsigned int value) {
  return std::atomic_ref<unsigned int>(*address).fetch_add(value);
}

inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                                    unsigned long long value) {
  std::atomic_ref<unsigned long long>(*address).compare_exchange_strong(compare, value);
  return compare;  // the old value, whether or not it was replaced
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename V>
V __ldcg(const V* address) {
  V out;
  __atomic_load(const_cast<V*>(address), &out, __ATOMIC_SEQ_CST);
  return out;
}

// ---------------------------------------------------------------- launches
// cuLaunchKernel's convention: `args` holds one pointer per kernel parameter.
template <typename... A, std::size_t... I>
void optim_invoke(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
  kernel(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

// The host threads that play a launch's GPU threads, kept between launches (creating
// a thread costs more than most emulated kernels). run(count, job) calls job(i) for
// every i < count, each on its own thread, all at once (a warp's lanes must meet).
class OptimPool {
 public:
  void run(unsigned int count, const std::function<void(unsigned int)>& job) {
    std::lock_guard<std::mutex> one_launch_at_a_time(launch_);
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_ < count) {
      std::thread(&OptimPool::work, this, workers_++, generation_).detach();
    }
    job_ = &job;
    count_ = count;
    remaining_ = count;
    ++generation_;
    wake_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    job_ = nullptr;
  }

 private:
  void work(unsigned int index, unsigned long seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (index >= count_) {
        continue;
      }
      const std::function<void(unsigned int)>* job = job_;
      lock.unlock();
      (*job)(index);
      lock.lock();
      if (--remaining_ == 0) {
        done_.notify_all();
      }
    }
  }

  std::mutex launch_, mutex_;
  std::condition_variable wake_, done_;
  const std::function<void(unsigned int)>* job_ = nullptr;
  unsigned int workers_ = 0, count_ = 0, remaining_ = 0;
  unsigned long generation_ = 0;
};

OptimPool& optim_pool() {
  static OptimPool* pool = new OptimPool();  // never destroyed: its threads outlive exit
  return *pool;
}

template <typename... A>
int optim_launch(void (*kernel)(A...), unsigned int grid, unsigned int block, void** args) {
  if (grid == 0 || block == 0 || block % 32 != 0) {
    return 1;
  }
  const unsigned int threads = grid * block;
  std::vector<std::unique_ptr<OptimWarp>> warps;
  for (unsigned int i = 0; i < threads / 32; ++i) {
    warps.push_back(std::make_unique<OptimWarp>());
  }
  optim_pool().run(threads, [&](unsigned int i) {
    blockIdx.x = i / block;
    threadIdx.x = i % block;
    blockDim.x = block;
    gridDim.x = grid;
    optim_this_warp = warps[i / 32].get();
    optim_invoke(kernel, args, std::index_sequence_for<A...>{});
  });
  return 0;
}
