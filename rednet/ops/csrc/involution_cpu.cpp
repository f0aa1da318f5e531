// Involution on the CPU: forward, grad-input and grad-kernel for float, double and bfloat16
// (bfloat16 is stored as uint16_t and accumulates in float), in two memory layouts, all
// tensors contiguous in them:
//
//   layout 1 (channels_last): x (B, H, W, C), kernel (B, Ho, Wo, G, K, K), y (B, Ho, Wo, C)
//   layout 0 (NCHW):          x (B, C, H, W), kernel (B, G, K, K, Ho, Wo), y (B, C, Ho, Wo)
//
// y[b, c, i, j] = sum_{u, v < K} kernel[b, c / (C/G), u, v, i, j] * x[b, c, i*s - p + u*d, j*s - p + v*d]
// (docs/reference.md, "Operator"); taps outside the image read zero.
//
// rednet/ops/_cpu.py compiles this file at first use (g++ -O3 -march=native -fopenmp) and
// calls the extern "C" functions at the bottom through ctypes, so it needs no PyTorch
// headers. Every output element is written by one thread: grad-input is a gather over the
// output pixels that read an input pixel, not a scatter, so there are no races or atomics.
//
// Every element is a sum over the taps in one fixed order, one accumulator each, the same in
// both layouts, so the two layouts give bit-identical forward and grad-input results. The
// order is (u, v), except grad-input's register-blocked windows (bwd_input_block_fixed),
// which take v backwards.
//
// Channels_last is the fast layout: a group's 16 channels are 16 contiguous values, one
// AVX-512 register of floats (two of AVX2), written with GCC vector extensions so that
// -march=native picks the instructions. NCHW with such groups runs the same loops on
// per-group tiles transposed to channels_last. Groups of other widths take plain loops
// (over channels in channels_last, along the width in NCHW).
#include <cstdint>
#include <cstring>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

namespace {

// ---------------------------------------------------------------------------------------
// Scalars and 16-wide vectors of each storage type.

typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x16 __attribute__((vector_size(128)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (f != f) return uint16_t((u >> 16) | 0x40);  // keep NaN a (quiet) NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <class S> struct Traits;

template <> struct Traits<float> {
  typedef float A;  // accumulator
  typedef f32x16 V;
  static A get(const float* p) { return *p; }
  static void put(float* p, A v) { *p = v; }
  static V load(const float* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
};

template <> struct Traits<double> {
  typedef double A;
  typedef f64x16 V;
  static A get(const double* p) { return *p; }
  static void put(double* p, A v) { *p = v; }
  static V load(const double* p) { V v; std::memcpy(&v, p, sizeof v); return v; }
  static void store(double* p, V v) { std::memcpy(p, &v, sizeof v); }
};

template <> struct Traits<uint16_t> {  // bfloat16
  typedef float A;
  typedef f32x16 V;
  static A get(const uint16_t* p) { return bf16_to_float(*p); }
  static void put(uint16_t* p, A v) { *p = float_to_bf16(v); }
  static V load(const uint16_t* p) {
    u16x16 h;
    std::memcpy(&h, p, sizeof h);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    return (V)u;
  }
  static void store(uint16_t* p, V v) {
    u32x16 u = (u32x16)v;
    u32x16 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    u32x16 nan = (u32x16)(v != v);  // all ones where NaN
    r = (r & ~nan) | (((u >> 16) | 0x40u) & nan);
    u16x16 h = __builtin_convertvector(r, u16x16);
    std::memcpy(p, &h, sizeof h);
  }
};

// The 16 sums of 16 vectors: lane m of the result is the sum of the lanes of P[m]. A
// transpose-and-add tree (45 shuffles and adds for 16 sums) instead of 16 separate
// horizontal reductions; each grad-kernel value is one such 16-channel dot product.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define REDNET_HAVE_SHUFFLEVECTOR 1
#endif
#endif

template <class V> inline V hsum16(const V* P) {
#ifdef REDNET_HAVE_SHUFFLEVECTOR
  V q[8], r[4], s[2];
  for (int m = 0; m < 8; ++m)  // lanes 0-7: 8 partial sums of P[2m]; lanes 8-15: of P[2m+1]
    q[m] = __builtin_shufflevector(P[2 * m], P[2 * m + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(P[2 * m], P[2 * m + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int m = 0; m < 4; ++m)  // four lanes per P, P[4m] .. P[4m+3]
    r[m] = __builtin_shufflevector(q[2 * m], q[2 * m + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(q[2 * m], q[2 * m + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int m = 0; m < 2; ++m)  // two lanes per P, P[8m] .. P[8m+7]
    s[m] = __builtin_shufflevector(r[2 * m], r[2 * m + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(r[2 * m], r[2 * m + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(s[0], s[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(s[0], s[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
#else  // compilers without __builtin_shufflevector (GCC < 12): correct, slower
  V out = {};
  for (int m = 0; m < 16; ++m)
    for (int l = 0; l < 16; ++l) out[m] += P[m][l];
  return out;
#endif
}

// ---------------------------------------------------------------------------------------
// Geometry.

struct Dims {
  i64 B, C, H, W, G, K, Ho, Wo, s, p, d;
  i64 cg() const { return C / G; }
  i64 kk() const { return K * K; }
};

// Taps [lo, hi) of output position o whose input position o*s - p + t*d lies in [0, n).
inline void tap_range(i64 o, i64 s, i64 p, i64 d, i64 K, i64 n, i64* lo, i64* hi) {
  const i64 base = o * s - p;
  i64 l = base >= 0 ? 0 : (-base + d - 1) / d;
  i64 h = n - 1 - base < 0 ? 0 : (n - 1 - base) / d + 1;
  *lo = l < K ? l : K;
  *hi = h < K ? (h > *lo ? h : *lo) : K;
}

// Output positions [lo, hi) that read input position o*s - p + t*d inside [0, n) for tap t.
inline void out_range(i64 t, i64 s, i64 p, i64 d, i64 n_in, i64 n_out, i64* lo, i64* hi) {
  const i64 off = t * d - p;  // input = o*s + off
  i64 l = off >= 0 ? 0 : (-off + s - 1) / s;
  i64 h = n_in - 1 - off < 0 ? 0 : (n_in - 1 - off) / s + 1;
  *lo = l < n_out ? l : n_out;
  *hi = h < n_out ? (h > *lo ? h : *lo) : n_out;
}

// Output columns [lo, hi) all of whose K taps fall inside the row (no bounds checks needed).
inline void interior(i64 n_in, i64 n_out, i64 K, i64 s, i64 p, i64 d, i64* lo, i64* hi) {
  i64 l = (p + s - 1) / s;                         // j*s - p >= 0
  i64 last = n_in - 1 + p - (K - 1) * d;           // j*s <= last
  i64 h = last < 0 ? 0 : last / s + 1;
  *lo = l < n_out ? l : n_out;
  h = h < n_out ? h : n_out;
  *hi = h > *lo ? h : *lo;
}

// ---------------------------------------------------------------------------------------
// Threads. Every parallel loop is parallel_chunks(n, nt, body): body(lo, hi) runs over
// consecutive chunks that cover [0, n) exactly once, each chunk on one thread, with its own
// scratch. Through ctypes (PyTorch) the chunks are OpenMP's static split over nt threads.
// A host with its own thread pool (the ONNX Runtime op, involution_ort.cpp) installs a
// ChunkRunner on the calling thread for the duration of a call: two spinning pools in one
// process fight over the cores (measured 0.3-1.0x of RedNet-50's speed inside ORT).

typedef void (*ChunkFn)(const void* body, i64 lo, i64 hi);

struct ChunkRunner {
  // Calls fn(body, lo, hi) for chunks covering [0, n), and returns when all have run.
  void (*run)(ChunkRunner* self, i64 n, ChunkFn fn, const void* body);
};

thread_local ChunkRunner* t_runner = nullptr;

template <class F> void call_chunk(const void* body, i64 lo, i64 hi) { (*static_cast<const F*>(body))(lo, hi); }

template <class F> void parallel_chunks(i64 n, int nt, const F& body) {
  if (n <= 0) return;
  if (t_runner) {
    t_runner->run(t_runner, n, &call_chunk<F>, &body);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const i64 t = omp_get_thread_num(), T = omp_get_num_threads();
    const i64 lo = n * t / T, hi = n * (t + 1) / T;
    if (lo < hi) body(lo, hi);
  }
#else
  (void)nt;
  body(0, n);
#endif
}

// ---------------------------------------------------------------------------------------
// Channels_last, groups of 16k channels: vectors of 16 channels.
//
// Blocks of JB = 4 pixels keep four independent accumulators, which hides the FMA latency
// (one accumulator per pixel serialises on it and ran 4x slower at the image borders).
// Taps outside the image read a block of zeros instead of being skipped, so border blocks
// keep the same loop; adding k * 0 leaves a sum unchanged, as skipping does.

constexpr int JB = 4;
constexpr int JB2 = 8;  // pixels per block in fwd_nhwc_block_fixed

// What a forward pass does to each 16-channel vector of sums before storing it: nothing, or
// (the fused inference pass) a per-channel affine map (an inference BatchNorm) and a ReLU.
struct NoEpilogue {
  template <class V> V operator()(V acc, i64) const { return acc; }
};

struct AffineRelu {
  const float* scale;  // per channel, or null for none (shift then too)
  const float* shift;
  bool relu;
  f32x16 operator()(f32x16 acc, i64 c0) const {
    typedef Traits<float> T;
    if (scale) acc = acc * T::load(scale + c0) + T::load(shift + c0);
    if (relu) acc = (f32x16)((i32x16)acc & ~(i32x16)(acc < 0));  // NaN stays NaN, as torch.relu
    return acc;
  }
};

// Where a pass finds the kernel: value (g, u, v) of output pixel jj (counted from a block's
// first pixel) at w[jj * ps + (g*K*K + u*K + v) * ts]. The module's kernel tensor, channels_last
// (B, Ho, Wo, G, K, K), has ps = G*K*K and ts = 1; the fused pass keeps each block's kernels
// tap-major, ps = 1 and ts = PB (16 pixels per tap).
struct KernelLayout {
  i64 ps, ts;
};

// Forward of NB consecutive output pixels j .. j+NB-1 of row i.
template <class S, int NB, bool CHECK, class E>
inline void fwd_nhwc_block(const S* xb, const S* wp, KernelLayout L, S* yp, i64 i, i64 j, i64 u0, i64 u1,
                           const S* zeros, const Dims& D, const E& epilogue) {
  typedef Traits<S> T;
  typedef typename T::V V;
  const i64 C = D.C, cg = D.cg(), KK = D.kk();
  for (i64 g = 0; g < D.G; ++g) {
    for (i64 c0 = g * cg; c0 < (g + 1) * cg; c0 += 16) {
      V acc[NB];
      for (int jj = 0; jj < NB; ++jj) acc[jj] = V{};
      for (i64 u = u0; u < u1; ++u) {
        const S* xr = xb + (i * D.s - D.p + u * D.d) * D.W * C + c0;
        const S* wu = wp + (g * KK + u * D.K) * L.ts;
        for (i64 v = 0; v < D.K; ++v) {
          for (int jj = 0; jj < NB; ++jj) {
            const i64 q = (j + jj) * D.s - D.p + v * D.d;
            const S* xp = xr + q * C;
            if (CHECK && (q < 0 || q >= D.W)) xp = zeros;
            acc[jj] += T::get(wu + jj * L.ps + v * L.ts) * T::load(xp);
          }
        }
      }
      for (int jj = 0; jj < NB; ++jj) T::store(yp + jj * C + c0, epilogue(acc[jj], c0));
    }
  }
}

// The same for up to NB pixels (n of them are stored), with the window, the stride (dilation 1)
// and a tap-major kernel layout (ps = 1, ts = TS) known at compile time. The pixels read
// S*(NB-1)+K consecutive input columns of each tap row: each column's vector is loaded once
// and used by every pixel whose window covers it, instead of once per (pixel, tap), and
// every kernel value is an FMA's broadcast operand at a constant offset from one pointer.
// (With the kernel pixel-major at a run-time stride the compiler ran out of general
// registers for the NB pointers and spilled.) CHECK: columns outside the image read zeros,
// as in fwd_nhwc_block. Pixels past n are computed from whatever follows in the kernel
// buffer and the image and thrown away. Each sum runs over the taps in (u, v) order, so
// results are bit-identical to fwd_nhwc_block's.
template <class S, int K, int STRIDE, int NB, int TS, bool CHECK, class E>
inline void fwd_nhwc_block_fixed(const S* xb, const S* wp, S* yp, i64 i, i64 j, i64 n, i64 u0, i64 u1,
                                 const Dims& D, const E& epilogue) {
  typedef Traits<S> T;
  typedef typename T::V V;
  constexpr int NQ = STRIDE * (NB - 1) + K;
  const i64 C = D.C, cg = D.cg(), q0 = j * STRIDE - D.p;  // the first column read
  const i64 tlo = CHECK && q0 < 0 ? -q0 : 0, thi = CHECK && q0 + NQ > D.W ? D.W - q0 : NQ;  // columns inside
  for (i64 g = 0; g < D.G; ++g) {
    for (i64 c0 = g * cg; c0 < (g + 1) * cg; c0 += 16) {
      V acc[NB];
      for (int jj = 0; jj < NB; ++jj) acc[jj] = V{};
      for (i64 u = u0; u < u1; ++u) {
        const S* xr = xb + (i * STRIDE - D.p + u) * D.W * C + c0;
        const S* wu = wp + (g * K * K + u * K) * TS;
#pragma GCC unroll 32
        for (int t = 0; t < NQ; ++t) {
          const V xv = !CHECK || (t >= tlo && t < thi) ? T::load(xr + (q0 + t) * C) : V{};
#pragma GCC unroll 16
          for (int jj = 0; jj < NB; ++jj) {
            const int v = t - STRIDE * jj;
            if (v >= 0 && v < K) acc[jj] += T::get(wu + v * TS + jj) * xv;
          }
        }
      }
      for (int jj = 0; jj < NB; ++jj)
        if (jj < n) T::store(yp + jj * C + c0, epilogue(acc[jj], c0));
    }
  }
}

// Forward rows bi = b*Ho + i of one call, with what every row shares computed once.
template <class S> struct FwdRows {
  Dims D;
  i64 jlo, jhi;  // output columns whose taps are all inside the image
  std::vector<S> zeros;
  explicit FwdRows(const Dims& dims) : D(dims), zeros(16) { interior(D.W, D.Wo, D.K, D.s, D.p, D.d, &jlo, &jhi); }

  // Output columns [j0, j1) of row i of image b: w holds pixel j0's kernel, y is its output.
  // TS > 0: the kernel is tap-major (ps = 1, ts = TS), and RedNet's windows take the fast block.
  template <int TS, class E>
  void segment(const S* x, const S* w, KernelLayout L, S* y, i64 b, i64 i, i64 j0, i64 j1, const E& epilogue) const {
    i64 u0, u1;
    tap_range(i, D.s, D.p, D.d, D.K, D.H, &u0, &u1);
    const S* xb = x + b * D.H * D.W * D.C;
    i64 j = j0;
    if constexpr (TS > 0) {
      // RedNet's windows, 8 pixels a block: eight independent sums cover the FMA latency.
      if (D.d == 1 && ((D.K == 7 && (D.s == 1 || D.s == 2)) || (D.K == 3 && D.s == 1))) {
        for (; j < j1; j += JB2) {
          const i64 n = j1 - j < JB2 ? j1 - j : JB2;
          const bool inside = j >= jlo && j + JB2 <= jhi;
          const S* wp = w + (j - j0);
          S* yp = y + (j - j0) * D.C;
          if (D.K == 3)
            inside ? fwd_nhwc_block_fixed<S, 3, 1, JB2, TS, false>(xb, wp, yp, i, j, n, u0, u1, D, epilogue)
                   : fwd_nhwc_block_fixed<S, 3, 1, JB2, TS, true>(xb, wp, yp, i, j, n, u0, u1, D, epilogue);
          else if (D.s == 1)
            inside ? fwd_nhwc_block_fixed<S, 7, 1, JB2, TS, false>(xb, wp, yp, i, j, n, u0, u1, D, epilogue)
                   : fwd_nhwc_block_fixed<S, 7, 1, JB2, TS, true>(xb, wp, yp, i, j, n, u0, u1, D, epilogue);
          else
            inside ? fwd_nhwc_block_fixed<S, 7, 2, JB2, TS, false>(xb, wp, yp, i, j, n, u0, u1, D, epilogue)
                   : fwd_nhwc_block_fixed<S, 7, 2, JB2, TS, true>(xb, wp, yp, i, j, n, u0, u1, D, epilogue);
        }
        return;
      }
    }
    for (; j + JB <= j1; j += JB) {
      const S* wp = w + (j - j0) * L.ps;
      S* yp = y + (j - j0) * D.C;
      if (j >= jlo && j + JB <= jhi)
        fwd_nhwc_block<S, JB, false>(xb, wp, L, yp, i, j, u0, u1, zeros.data(), D, epilogue);
      else
        fwd_nhwc_block<S, JB, true>(xb, wp, L, yp, i, j, u0, u1, zeros.data(), D, epilogue);
    }
    for (; j < j1; ++j)
      fwd_nhwc_block<S, 1, true>(xb, w + (j - j0) * L.ps, L, y + (j - j0) * D.C, i, j, u0, u1, zeros.data(), D,
                                 epilogue);
  }

  void operator()(const S* x, const S* w, S* y, i64 bi) const {
    const i64 GKK = D.G * D.kk();
    segment<0>(x, w + bi * D.Wo * GKK, KernelLayout{GKK, 1}, y + bi * D.Wo * D.C, bi / D.Ho, bi % D.Ho, 0, D.Wo,
               NoEpilogue());
  }
};

template <class S> void fwd_nhwc_vec(const S* x, const S* w, S* y, const Dims& D, int nt) {
  const FwdRows<S> rows(D);
  parallel_chunks(D.B * D.Ho, nt, [&](i64 lo, i64 hi) {
    for (i64 bi = lo; bi < hi; ++bi) rows(x, w, y, bi);
  });
}

// The taps t < K of input position n that an output position o reads, with that o:
// o * s = n + p - t * d for 0 <= o < n_out, in ascending t. Returns how many.
inline int taps_reading(i64 n, i64 K, i64 s, i64 p, i64 d, i64 n_out, int* ts, i64* os) {
  int count = 0;
  for (i64 t = 0; t < K; ++t) {
    const i64 os_ = n + p - t * d;
    if (os_ < 0 || os_ % s) continue;
    if (os_ / s >= n_out) continue;
    ts[count] = int(t);
    os[count++] = os_ / s;
  }
  return count;
}

// Grad-input of NB input pixels q, q+s, ..., of row r that all receive the same taps v (from
// output columns j, j+1, ...): the gather over the output pixels that read them.
template <class S, int NB>
inline void bwd_input_nhwc_block(const S* gob, const S* wb, S* gxp, int nu, const int* us, const i64* is, int nv,
                                 const int* vs, const i64* js, const Dims& D) {
  typedef Traits<S> T;
  typedef typename T::V V;
  const i64 C = D.C, cg = D.cg(), KK = D.kk(), GKK = D.G * KK;
  for (i64 g = 0; g < D.G; ++g) {
    for (i64 c0 = g * cg; c0 < (g + 1) * cg; c0 += 16) {
      V acc[NB];
      for (int jj = 0; jj < NB; ++jj) acc[jj] = V{};
      for (int a = 0; a < nu; ++a) {
        for (int e = 0; e < nv; ++e) {
          const i64 pix = is[a] * D.Wo + js[e];
          const S* wv = wb + pix * GKK + g * KK + us[a] * D.K + vs[e];
          const S* gv = gob + pix * C + c0;
          for (int jj = 0; jj < NB; ++jj) acc[jj] += T::get(wv + jj * GKK) * T::load(gv + jj * C);
        }
      }
      for (int jj = 0; jj < NB; ++jj) T::store(gxp + jj * D.s * C + c0, acc[jj]);
    }
  }
}

// Grad-input with the window (K, stride STRIDE, dilation 1) known at compile time: the same
// register blocking as fwd_nhwc_block_fixed, mirrored. Input column q receives tap v from
// output column j = (q + p - v) / s where s divides q + p - v: the KT taps v = v0 + s*m
// (v0 = (q + p) mod s, m < KT). NB columns q0, q0+s, ... (one v0) read the NQ = NB + KT - 1
// output columns jb + t, jb = (q0 + p - v0)/s - (KT - 1), column jb + t feeding pixel jj
// through m = jj + KT - 1 - t. Each column's grad_y vector is loaded once for all NB pixels,
// and the kernel values it is multiplied with are that column's own (g, u, v0 + s*m), at
// constant offsets from one pointer. CHECK: columns outside [0, Wo) are skipped (their
// kernel values would lie outside the tensor). Pixels past n are computed and thrown away.
// Each sum runs over the taps in order (u ascending, v descending): the columns go in
// ascending t, the direction memory is read in. Descending t, which keeps bwd_input_nhwc_block's
// (u, v) order bit for bit, ran the 112-wide stem up to 2x slower than it (measured, 1 thread);
// both layouts go through this block, so they still agree bit for bit.
template <class S, int KT, int STRIDE, int NB, bool CHECK>
inline void bwd_input_block_fixed(const S* gob, const S* wb, S* gxp, i64 jb, i64 v0, i64 n, int nu, const int* us,
                                  const i64* is, const Dims& D) {
  typedef Traits<S> T;
  typedef typename T::V V;
  constexpr int NQ = NB + KT - 1;
  const i64 C = D.C, cg = D.cg(), KK = D.kk(), GKK = D.G * KK;
  const i64 tlo = CHECK && jb < 0 ? -jb : 0, thi = CHECK && jb + NQ > D.Wo ? D.Wo - jb : NQ;
  for (i64 g = 0; g < D.G; ++g) {
    for (i64 c0 = g * cg; c0 < (g + 1) * cg; c0 += 16) {
      V acc[NB];
      for (int jj = 0; jj < NB; ++jj) acc[jj] = V{};
      for (int a = 0; a < nu; ++a) {
        const i64 pix = is[a] * D.Wo + jb;
        const S* gr = gob + pix * C + c0;
        const S* wr = wb + pix * GKK + g * KK + us[a] * D.K + v0;
#pragma GCC unroll 32
        for (int t = 0; t < NQ; ++t) {
          if (!CHECK || (t >= tlo && t < thi)) {
            const V gv = T::load(gr + t * C);
#pragma GCC unroll 16
            for (int jj = 0; jj < NB; ++jj) {
              const int m = jj + KT - 1 - t;
              if (m >= 0 && m < KT) acc[jj] += T::get(wr + t * GKK + STRIDE * m) * gv;
            }
          }
        }
      }
      for (int jj = 0; jj < NB; ++jj)
        if (jj < n) T::store(gxp + jj * STRIDE * C + c0, acc[jj]);
    }
  }
}

// Pixels per grad-input block: NB accumulators of 16 lanes and one grad_y vector must fit the
// vector registers (32 with AVX-512, 16 with AVX2) without spilling.
template <class S> constexpr int bwd_input_nb() {
#ifdef __AVX512F__
  return sizeof(typename Traits<S>::V) <= 64 ? 8 : 4;
#else
  return sizeof(typename Traits<S>::V) <= 64 ? 4 : 2;
#endif
}

// Columns rho, rho+s, ... of one grad-input row, for a window known at compile time; KT0 and
// KT1 are the tap counts of v0 = 0 and v0 = 1 (only v0 = 0 with stride 1).
template <class S, int KT0, int KT1, int STRIDE>
void bwd_input_row_fixed(const S* gob, const S* wb, S* gxrow, int nu, const int* us, const i64* is, const Dims& D) {
  constexpr int NB = bwd_input_nb<S>();
  for (i64 rho = 0; rho < STRIDE && rho < D.W; ++rho) {
    const i64 v0 = (rho + D.p) % STRIDE;
    const int kt = v0 == 0 ? KT0 : KT1;
    for (i64 q0 = rho; q0 < D.W; q0 += NB * STRIDE) {
      const i64 n = (D.W - 1 - q0) / STRIDE + 1 < NB ? (D.W - 1 - q0) / STRIDE + 1 : NB;
      const i64 jb = (q0 + D.p - v0) / STRIDE - (kt - 1);
      const bool inside = jb >= 0 && jb + NB + kt - 1 <= D.Wo;
      S* gxp = gxrow + q0 * D.C;
      if (kt == KT0)
        inside ? bwd_input_block_fixed<S, KT0, STRIDE, NB, false>(gob, wb, gxp, jb, v0, n, nu, us, is, D)
               : bwd_input_block_fixed<S, KT0, STRIDE, NB, true>(gob, wb, gxp, jb, v0, n, nu, us, is, D);
      else
        inside ? bwd_input_block_fixed<S, KT1, STRIDE, NB, false>(gob, wb, gxp, jb, v0, n, nu, us, is, D)
               : bwd_input_block_fixed<S, KT1, STRIDE, NB, true>(gob, wb, gxp, jb, v0, n, nu, us, is, D);
    }
  }
}

// Grad-input rows br = b*H + r of one call. Per input column q: its taps v and their output
// columns j, and whether all taps of q's residue mod s reach an output column (then q and
// q+s, q+2s, ... share them and go through one block).
template <class S> struct BwdInputRows {
  Dims D;
  std::vector<int> nv, vs;
  std::vector<i64> js;
  std::vector<char> full;
  explicit BwdInputRows(const Dims& dims) : D(dims), nv(D.W), vs(D.W * D.K), js(D.W * D.K), full(D.W) {
    for (i64 q = 0; q < D.W; ++q) {
      nv[q] = taps_reading(q, D.K, D.s, D.p, D.d, D.Wo, &vs[q * D.K], &js[q * D.K]);
      int all = 0;
      for (i64 t = 0; t < D.K; ++t) all += (q + D.p - t * D.d) % D.s == 0;  // C++ %: 0 also for negatives
      full[q] = nv[q] == all;
    }
  }

  // us, is: scratch for K taps (the row's taps u and output rows i).
  void operator()(const S* go, const S* w, S* gx, i64 br, int* us, i64* is) const {
    const i64 C = D.C, K = D.K, GKK = D.G * D.kk(), s = D.s;
    const i64 b = br / D.H, r = br % D.H;
    const int nu = taps_reading(r, K, s, D.p, D.d, D.Ho, us, is);
    const S* gob = go + b * D.Ho * D.Wo * C;
    const S* wb = w + b * D.Ho * D.Wo * GKK;
    S* gxrow = gx + br * D.W * C;
    if (D.d == 1) {  // RedNet's windows (and K = 5), with a register-blocked row
      if (K == 7 && s == 1) return bwd_input_row_fixed<S, 7, 7, 1>(gob, wb, gxrow, nu, us, is, D);
      if (K == 7 && s == 2) return bwd_input_row_fixed<S, 4, 3, 2>(gob, wb, gxrow, nu, us, is, D);
      if (K == 3 && s == 1) return bwd_input_row_fixed<S, 3, 3, 1>(gob, wb, gxrow, nu, us, is, D);
      if (K == 3 && s == 2) return bwd_input_row_fixed<S, 2, 1, 2>(gob, wb, gxrow, nu, us, is, D);
      if (K == 5 && s == 1) return bwd_input_row_fixed<S, 5, 5, 1>(gob, wb, gxrow, nu, us, is, D);
    }
    for (i64 rho = 0; rho < s && rho < D.W; ++rho) {  // columns rho, rho+s, ... share their tap pattern
      i64 q = rho;
      while (q < D.W) {
        const i64 last = q + (JB - 1) * s;
        if (last < D.W && full[q] && full[last] && nv[q] == nv[last]) {
          bwd_input_nhwc_block<S, JB>(gob, wb, gxrow + q * C, nu, us, is, nv[q], &vs[q * K], &js[q * K], D);
          q += JB * s;
        } else {
          bwd_input_nhwc_block<S, 1>(gob, wb, gxrow + q * C, nu, us, is, nv[q], &vs[q * K], &js[q * K], D);
          q += s;
        }
      }
    }
  }
};

template <class S> void bwd_input_nhwc_vec(const S* go, const S* w, S* gx, const Dims& D, int nt) {
  const BwdInputRows<S> rows(D);
  parallel_chunks(D.B * D.H, nt, [&](i64 lo, i64 hi) {
    std::vector<int> us(D.K);
    std::vector<i64> is(D.K);
    for (i64 br = lo; br < hi; ++br) rows(go, w, gx, br, us.data(), is.data());
  });
}

// Grad-kernel: one 16-channel dot product per (pixel, group, tap), reduced 16 at a time by
// hsum16 over the pixel's G*K*K kernel values in storage order. Entry n = (g, u, v) reads
// go at channel offset goff[n] = g*cg and x through the pointer xp[n]: x + off[n] for a
// pixel whose taps are all inside the image (off[n] is the same for every such pixel), a
// block of zeros for taps outside it. The tables keep the unrolled loop free of index math.
template <class S, bool ONE>
inline void bwd_kernel_nhwc_pixel(const S* gop, const S* const* xp, const i64* goff, S* gwp, i64 GKK, i64 nv) {
  typedef Traits<S> T;
  typedef typename T::V V;
  for (i64 n0 = 0; n0 < GKK; n0 += 16) {
    V P[16];
    if (n0 + 16 <= GKK) {
      for (int m = 0; m < 16; ++m) {
        const i64 n = n0 + m;
        P[m] = T::load(gop + goff[n]) * T::load(xp[n]);
        if (!ONE)
          for (i64 h = 1; h < nv; ++h) P[m] += T::load(gop + goff[n] + 16 * h) * T::load(xp[n] + 16 * h);
      }
      T::store(gwp + n0, hsum16(P));
    } else {
      const int m_end = int(GKK - n0);
      for (int m = 0; m < 16; ++m) {
        P[m] = V{};
        if (m >= m_end) continue;
        const i64 n = n0 + m;
        for (i64 h = 0; h < nv; ++h) P[m] += T::load(gop + goff[n] + 16 * h) * T::load(xp[n] + 16 * h);
      }
      const V sums = hsum16(P);
      for (int m = 0; m < m_end; ++m) T::put(gwp + n0 + m, sums[m]);
    }
  }
}

// Grad-kernel rows bi = b*Ho + i of one call.
template <class S> struct BwdKernelRows {
  Dims D;
  std::vector<i64> goff, off;  // per entry n = (g, u, v) of a pixel's G*K*K values
  i64 ilo, ihi, jlo, jhi;      // output rows and columns whose taps are all inside the image
  std::vector<S> zeros;
  explicit BwdKernelRows(const Dims& dims) : D(dims), goff(D.G * D.kk()), off(D.G * D.kk()), zeros(D.C) {
    const i64 K = D.K, KK = D.kk(), cg = D.cg();
    for (i64 n = 0; n < D.G * KK; ++n) {
      const i64 g = n / KK, u = n % KK / K, v = n % K;
      goff[n] = g * cg;
      off[n] = ((u * D.d - D.p) * D.W + v * D.d - D.p) * D.C + g * cg;  // from x at (i*s, j*s)
    }
    interior(D.W, D.Wo, K, D.s, D.p, D.d, &jlo, &jhi);
    interior(D.H, D.Ho, K, D.s, D.p, D.d, &ilo, &ihi);
  }

  // xp: scratch for G*K*K pointers.
  void operator()(const S* go, const S* x, S* gw, i64 bi, const S** xp) const {
    const i64 C = D.C, cg = D.cg(), K = D.K, KK = D.kk(), GKK = D.G * KK, nv = cg / 16;
    const i64 b = bi / D.Ho, i = bi % D.Ho;
    const S* xb = x + b * D.H * D.W * C;
    for (i64 j = 0; j < D.Wo; ++j) {
      if (i >= ilo && i < ihi && j >= jlo && j < jhi) {
        const S* base = xb + (i * D.s * D.W + j * D.s) * C;
        for (i64 n = 0; n < GKK; ++n) xp[n] = base + off[n];
      } else {
        for (i64 u = 0; u < K; ++u) {
          const i64 r = i * D.s - D.p + u * D.d;
          for (i64 v = 0; v < K; ++v) {
            const i64 q = j * D.s - D.p + v * D.d;
            const bool in = r >= 0 && r < D.H && q >= 0 && q < D.W;
            const S* tap = xb + (r * D.W + q) * C;
            for (i64 g = 0; g < D.G; ++g) xp[g * KK + u * K + v] = in ? tap + g * cg : zeros.data();
          }
        }
      }
      const S* gop = go + (bi * D.Wo + j) * C;
      S* gwp = gw + (bi * D.Wo + j) * GKK;
      if (nv == 1)
        bwd_kernel_nhwc_pixel<S, true>(gop, xp, goff.data(), gwp, GKK, nv);
      else
        bwd_kernel_nhwc_pixel<S, false>(gop, xp, goff.data(), gwp, GKK, nv);
    }
  }
};

template <class S> void bwd_kernel_nhwc_vec(const S* go, const S* x, S* gw, const Dims& D, int nt) {
  const BwdKernelRows<S> rows(D);
  parallel_chunks(D.B * D.Ho, nt, [&](i64 lo, i64 hi) {
    std::vector<const S*> xp(D.G * D.kk());
    for (i64 bi = lo; bi < hi; ++bi) rows(go, x, gw, bi, xp.data());
  });
}

// ---------------------------------------------------------------------------------------
// Fused inference (float, channels_last, groups of 16k channels): the Involution module's
// kernel generation, the aggregation and the BatchNorm + ReLU after it, in one pass.
//
//   x' = AvgPool(s)(x) (ceil mode: a window cut by the border averages what it covers)
//   r  = relu(x' @ wr + br)          wr (C, R): reduce conv with its BatchNorm folded in
//   k  = r @ ws + bs                 ws (R, N): span conv, N = G*K*K
//   y  = act(scale * involution(x, k) + shift)
//
// R and N are padded to multiples of 16 with zero columns (and rows of ws), so GEMM rows are
// whole vectors; the padded r columns are relu(0) = 0 and add nothing. Output pixels go in
// blocks of PB = 16 consecutive ones (over b, i, j: blocks cross rows, which keeps the small
// late-stage maps in full blocks). A block's r and k live in per-thread scratch and never
// reach memory: r as (R, PB) and k as (N, PB), one 16-pixel vector per channel, so the span
// GEMM's accumulators are vectors over the block's pixels, each weight of ws is an FMA's
// broadcast operand, and the aggregation finds a tap's kernel values for consecutive pixels
// side by side (KernelLayout{1, PB}).

constexpr int PB = 16;
#ifdef __AVX512F__
constexpr int GEMM_NV = 4;  // 4 x 4 accumulators + 4 weight vectors: 21 of AVX-512's 32 registers
constexpr int SPAN_NB = 16;  // 16 accumulators + 1 input vector
#else
constexpr int GEMM_NV = 2;  // a 16-float vector is two AVX2 registers
constexpr int SPAN_NB = 6;
#endif
constexpr int GEMM_MB = 4;  // rows per tile

// Cm[m][n] = relu(bias[n] + sum_k A[m*lda + k] * Bm[k*ldb + n]) for m < MB and NV vectors of n.
template <int MB, int NV>
inline void gemm_tile(const float* A, i64 lda, const float* Bm, i64 ldb, const float* bias, float* Cm, i64 ldc,
                      i64 K) {
  typedef Traits<float> T;
  f32x16 acc[MB][NV];
  for (int nv = 0; nv < NV; ++nv) {
    const f32x16 b = T::load(bias + 16 * nv);
    for (int m = 0; m < MB; ++m) acc[m][nv] = b;
  }
  for (i64 k = 0; k < K; ++k) {
    f32x16 bv[NV];
    for (int nv = 0; nv < NV; ++nv) bv[nv] = T::load(Bm + k * ldb + 16 * nv);
    for (int m = 0; m < MB; ++m) {
      const float a = A[m * lda + k];
      for (int nv = 0; nv < NV; ++nv) acc[m][nv] += a * bv[nv];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int nv = 0; nv < NV; ++nv) {
      const f32x16 v = acc[m][nv];
      T::store(Cm + m * ldc + 16 * nv, (f32x16)((i32x16)v & ~(i32x16)(v < 0)));
    }
}

template <int NV>
inline void gemm_panel(const float* A, i64 lda, i64 M, const float* Bm, i64 ldb, const float* bias, float* Cm,
                       i64 ldc, i64 K) {
  constexpr int MB = NV == 1 ? 2 * GEMM_MB : GEMM_MB;  // one column vector: more rows for independent sums
  i64 m = 0;
  for (; m + MB <= M; m += MB) gemm_tile<MB, NV>(A + m * lda, lda, Bm, ldb, bias, Cm + m * ldc, ldc, K);
  for (; m + 2 <= M; m += 2) gemm_tile<2, NV>(A + m * lda, lda, Bm, ldb, bias, Cm + m * ldc, ldc, K);
  if (m < M) gemm_tile<1, NV>(A + m * lda, lda, Bm, ldb, bias, Cm + m * ldc, ldc, K);
}

// Cm (M, N) = relu(A (M, K) @ Bm (K, N) + bias), N a multiple of 16: panels of NV vectors of
// output columns, all M rows each, so a panel of Bm stays in L1 while the rows pass.
inline void gemm_bias_relu(const float* A, i64 lda, i64 M, const float* Bm, i64 ldb, const float* bias, float* Cm,
                           i64 ldc, i64 K, i64 N) {
  i64 n = 0;
  for (; n + 16 * GEMM_NV <= N; n += 16 * GEMM_NV)
    gemm_panel<GEMM_NV>(A, lda, M, Bm + n, ldb, bias + n, Cm + n, ldc, K);
  for (; n < N; n += 16) gemm_panel<1>(A, lda, M, Bm + n, ldb, bias + n, Cm + n, ldc, K);
}

// kT[n][0:PB] = bias[n] + sum_j W[j*ldw + n] * rT[j][0:PB] for NB consecutive n.
template <int NB>
inline void span_tile(const float* rT, i64 R, const float* W, i64 ldw, const float* bias, float* kT) {
  typedef Traits<float> T;
  f32x16 acc[NB];
  for (int nb = 0; nb < NB; ++nb) acc[nb] = f32x16{} + bias[nb];
  for (i64 j = 0; j < R; ++j) {
    const f32x16 rv = T::load(rT + j * PB);
    const float* w = W + j * ldw;
    for (int nb = 0; nb < NB; ++nb) acc[nb] += w[nb] * rv;
  }
  for (int nb = 0; nb < NB; ++nb) T::store(kT + nb * PB, acc[nb]);
}

// kT (N, PB) = ws^T @ rT + bs, for all N outputs, N a multiple of 16.
inline void span_gemm(const float* rT, i64 R, const float* W, i64 N, const float* bias, float* kT) {
  i64 n = 0;
  for (; n + SPAN_NB <= N; n += SPAN_NB) span_tile<SPAN_NB>(rT, R, W + n, N, bias + n, kT + n * PB);
  for (; n < N; ++n) span_tile<1>(rT, R, W + n, N, bias + n, kT + n * PB);
}

struct FusedParams {
  const float *wr, *br, *ws, *bs, *scale, *shift;
  i64 R, N;  // padded widths of r and k
  bool relu;
};

// Output pixels [p0, p1) (flattened over b, i, j), p1 - p0 <= PB.
struct FusedBlocks {
  FwdRows<float> rows;
  FusedParams P;
  FusedBlocks(const Dims& D, const FusedParams& params) : rows(D), P(params) {}

  // xs: scratch for PB pooled pixels (C); rs: r as (PB, R), then rT (R, PB); ks: k as (N, PB).
  void operator()(const float* x, float* y, i64 p0, i64 p1, float* xs, float* rs, float* rT, float* ks) const {
    const Dims& D = rows.D;
    const i64 C = D.C, M = p1 - p0, HoWo = D.Ho * D.Wo;
    const float* a = x + p0 * C;  // stride 1: output pixel p generates its kernel from input pixel p
    if (D.s != 1) {
      for (i64 m = 0; m < M; ++m) pool_pixel(x, p0 + m, xs + m * C);
      a = xs;
    }
    gemm_bias_relu(a, C, M, P.wr, P.R, P.br, rs, P.R, C, P.R);
    for (i64 j = 0; j < P.R; ++j)  // (M, R) -> (R, PB), pixels past M zero
      for (i64 m = 0; m < PB; ++m) rT[j * PB + m] = m < M ? rs[m * P.R + j] : 0.0f;
    span_gemm(rT, P.R, P.ws, P.N, P.bs, ks);
    const AffineRelu epilogue{P.scale, P.shift, P.relu};
    for (i64 p = p0; p < p1;) {  // the block's pieces of output rows
      const i64 b = p / HoWo, i = p % HoWo / D.Wo, j0 = p % D.Wo;
      const i64 j1 = j0 + (p1 - p) < D.Wo ? j0 + (p1 - p) : D.Wo;
      rows.segment<PB>(x, ks + (p - p0), KernelLayout{1, PB}, y + p * C, b, i, j0, j1, epilogue);
      p += j1 - j0;
    }
  }

  // The s x s average of x under output pixel p, as AvgPool2d(s, s, ceil_mode=True).
  void pool_pixel(const float* x, i64 p, float* out) const {
    typedef Traits<float> T;
    const Dims& D = rows.D;
    const i64 C = D.C, HoWo = D.Ho * D.Wo;
    const i64 b = p / HoWo, r0 = p % HoWo / D.Wo * D.s, q0 = p % D.Wo * D.s;
    const i64 r1 = r0 + D.s < D.H ? r0 + D.s : D.H, q1 = q0 + D.s < D.W ? q0 + D.s : D.W;
    const float inv = 1.0f / float((r1 - r0) * (q1 - q0));
    for (i64 c = 0; c < C; c += 16) {
      f32x16 sum = {};
      for (i64 r = r0; r < r1; ++r)
        for (i64 q = q0; q < q1; ++q) sum += T::load(x + ((b * D.H + r) * D.W + q) * C + c);
      T::store(out + c, sum * inv);
    }
  }
};

void fused_nhwc(const float* x, float* y, const Dims& D, const FusedParams& P, int nt) {
  const FusedBlocks blocks(D, P);
  const i64 pixels = D.B * D.Ho * D.Wo, nblocks = (pixels + PB - 1) / PB;
  parallel_chunks(nblocks, nt, [&](i64 lo, i64 hi) {
    // Scratch per thread, kept from call to call: under ORT's pool the chunks are many and
    // short, and a fresh allocation of this size (up to 150 KB) goes to mmap and faults its
    // pages in each time. ks gets JB2 more floats for the pixels a block's last piece
    // computes past its end (fwd_nhwc_block_fixed).
    thread_local std::vector<float> scratch;
    const size_t need = size_t(PB * (D.C + 2 * P.R + P.N) + JB2);
    if (scratch.size() < need) scratch.resize(need);
    float* xs = scratch.data();
    float* rs = xs + PB * D.C;
    float* rT = rs + PB * P.R;
    float* ks = rT + PB * P.R;
    for (i64 blk = lo; blk < hi; ++blk) {
      const i64 p0 = blk * PB, p1 = p0 + PB < pixels ? p0 + PB : pixels;
      blocks(x, y, p0, p1, xs, rs, rT, ks);
    }
  });
}

// ---------------------------------------------------------------------------------------
// Channels_last, any group width: scalar loops over the channels of a group.

template <class S> void fwd_nhwc_any(const S* x, const S* w, S* y, const Dims& D, int nt) {
  typedef Traits<S> T;
  typedef typename T::A A;
  const i64 C = D.C, cg = D.cg(), KK = D.kk(), GKK = D.G * KK;
  parallel_chunks(D.B * D.Ho, nt, [&](i64 lo, i64 hi) {
    std::vector<A> acc(C);
    for (i64 bi = lo; bi < hi; ++bi) {
      const i64 b = bi / D.Ho, i = bi % D.Ho;
      i64 u0, u1, v0, v1;
      tap_range(i, D.s, D.p, D.d, D.K, D.H, &u0, &u1);
      for (i64 j = 0; j < D.Wo; ++j) {
        tap_range(j, D.s, D.p, D.d, D.K, D.W, &v0, &v1);
        const S* wp = w + (bi * D.Wo + j) * GKK;
        for (i64 c = 0; c < C; ++c) acc[c] = 0;
        for (i64 u = u0; u < u1; ++u) {
          for (i64 v = v0; v < v1; ++v) {
            const S* xp = x + ((b * D.H + i * D.s - D.p + u * D.d) * D.W + j * D.s - D.p + v * D.d) * C;
            for (i64 g = 0; g < D.G; ++g) {
              const A kv = T::get(wp + g * KK + u * D.K + v);
              for (i64 c = g * cg; c < (g + 1) * cg; ++c) acc[c] += kv * T::get(xp + c);
            }
          }
        }
        S* yp = y + (bi * D.Wo + j) * C;
        for (i64 c = 0; c < C; ++c) T::put(yp + c, acc[c]);
      }
    }
  });
}

template <class S> void bwd_input_nhwc_any(const S* go, const S* w, S* gx, const Dims& D, int nt) {
  typedef Traits<S> T;
  typedef typename T::A A;
  const i64 C = D.C, cg = D.cg(), KK = D.kk(), GKK = D.G * KK;
  parallel_chunks(D.B * D.H, nt, [&](i64 lo, i64 hi) {
    std::vector<A> acc(C);
    for (i64 br = lo; br < hi; ++br) {
      const i64 b = br / D.H, r = br % D.H;
      for (i64 q = 0; q < D.W; ++q) {
        for (i64 c = 0; c < C; ++c) acc[c] = 0;
        for (i64 u = 0; u < D.K; ++u) {
          const i64 ti = r + D.p - u * D.d;
          if (ti < 0 || ti % D.s || ti / D.s >= D.Ho) continue;
          for (i64 v = 0; v < D.K; ++v) {
            const i64 tj = q + D.p - v * D.d;
            if (tj < 0 || tj % D.s || tj / D.s >= D.Wo) continue;
            const i64 pix = (b * D.Ho + ti / D.s) * D.Wo + tj / D.s;
            const S* gp = go + pix * C;
            const S* wp = w + pix * GKK + u * D.K + v;
            for (i64 g = 0; g < D.G; ++g) {
              const A kv = T::get(wp + g * KK);
              for (i64 c = g * cg; c < (g + 1) * cg; ++c) acc[c] += kv * T::get(gp + c);
            }
          }
        }
        S* gxp = gx + (br * D.W + q) * C;
        for (i64 c = 0; c < C; ++c) T::put(gxp + c, acc[c]);
      }
    }
  });
}

template <class S> void bwd_kernel_nhwc_any(const S* go, const S* x, S* gw, const Dims& D, int nt) {
  typedef Traits<S> T;
  typedef typename T::A A;
  const i64 C = D.C, cg = D.cg(), K = D.K, KK = D.kk(), GKK = D.G * KK;
  parallel_chunks(D.B * D.Ho, nt, [&](i64 lo, i64 hi) {
    for (i64 bi = lo; bi < hi; ++bi) {
      const i64 b = bi / D.Ho, i = bi % D.Ho;
      i64 u0, u1, v0, v1;
      tap_range(i, D.s, D.p, D.d, K, D.H, &u0, &u1);
      for (i64 j = 0; j < D.Wo; ++j) {
        tap_range(j, D.s, D.p, D.d, K, D.W, &v0, &v1);
        const S* gop = go + (bi * D.Wo + j) * C;
        S* gwp = gw + (bi * D.Wo + j) * GKK;
        for (i64 g = 0; g < D.G; ++g) {
          for (i64 u = 0; u < K; ++u) {
            for (i64 v = 0; v < K; ++v) {
              A sum = 0;
              if (u >= u0 && u < u1 && v >= v0 && v < v1) {
                const S* xp = x + ((b * D.H + i * D.s - D.p + u * D.d) * D.W + j * D.s - D.p + v * D.d) * C;
                for (i64 c = g * cg; c < (g + 1) * cg; ++c) sum += T::get(gop + c) * T::get(xp + c);
              }
              T::put(gwp + g * KK + u * K + v, sum);
            }
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// NCHW, groups of 16k channels: through channels_last tiles. Each (b, g) slab is transposed
// into the thread's buffers (x: (C/G, H, W) -> (H, W, C/G); kernel: (K*K, Ho, Wo) ->
// (Ho, Wo, K*K)), run by the channels_last rows above as a one-group problem, and the result
// transposed back. The copies are per group and stay in cache at RedNet's sizes, instead of
// whole-tensor copies; vectorising along the width instead left 7- and 14-wide rows scalar.

// dst[n * P + p] = src[p * N + n]: P planes of N values -> N interleaved groups of P.
template <class S> void interleave(const S* src, S* dst, i64 P, i64 N) {
  for (i64 n0 = 0; n0 < N; n0 += 64) {
    const i64 n1 = n0 + 64 < N ? n0 + 64 : N;
    for (i64 p = 0; p < P; ++p)
      for (i64 n = n0; n < n1; ++n) dst[n * P + p] = src[p * N + n];
  }
}

// The inverse: dst[p * N + n] = src[n * P + p].
template <class S> void deinterleave(const S* src, S* dst, i64 P, i64 N) {
  for (i64 n0 = 0; n0 < N; n0 += 64) {
    const i64 n1 = n0 + 64 < N ? n0 + 64 : N;
    for (i64 p = 0; p < P; ++p)
      for (i64 n = n0; n < n1; ++n) dst[p * N + n] = src[n * P + p];
  }
}

inline Dims one_group(const Dims& D) {
  Dims g = D;
  g.B = 1, g.C = D.cg(), g.G = 1;
  return g;
}

template <class S> void fwd_nchw_tiled(const S* x, const S* w, S* y, const Dims& D, int nt) {
  const i64 cg = D.cg(), KK = D.kk(), HW = D.H * D.W, HoWo = D.Ho * D.Wo;
  const FwdRows<S> rows(one_group(D));
  parallel_chunks(D.B * D.G, nt, [&](i64 lo, i64 hi) {
    std::vector<S> xt(cg * HW), wt(KK * HoWo), yt(cg * HoWo);
    for (i64 bg = lo; bg < hi; ++bg) {
      const i64 c0 = bg / D.G * D.C + bg % D.G * cg;  // first channel of the slab, counting over b
      interleave(x + c0 * HW, xt.data(), cg, HW);
      interleave(w + bg * KK * HoWo, wt.data(), KK, HoWo);
      for (i64 i = 0; i < D.Ho; ++i) rows(xt.data(), wt.data(), yt.data(), i);
      deinterleave(yt.data(), y + c0 * HoWo, cg, HoWo);
    }
  });
}

template <class S> void bwd_input_nchw_tiled(const S* go, const S* w, S* gx, const Dims& D, int nt) {
  const i64 cg = D.cg(), KK = D.kk(), HW = D.H * D.W, HoWo = D.Ho * D.Wo;
  const BwdInputRows<S> rows(one_group(D));
  parallel_chunks(D.B * D.G, nt, [&](i64 lo, i64 hi) {
    std::vector<S> gt(cg * HoWo), wt(KK * HoWo), xt(cg * HW);
    std::vector<int> us(D.K);
    std::vector<i64> is(D.K);
    for (i64 bg = lo; bg < hi; ++bg) {
      const i64 c0 = bg / D.G * D.C + bg % D.G * cg;
      interleave(go + c0 * HoWo, gt.data(), cg, HoWo);
      interleave(w + bg * KK * HoWo, wt.data(), KK, HoWo);
      for (i64 r = 0; r < D.H; ++r) rows(gt.data(), wt.data(), xt.data(), r, us.data(), is.data());
      deinterleave(xt.data(), gx + c0 * HW, cg, HW);
    }
  });
}

template <class S> void bwd_kernel_nchw_tiled(const S* go, const S* x, S* gw, const Dims& D, int nt) {
  const i64 cg = D.cg(), KK = D.kk(), HW = D.H * D.W, HoWo = D.Ho * D.Wo;
  const BwdKernelRows<S> rows(one_group(D));
  parallel_chunks(D.B * D.G, nt, [&](i64 lo, i64 hi) {
    std::vector<S> gt(cg * HoWo), xt(cg * HW), wt(KK * HoWo);
    std::vector<const S*> xp(KK);
    for (i64 bg = lo; bg < hi; ++bg) {
      const i64 c0 = bg / D.G * D.C + bg % D.G * cg;
      interleave(go + c0 * HoWo, gt.data(), cg, HoWo);
      interleave(x + c0 * HW, xt.data(), cg, HW);
      for (i64 i = 0; i < D.Ho; ++i) rows(gt.data(), xt.data(), wt.data(), i, xp.data());
      deinterleave(wt.data(), gw + bg * KK * HoWo, KK, HoWo);
    }
  });
}

// ---------------------------------------------------------------------------------------
// NCHW: rows of one channel, vectorised along the width (contiguous when the stride is 1).

template <class S> void fwd_nchw(const S* x, const S* w, S* y, const Dims& D, int nt) {
  typedef Traits<S> T;
  typedef typename T::A A;
  const i64 cg = D.cg(), K = D.K, HoWo = D.Ho * D.Wo;
  parallel_chunks(D.B * D.G * D.Ho, nt, [&](i64 lo, i64 hi) {
    std::vector<A> acc(D.Wo);
    for (i64 bgi = lo; bgi < hi; ++bgi) {
      const i64 bg = bgi / D.Ho, i = bgi % D.Ho, b = bg / D.G, g = bg % D.G;
      i64 u0, u1;
      tap_range(i, D.s, D.p, D.d, K, D.H, &u0, &u1);
      for (i64 c = g * cg; c < (g + 1) * cg; ++c) {
        for (i64 j = 0; j < D.Wo; ++j) acc[j] = 0;
        for (i64 u = u0; u < u1; ++u) {
          const S* xr = x + ((b * D.C + c) * D.H + i * D.s - D.p + u * D.d) * D.W;
          for (i64 v = 0; v < K; ++v) {
            const S* wr = w + (bg * K * K + u * K + v) * HoWo + i * D.Wo;
            i64 j0, j1;
            out_range(v, D.s, D.p, D.d, D.W, D.Wo, &j0, &j1);
            const i64 off = v * D.d - D.p;  // column j reads xr[j * s + off]
            A* a = acc.data();
            if (D.s == 1) {
              for (i64 j = j0; j < j1; ++j) a[j] += T::get(wr + j) * T::get(xr + j + off);
            } else {
              for (i64 j = j0; j < j1; ++j) a[j] += T::get(wr + j) * T::get(xr + j * D.s + off);
            }
          }
        }
        S* yr = y + ((b * D.C + c) * D.Ho + i) * D.Wo;
        for (i64 j = 0; j < D.Wo; ++j) T::put(yr + j, acc[j]);
      }
    }
  });
}

template <class S> void bwd_input_nchw(const S* go, const S* w, S* gx, const Dims& D, int nt) {
  typedef Traits<S> T;
  typedef typename T::A A;
  const i64 cg = D.cg(), K = D.K, HoWo = D.Ho * D.Wo;
  parallel_chunks(D.B * D.G * D.H, nt, [&](i64 lo, i64 hi) {
    std::vector<A> acc(D.W);
    for (i64 bgr = lo; bgr < hi; ++bgr) {
      const i64 bg = bgr / D.H, r = bgr % D.H, b = bg / D.G, g = bg % D.G;
      for (i64 c = g * cg; c < (g + 1) * cg; ++c) {
        for (i64 q = 0; q < D.W; ++q) acc[q] = 0;
        for (i64 u = 0; u < K; ++u) {
          const i64 ti = r + D.p - u * D.d;  // = i * s
          if (ti < 0 || ti % D.s || ti / D.s >= D.Ho) continue;
          const i64 i = ti / D.s;
          const S* gr = go + ((b * D.C + c) * D.Ho + i) * D.Wo;
          for (i64 v = 0; v < K; ++v) {
            const S* wr = w + (bg * K * K + u * K + v) * HoWo + i * D.Wo;
            i64 j0, j1;
            out_range(v, D.s, D.p, D.d, D.W, D.Wo, &j0, &j1);
            const i64 off = v * D.d - D.p;  // column j writes acc[j * s + off]
            A* a = acc.data();
            if (D.s == 1) {
              for (i64 j = j0; j < j1; ++j) a[j + off] += T::get(wr + j) * T::get(gr + j);
            } else {
              for (i64 j = j0; j < j1; ++j) a[j * D.s + off] += T::get(wr + j) * T::get(gr + j);
            }
          }
        }
        S* gxr = gx + ((b * D.C + c) * D.H + r) * D.W;
        for (i64 q = 0; q < D.W; ++q) T::put(gxr + q, acc[q]);
      }
    }
  });
}

template <class S> void bwd_kernel_nchw(const S* go, const S* x, S* gw, const Dims& D, int nt) {
  typedef Traits<S> T;
  typedef typename T::A A;
  const i64 cg = D.cg(), K = D.K, HoWo = D.Ho * D.Wo;
  parallel_chunks(D.B * D.G * D.Ho, nt, [&](i64 lo, i64 hi) {
    std::vector<A> acc(D.Wo);
    for (i64 bgi = lo; bgi < hi; ++bgi) {
      const i64 bg = bgi / D.Ho, i = bgi % D.Ho, b = bg / D.G, g = bg % D.G;
      i64 u0, u1;
      tap_range(i, D.s, D.p, D.d, K, D.H, &u0, &u1);
      for (i64 u = 0; u < K; ++u) {
        for (i64 v = 0; v < K; ++v) {
          for (i64 j = 0; j < D.Wo; ++j) acc[j] = 0;
          if (u >= u0 && u < u1) {
            i64 j0, j1;
            out_range(v, D.s, D.p, D.d, D.W, D.Wo, &j0, &j1);
            A* a = acc.data();
            for (i64 c = g * cg; c < (g + 1) * cg; ++c) {
              const S* gr = go + ((b * D.C + c) * D.Ho + i) * D.Wo;
              const S* xr = x + ((b * D.C + c) * D.H + i * D.s - D.p + u * D.d) * D.W;
              const i64 off = v * D.d - D.p;  // column j reads xr[j * s + off]
              if (D.s == 1) {
                for (i64 j = j0; j < j1; ++j) a[j] += T::get(gr + j) * T::get(xr + j + off);
              } else {
                for (i64 j = j0; j < j1; ++j) a[j] += T::get(gr + j) * T::get(xr + j * D.s + off);
              }
            }
          }
          S* gwr = gw + (bg * K * K + u * K + v) * HoWo + i * D.Wo;
          for (i64 j = 0; j < D.Wo; ++j) T::put(gwr + j, acc[j]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------
// Dispatch on pass, layout and dtype.

enum Pass { FWD = 0, BWD_INPUT = 1, BWD_KERNEL = 2 };

template <class S> int run(int pass, int layout, const void* a, const void* b, void* out, const Dims& D, int nt) {
  const S* pa = static_cast<const S*>(a);
  const S* pb = static_cast<const S*>(b);
  S* po = static_cast<S*>(out);
  const bool vec = D.cg() % 16 == 0;
  if (layout == 1) {
    switch (pass) {
      case FWD: vec ? fwd_nhwc_vec(pa, pb, po, D, nt) : fwd_nhwc_any(pa, pb, po, D, nt); return 0;
      case BWD_INPUT: vec ? bwd_input_nhwc_vec(pa, pb, po, D, nt) : bwd_input_nhwc_any(pa, pb, po, D, nt); return 0;
      case BWD_KERNEL: vec ? bwd_kernel_nhwc_vec(pa, pb, po, D, nt) : bwd_kernel_nhwc_any(pa, pb, po, D, nt); return 0;
    }
  } else if (layout == 0) {
    switch (pass) {
      case FWD: vec ? fwd_nchw_tiled(pa, pb, po, D, nt) : fwd_nchw(pa, pb, po, D, nt); return 0;
      case BWD_INPUT: vec ? bwd_input_nchw_tiled(pa, pb, po, D, nt) : bwd_input_nchw(pa, pb, po, D, nt); return 0;
      // With fewer than 16 taps a one-group pixel fills only part of hsum16's 16 lanes; the
      // width-vectorised loop was 2.8x faster on RedNet's 3x3 stem.
      case BWD_KERNEL:
        vec && D.kk() >= 16 ? bwd_kernel_nchw_tiled(pa, pb, po, D, nt) : bwd_kernel_nchw(pa, pb, po, D, nt);
        return 0;
    }
  }
  return 2;
}

}  // namespace

extern "C" {

// Bumped when the signature below changes; the loader checks it.
int rednet_involution_abi(void) { return 2; }

// pass: 0 forward (a = x, b = kernel, out = y), 1 grad-input (a = grad_y, b = kernel,
// out = grad_x), 2 grad-kernel (a = grad_y, b = x, out = grad_kernel). layout: 0 NCHW,
// 1 channels_last. dtype: 0 float32, 1 float64, 2 bfloat16. dims: B, C, H, W, G, K, Ho,
// Wo, stride, padding, dilation. Returns 0, or 1 for an unknown dtype, 2 for an unknown
// pass or layout.
int rednet_involution(int pass, int layout, int dtype, const void* a, const void* b, void* out, const i64* dims,
                      int nthreads) {
  const Dims D{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8], dims[9], dims[10]};
  const int nt = nthreads > 0 ? nthreads : 1;
  switch (dtype) {
    case 0: return run<float>(pass, layout, a, b, out, D, nt);
    case 1: return run<double>(pass, layout, a, b, out, D, nt);
    case 2: return run<uint16_t>(pass, layout, a, b, out, D, nt);
  }
  return 1;
}

// The fused inference pass (float, channels_last): x (B, H, W, C), y (B, Ho, Wo, C); wr (C, R),
// br (R), ws (R, N), bs (N) with R and N multiples of 16 (zero padded); scale and shift (C) or
// both null. dims: B, C, H, W, G, K, Ho, Wo, stride, padding, R, N, relu. Returns 0, or 3 for
// dimensions the pass does not take (C/G not a multiple of 16, R or N not multiples of 16).
int rednet_involution_fused(const float* x, const float* wr, const float* br, const float* ws, const float* bs,
                            const float* scale, const float* shift, float* y, const i64* dims, int nthreads) {
  const Dims D{dims[0], dims[1], dims[2], dims[3], dims[4], dims[5], dims[6], dims[7], dims[8], dims[9], 1};
  const FusedParams P{wr, br, ws, bs, scale, shift, dims[10], dims[11], dims[12] != 0};
  if (D.G < 1 || D.C % D.G || D.cg() % 16 || P.R % 16 || P.N % 16 || P.N < D.G * D.kk()) return 3;
  fused_nhwc(x, y, D, P, nthreads > 0 ? nthreads : 1);
  return 0;
}

}  // extern "C"
