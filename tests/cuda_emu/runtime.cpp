// The emulator's runtime (see include/tl_cuda_emu.h): fibers, barriers, warp intrinsics,
// thread-block clusters and dynamic shared memory, the emulated devices, guard-page buffers and
// error reporting.
//
// Fibers are created with makecontext (first entry through swapcontext) and switched with
// _setjmp/_longjmp, which do not save the signal mask (no system call per switch). A fiber runs
// until it waits at a barrier or ends; the scheduler then runs the next runnable fiber of the
// block. A fault (SIGSEGV/SIGBUS) in a fiber, e.g. a read of a guard page, is reported like any
// other error and the block is abandoned; the test process carries on.
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "include/tl_cuda_emu.h"

uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim;
dim3 gridDim;

namespace tl_emu {
namespace {

constexpr size_t kStackBytes = 64 * 1024;
constexpr int kMaxThreads = 1024;
constexpr int kMaxCluster = 16;  // blocks of a cluster (8 portable, 16 with the attribute)
constexpr int kStackChunk = 1024;  // fiber stacks are mapped this many at a time

enum State : int { kRunnable, kAtBlockBarrier, kAtWarpOp, kAtClusterWait, kDone };

const char* const kWarpOpNames[] = {"__shfl_xor_sync", "__shfl_down_sync", "__shfl_up_sync",
                                    "__shfl_sync", "__ballot_sync", "__syncwarp"};

struct Fiber {
  jmp_buf jb;
  ucontext_t uc;
  char* stack = nullptr;
  bool started = false;
  State state = kRunnable;
  uint3 tid{0, 0, 0};
  int linear = 0;  // thread index in its block
  int block = 0;   // its block's rank in the cluster
  // Cluster barrier: arrived and not yet waited; the phase it arrived in.
  bool cluster_pending = false;
  long cluster_phase = 0;
  // The barrier it waits at and, for warp intrinsics, its operands and result.
  const char* file = nullptr;
  int line = 0;
  WarpOp op = kSyncWarp;
  unsigned mask = 0;
  uint64_t in = 0, out = 0;
  int arg = 0, width = 32;
};

struct Warp {
  int lanes = 0;    // threads of the block in this warp
  int arrived = 0;  // lanes waiting at the current warp intrinsic
  int first = -1;   // the first of them (whose call site the others must match)
};

// One block of the running cluster.
struct Block {
  uint3 idx{0, 0, 0};
  int at_barrier = 0;      // threads waiting at __syncthreads
  int barrier_first = -1;  // the first of them
  int live = 0;            // threads not yet exited
  char* smem = nullptr;    // dynamic shared memory: `smem_bytes`, ending at a guard page
  char* smem_map = nullptr;
  size_t smem_map_len = 0;
};

struct Scheduler {
  std::vector<Fiber> fibers{size_t(kMaxThreads)};
  std::vector<Warp> warps{size_t(kMaxCluster * kMaxThreads / 32)};
  std::vector<Block> blocks{size_t(kMaxCluster)};
  std::vector<char*> stack_chunks;  // kStackChunk stacks each
  int n = 0;               // threads per block
  int cluster = 1;         // blocks per cluster
  int total = 0;           // threads of the cluster: n x cluster
  size_t smem_bytes = 0;
  int cluster_arrived = 0;  // threads arrived at the current cluster barrier phase
  long cluster_phase = 0;
  int current = -1;        // running fiber, -1 in the scheduler
  jmp_buf sched_jb;
  ucontext_t sched_uc;
  const char* kernel = "";
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::string error;  // sticky, as CUDA's errors
};

Scheduler& S() {
  static Scheduler s;
  return s;
}

// ---- emulated devices --------------------------------------------------------------------------
struct Device {
  int sms;
  int l2_bytes;
  int blocks_per_sm;  // cudaOccupancyMaxActiveBlocksPerMultiprocessor's answer (capped by 2048)
  int cc;             // compute capability, 10 major + minor (>= 90: clusters)
  int smem_optin;     // dynamic shared memory a block may opt in to (bytes)
  int smem_per_sm;
  int code_cc;  // the architecture of the kernels' code that runs (cudaFuncGetAttributes)
};
// 0: H100-like, 1: A100-like, then small devices whose grid caps, L2-based caps and shared
// memory limits bite (2, 4, 7: clusters, with 1-3 SMs or little shared memory; 6: an sm_90
// device running a build without sm_90 code, i.e. compute_80 PTX compiled at load time).
const Device g_devices[8] = {
    {132, 50 << 20, 3, 90, 232448, 233472, 90}, {108, 40 << 20, 2, 80, 166912, 167936, 80},
    {1, 1 << 20, 1, 90, 232448, 233472, 90},     {7, 256 << 10, 4, 86, 101376, 102400, 86},
    {16, 4 << 20, 8, 90, 49152, 65536, 90},      {80, 6 << 20, 1, 70, 98304, 98304, 70},
    {2, 128 << 10, 2, 90, 101376, 102400, 80},   {3, 64 << 10, 5, 120, 101376, 102400, 120}};
int g_device = 0;

// Kernel attributes (cudaFuncSetAttribute), by the kernel's address and device.
struct KernelAttrs {
  const void* key;
  int device;
  int max_dynamic_smem;
  bool nonportable_cluster;
};
std::vector<KernelAttrs> g_kernel_attrs;
KernelAttrs& attrs_of(const void* key) {
  for (KernelAttrs& a : g_kernel_attrs) {
    if (a.key == key && a.device == g_device) return a;
  }
  g_kernel_attrs.push_back(KernelAttrs{key, g_device, 48 << 10, false});
  return g_kernel_attrs.back();
}
std::string g_launch_log;  // one line per launch, read and cleared by tl_emu_launch_log

std::string where(const Fiber& f) {
  const uint3 b = S().blocks[f.block].idx;
  char buf[160];
  snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", b.x, b.y, b.z, f.tid.x,
           f.tid.y, f.tid.z);
  return buf;
}

void mark_done(Fiber& f);

[[noreturn]] void stop_current() {
  Scheduler& s = S();
  mark_done(s.fibers[s.current]);
  _longjmp(s.sched_jb, 1);
}

void set_error(const std::string& msg) {
  Scheduler& s = S();
  if (s.error.empty()) s.error = std::string("kernel ") + s.kernel + ": " + msg;
}

[[noreturn]] void vfail(const char* fmt, va_list ap) {
  Scheduler& s = S();
  char buf[1024];
  vsnprintf(buf, sizeof buf, fmt, ap);
  if (s.current < 0) {
    set_error(std::string("(host) ") + buf);
    fprintf(stderr, "tl_cuda_emu: %s\n", s.error.c_str());
    abort();
  }
  set_error(where(s.fibers[s.current]) + ": " + buf);
  stop_current();
}

[[noreturn]] void fail_now(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfail(fmt, ap);
}

__attribute__((noinline)) void yield() {
  Scheduler& s = S();
  Fiber& f = s.fibers[s.current];
  if (_setjmp(f.jb) == 0) _longjmp(s.sched_jb, 1);
}

int warp_index(const Fiber& f) { return f.block * (kMaxThreads / 32) + f.linear / 32; }

void mark_done(Fiber& f) {
  Scheduler& s = S();
  f.state = kDone;
  Block& b = s.blocks[f.block];
  // A block whose threads have all exited has no shared memory any more: a later access from
  // another block of the cluster faults (reported by on_fault).
  if (--b.live == 0 && s.cluster > 1) mprotect(b.smem_map, b.smem_map_len, PROT_NONE);
}

void fiber_main() {
  Scheduler& s = S();
  s.body(s.ctx);
  Fiber& f = s.fibers[s.current];
  const Block& b = s.blocks[f.block];
  if (b.at_barrier > 0) {
    const Fiber& w = s.fibers[b.barrier_first];
    fail_now("exited while %d thread(s) wait at __syncthreads (%s:%d), e.g. %s", b.at_barrier,
             w.file, w.line, where(w).c_str());
  }
  const Warp& warp = s.warps[warp_index(f)];
  if (warp.arrived > 0) {
    const Fiber& w = s.fibers[warp.first];
    fail_now("exited while %d lane(s) of its warp wait at %s (%s:%d), e.g. %s", warp.arrived,
             kWarpOpNames[w.op], w.file, w.line, where(w).c_str());
  }
  if (f.cluster_pending) {
    fail_now("exited after a cluster barrier arrive (%s:%d) without its wait", f.file, f.line);
  }
  if (s.cluster_arrived > 0) {
    fail_now("exited while %d thread(s) of its cluster wait at a cluster barrier it has not "
             "arrived at", s.cluster_arrived);
  }
  mark_done(f);
  _longjmp(s.sched_jb, 1);
}

void resume(int i) {
  Scheduler& s = S();
  Fiber& f = s.fibers[i];
  s.current = i;
  threadIdx = f.tid;
  blockIdx = s.blocks[f.block].idx;
  if (_setjmp(s.sched_jb) == 0) {
    if (!f.started) {
      f.started = true;
      swapcontext(&s.sched_uc, &f.uc);
    } else {
      _longjmp(f.jb, 1);
    }
  }
  s.current = -1;
}

std::string describe_waits() {
  Scheduler& s = S();
  std::string r;
  int shown = 0;
  for (int i = 0; i < s.total && shown < 4; ++i) {
    const Fiber& f = s.fibers[i];
    if (f.state == kDone) continue;
    char buf[256];
    snprintf(buf, sizeof buf, "%s%s at %s (%s:%d)", shown ? "; " : "", where(f).c_str(),
             f.state == kAtBlockBarrier   ? "__syncthreads"
             : f.state == kAtClusterWait ? "a cluster barrier wait"
                                         : kWarpOpNames[f.op],
             f.file, f.line);
    r += buf;
    ++shown;
  }
  return r;
}

// ---- faults in a kernel ------------------------------------------------------------------------
struct Buffer {
  uintptr_t begin, end, map_begin, map_end;  // the user's bytes; the mapping (guard page last)
};
std::vector<Buffer> g_buffers;
struct sigaction g_old_segv, g_old_bus;
bool g_in_kernel = false;
char* g_altstack = nullptr;

std::string describe_address(uintptr_t a) {
  char buf[200];
  const Scheduler& s = S();
  for (int i = 0; i < s.cluster; ++i) {
    const Block& b = s.blocks[i];
    const uintptr_t m = uintptr_t(b.smem_map);
    if (b.smem_map == nullptr || a < m || a >= m + b.smem_map_len) continue;
    snprintf(buf, sizeof buf, " (the dynamic shared memory of block (%u,%u,%u)%s)", b.idx.x,
             b.idx.y, b.idx.z,
             b.live == 0 ? ", which has exited" : uintptr_t(a) >= uintptr_t(b.smem) + s.smem_bytes
                                                      ? ", past its end"
                                                      : "");
    return buf;
  }
  for (const Buffer& b : g_buffers) {
    if (a >= b.end && a < b.map_end) {
      snprintf(buf, sizeof buf, " (%zu bytes past the end of the %zu-byte buffer at %p)",
               size_t(a - b.end), size_t(b.end - b.begin), reinterpret_cast<void*>(b.begin));
      return buf;
    }
    if (a >= b.map_begin && a < b.begin) {
      snprintf(buf, sizeof buf, " (%zu bytes before the %zu-byte buffer at %p)",
               size_t(b.begin - a), size_t(b.end - b.begin), reinterpret_cast<void*>(b.begin));
      return buf;
    }
  }
  return "";
}

void on_fault(int sig, siginfo_t* si, void* uctx) {
  Scheduler& s = S();
  if (!g_in_kernel || s.current < 0) {
    // Not ours: the previous handler (e.g. Python's faulthandler) or the default action.
    struct sigaction& old = sig == SIGSEGV ? g_old_segv : g_old_bus;
    if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction != nullptr) {
      old.sa_sigaction(sig, si, uctx);
      return;
    }
    if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN && old.sa_handler != nullptr) {
      old.sa_handler(sig);
      return;
    }
    signal(sig, SIG_DFL);
    raise(sig);
    return;
  }
  const uintptr_t a = reinterpret_cast<uintptr_t>(si->si_addr);
  const uintptr_t stack = reinterpret_cast<uintptr_t>(s.fibers[s.current].stack);
  const uintptr_t page = uintptr_t(sysconf(_SC_PAGESIZE));
  if (a >= stack - page && a < stack) {
    fail_now("fiber stack overflow (%zu KiB per thread)", kStackBytes / 1024);
  }
  fail_now("invalid memory access (%s) at %p%s", sig == SIGSEGV ? "SIGSEGV" : "SIGBUS",
           si->si_addr, describe_address(a).c_str());
}

void install_fault_handlers() {
  if (g_altstack == nullptr) {
    g_altstack = static_cast<char*>(malloc(1 << 16));
    stack_t ss{};
    ss.ss_sp = g_altstack;
    ss.ss_size = 1 << 16;
    sigaltstack(&ss, nullptr);
  }
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sigemptyset(&sa.sa_mask);
  // NODEFER: the handler leaves by _longjmp, so the signal must not stay blocked.
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
}

void restore_fault_handlers() {
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
}

// Stacks (and fibers) for `total` threads, mapped kStackChunk at a time as clusters need more.
void init_stacks(int total) {
  Scheduler& s = S();
  if (s.fibers.size() < size_t(total)) {  // no fiber is running: they may move
    s.fibers.resize(size_t((total + kStackChunk - 1) / kStackChunk * kStackChunk));
  }
  // One guard page below each stack: an overflow faults instead of corrupting a neighbour.
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t slot = kStackBytes + page;
  while (int(s.stack_chunks.size()) * kStackChunk < total) {
    char* chunk = static_cast<char*>(mmap(nullptr, slot * kStackChunk, PROT_READ | PROT_WRITE,
                                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (chunk == MAP_FAILED) {
      fprintf(stderr, "tl_cuda_emu: cannot map the fiber stacks\n");
      abort();
    }
    const int first = int(s.stack_chunks.size()) * kStackChunk;
    for (int i = 0; i < kStackChunk; ++i) {
      mprotect(chunk + i * slot, page, PROT_NONE);
      s.fibers[first + i].stack = chunk + i * slot + page;
    }
    s.stack_chunks.push_back(chunk);
  }
}

// Each block's dynamic shared memory: smem bytes (rounded up to 16) ending at a guard page.
void map_shared_memory(size_t smem) {
  Scheduler& s = S();
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t bytes = (smem + 15) / 16 * 16;
  const size_t len = (bytes + page - 1) / page * page + page;
  for (int i = 0; i < s.cluster; ++i) {
    Block& b = s.blocks[i];
    if (b.smem_map_len != len) {
      if (b.smem_map != nullptr) munmap(b.smem_map, b.smem_map_len);
      b.smem_map = static_cast<char*>(
          mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
      if (b.smem_map == MAP_FAILED) {
        fprintf(stderr, "tl_cuda_emu: cannot map shared memory\n");
        abort();
      }
      b.smem_map_len = len;
    }
    b.smem = b.smem_map + (len - page) - bytes;
  }
}

// A fresh cluster: shared memory accessible again and NaN-patterned (0xff bytes).
void reset_shared_memory() {
  Scheduler& s = S();
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  for (int i = 0; i < s.cluster; ++i) {
    Block& b = s.blocks[i];
    mprotect(b.smem_map, b.smem_map_len - page, PROT_READ | PROT_WRITE);
    mprotect(b.smem_map + b.smem_map_len - page, page, PROT_NONE);
    memset(b.smem_map, 0xff, b.smem_map_len - page);
  }
}

// The order in which a block's runnable threads run between their waits: ascending (the
// default), or the highest-numbered first (tl_emu_set_schedule). Race-free kernels give the same
// bits either way; a shared-memory race shows where the two orders differ (e.g. a warp that
// writes its next sum before warp 0 has read the last one, which ascending order never lets
// happen).
bool g_high_first = false;

// Runs the blocks of one cluster (one block without clusters) to the end.
void run_cluster() {
  Scheduler& s = S();
  static ucontext_t proto;
  static bool have_proto = false;
  if (!have_proto) {
    getcontext(&proto);
    have_proto = true;
  }
  for (int i = 0; i < s.total; ++i) {
    Fiber& f = s.fibers[i];
    f.started = false;
    f.state = kRunnable;
    f.cluster_pending = false;
    f.uc = proto;
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
  }
  for (auto& w : s.warps) w.arrived = 0, w.first = -1;
  for (int b = 0; b < s.cluster; ++b) {
    s.blocks[b].at_barrier = 0;
    s.blocks[b].barrier_first = -1;
    s.blocks[b].live = s.n;
  }
  s.cluster_arrived = 0;
  s.cluster_phase = 0;
  reset_shared_memory();
  // Each block runs as far as it can (through its own __syncthreads) before the next one goes
  // on: a block that does not wait for the others at a cluster barrier exits while they still
  // need its shared memory, and their access faults.
  for (;;) {
    bool ran = false, all_done = true;
    for (int b = 0; b < s.cluster; ++b) {
      if (g_high_first) {
        // The highest-numbered runnable thread, again and again: a lower one runs only when
        // every higher one of its block waits (at a barrier, or at a warp operation that lower
        // lanes have yet to reach).
        for (;;) {
          int i = (b + 1) * s.n - 1;
          while (i >= b * s.n && s.fibers[i].state != kRunnable) --i;
          if (i < b * s.n) break;
          resume(i);
          ran = true;
          if (!s.error.empty()) return;
        }
        continue;
      }
      for (bool again = true; again;) {
        again = false;
        for (int i = b * s.n; i < (b + 1) * s.n; ++i) {
          if (s.fibers[i].state != kRunnable) continue;
          resume(i);
          ran = again = true;
          if (!s.error.empty()) return;  // the cluster is abandoned
        }
      }
    }
    for (int i = 0; i < s.total; ++i) all_done = all_done && s.fibers[i].state == kDone;
    if (all_done) return;
    if (!ran) {
      set_error("deadlock: no thread can go on; " + describe_waits());
      return;
    }
  }
}

// Why a launch of `cluster` blocks of `threads` threads with `smem` bytes of dynamic shared
// memory cannot run on the current device ("" when it can): CUDA's rules.
std::string launch_refusal(const void* key, long threads, unsigned cluster, size_t smem) {
  const Device& d = g_devices[g_device];
  const KernelAttrs& a = attrs_of(key);
  char buf[200];
  if (threads < 1 || threads > kMaxThreads) return "more than 1024 threads per block";
  if (cluster < 1 || cluster > unsigned(kMaxCluster)) {
    snprintf(buf, sizeof buf, "cluster of %u blocks (1 to %d)", cluster, kMaxCluster);
    return buf;
  }
  if (cluster > 1 && d.cc < 90) {
    snprintf(buf, sizeof buf, "clusters need compute capability 9.0 (device %d: %d.%d)",
             g_device, d.cc / 10, d.cc % 10);
    return buf;
  }
  if (cluster > 8 && !a.nonportable_cluster) {
    snprintf(buf, sizeof buf, "cluster of %u blocks without "
             "cudaFuncAttributeNonPortableClusterSizeAllowed (portable: 8)", cluster);
    return buf;
  }
  if (smem > size_t(a.max_dynamic_smem)) {
    snprintf(buf, sizeof buf, "%zu bytes of dynamic shared memory, above the kernel's %d "
             "(cudaFuncAttributeMaxDynamicSharedMemorySize)", smem, a.max_dynamic_smem);
    return buf;
  }
  return "";
}

}  // namespace

void fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vfail(fmt, ap);
}

// The kernels launched since the last tl_emu_take_launches(), one name per line: which path
// a launcher chose.
std::string g_launches;

void run_grid(const char* kernel, const void* key, dim3 grid, dim3 block, unsigned cluster,
              size_t smem, void (*body)(void*), void* ctx) {
  Scheduler& s = S();
  if (!s.error.empty()) return;  // sticky error: later launches do nothing
  g_launches += std::string(kernel) + "\n";
  const long threads = long(block.x) * block.y * block.z;
  s.kernel = kernel;
  if (g_launch_log.size() < (1u << 20)) {
    char buf[96];
    snprintf(buf, sizeof buf, " grid=%u block=%ld cluster=%u smem=%zu\n", grid.x, threads,
             cluster, smem);
    g_launch_log += kernel;
    g_launch_log += buf;
  }
  const std::string refusal = launch_refusal(key, threads, cluster, smem);
  if (!refusal.empty() || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535 || grid.x % cluster != 0) {
    char buf[160];
    snprintf(buf, sizeof buf,
             "invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u), cluster %u: ",
             grid.x, grid.y, grid.z, block.x, block.y, block.z, cluster);
    set_error(buf + (refusal.empty() ? std::string("grid not a whole number of clusters")
                                     : refusal));
    return;
  }
  s.n = int(threads);
  s.cluster = int(cluster);
  s.total = s.n * s.cluster;
  s.smem_bytes = smem;
  init_stacks(s.total);
  map_shared_memory(smem);
  s.body = body;
  s.ctx = ctx;
  for (int i = 0; i < s.total; ++i) {
    Fiber& f = s.fibers[i];
    const int t = i % s.n;
    f.linear = t;
    f.block = i / s.n;
    f.tid = uint3{unsigned(t % block.x), unsigned(t / block.x % block.y),
                  unsigned(t / (block.x * block.y))};
  }
  for (int b = 0; b < s.cluster; ++b) {
    for (int w = 0; w < (s.n + 31) / 32; ++w) {
      s.warps[b * (kMaxThreads / 32) + w].lanes = std::min(32, s.n - 32 * w);
    }
  }
  blockDim = block;
  gridDim = grid;
  install_fault_handlers();
  g_in_kernel = true;
  for (unsigned z = 0; z < grid.z && s.error.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && s.error.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && s.error.empty(); x += cluster) {
        for (unsigned b = 0; b < cluster; ++b) s.blocks[b].idx = uint3{x + b, y, z};
        run_cluster();
      }
    }
  }
  g_in_kernel = false;
  restore_fault_handlers();
}

void sync_block(const char* file, int line) {
  Scheduler& s = S();
  Fiber& f = s.fibers[s.current];
  Block& b = s.blocks[f.block];
  const int first = f.block * s.n;  // the block's fibers: [first, first + n)
  if (b.at_barrier == 0) {
    b.barrier_first = s.current;
  } else {
    const Fiber& w = s.fibers[b.barrier_first];
    if (w.line != line || strcmp(w.file, file) != 0) {
      fail_now("reached __syncthreads at %s:%d while %s waits at __syncthreads at %s:%d", file,
               line, where(w).c_str(), w.file, w.line);
    }
  }
  for (int i = first; i < first + s.n; ++i) {
    if (s.fibers[i].state == kDone) {
      fail_now("reached __syncthreads at %s:%d, which %s will never reach (it has exited)",
               file, line, where(s.fibers[i]).c_str());
    }
  }
  f.file = file;
  f.line = line;
  f.state = kAtBlockBarrier;
  if (++b.at_barrier == s.n) {  // the last one releases everybody and goes on
    for (int i = first; i < first + s.n; ++i) s.fibers[i].state = kRunnable;
    b.at_barrier = 0;
    b.barrier_first = -1;
    return;
  }
  yield();
}

void* dynamic_smem() {
  Scheduler& s = S();
  return s.blocks[s.fibers[s.current].block].smem;
}

unsigned cluster_rank() {
  Scheduler& s = S();
  return unsigned(s.fibers[s.current].block);
}

void cluster_arrive(const char* file, int line) {
  Scheduler& s = S();
  Fiber& f = s.fibers[s.current];
  if (f.cluster_pending) {
    fail_now("cluster barrier arrive at %s:%d after an arrive (%s:%d) without its wait", file,
             line, f.file, f.line);
  }
  for (int i = 0; i < s.total; ++i) {
    if (s.fibers[i].state == kDone) {
      fail_now("cluster barrier arrive at %s:%d, which %s will never reach (it has exited)",
               file, line, where(s.fibers[i]).c_str());
    }
  }
  f.cluster_pending = true;
  f.cluster_phase = s.cluster_phase;
  f.file = file;
  f.line = line;
  if (++s.cluster_arrived == s.total) {  // the phase is complete: release the waiting threads
    s.cluster_arrived = 0;
    ++s.cluster_phase;
    for (int i = 0; i < s.total; ++i) {
      if (s.fibers[i].state == kAtClusterWait) s.fibers[i].state = kRunnable;
    }
  }
}

void cluster_wait(const char* file, int line) {
  Scheduler& s = S();
  Fiber& f = s.fibers[s.current];
  if (!f.cluster_pending) {
    fail_now("cluster barrier wait at %s:%d without an arrive", file, line);
  }
  if (f.cluster_phase == s.cluster_phase) {
    f.file = file;
    f.line = line;
    f.state = kAtClusterWait;
    yield();
  }
  f.cluster_pending = false;
}

void* cluster_map(const void* p, unsigned rank) {
  Scheduler& s = S();
  const Block& own = s.blocks[s.fibers[s.current].block];
  const uintptr_t a = uintptr_t(p), base = uintptr_t(own.smem);
  if (a < base || a >= base + s.smem_bytes) {
    fail_now("cluster_map(%p, %u): not an address in the block's dynamic shared memory", p,
             rank);
  }
  if (rank >= unsigned(s.cluster)) {
    fail_now("cluster_map(%p, %u): the cluster has %d block(s)", p, rank, s.cluster);
  }
  return s.blocks[rank].smem + (a - base);
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t bits, int arg, int width, const char* file,
                 int line) {
  Scheduler& s = S();
  Fiber& f = s.fibers[s.current];
  Warp& w = s.warps[warp_index(f)];
  const unsigned full = w.lanes == 32 ? 0xffffffffu : ((1u << w.lanes) - 1u);
  if (mask != full && mask != 0xffffffffu) {
    fail_now("%s at %s:%d with mask 0x%08x: the emulator supports whole warps only", 
             kWarpOpNames[op], file, line, mask);
  }
  if (mask != full) {
    fail_now("%s at %s:%d names lanes 0x%08x but the warp has only %d thread(s)",
             kWarpOpNames[op], file, line, mask, w.lanes);
  }
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail_now("%s at %s:%d: width %d is not a power of 2 <= 32", kWarpOpNames[op], file, line,
             width);
  }
  if (w.arrived == 0) {
    w.first = s.current;
  } else {
    const Fiber& o = s.fibers[w.first];
    if (o.op != op || o.line != line || strcmp(o.file, file) != 0) {
      fail_now("reached %s at %s:%d while %s (same warp) waits at %s at %s:%d",
               kWarpOpNames[op], file, line, where(o).c_str(), kWarpOpNames[o.op], o.file,
               o.line);
    }
  }
  const int base = f.block * s.n + (f.linear / 32) * 32;  // the warp's first fiber
  for (int l = 0; l < w.lanes; ++l) {
    if (s.fibers[base + l].state == kDone) {
      fail_now("reached %s at %s:%d, which lane %d (%s) will never reach (it has exited)",
               kWarpOpNames[op], file, line, l, where(s.fibers[base + l]).c_str());
    }
  }
  f.op = op;
  f.file = file;
  f.line = line;
  f.mask = mask;
  f.in = bits;
  f.arg = arg;
  f.width = width;
  f.state = kAtWarpOp;
  if (++w.arrived < w.lanes) {
    yield();
    return f.out;
  }
  // The last lane computes every lane's result, then all go on.
  uint64_t ballot = 0;
  for (int l = 0; l < w.lanes; ++l) ballot |= uint64_t(s.fibers[base + l].in != 0) << l;
  for (int l = 0; l < w.lanes; ++l) {
    Fiber& g = s.fibers[base + l];
    const int seg = l & ~(g.width - 1);  // first lane of this lane's width-segment
    const int pos = l - seg;
    int src = l;
    switch (op) {
      case kShflXor: src = seg + ((pos ^ g.arg) & (g.width - 1)); break;
      case kShflDown: src = pos + g.arg < g.width ? l + g.arg : l; break;
      case kShflUp: src = pos >= g.arg ? l - g.arg : l; break;
      case kShflIdx: src = seg + (g.arg & (g.width - 1)); break;
      default: break;
    }
    if (op == kBallot) g.out = ballot;
    else g.out = src < w.lanes ? s.fibers[base + src].in : g.in;
    g.state = kRunnable;
  }
  w.arrived = 0;
  w.first = -1;
  return f.out;
}

}  // namespace tl_emu

// ---- the C interface used by the tests ---------------------------------------------------------
using namespace tl_emu;

extern "C" {

void tl_emu_assert_fail(const char* msg, const char* file, unsigned int line,
                        const char* func) noexcept {
  fail_now("device-side assert triggered: %s (%s:%u, %s)", msg, file, line, func);
}

// Returns the first error since the last call ("" when none) and clears it.
const char* tl_emu_take_error() {
  static std::string last;
  last = S().error;
  S().error.clear();
  return last.c_str();
}

// The kernels launched since the last call, one name per line, and clears the list.
const char* tl_emu_take_launches() {
  static std::string last;
  last.swap(g_launches);
  g_launches.clear();
  return last.c_str();
}

// The emulated device of the following launches: 0..7, each with its own SM count and L2
// size (tl_emu_device_sms / tl_emu_device_l2): the kernels' grid sizes depend on them.
int tl_emu_set_device(int device) { return cudaSetDevice(device) == cudaSuccess ? 0 : 1; }
// The schedule of a block's threads: 0 ascending, 1 the highest-numbered runnable one first.
void tl_emu_set_schedule(int high_first) { g_high_first = high_first != 0; }
int tl_emu_device_sms(int device) { return g_devices[device & 7].sms; }
int tl_emu_device_l2(int device) { return g_devices[device & 7].l2_bytes; }
int tl_emu_device_cc(int device) { return g_devices[device & 7].cc; }
int tl_emu_device_smem_optin(int device) { return g_devices[device & 7].smem_optin; }

// The launches since the last call, one line each: "kernel grid=G block=B cluster=S smem=M".
const char* tl_emu_launch_log() {
  static std::string last;
  last.swap(g_launch_log);
  g_launch_log.clear();
  return last.c_str();
}

// A buffer whose last byte is followed by an inaccessible page, starting `offset` bytes past a
// 16-byte boundary with as few bytes as possible between its end and the guard page (0 when
// nbytes + offset is a multiple of 16); offset < 0: the end touches the guard page exactly.
// A 0-byte buffer is the guard page itself.
void* tl_emu_alloc(size_t nbytes, int offset) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t pad = offset < 0 ? 0 : (16 - (nbytes + size_t(offset)) % 16) % 16;
  const size_t data_pages = (nbytes + pad + 16 + page - 1) / page;
  const size_t len = (data_pages + 1) * page;
  char* m = static_cast<char*>(
      mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (m == MAP_FAILED) return nullptr;
  char* guard = m + data_pages * page;
  mprotect(guard, page, PROT_NONE);
  char* p = guard - pad - nbytes;
  memset(m, 0xA5, size_t(guard - m));  // the padding is checked by tl_emu_padding_intact
  g_buffers.push_back(Buffer{uintptr_t(p), uintptr_t(p + nbytes), uintptr_t(m),
                             uintptr_t(guard + page)});
  return p;
}

// Whether the bytes between a buffer's end and its guard page still hold the fill pattern (a
// write past the end that stopped short of the guard page).
int tl_emu_padding_intact(void* p) {
  for (const Buffer& b : g_buffers) {
    if (b.begin != uintptr_t(p)) continue;
    const uintptr_t guard = b.map_end - size_t(sysconf(_SC_PAGESIZE));
    for (uintptr_t a = b.end; a < guard; ++a) {
      if (*reinterpret_cast<unsigned char*>(a) != 0xA5) return 0;
    }
    for (uintptr_t a = b.map_begin; a < b.begin; ++a) {
      if (*reinterpret_cast<unsigned char*>(a) != 0xA5) return 0;
    }
    return 1;
  }
  return -1;
}

void tl_emu_free(void* p) {
  for (size_t i = 0; i < g_buffers.size(); ++i) {
    if (g_buffers[i].begin == uintptr_t(p)) {
      munmap(reinterpret_cast<void*>(g_buffers[i].map_begin),
             g_buffers[i].map_end - g_buffers[i].map_begin);
      g_buffers.erase(g_buffers.begin() + long(i));
      return;
    }
  }
}

}  // extern "C"

cudaError_t cudaGetDevice(int* device) {
  *device = g_device;
  return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= 8) return cudaErrorInvalidValue;
  g_device = device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (device < 0 || device >= 8) return cudaErrorInvalidValue;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = g_devices[device].sms; return cudaSuccess;
    case cudaDevAttrL2CacheSize: *value = g_devices[device].l2_bytes; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = g_devices[device].cc / 10; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = g_devices[device].cc % 10; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor:
      *value = g_devices[device].smem_per_sm;
      return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin:
      *value = g_devices[device].smem_optin;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t tl_emu_occupancy(int* num_blocks, int block_size) {
  if (block_size <= 0 || block_size > 1024) return cudaErrorInvalidValue;
  const int by_threads = 2048 / block_size;
  const int b = g_devices[g_device].blocks_per_sm;
  *num_blocks = b < by_threads ? b : by_threads;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() {
  return S().error.empty() ? cudaSuccess : cudaErrorLaunchFailure;
}

cudaError_t tl_emu_func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value) {
  KernelAttrs& a = attrs_of(kernel);
  switch (attr) {
    case cudaFuncAttributeMaxDynamicSharedMemorySize:
      if (value < 0 || value > g_devices[g_device].smem_optin) return cudaErrorInvalidValue;
      a.max_dynamic_smem = value;
      return cudaSuccess;
    case cudaFuncAttributeNonPortableClusterSizeAllowed:
      if (g_devices[g_device].cc < 90) return cudaErrorInvalidValue;
      a.nonportable_cluster = value != 0;
      return cudaSuccess;
  }
  return cudaErrorInvalidValue;
}

cudaError_t tl_emu_func_get_attributes(cudaFuncAttributes* attr, const void* kernel) {
  const int v = g_devices[g_device].code_cc;
  attr->binaryVersion = v;
  attr->ptxVersion = v;
  attr->maxDynamicSharedSizeBytes = attrs_of(kernel).max_dynamic_smem;
  return cudaSuccess;
}

// Clusters resident at once: the device's blocks per SM (its register answer, the threads, and
// the shared memory with 1 KiB reserved per block) over all SMs, in whole clusters.
cudaError_t tl_emu_max_active_clusters(int* num_clusters, const void* kernel,
                                       const cudaLaunchConfig_t* config) {
  unsigned cluster = 1;
  for (unsigned i = 0; i < config->numAttrs; ++i) {
    if (config->attrs[i].id == cudaLaunchAttributeClusterDimension) {
      cluster = config->attrs[i].val.clusterDim.x * config->attrs[i].val.clusterDim.y *
                config->attrs[i].val.clusterDim.z;
    }
  }
  const dim3 b = config->blockDim;
  const long threads = long(b.x) * b.y * b.z;
  if (!launch_refusal(kernel, threads, cluster, config->dynamicSmemBytes).empty()) {
    return cudaErrorInvalidValue;
  }
  const Device& d = g_devices[g_device];
  long per_sm = std::min<long>(d.blocks_per_sm, 2048 / threads);
  per_sm = std::min<long>(per_sm, d.smem_per_sm / long(config->dynamicSmemBytes + 1024));
  *num_clusters = int(d.sms * per_sm / long(cluster));
  return cudaSuccess;
}
