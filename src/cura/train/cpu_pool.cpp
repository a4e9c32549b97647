// cura's CPU tensor pool: a caching allocator for PyTorch's CPU tensors, installed with
// c10::SetCPUAllocator by cura/train/cpu_pool.py (built on first use, loaded with ctypes).
//
// A training step allocates and frees the same tensors, of the same sizes, every step. glibc's malloc
// either keeps freed blocks in its heaps (fast, but resident memory 0.9-3.4x the live tensors and not
// reproducible) or, with a fixed mmap threshold, maps and unmaps every large block (resident memory follows
// the live tensors, but every step page-faults each block in again: 1.35-1.9x slower steps). The pool keeps
// freed blocks of at least `min_bytes` in a free list keyed by size and hands them out again (best fit,
// at most `slack` times the request), mapping fresh memory only when none fits. So after the first step a
// step maps nothing. The memory it holds (live + cached) stays within a cap: the most ever alive at once
// (the high-water mark of live tensors) + `headroom` of it, and never above `limit` (cura train: the plan's
// tensors + 5%). When a new block would pass the cap, cached blocks are unmapped first (largest first), and
// a freed block that would pass it is unmapped instead of cached. So the pool holds what a step needs at
// its peak + headroom, and only live tensors can push it above `limit`.
//
// Smaller requests go to the allocator the pool replaced (PyTorch's default: glibc), as without the pool.
// Blocks are reported to PyTorch's profiler as the default allocator reports its own (profile_memory). The
// pool is process-wide, never destroyed (tensors may outlive everything), thread-safe (one mutex), and
// fork-safe (the mutex is held across fork and released on both sides).

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <pthread.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstring>
#include <iterator>
#include <map>
#include <mutex>
#include <unordered_map>

#define CURA_POOL_ABI 3

namespace {

constexpr size_t kPage = 4096;

struct Stats {
  long long live;        // bytes of blocks handed out and not yet freed
  long long cached;      // bytes of freed blocks kept for reuse
  long long peak_live;   // since the last reset
  long long peak_held;   // live + cached, since the last reset
  long long hits;        // requests served from the cache
  long long maps;        // blocks mapped from the system
  long long unmaps;      // blocks returned to the system
  long long over_limit;  // blocks mapped while live alone exceeded the limit
  long long high_live;   // the most ever alive at once (never reset)
};

void pool_deleter(void* ptr);

struct Block {
  size_t size;       // bytes mapped
  size_t requested;  // bytes asked for (what the profiler is told)
};

struct Pool final : c10::Allocator {
  c10::Allocator* fallback = nullptr;  // the allocator the pool replaced: small requests go there
  size_t min_bytes = 128 << 10;
  size_t limit = ~size_t(0);
  double slack = 1.25;
  double headroom = 0.05;
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // size -> block
  std::unordered_map<void*, Block> owned;    // live block -> its sizes
  Stats s{};

  static void* map(size_t bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }

  void unmap_cached(std::multimap<size_t, void*>::iterator it) {  // mu held
    munmap(it->second, it->first);
    s.cached -= (long long)it->first;
    s.unmaps++;
    free_blocks.erase(it);
  }

  // What live + cached may reach when `extra` more bytes become live.
  size_t cap(size_t extra) const {  // mu held
    size_t high = std::max((size_t)s.high_live, (size_t)s.live + extra);
    return std::min(limit, high + (size_t)((double)high * headroom));
  }

  // Unmap cached blocks, largest first, until `extra` more bytes keep the total within `cap`.
  void trim(size_t extra, size_t bound) {  // mu held
    while (!free_blocks.empty() && (size_t)(s.live + s.cached) + extra > bound) {
      unmap_cached(std::prev(free_blocks.end()));
    }
  }

  void note_peaks() {  // mu held
    if (s.live > s.high_live) s.high_live = s.live;
    if (s.live > s.peak_live) s.peak_live = s.live;
    if (s.live + s.cached > s.peak_held) s.peak_held = s.live + s.cached;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < min_bytes) return fallback->allocate(n);  // its own deleter frees it (and tells the profiler)
    c10::Device cpu(c10::DeviceType::CPU);
    size_t bytes = (n + kPage - 1) & ~(kPage - 1);
    void* p = nullptr;
    long long live = 0, held = 0;
    {
      std::lock_guard<std::mutex> guard(mu);
      size_t size = bytes;
      auto it = free_blocks.lower_bound(bytes);
      if (it != free_blocks.end() && (double)it->first <= (double)bytes * slack) {
        p = it->second;
        size = it->first;
        free_blocks.erase(it);
        s.cached -= (long long)size;
        s.hits++;
      } else {
        trim(bytes, cap(bytes));
        p = map(bytes);
        if (p == nullptr) {  // the system refused: give back everything cached and try once more
          trim(bytes, 0);
          p = map(bytes);
        }
        TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "cura's CPU pool: the system refused ", bytes,
                         " bytes (", s.live, " bytes of tensors are alive)");
        if ((size_t)s.live + bytes > limit) s.over_limit++;
        s.maps++;
      }
      s.live += (long long)size;
      owned.emplace(p, Block{size, n});
      note_peaks();
      live = s.live;
      held = s.live + s.cached;
    }
    if (c10::memoryProfilingEnabled()) c10::reportMemoryUsageToProfiler(p, (int64_t)n, live, held, cpu);
    return {p, p, &pool_deleter, cpu};
  }

  void release(void* p) {
    Block block{};
    long long live = 0, held = 0;
    {
      std::lock_guard<std::mutex> guard(mu);
      auto it = owned.find(p);
      if (it == owned.end()) {
        // a small block handed to oneDNN through raw_allocate, freed through raw_deleter
        c10::free_cpu(p);
        return;
      }
      block = it->second;
      owned.erase(it);
      s.live -= (long long)block.size;
      if ((size_t)(s.live + s.cached) + block.size > cap(0)) {
        munmap(p, block.size);
        s.unmaps++;
      } else {
        free_blocks.emplace(block.size, p);
        s.cached += (long long)block.size;
      }
      live = s.live;
      held = s.live + s.cached;
    }
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(p, -(int64_t)block.requested, live, held, c10::Device(c10::DeviceType::CPU));
    }
  }

  c10::DeleterFnPtr raw_deleter() const override { return &pool_deleter; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

Pool* g_pool = nullptr;

void pool_deleter(void* ptr) {
  if (ptr != nullptr) g_pool->release(ptr);
}

void before_fork() { g_pool->mu.lock(); }
void after_fork() { g_pool->mu.unlock(); }

}  // namespace

extern "C" {

int cura_pool_abi() { return CURA_POOL_ABI; }

// Install the pool as PyTorch's CPU allocator (again: update its settings). limit <= 0: no limit.
int cura_pool_install(long long min_bytes, long long limit, double slack, double headroom) {
  if (g_pool == nullptr) {
    g_pool = new Pool();  // never deleted
    g_pool->fallback = c10::GetCPUAllocator();
    pthread_atfork(before_fork, after_fork, after_fork);
  }
  {
    std::lock_guard<std::mutex> guard(g_pool->mu);
    g_pool->min_bytes = (size_t)(min_bytes > 0 ? min_bytes : 1);
    g_pool->limit = limit > 0 ? (size_t)limit : ~size_t(0);
    g_pool->slack = slack >= 1.0 ? slack : 1.0;
    g_pool->headroom = headroom >= 0.0 ? headroom : 0.0;
    g_pool->trim(0, g_pool->cap(0));
  }
  c10::SetCPUAllocator(g_pool, /*priority=*/100);
  return c10::GetCPUAllocator() == g_pool ? 0 : 1;
}

// Stats as 9 int64: live, cached, peak_live, peak_held, hits, maps, unmaps, over_limit, high_live.
int cura_pool_stats(long long* out) {
  if (g_pool == nullptr) return 1;
  std::lock_guard<std::mutex> guard(g_pool->mu);
  std::memcpy(out, &g_pool->s, sizeof(Stats));
  return 0;
}

void cura_pool_reset_peaks() {
  if (g_pool == nullptr) return;
  std::lock_guard<std::mutex> guard(g_pool->mu);
  g_pool->s.peak_live = g_pool->s.live;
  g_pool->s.peak_held = g_pool->s.live + g_pool->s.cached;
}

// Unmap every cached block (the memory of live tensors stays).
void cura_pool_empty_cache() {
  if (g_pool == nullptr) return;
  std::lock_guard<std::mutex> guard(g_pool->mu);
  g_pool->trim(0, 0);
}

}  // extern "C"
