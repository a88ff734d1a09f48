// A persistent worker pool for the NF4 kernels. A decode step calls ~100 small GEMVs: starting threads per call
// (common/parallel.h's parallel_for) would cost more than the work, so the workers live for the process.
//
// Work sharing (why the caller never waits for a late worker): tasks are claimed from an atomic counter, the
// caller claims too, and a worker joins a job only while the job is open. When the caller runs out of tasks it
// closes the job and waits only for workers that joined and are finishing a task. On a busy machine where a
// worker is descheduled, the caller simply does all the work itself.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define PHI3FAST_PAUSE() _mm_pause()
#else
#define PHI3FAST_PAUSE() ((void)0)
#endif

namespace phi3fast {
namespace nf4 {

class ThreadPool {
 public:
  static ThreadPool& instance() {
    static ThreadPool* pool = new ThreadPool();  // leaked on purpose: no join at interpreter exit
    return *pool;
  }

  static int max_threads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

  // fn(task) for task in [0, n) on up to `threads` threads (<= 0: every core), the caller included. The first
  // exception is re-raised here after every joined worker is done.
  void run(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
    const int t = static_cast<int>(std::min<int64_t>(n, threads <= 0 ? max_threads() : threads));
    if (t <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    std::lock_guard<std::mutex> one_job(run_mu_);  // concurrent callers take turns
    ensure_workers(t - 1);
    {
      std::lock_guard<std::mutex> g(mu_);
      job_ = &fn;
      n_ = n;
      next_.store(0);
      wanted_ = t - 1;
      open_ = true;
      error_ = nullptr;
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    open_ = false;
    done_cv_.wait(lk, [&] { return active_ == 0; });
    job_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  ThreadPool() = default;

  void ensure_workers(int count) {
    while (static_cast<int>(workers_.size()) < count) {
      const int index = static_cast<int>(workers_.size());
      workers_.emplace_back([this, index] { loop(index); });
      workers_.back().detach();
    }
  }

  void work() {
    for (;;) {
      const int64_t i = next_.fetch_add(1);
      if (i >= n_) return;
      try {
        (*job_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> g(mu_);
        if (!error_) error_ = std::current_exception();
        next_.store(n_);
        return;
      }
    }
  }

  void loop(int index) {
    uint64_t seen = generation_.load();
    for (;;) {
      // Spin briefly for the next job (decode issues them back to back), then sleep.
      for (int spin = 0; spin < 4000 && generation_.load(std::memory_order_acquire) == seen; ++spin)
        PHI3FAST_PAUSE();
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return generation_.load() != seen; });
      seen = generation_.load();
      if (!open_ || index >= wanted_) continue;
      ++active_;
      lk.unlock();
      work();
      lk.lock();
      if (--active_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> generation_{0};
  int wanted_ = 0, active_ = 0;
  bool open_ = false;
  std::exception_ptr error_;
};

}  // namespace nf4
}  // namespace phi3fast
