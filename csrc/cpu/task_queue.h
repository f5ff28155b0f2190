// A shared task queue for the CPU verification (csrc/cpu/verify_cpu.cpp): run_tasks(n, work, f)
// runs f(0) ... f(n - 1) on the calling thread and on helpers from ATen's inter-op pool, and
// returns once every task has run.
//
// Tasks are claimed from an atomic counter by the calling thread and by up to
// at::get_num_threads() - 1 helpers started on ATen's inter-op pool (at::launch). The caller waits
// only for tasks that were claimed, never for a helper to start: on a machine whose cores are
// shared, a helper that is not scheduled in time simply finds no work left. (An OpenMP region,
// at::parallel_for, ends with a barrier that waits for every team thread: with the other core
// busy that costs a scheduler time slice, ~4 ms, per region, far more than a block's work.)
// Results do not depend on which thread runs a task.
#pragma once

#include <cstdint>
#include <functional>

namespace speccascade {
namespace task_queue {

// Below this much work (the caller's unit: logits for the verification) a call stays on the
// calling thread: starting helpers would cost more than they save.
constexpr int64_t kSerialWork = 1 << 16;

// at::get_num_threads(): the most threads (the caller included) a call may use.
int64_t num_threads();

// How many helpers run_tasks starts for n tasks of total_work in all; 0: run them inline (little
// work, one task, one thread, or a call from inside an ATen parallel region).
int64_t helpers_for(int64_t n, int64_t total_work);

// Runs fn(0) ... fn(n - 1) on the calling thread and `helpers` helper threads; returns when all
// n have run.
void run_shared(int64_t n, int64_t helpers, const std::function<void(int64_t)>& fn);

template <class F>
void run_tasks(int64_t n, int64_t total_work, const F& f) {
  if (n <= 0) return;
  const int64_t helpers = helpers_for(n, total_work);
  if (helpers == 0) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  const std::function<void(int64_t)> fn = [&f](int64_t i) { f(i); };
  run_shared(n, helpers, fn);
}

}  // namespace task_queue
}  // namespace speccascade
