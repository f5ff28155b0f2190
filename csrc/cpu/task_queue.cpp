// The shared task queue of csrc/cpu/task_queue.h.
#include "task_queue.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>

namespace speccascade {
namespace task_queue {
namespace {

struct TaskQueue {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t n = 0;
  const std::function<void(int64_t)>* fn = nullptr;

  void work() {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= n) return;  // late helpers return here without touching fn
      (*fn)(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

}  // namespace

int64_t num_threads() { return at::get_num_threads(); }

int64_t helpers_for(int64_t n, int64_t total_work) {
  const int64_t threads = at::get_num_threads();
  if (total_work < kSerialWork || n <= 1 || threads <= 1 || at::in_parallel_region()) return 0;
  return std::min(threads, n) - 1;
}

void run_shared(int64_t n, int64_t helpers, const std::function<void(int64_t)>& fn) {
  // shared with the helpers: one that starts after the caller returned finds no task left and
  // drops its reference without reading fn
  auto queue = std::make_shared<TaskQueue>();
  queue->n = n;
  queue->fn = &fn;
  for (int64_t h = 0; h < helpers; ++h) at::launch([queue] { queue->work(); });
  queue->work();
  while (queue->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace task_queue
}  // namespace speccascade
