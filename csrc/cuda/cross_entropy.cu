// Softmax cross-entropy over input (N, C, D) (torch-free: CUDA headers only).
//
// Kernels:
//  - row kernel (D == 1, C >= 64): a warp (C small) or a block (C large) per row. Pass 1 reads the
//    row once with 16-byte vector loads and keeps an online max / sum of exp (plus the sums the
//    label-smoothing and probability-target terms need); one fixed-order group reduction; pass 2
//    re-reads the row (an L2 hit) and writes the gradient. The row is entirely read before any
//    gradient element is written (the group reduction is a barrier), so grad_input may alias input.
//  - column kernel (D > 1, or few classes): one thread per position (n, d) walking c with stride
//    D, so a warp reads 32 consecutive d (coalesced).
//  - deterministic two-stage sums (common.cuh) for W = sum of target weights (computed before the
//    main kernel so the fused gradient can use 1/W without a host sync), the class-weight sum and
//    the reduction of the per-row losses.
#include <algorithm>
#include <cstring>

#include "cuda/common.cuh"

namespace torch_losses {
namespace cuda {
namespace {

#define TL_CE_TARGET_CHECK "torch_losses cross_entropy: target class index out of bounds (0 <= target < C)"

template <typename A>
__device__ __forceinline__ A fexp(A v);
template <>
__device__ __forceinline__ float fexp<float>(float v) { return expf(v); }
template <>
__device__ __forceinline__ double fexp<double>(double v) { return exp(v); }
__device__ __forceinline__ float flog(float v) { return logf(v); }
__device__ __forceinline__ double flog(double v) { return log(v); }
__device__ __forceinline__ float fmax_(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double fmax_(double a, double b) { return fmax(a, b); }

template <typename A>
struct Stats {
  A m, s;  // running max and sum of exp(x - m)
  A a, b;  // class index: a = sum w_c (x_c - x0); probabilities: a = sum w t', b = sum w t' (x - x0)

  // The online softmax step: fold N more logits into the running max and sum of exp.
  template <int N>
  __device__ __forceinline__ void push(const A (&v)[N]) {
    A vmax = -INFINITY;
#pragma unroll
    for (int i = 0; i < N; ++i) vmax = fmax_(vmax, v[i]);
    if (vmax > m) {
      s *= fexp(m - vmax);
      m = vmax;
    }
    if (m != -INFINITY) {
#pragma unroll
      for (int i = 0; i < N; ++i) s += fexp(v[i] - m);
    }
  }
};

template <typename A>
__device__ __forceinline__ Stats<A> merge(const Stats<A>& p, const Stats<A>& q) {
  // Commutative bit for bit, so a butterfly gives every lane the same result.
  Stats<A> r;
  r.m = fmax_(p.m, q.m);
  r.s = r.m == -INFINITY ? A(0) : p.s * fexp(p.m - r.m) + q.s * fexp(q.m - r.m);
  r.a = p.a + q.a;
  r.b = p.b + q.b;
  return r;
}

template <typename A>
__device__ __forceinline__ Stats<A> warp_allreduce(Stats<A> v) {
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    Stats<A> q;
    q.m = __shfl_xor_sync(0xffffffffu, v.m, o);
    q.s = __shfl_xor_sync(0xffffffffu, v.s, o);
    q.a = __shfl_xor_sync(0xffffffffu, v.a, o);
    q.b = __shfl_xor_sync(0xffffffffu, v.b, o);
    v = merge(v, q);
  }
  return v;
}

// Every thread of the block gets the result; fixed order over the warps.
template <typename A>
__device__ __forceinline__ Stats<A> block_allreduce(Stats<A> v, Stats<A>* smem /* 32 */) {
  v = warp_allreduce(v);
  __syncthreads();  // the previous row's readers are done with smem
  if ((threadIdx.x & 31) == 0) smem[threadIdx.x >> 5] = v;
  __syncthreads();
  Stats<A> r = smem[0];
  const int nw = blockDim.x >> 5;
  for (int w = 1; w < nw; ++w) r = merge(r, smem[w]);
  return r;
}

// ---- vector memory helpers ------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ Vec<T> ld_vec(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}
// Last read of a row: evict-first.
template <typename T>
__device__ __forceinline__ Vec<T> ld_vec_last(const T* p) {
  int4 r = __ldcs(reinterpret_cast<const int4*>(p));
  Vec<T> v;
  static_assert(sizeof(Vec<T>) == sizeof(int4), "16-byte vectors");
  memcpy(&v, &r, sizeof(r));
  return v;
}
template <typename T>
__device__ __forceinline__ void st_vec_stream(T* p, const Vec<T>& v) {
  int4 r;
  memcpy(&r, &v, sizeof(r));
  __stcs(reinterpret_cast<int4*>(p), r);
}

template <typename T>
struct CeParams {
  CrossEntropyArgs<T> a;
  acc_t<T> eps, eps_c;  // label smoothing, label smoothing / C
  acc_t<T> s_host;      // gradient scale not read from the device: 1, or 1/rows (probability mean)
  const acc_t<T>* W;    // device scalar: class-index mean denominator, else nullptr
  const acc_t<T>* Wsum; // device scalar: sum of the class weights, else nullptr (then C)
  acc_t<T>* row_loss;   // per-row losses for mean/sum
  bool fwd;             // forward op: compute lse (else read it)
  int64_t rows;
};

// ---- per-element passes ---------------------------------------------------------------------
// Each functor: load<N>(c, xv, tv) then compute<N>(c, xv, tv) for N = 1 (scalar, element c at
// offset c*stride) or N = V (a vector of V consecutive classes, stride 1).

template <typename T>
struct Pass1Index {  // class-index forward: online max/sum; sum of w_c (x_c - x0) when smoothing
  using A = acc_t<T>;
  const T* x;
  const A* weight;
  int64_t stride;
  A x0;
  bool smooth;
  Stats<A> st;
  template <int N>
  __device__ __forceinline__ void load(int64_t c, Vec<T>& xv, Vec<T>&) const {
    if (N == 1) xv.v[0] = x[c * stride];
    else xv = ld_vec(x + c);
  }
  template <int N>
  __device__ __forceinline__ void compute(int64_t c, const Vec<T>& xv, const Vec<T>&) {
    A v[N];
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = to_acc(xv.v[i]);
    st.push(v);
    if (smooth) {
#pragma unroll
      for (int i = 0; i < N; ++i) st.a += (weight != nullptr ? weight[c + i] : A(1)) * (v[i] - x0);
    }
  }
};

template <typename T>
struct Pass1Prob {  // probability target: online max/sum (forward), sum w t', sum w t' (x - x0)
  using A = acc_t<T>;
  const T* x;
  const T* t;
  const A* weight;
  int64_t stride;
  A x0, one_m_eps, eps_c;
  bool fwd;
  Stats<A> st;
  template <int N>
  __device__ __forceinline__ void load(int64_t c, Vec<T>& xv, Vec<T>& tv) const {
    if (N == 1) {
      if (fwd) xv.v[0] = x[c * stride];
      tv.v[0] = t[c * stride];
    } else {
      if (fwd) xv = ld_vec(x + c);
      tv = ld_vec(t + c);
    }
  }
  template <int N>
  __device__ __forceinline__ void compute(int64_t c, const Vec<T>& xv, const Vec<T>& tv) {
    if (fwd) {
      A v[N];
#pragma unroll
      for (int i = 0; i < N; ++i) v[i] = to_acc(xv.v[i]);
      st.push(v);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const A wt = (weight != nullptr ? weight[c + i] : A(1)) *
                     (one_m_eps * to_acc(tv.v[i]) + eps_c);
        st.a += wt;
        st.b += wt * (v[i] - x0);
      }
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        st.a += (weight != nullptr ? weight[c + i] : A(1)) * (one_m_eps * to_acc(tv.v[i]) + eps_c);
      }
    }
  }
};

template <typename T>
struct Pass2Index {  // class-index gradient: sg * (coef_a * softmax_c - coef_b [c == y] - eps_c w_c)
  using A = acc_t<T>;
  const T* x;
  T* gi;
  const A* weight;
  int64_t stride, y;
  A lse, coef_a, coef_b, eps_c, sg;
  bool ignored;
  template <int N>
  __device__ __forceinline__ void load(int64_t c, Vec<T>& xv, Vec<T>&) const {
    if (ignored) return;
    if (N == 1) xv.v[0] = x[c * stride];
    else xv = ld_vec_last(x + c);
  }
  template <int N>
  __device__ __forceinline__ void compute(int64_t c, const Vec<T>& xv, const Vec<T>&) const {
    Vec<T> out;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      A g = 0;
      if (!ignored) {
        const A p = fexp(to_acc(xv.v[i]) - lse);
        g = coef_a * p;
        if (c + i == y) g -= coef_b;
        if (eps_c != A(0)) g -= eps_c * (weight != nullptr ? weight[c + i] : A(1));
        g *= sg;
      }
      out.v[i] = from_acc<T>(g);
    }
    if (N == 1) gi[c * stride] = out.v[0];
    else st_vec_stream(gi + c, out);
  }
};

template <typename T>
struct Pass2Prob {  // probability target gradients
  using A = acc_t<T>;
  const T* x;
  const T* t;
  T* gi;
  T* gt;
  const A* weight;
  int64_t stride;
  A lse, tw, one_m_eps, eps_c, sg;
  template <int N>
  __device__ __forceinline__ void load(int64_t c, Vec<T>& xv, Vec<T>& tv) const {
    if (N == 1) {
      xv.v[0] = x[c * stride];
      if (gi != nullptr) tv.v[0] = t[c * stride];
    } else {
      xv = ld_vec_last(x + c);
      if (gi != nullptr) tv = ld_vec_last(t + c);
    }
  }
  template <int N>
  __device__ __forceinline__ void compute(int64_t c, const Vec<T>& xv, const Vec<T>& tv) const {
    Vec<T> oi, ot;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const A xx = to_acc(xv.v[i]);
      const A w = weight != nullptr ? weight[c + i] : A(1);
      if (gi != nullptr) {
        const A wt = w * (one_m_eps * to_acc(tv.v[i]) + eps_c);
        oi.v[i] = from_acc<T>(sg * (fexp(xx - lse) * tw - wt));
      }
      if (gt != nullptr) ot.v[i] = from_acc<T>(sg * one_m_eps * w * (lse - xx));
    }
    if (N == 1) {
      if (gi != nullptr) gi[c * stride] = oi.v[0];
      if (gt != nullptr) gt[c * stride] = ot.v[0];
    } else {
      if (gi != nullptr) st_vec_stream(gi + c, oi);
      if (gt != nullptr) st_vec_stream(gt + c, ot);
    }
  }
};

// Walks classes [0, C) of one row: thread gt of a group of G threads. kVec: the row is split
// into a scalar head up to the first 16-byte boundary, whole vectors, and a scalar tail (the
// caller checked that every array has the same misalignment). kWalkUnroll loads in flight per
// thread and array (with >= 1024 threads per SM: >= 32 KB in flight per SM for one array).
constexpr int kWalkUnroll = 2;
template <typename T, bool kVec, class F>
__device__ __forceinline__ void walk(F& f, int64_t C, int head, int gt, int G) {
  constexpr int U = kWalkUnroll;
  Vec<T> xv[U], tv[U];
  if (kVec) {
    constexpr int V = VecTraits<T>::kVec;
    if (gt < head) {
      f.template load<1>(gt, xv[0], tv[0]);
      f.template compute<1>(gt, xv[0], tv[0]);
    }
    const int64_t nv = (C - head) / V;
    int64_t j = gt;
    for (; j + (U - 1) * int64_t(G) < nv; j += U * int64_t(G)) {
#pragma unroll
      for (int u = 0; u < U; ++u) f.template load<V>(head + (j + u * G) * V, xv[u], tv[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) f.template compute<V>(head + (j + u * G) * V, xv[u], tv[u]);
    }
    for (; j < nv; j += G) {
      f.template load<V>(head + j * V, xv[0], tv[0]);
      f.template compute<V>(head + j * V, xv[0], tv[0]);
    }
    const int64_t c = head + nv * V + gt;
    if (c < C) {
      f.template load<1>(c, xv[0], tv[0]);
      f.template compute<1>(c, xv[0], tv[0]);
    }
  } else {
    int64_t c = gt;
    for (; c + (U - 1) * int64_t(G) < C; c += U * int64_t(G)) {
#pragma unroll
      for (int u = 0; u < U; ++u) f.template load<1>(c + u * G, xv[u], tv[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) f.template compute<1>(c + u * G, xv[u], tv[u]);
    }
    for (; c < C; c += G) {
      f.template load<1>(c, xv[0], tv[0]);
      f.template compute<1>(c, xv[0], tv[0]);
    }
  }
}

// Group reductions: kGroup == 32: a warp per row; 0: the whole block per row; 1: one thread.
template <int kGroup, typename A>
__device__ __forceinline__ Stats<A> group_allreduce(const Stats<A>& v, Stats<A>* smem) {
  if (kGroup == 1) return v;
  if (kGroup == 32) return warp_allreduce(v);
  return block_allreduce(v, smem);
}

// One row: `base` = offset of element (n, 0, d), `stride` = D.
template <typename T, bool kProb, bool kVec, int kGroup>
__device__ __forceinline__ void ce_row(const CeParams<T>& P, int64_t row, int64_t base,
                                       int64_t stride, int gt, int G, Stats<acc_t<T>>* smem) {
  using A = acc_t<T>;
  const CrossEntropyArgs<T>& a = P.a;
  const int64_t C = a.C;
  const T* xr = a.input + base;
  const bool leader = gt == 0;
  int head = 0;
  if (kVec) {
    const uintptr_t addr = reinterpret_cast<uintptr_t>(xr);
    head = int(((16 - (addr & 15)) & 15) / sizeof(T));
    if (head > C) head = int(C);
  }
  // Gradient scale: 1/W (device) for class-index mean, else s_host; times grad_output.
  A sg = P.W != nullptr ? A(1) / *P.W : P.s_host;
  if (a.grad_output != nullptr) sg *= to_acc(a.grad_output_scalar ? a.grad_output[0] : a.grad_output[row]);
  const A one_m_eps = A(1) - P.eps;
  // A reference logit for the label-smoothing / probability sums (less cancellation).
  A x0 = 0;
  if (P.fwd) {
    x0 = to_acc(xr[0]);
    if (!isfinite(x0)) x0 = 0;
  }
  Stats<A> st{A(-INFINITY), A(0), A(0), A(0)};

  if (!kProb) {
    const int64_t y = a.target_index[row];
    const bool ignored = y == a.ignore_index;
    if (!ignored) TL_DEVICE_ASSERT(y >= 0 && y < C, TL_CE_TARGET_CHECK);
    const A wy = ignored ? A(0) : (a.weight != nullptr ? a.weight[y] : A(1));
    A lse;
    if (P.fwd) {
      A xy = 0;
      if (leader && !ignored) xy = to_acc(xr[y * stride]);  // read before any gradient write
      Pass1Index<T> f{a.input + base, a.weight, stride, x0, P.eps != A(0), st};
      walk<T, kVec>(f, C, head, gt, G);
      st = group_allreduce<kGroup>(f.st, smem);
      lse = st.m + flog(st.s);
      if (leader) {
        a.lse[row] = lse;
        A l = 0;
        if (!ignored) {
          l = one_m_eps * wy * (lse - xy);
          if (P.eps != A(0)) {
            const A wsum = P.Wsum != nullptr ? *P.Wsum : A(C);
            l += P.eps_c * (wsum * (lse - x0) - st.a);
          }
        }
        if (a.reduction == 0) a.loss[row] = from_acc<T>(l);
        else P.row_loss[row] = l;
      }
    } else {
      lse = a.lse[row];
    }
    if (a.grad_input != nullptr) {
      const A wsum = P.Wsum != nullptr ? *P.Wsum : A(C);
      Pass2Index<T> f{a.input + base, a.grad_input + base, a.weight, stride, y, lse,
                      one_m_eps * wy + P.eps_c * wsum, one_m_eps * wy, P.eps_c, sg, ignored};
      walk<T, kVec>(f, C, head, gt, G);
    }
  } else {
    const bool need_tw = P.fwd || a.grad_input != nullptr;
    if (need_tw) {
      Pass1Prob<T> f{a.input + base, a.target_prob + base, a.weight, stride, x0, one_m_eps,
                     P.eps_c, P.fwd, st};
      walk<T, kVec>(f, C, head, gt, G);
      st = group_allreduce<kGroup>(f.st, smem);
    }
    A lse;
    if (P.fwd) {
      lse = st.m + flog(st.s);
      if (leader) {
        a.lse[row] = lse;
        const A l = st.a * (lse - x0) - st.b;
        if (a.reduction == 0) a.loss[row] = from_acc<T>(l);
        else P.row_loss[row] = l;
      }
    } else {
      lse = a.lse[row];
    }
    if (a.grad_input != nullptr || a.grad_target != nullptr) {
      Pass2Prob<T> f{a.input + base, a.target_prob + base, a.grad_input ? a.grad_input + base : nullptr,
                     a.grad_target ? a.grad_target + base : nullptr, a.weight, stride, lse, st.a,
                     one_m_eps, P.eps_c, sg};
      walk<T, kVec>(f, C, head, gt, G);
    }
  }
}

// A backward into the forward's gradient buffers with a scalar grad_output of exactly 1 (read
// on the device, no host sync): those buffers already hold the gradient (issue 13).
template <typename T>
__device__ __forceinline__ bool skip_backward(const CrossEntropyArgs<T>& a) {
  return a.skip_if_grad_output_is_one && to_acc(a.grad_output[0]) == acc_t<T>(1);
}

// D == 1: a warp (kGroup 32) or the block (kGroup 0) per row; rows in a grid-stride loop.
// The hot class-index kernels are capped at 64 registers (2 blocks of 512 threads per SM: enough
// loads in flight); the probability-target and double ones get 128 (no spills).
template <typename T, bool kProb, bool kVec, int kGroup>
__global__ void __launch_bounds__(512, (kProb || sizeof(T) == 8) ? 1 : 2) ce_row_kernel(const CeParams<T> P) {
  if (skip_backward(P.a)) return;  // issue 13: the forward's buffer already holds it
  __shared__ Stats<acc_t<T>> smem[32];
  const int G = kGroup == 32 ? 32 : blockDim.x;
  const int gt = kGroup == 32 ? (threadIdx.x & 31) : threadIdx.x;
  const int64_t groups_per_block = blockDim.x / G;
  const int64_t first = int64_t(blockIdx.x) * groups_per_block + threadIdx.x / G;
  const int64_t step = int64_t(gridDim.x) * groups_per_block;
  for (int64_t row = first; row < P.rows; row += step) {
    ce_row<T, kProb, kVec, kGroup>(P, row, row * P.a.C, 1, gt, G, smem);
  }
}

// One thread per position (n, d): coalesced over d for D > 1.
template <typename T, bool kProb>
__global__ void __launch_bounds__(256) ce_column_kernel(const CeParams<T> P) {
  if (skip_backward(P.a)) return;  // issue 13
  const int64_t D = P.a.D;
  const int64_t CD = P.a.C * D;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; row < P.rows;
       row += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = row / D, d = row - n * D;
    ce_row<T, kProb, false, 1>(P, row, n * CD + d, D, 0, 1, nullptr);
  }
}

// Weight of a row's target (0 when ignored): the class-index mean's denominator W.
template <typename A>
struct TargetWeightLoad {
  const int64_t* target;
  const A* weight;
  int64_t C, ignore_index;
  __device__ __forceinline__ A operator()(int64_t i) const {
    const int64_t y = target[i];
    if (y == ignore_index) return A(0);
    TL_DEVICE_ASSERT(y >= 0 && y < C, TL_CE_TARGET_CHECK);
    return weight != nullptr ? weight[y] : A(1);
  }
};

template <typename T, bool kProb>
void launch_main(const CeParams<T>& P, cudaStream_t stream) {
  const CrossEntropyArgs<T>& a = P.a;
  const int64_t sms = num_sms();
  constexpr int V = VecTraits<T>::kVec;
  if (a.D == 1 && a.C >= 64) {
    // Vector path when every array the row kernel touches has the input's misalignment.
    const uintptr_t xa = reinterpret_cast<uintptr_t>(a.input);
    auto same = [xa](const void* p) {
      return p == nullptr || ((reinterpret_cast<uintptr_t>(p) - xa) & 15) == 0;
    };
    const bool vec = (xa % sizeof(T)) == 0 && same(a.target_prob) && same(a.grad_input) &&
                     same(a.grad_target);
    const int64_t nvec = a.C / V;
    if (nvec <= 512) {
      constexpr int kThreads = 256;
      const unsigned grid = grid_for((P.rows + 7) / 8, sms * 8);
      if (vec) ce_row_kernel<T, kProb, true, 32><<<grid, kThreads, 0, stream>>>(P);
      else ce_row_kernel<T, kProb, false, 32><<<grid, kThreads, 0, stream>>>(P);
    } else {
      int threads = 64;
      while (threads < 512 && threads * 16 < nvec) threads *= 2;
      // Rows in flight at once = grid (grid-stride loop). Pass 2 re-reads a row from L2 only if
      // the rows in flight fit in it: cap the grid at ~60% of L2 / row bytes (but >= 1 per SM).
      const int64_t row_bytes = a.C * int64_t(sizeof(T)) * (kProb ? 2 : 1);
      int64_t cap = sms * (2048 / threads);
      cap = std::min(cap, std::max(sms, l2_bytes() * 6 / 10 / row_bytes));
      const unsigned grid = grid_for(P.rows, cap);
      if (vec) ce_row_kernel<T, kProb, true, 0><<<grid, threads, 0, stream>>>(P);
      else ce_row_kernel<T, kProb, false, 0><<<grid, threads, 0, stream>>>(P);
    }
  } else {
    const unsigned grid = grid_for((P.rows + 255) / 256, sms * 8);
    ce_column_kernel<T, kProb><<<grid, 256, 0, stream>>>(P);
  }
}

}  // namespace

template <typename T>
void launch_cross_entropy(const CrossEntropyArgs<T>& a, cudaStream_t stream) {
  using A = acc_t<T>;
  const int64_t rows = a.N * a.D;
  const bool prob = a.target_prob != nullptr;
  const bool fwd = a.grad_output == nullptr;
  const bool mean = a.reduction == 1;
  A* W = a.scratch;          // [0]: class-index mean denominator
  A* Wsum = a.scratch + 1;   // [1]: sum of class weights
  A* row_loss = a.scratch + 4;
  A* partials = a.scratch + 4 + rows;
  if (!fwd && a.grad_input == nullptr && a.grad_target == nullptr) return;

  CeParams<T> P;
  P.a = a;
  P.eps = A(a.label_smoothing);
  P.eps_c = a.C > 0 ? A(a.label_smoothing / double(a.C)) : A(0);
  P.s_host = (prob && mean && rows > 0) ? A(1.0 / double(rows)) : A(1);
  P.W = nullptr;
  P.Wsum = nullptr;
  P.row_loss = row_loss;
  P.fwd = fwd;
  P.rows = rows;

  if (!prob && mean) {
    deterministic_sum<A, T>(TargetWeightLoad<A>{a.target_index, a.weight, a.C, a.ignore_index},
                            rows, partials, nullptr, A(1), nullptr, W, stream);
    P.W = W;
  }
  if (!prob && a.weight != nullptr && a.label_smoothing != 0.0) {
    deterministic_sum<A, T>(ArrayLoad<A>{a.weight}, a.C, partials, nullptr, A(1), nullptr, Wsum,
                            stream);
    P.Wsum = Wsum;
  }
  if (rows > 0) {
    if (prob) launch_main<T, true>(P, stream);
    else launch_main<T, false>(P, stream);
  }
  if (fwd && a.reduction != 0) {
    // mean: / W (class index, on the device) or / rows (probabilities); 0 rows: 0/0 = nan.
    deterministic_sum<A, T>(ArrayLoad<A>{row_loss}, rows, partials, P.W,
                            (prob && mean) ? A(rows) : A(1), a.loss, nullptr, stream);
  }
}

template void launch_cross_entropy<double>(const CrossEntropyArgs<double>&, cudaStream_t);
template void launch_cross_entropy<float>(const CrossEntropyArgs<float>&, cudaStream_t);
template void launch_cross_entropy<__half>(const CrossEntropyArgs<__half>&, cudaStream_t);
template void launch_cross_entropy<__nv_bfloat16>(const CrossEntropyArgs<__nv_bfloat16>&,
                                                  cudaStream_t);

}  // namespace cuda
}  // namespace torch_losses
