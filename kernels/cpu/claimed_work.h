// Work items that the threads of one parallel region claim one at a time, in index order,
// instead of each taking a static share. Where the items differ in cost (attention over
// contexts of 10x different lengths), or where a thread may be preempted on a CPU shared
// with the front or the client, no thread then waits for another's unstarted share at the
// region's end: a late thread holds it up by its current item at most.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace palm_cpu {

// f(i) for every i in [0, count), each exactly once, on the region's threads.
template <typename F>
void parallel_claim(int64_t count, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < count;) f(i);
  });
}

}  // namespace palm_cpu
