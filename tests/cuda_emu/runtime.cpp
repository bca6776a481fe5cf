// The emulator's runtime (see include/tl_cuda_emu.h): fibers, barriers, warp intrinsics, the
// emulated devices, guard-page buffers and error reporting.
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

enum State : int { kRunnable, kAtBlockBarrier, kAtWarpOp, kDone };

const char* const kWarpOpNames[] = {"__shfl_xor_sync", "__shfl_down_sync", "__shfl_up_sync",
                                    "__shfl_sync", "__ballot_sync", "__syncwarp"};

struct Fiber {
  jmp_buf jb;
  ucontext_t uc;
  char* stack = nullptr;
  bool started = false;
  State state = kRunnable;
  uint3 tid{0, 0, 0};
  int linear = 0;
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

struct Scheduler {
  std::vector<Fiber> fibers{size_t(kMaxThreads)};
  std::vector<Warp> warps{size_t(kMaxThreads / 32)};
  char* stacks = nullptr;
  int n = 0;               // threads per block
  int at_barrier = 0;      // threads waiting at __syncthreads
  int barrier_first = -1;  // the first of them
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
};
// 0: H100-like, 1: A100-like, then small devices whose grid caps and L2-based caps bite.
const Device g_devices[8] = {{132, 50 << 20, 3}, {108, 40 << 20, 2}, {1, 1 << 20, 1},
                             {7, 256 << 10, 4},  {16, 4 << 20, 8},   {80, 6 << 20, 1},
                             {2, 128 << 10, 2},  {3, 64 << 10, 5}};
int g_device = 0;

std::string where(const Fiber& f) {
  char buf[160];
  snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y,
           blockIdx.z, f.tid.x, f.tid.y, f.tid.z);
  return buf;
}

[[noreturn]] void stop_current() {
  Scheduler& s = S();
  s.fibers[s.current].state = kDone;
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

void fiber_main() {
  Scheduler& s = S();
  s.body(s.ctx);
  Fiber& f = s.fibers[s.current];
  if (s.at_barrier > 0) {
    const Fiber& w = s.fibers[s.barrier_first];
    fail_now("exited while %d thread(s) wait at __syncthreads (%s:%d), e.g. %s", s.at_barrier,
             w.file, w.line, where(w).c_str());
  }
  const Warp& warp = s.warps[f.linear / 32];
  if (warp.arrived > 0) {
    const Fiber& w = s.fibers[warp.first];
    fail_now("exited while %d lane(s) of its warp wait at %s (%s:%d), e.g. %s", warp.arrived,
             kWarpOpNames[w.op], w.file, w.line, where(w).c_str());
  }
  f.state = kDone;
  _longjmp(s.sched_jb, 1);
}

void resume(int i) {
  Scheduler& s = S();
  Fiber& f = s.fibers[i];
  s.current = i;
  threadIdx = f.tid;
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
  for (int i = 0; i < s.n && shown < 4; ++i) {
    const Fiber& f = s.fibers[i];
    if (f.state == kDone) continue;
    char buf[256];
    snprintf(buf, sizeof buf, "%s%s at %s (%s:%d)", shown ? "; " : "", where(f).c_str(),
             f.state == kAtBlockBarrier ? "__syncthreads" : kWarpOpNames[f.op], f.file, f.line);
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

void init_stacks() {
  Scheduler& s = S();
  if (s.stacks != nullptr) return;
  // One guard page below each stack: an overflow faults instead of corrupting a neighbour.
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t slot = kStackBytes + page;
  s.stacks = static_cast<char*>(mmap(nullptr, slot * kMaxThreads, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (s.stacks == MAP_FAILED) {
    fprintf(stderr, "tl_cuda_emu: cannot map the fiber stacks\n");
    abort();
  }
  for (int i = 0; i < kMaxThreads; ++i) {
    mprotect(s.stacks + i * slot, page, PROT_NONE);
    s.fibers[i].stack = s.stacks + i * slot + page;
  }
}

void run_block() {
  Scheduler& s = S();
  static ucontext_t proto;
  static bool have_proto = false;
  if (!have_proto) {
    getcontext(&proto);
    have_proto = true;
  }
  for (int i = 0; i < s.n; ++i) {
    Fiber& f = s.fibers[i];
    f.started = false;
    f.state = kRunnable;
    f.uc = proto;
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
  }
  for (auto& w : s.warps) w.arrived = 0, w.first = -1;
  s.at_barrier = 0;
  s.barrier_first = -1;
  for (;;) {
    bool ran = false, all_done = true;
    for (int i = 0; i < s.n; ++i) {
      if (s.fibers[i].state == kRunnable) {
        resume(i);
        ran = true;
        if (!s.error.empty()) return;  // the block is abandoned
      }
      if (s.fibers[i].state != kDone) all_done = false;
    }
    if (all_done) return;
    if (!ran) {
      set_error("deadlock: no thread can go on; " + describe_waits());
      return;
    }
  }
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

void run_grid(const char* kernel, dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  Scheduler& s = S();
  if (!s.error.empty()) return;  // sticky error: later launches do nothing
  g_launches += std::string(kernel) + "\n";
  const long threads = long(block.x) * block.y * block.z;
  s.kernel = kernel;
  if (threads < 1 || threads > kMaxThreads || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    char buf[160];
    snprintf(buf, sizeof buf, "invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u)",
             grid.x, grid.y, grid.z, block.x, block.y, block.z);
    set_error(buf);
    return;
  }
  init_stacks();
  s.n = int(threads);
  s.body = body;
  s.ctx = ctx;
  for (int i = 0; i < s.n; ++i) {
    Fiber& f = s.fibers[i];
    f.linear = i;
    f.tid = uint3{unsigned(i % block.x), unsigned(i / block.x % block.y),
                  unsigned(i / (block.x * block.y))};
  }
  for (int w = 0; w < (s.n + 31) / 32; ++w) s.warps[w].lanes = std::min(32, s.n - 32 * w);
  blockDim = block;
  gridDim = grid;
  install_fault_handlers();
  g_in_kernel = true;
  for (unsigned z = 0; z < grid.z && s.error.empty(); ++z) {
    for (unsigned y = 0; y < grid.y && s.error.empty(); ++y) {
      for (unsigned x = 0; x < grid.x && s.error.empty(); ++x) {
        blockIdx = uint3{x, y, z};
        run_block();
      }
    }
  }
  g_in_kernel = false;
  restore_fault_handlers();
}

void sync_block(const char* file, int line) {
  Scheduler& s = S();
  Fiber& f = s.fibers[s.current];
  if (s.at_barrier == 0) {
    s.barrier_first = s.current;
  } else {
    const Fiber& w = s.fibers[s.barrier_first];
    if (w.line != line || strcmp(w.file, file) != 0) {
      fail_now("reached __syncthreads at %s:%d while %s waits at __syncthreads at %s:%d", file,
               line, where(w).c_str(), w.file, w.line);
    }
  }
  for (int i = 0; i < s.n; ++i) {
    if (s.fibers[i].state == kDone) {
      fail_now("reached __syncthreads at %s:%d, which %s will never reach (it has exited)",
               file, line, where(s.fibers[i]).c_str());
    }
  }
  f.file = file;
  f.line = line;
  f.state = kAtBlockBarrier;
  if (++s.at_barrier == s.n) {  // the last one releases everybody and goes on
    for (int i = 0; i < s.n; ++i) s.fibers[i].state = kRunnable;
    s.at_barrier = 0;
    s.barrier_first = -1;
    return;
  }
  yield();
}

uint64_t warp_op(WarpOp op, unsigned mask, uint64_t bits, int arg, int width, const char* file,
                 int line) {
  Scheduler& s = S();
  Fiber& f = s.fibers[s.current];
  const int wi = f.linear / 32;
  Warp& w = s.warps[wi];
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
  const int base = wi * 32;
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
int tl_emu_device_sms(int device) { return g_devices[device & 7].sms; }
int tl_emu_device_l2(int device) { return g_devices[device & 7].l2_bytes; }

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
