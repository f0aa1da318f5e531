// Involution kernels: forward, gradient w.r.t. the input, gradient w.r.t. the kernel.
//
//   y[b, c, i, j] = sum_{u,v < K} w[b, g(c), u, v, i, j] * x[b, c, i*S - pad + u*D, j*S - pad + v*D]
//
// Compiled at run time by NVRTC through cupy.RawModule (rednet/ops/_cupy.py), one module
// per (dtype, K, S, D) and device, and in CI by nvcc and NVRTC without a GPU
// (tests/test_kernels.py), which also runs it on the host (tests/cuda_emu.h). The file is
// header-free so both compilers take it as is: NVRTC has no default include path, and the
// half conversions below are one PTX instruction each. Launch geometry and arguments are
// planned by rednet/ops/_plan.py, which mirrors the constants marked "(_plan)".
//
// Memory formats. "nchw": x, y (B, C, H, W) contiguous and w (B, G, K, K, Ho, Wo) contiguous.
// "nhwc" (channels_last): x, y stored as (B, H, W, C) and w stored as (B, Ho, Wo, G, K, K),
// which is what a channels_last Conv2d with G*K*K output channels produces, viewed as
// (B, G, K, K, Ho, Wo). Every kernel accumulates in float (double for double) and
// writes each output element once; none uses atomics.
//
// The op moves ~4.5 FLOP per byte (fp32), so the designs aim at the memory floor: each
// element of x, w and grad_out read from DRAM once, with wide, fully used accesses
// (docs/reference.md, "Performance anchors"; benchmarks/results/*-static.md has the
// evidence per kernel).
// - nchw: a block owns one tile of output (or, for grad_x, input) pixels in each of 1, 2 or
//   4 (b, g) planes, the tile sized to the map (32x8, 16x8, 8x8: 7x7 and 14x14 maps keep most
//   threads busy). Each thread keeps its K*K kernel values (or sums) in registers across the
//   C/G channels of the group; the tile's input window is staged through shared memory, double
//   buffered: the next channel's loads are issued before the current channel's taps, and one
//   barrier per channel separates the two buffers.
// - nhwc: one thread per (pixel, group, 16-byte slice of the group's channels): every x, y,
//   grad access is one 128-bit load or store and a warp's request covers 512 contiguous bytes
//   when C/G = 16. A kernel value is loaded once and used for the 16 bytes' channels; the
//   kernel tensor moves between global and shared memory as the block's contiguous chunk of
//   (pixel, group) rows, 128 bits at a time. Other group widths and alignments take the
//   scalar "nhwc_scalar" kernels (one thread per (pixel, group), looping over its channels).

typedef long long i64;

struct half_t { unsigned short bits; };  // IEEE binary16, layout of torch.float16
struct bf16_t { unsigned short bits; };  // bfloat16, layout of torch.bfloat16

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

// The host emulation (tests/cuda_emu.h) supplies its own half conversions and counts every
// global access through the two trace hooks, which are empty on the device.
#ifndef REDNET_HOST_EMULATION
#define REDNET_TRACE_LOAD(p, bytes)
#define REDNET_TRACE_STORE(p, bytes)
__device__ __forceinline__ float half_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ unsigned short float_to_half(float v) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return h;
}
#endif

// Storage type <-> accumulator.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(half_t v) { return half_to_float(v.bits); }
__device__ __forceinline__ float to_acc(bf16_t v) { return __uint_as_float(((unsigned int)v.bits) << 16); }
__device__ __forceinline__ unsigned short bf16_bits(float v) {
  // Round to nearest even, as torch's float -> bfloat16 cast; NaN stays a quiet NaN.
  unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)(u >> 16);
}
template <typename T> __device__ __forceinline__ T from_acc(typename Acc<T>::type v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ half_t from_acc<half_t>(float v) { return half_t{float_to_half(v)}; }
template <> __device__ __forceinline__ bf16_t from_acc<bf16_t>(float v) { return bf16_t{bf16_bits(v)}; }

// Global memory: every access goes through these, so the emulation sees them all.
template <typename T> __device__ __forceinline__ typename Acc<T>::type load(const T* p) {
  REDNET_TRACE_LOAD(p, sizeof(T));
  return to_acc(*p);
}
template <typename T> __device__ __forceinline__ T load_raw(const T* p) {
  REDNET_TRACE_LOAD(p, sizeof(T));
  return *p;
}
template <typename T> __device__ __forceinline__ void store(T* p, typename Acc<T>::type v) {
  REDNET_TRACE_STORE(p, sizeof(T));
  *p = from_acc<T>(v);
}
template <typename T> __device__ __forceinline__ void store_raw(T* p, T v) {
  REDNET_TRACE_STORE(p, sizeof(T));
  *p = v;
}
// One 128-bit access; p is 16-byte aligned (the plan checks base pointers and strides).
template <typename T> __device__ __forceinline__ uint4 load16(const T* p) {
  REDNET_TRACE_LOAD(p, 16);
  return *reinterpret_cast<const uint4*>(p);
}
template <typename T> __device__ __forceinline__ void store16(T* p, uint4 v) {
  REDNET_TRACE_STORE(p, 16);
  *reinterpret_cast<uint4*>(p) = v;
}

// 16 bytes of T <-> V16<T>::N accumulators (8 bf16/fp16, 4 fp32, 2 fp64).
template <typename T> struct V16;
template <> struct V16<float> {
  static constexpr int N = 4;
  __device__ static __forceinline__ void unpack(uint4 u, float* v) {
    v[0] = __uint_as_float(u.x), v[1] = __uint_as_float(u.y), v[2] = __uint_as_float(u.z), v[3] = __uint_as_float(u.w);
  }
  __device__ static __forceinline__ uint4 pack(const float* v) {
    uint4 u;
    u.x = __float_as_uint(v[0]), u.y = __float_as_uint(v[1]), u.z = __float_as_uint(v[2]), u.w = __float_as_uint(v[3]);
    return u;
  }
};
template <> struct V16<double> {
  static constexpr int N = 2;
  __device__ static __forceinline__ void unpack(uint4 u, double* v) {
    v[0] = __hiloint2double((int)u.y, (int)u.x), v[1] = __hiloint2double((int)u.w, (int)u.z);
  }
  __device__ static __forceinline__ uint4 pack(const double* v) {
    uint4 u;
    u.x = (unsigned)__double2loint(v[0]), u.y = (unsigned)__double2hiint(v[0]);
    u.z = (unsigned)__double2loint(v[1]), u.w = (unsigned)__double2hiint(v[1]);
    return u;
  }
};
template <typename T> struct V16Half {  // two 16-bit values per 32-bit word, the first in the low half
  static constexpr int N = 8;
  __device__ static __forceinline__ void unpack(uint4 u, float* v) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      v[2 * k] = to_acc(T{(unsigned short)(w[k] & 0xffffu)});
      v[2 * k + 1] = to_acc(T{(unsigned short)(w[k] >> 16)});
    }
  }
  __device__ static __forceinline__ uint4 pack(const float* v) {
    unsigned w[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) w[k] = from_acc<T>(v[2 * k]).bits | ((unsigned)from_acc<T>(v[2 * k + 1]).bits << 16);
    uint4 u;
    u.x = w[0], u.y = w[1], u.z = w[2], u.w = w[3];
    return u;
  }
};
template <> struct V16<bf16_t> : V16Half<bf16_t> {};
template <> struct V16<half_t> : V16Half<half_t> {};

constexpr int THREADS = 256;  // every kernel's block size (_plan.THREADS)
constexpr unsigned FULL_MASK = 0xffffffffu;

__device__ __forceinline__ int floor_div(int a, int b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}
__host__ __device__ constexpr int cmax(int a, int b) { return a > b ? a : b; }
__host__ __device__ constexpr int cdiv(int a, int b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------
// NCHW. A block is `planes` (b, g) planes side by side, each a TW x TH tile of pixels at the
// same place, TW * TH * planes = THREADS; the plan picks the narrowest tile covering the map's
// width (_plan.NCHW_TILES): 7x7 maps take 8x8 tiles, four planes per block, 14x14 maps 16x8
// tiles, two planes, wider maps 32x8. Grid: blockIdx.x = plane_group * tiles + tile.

struct Tile { int tw, th; };
constexpr Tile NCHW_TILES[3] = {{32, 8}, {16, 8}, {8, 8}};  // (_plan.NCHW_TILES)
// Stage buffers larger than this (two of them: double buffering) fall back to reading global
// memory directly, which is correct for any window and only slower (_plan.NCHW_MAX_STAGE_BYTES).
constexpr int MAX_STAGE_BYTES = 32768;

// Window a tile reads. Forward and grad_kernel: the input rows/cols the tile's taps touch.
// grad_input (a gather over output pixels): rows of grad_y read by TH consecutive input rows,
// floor(a/S) - floor(b/S) <= (a-b)/S + 1, plus one zero row and column that every tap outside
// the map or off the stride grid reads instead of branching (see involution_bwd_input_nchw).
template <int K, int S, int D, bool GATHER> struct Window {
  __host__ __device__ static constexpr int rows(int th) {
    return GATHER ? (th - 1 + (K - 1) * D) / S + 3 : (th - 1) * S + (K - 1) * D + 1;
  }
  __host__ __device__ static constexpr int cols(int tw) {
    return GATHER ? (tw - 1 + (K - 1) * D) / S + 3 : (tw - 1) * S + (K - 1) * D + 1;
  }
  __host__ __device__ static constexpr int size(Tile t) { return rows(t.th) * cols(t.tw); }
  __host__ __device__ static constexpr int planes(Tile t) { return THREADS / (t.tw * t.th); }
  // One stage buffer: the largest over the tile shapes, all planes of a block.
  static constexpr int BUF = cmax(cmax(planes(NCHW_TILES[0]) * size(NCHW_TILES[0]),
                                       planes(NCHW_TILES[1]) * size(NCHW_TILES[1])),
                                  planes(NCHW_TILES[2]) * size(NCHW_TILES[2]));
  // Window elements one thread stages per channel.
  static constexpr int PER_THREAD = cmax(cmax(cdiv(size(NCHW_TILES[0]), NCHW_TILES[0].tw * NCHW_TILES[0].th),
                                              cdiv(size(NCHW_TILES[1]), NCHW_TILES[1].tw * NCHW_TILES[1].th)),
                                         cdiv(size(NCHW_TILES[2]), NCHW_TILES[2].tw * NCHW_TILES[2].th));
};

// A thread's share of staging one plane's window into shared memory: element e = r + k * nt of
// the rows x cols window at (r0, c0). The plane offsets are computed once per block, so a
// channel costs one predicated load and one shared store per element.
template <typename A, int PER_THREAD> struct Stager {
  int off[PER_THREAD];  // offset in the plane; -1: zero (padding, or the gather's zero row/column)
  A v[PER_THREAD];
  int r, nt, size;

  __device__ __forceinline__ void init(int r_, int nt_, int rows, int cols, int plane_rows, int plane_cols, int r0,
                                       int c0, bool zero_last) {
    r = r_, nt = nt_, size = rows * cols;
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
      const int e = r + k * nt, er = e / cols, ec = e % cols;
      const int pr = r0 + er, pc = c0 + ec;
      const bool inside = pr >= 0 && pr < plane_rows && pc >= 0 && pc < plane_cols &&
                          !(zero_last && (er == rows - 1 || ec == cols - 1));
      off[k] = (e < size && inside) ? pr * plane_cols + pc : -1;
    }
  }
  template <typename T> __device__ __forceinline__ void fetch(const T* plane, bool live) {
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) v[k] = (live && off[k] >= 0) ? load(plane + off[k]) : A(0);
  }
  __device__ __forceinline__ void commit(A* buf) const {
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k)
      if (r + k * nt < size) buf[r + k * nt] = v[k];
  }
};

// What each thread of an NCHW block is: its plane, tile and pixel.
struct NchwThread {
  int slot, r, np, ty, tx, i0, j0, g;
  long long plane, b;
  bool live;  // the plane exists (the last block of planes may be partly empty)

  __device__ __forceinline__ NchwThread(int tw, int th, int tiles_w, int tiles, int planes, int G) {
    np = tw * th;
    const int t = blockIdx.x % tiles;
    slot = threadIdx.x / np, r = threadIdx.x % np;
    plane = (long long)(blockIdx.x / tiles) * (THREADS / np) + slot;  // b * G + g
    live = plane < planes;
    g = (int)(plane % G), b = plane / G;
    ty = r / tw, tx = r % tw;
    i0 = (t / tiles_w) * th, j0 = (t % tiles_w) * tw;
  }
};

template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS, 2) involution_fwd_nchw(
    const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int tw, int th, int tiles_w, int tiles, int planes) {
  typedef typename Acc<T>::type A;
  typedef Window<K, S, D, false> Win;
  constexpr int KK = K * K;
  constexpr bool STAGED = 2 * Win::BUF * (int)sizeof(A) <= MAX_STAGE_BYTES;
  __shared__ A buf[STAGED ? 2 * Win::BUF : 1];

  const NchwThread th_(tw, th, tiles_w, tiles, planes, G);
  const int cg = C / G;
  const int i = th_.i0 + th_.ty, j = th_.j0 + th_.tx;
  const bool active = th_.live && i < Ho && j < Wo;
  const i64 hwo = (i64)Ho * Wo, hw = (i64)H * W;

  A k[STAGED ? KK : 1];  // w[b, g, :, :, i, j], reused for all C/G channels of the group
  const T* wp = w + th_.plane * KK * hwo + (i64)i * Wo + j;
  if constexpr (STAGED) {
#pragma unroll
    for (int q = 0; q < KK; ++q) k[q] = active ? load(wp + q * hwo) : A(0);
  }

  const T* xg = x + (th_.b * C + (i64)th_.g * cg) * hw;  // channel 0 of the group
  T* yp = y + (th_.b * C + (i64)th_.g * cg) * hwo + (i64)i * Wo + j;
  if constexpr (STAGED) {
    const int rows = Win::rows(th), cols = Win::cols(tw), size = rows * cols;
    Stager<A, Win::PER_THREAD> st;
    st.init(th_.r, th_.np, rows, cols, H, W, th_.i0 * S - pad, th_.j0 * S - pad, false);
    A* mine = buf + th_.slot * size;  // this plane's window in buffer 0; buffer 1 is Win::BUF further
    st.fetch(xg, th_.live);
    st.commit(mine);
    const int at = th_.ty * S * cols + th_.tx * S;
    for (int cc = 0; cc < cg; ++cc) {
      __syncthreads();  // channel cc is staged; nobody reads the other buffer any more
      const bool next = cc + 1 < cg;
      if (next) st.fetch(xg + (cc + 1) * hw, th_.live);  // in flight during the taps below
      const A* tile = mine + (cc & 1) * Win::BUF + at;
      if (active) {
        A acc = 0;
#pragma unroll
        for (int u = 0; u < K; ++u) {
#pragma unroll
          for (int v = 0; v < K; ++v) acc += k[u * K + v] * tile[u * D * cols + v * D];
        }
        store(yp + cc * hwo, acc);
      }
      if (next) st.commit(mine + ((cc + 1) & 1) * Win::BUF);
    }
  } else if (active) {  // windows too large to stage: a fallback, direct loads, the row loop rolled
    for (int cc = 0; cc < cg; ++cc) {
      const T* xp = xg + cc * hw;
      A acc = 0;
#pragma unroll 1
      for (int u = 0; u < K; ++u) {
        const int yy = i * S - pad + u * D;
#pragma unroll
        for (int v = 0; v < K; ++v) {
          const int xx = j * S - pad + v * D;
          if (yy >= 0 && yy < H && xx >= 0 && xx < W) acc += load(wp + (u * K + v) * hwo) * load(xp + (i64)yy * W + xx);
        }
      }
      store(yp + cc * hwo, acc);
    }
  }
}

// grad_w[b, g, u, v, i, j] = sum_{c in g} grad_y[b, c, i, j] * x[b, c, i*S - pad + u*D, j*S - pad + v*D]:
// the forward's tile walk with the K*K sums in registers instead of the kernel. The grad_y
// value of the next channel is loaded with that channel's window, a channel ahead of its use.
template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS, 2) involution_bwd_kernel_nchw(
    const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gw,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int tw, int th, int tiles_w, int tiles, int planes) {
  typedef typename Acc<T>::type A;
  typedef Window<K, S, D, false> Win;
  constexpr int KK = K * K;
  constexpr bool STAGED = 2 * Win::BUF * (int)sizeof(A) <= MAX_STAGE_BYTES;
  __shared__ A buf[STAGED ? 2 * Win::BUF : 1];

  const NchwThread th_(tw, th, tiles_w, tiles, planes, G);
  const int cg = C / G;
  const int i = th_.i0 + th_.ty, j = th_.j0 + th_.tx;
  const bool active = th_.live && i < Ho && j < Wo;
  const i64 hwo = (i64)Ho * Wo, hw = (i64)H * W;

  A acc[KK];
#pragma unroll
  for (int q = 0; q < KK; ++q) acc[q] = A(0);

  const T* xg = x + (th_.b * C + (i64)th_.g * cg) * hw;
  const T* gp = gy + (th_.b * C + (i64)th_.g * cg) * hwo + (i64)i * Wo + j;
  if constexpr (STAGED) {
    const int rows = Win::rows(th), cols = Win::cols(tw), size = rows * cols;
    Stager<A, Win::PER_THREAD> st;
    st.init(th_.r, th_.np, rows, cols, H, W, th_.i0 * S - pad, th_.j0 * S - pad, false);
    A* mine = buf + th_.slot * size;
    st.fetch(xg, th_.live);
    st.commit(mine);
    A gnext = active ? load(gp) : A(0);
    const int at = th_.ty * S * cols + th_.tx * S;
    for (int cc = 0; cc < cg; ++cc) {
      __syncthreads();
      const bool next = cc + 1 < cg;
      const A gv = gnext;
      if (next) {
        st.fetch(xg + (cc + 1) * hw, th_.live);
        if (active) gnext = load(gp + (cc + 1) * hwo);
      }
      const A* tile = mine + (cc & 1) * Win::BUF + at;
      if (active) {
#pragma unroll
        for (int u = 0; u < K; ++u) {
#pragma unroll
          for (int v = 0; v < K; ++v) acc[u * K + v] += gv * tile[u * D * cols + v * D];
        }
      }
      if (next) st.commit(mine + ((cc + 1) & 1) * Win::BUF);
    }
  } else if (active) {  // windows too large to stage: a fallback, direct loads, the row loop rolled
    for (int cc = 0; cc < cg; ++cc) {
      const T* xp = xg + cc * hw;
      const A gv = load(gp + cc * hwo);
#pragma unroll 1
      for (int u = 0; u < K; ++u) {
        const int yy = i * S - pad + u * D;
#pragma unroll
        for (int v = 0; v < K; ++v) {
          const int xx = j * S - pad + v * D;
          if (yy >= 0 && yy < H && xx >= 0 && xx < W) acc[u * K + v] += gv * load(xp + (i64)yy * W + xx);
        }
      }
    }
  }
  if (active) {
    T* out = gw + th_.plane * KK * hwo + (i64)i * Wo + j;
#pragma unroll
    for (int q = 0; q < KK; ++q) store(out + q * hwo, acc[q]);
  }
}

// grad_x[b, c, yy, xx] = sum over the taps (u, v) and output pixels (i, j) with
// i*S - pad + u*D = yy and j*S - pad + v*D = xx of w[b, g, u, v, i, j] * grad_y[b, c, i, j].
// A gather over input pixels: each grad_x element is written once, no atomics. The block's
// tiles are of input pixels; the grad_y window they read is staged per channel. A tap whose
// output row (column) is outside the map or off the stride grid reads the window's zero row
// (column) with a zero kernel value, so the tap loop has no branches and a NaN elsewhere in
// grad_y cannot leak into a sum it does not belong to.
template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS, 2) involution_bwd_input_nchw(
    const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int tw, int th, int tiles_w, int tiles, int planes) {
  typedef typename Acc<T>::type A;
  typedef Window<K, S, D, true> Win;
  constexpr int KK = K * K;
  constexpr bool STAGED = 2 * Win::BUF * (int)sizeof(A) <= MAX_STAGE_BYTES;
  __shared__ A buf[STAGED ? 2 * Win::BUF : 1];

  const NchwThread th_(tw, th, tiles_w, tiles, planes, G);
  const int cg = C / G;
  const int yy = th_.i0 + th_.ty, xx = th_.j0 + th_.tx;
  const bool active = th_.live && yy < H && xx < W;
  const i64 hwo = (i64)Ho * Wo, hw = (i64)H * W;
  const int rows = Win::rows(th), cols = Win::cols(tw);
  const int gi0 = floor_div(th_.i0 + pad - (K - 1) * D, S);  // first grad_y row of the window
  const int gj0 = floor_div(th_.j0 + pad - (K - 1) * D, S);

  // Output row read by tap u: i*S = yy + pad - u*D, a multiple of S in [0, Ho); else the zero row.
  int iu[K], jv[K], ru[K], cv[K];
#pragma unroll
  for (int u = 0; u < K; ++u) {
    const int a = yy + pad - u * D, c = xx + pad - u * D;
    iu[u] = (active && a >= 0 && a % S == 0 && a / S < Ho) ? a / S : -1;
    jv[u] = (active && c >= 0 && c % S == 0 && c / S < Wo) ? c / S : -1;
    ru[u] = (iu[u] >= 0 ? iu[u] - gi0 : rows - 1) * cols;
    cv[u] = jv[u] >= 0 ? jv[u] - gj0 : cols - 1;
  }
  A k[STAGED ? KK : 1];  // the kernel values that read this pixel, reused for all C/G channels
  const T* wg = w + th_.plane * KK * hwo;
  if constexpr (STAGED) {
#pragma unroll
    for (int u = 0; u < K; ++u) {
#pragma unroll
      for (int v = 0; v < K; ++v) {
        k[u * K + v] = (iu[u] >= 0 && jv[v] >= 0) ? load(wg + (u * K + v) * hwo + (i64)iu[u] * Wo + jv[v]) : A(0);
      }
    }
  }

  const T* gg = gy + (th_.b * C + (i64)th_.g * cg) * hwo;
  T* xp = gx + (th_.b * C + (i64)th_.g * cg) * hw + (i64)yy * W + xx;
  if constexpr (STAGED) {
    Stager<A, Win::PER_THREAD> st;
    st.init(th_.r, th_.np, rows, cols, Ho, Wo, gi0, gj0, true);
    A* mine = buf + th_.slot * rows * cols;
    st.fetch(gg, th_.live);
    st.commit(mine);
    for (int cc = 0; cc < cg; ++cc) {
      __syncthreads();
      const bool next = cc + 1 < cg;
      if (next) st.fetch(gg + (cc + 1) * hwo, th_.live);
      const A* tile = mine + (cc & 1) * Win::BUF;
      if (active) {
        A acc = 0;
#pragma unroll
        for (int u = 0; u < K; ++u) {
#pragma unroll
          for (int v = 0; v < K; ++v) acc += k[u * K + v] * tile[ru[u] + cv[v]];
        }
        store(xp + cc * hw, acc);
      }
      if (next) st.commit(mine + ((cc + 1) & 1) * Win::BUF);
    }
  } else if (active) {  // windows too large to stage: a fallback, direct loads, the row loop rolled
    for (int cc = 0; cc < cg; ++cc) {
      const T* gp = gg + cc * hwo;
      A acc = 0;
#pragma unroll 1
      for (int u = 0; u < K; ++u) {
#pragma unroll
        for (int v = 0; v < K; ++v) {
          if (iu[u] >= 0 && jv[v] >= 0) {
            const i64 at = (i64)iu[u] * Wo + jv[v];
            acc += load(wg + (u * K + v) * hwo + at) * load(gp + at);
          }
        }
      }
      store(xp + cc * hw, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------
// NHWC, vector path (the plan takes it when C/G * sizeof(T) is 16 bytes times a power of two
// <= 32, C/G >= 16, K <= NHWC_MAX_STAGED_K and every pointer is 16-byte aligned).
//
// A block is a patch of PATCH_W x ph pixels of one image times gb groups; each (pixel, group)
// item has tpi = C/G / V16<T>::N threads, each owning 16 bytes of the group's channels, so every
// x, y and grad access is one 128-bit load or store. Lanes run slice, then group, then pixel
// along the patch row: a warp's request is the gb groups' 32 * gb contiguous bytes at each of
// 32 / (tpi * gb) neighbouring pixels, every fetched sector fully used. The patch (8x8 pixels
// for bf16/fp16 with two groups, or fp32) shares its K x K window halo between its pixels, so
// a block fetches (8 + K - 1)^2 / 8^2 of its pixels' x rather than a strip's K * (n + K - 1) / n.
// The kernel rows of the block (gb * K*K contiguous values per pixel in the (B, Ho, Wo, G, K*K)
// storage) move between global and shared memory a warp per pixel, 32 bits per lane when the
// rows are 4-byte aligned: each value is loaded once and used for the N channels of 16 bytes.
// fwd and bwd_kernel ask for four and six blocks per SM (at most 64 and 40 registers): left to
// itself, ptxas picks 32 registers for some instantiations and spills.

constexpr int NHWC_MAX_STAGED_K = 11;  // (_plan.NHWC_MAX_STAGED_K)
constexpr int PATCH_W = 8;  // (_plan.NHWC_PATCH_W)
// A block's kernel rows: at most THREADS * K*K bytes, which C/G >= 16 guarantees
// (pixels * gb * K*K * sizeof(T) = THREADS / tpi * K*K * sizeof(T), tpi >= sizeof(T)).
template <int K> struct Chunk {
  static constexpr int VECS = K <= NHWC_MAX_STAGED_K ? THREADS * K * K / 16 : 1;
};

// What each thread of an NHWC vector block is: its slice, group and pixel.
struct Patch {
  int slice, gl, px, pr, pc;  // 16-byte slice, group in the block, pixel (index, row, column) in the patch
  int npx, g0, r0, c0;
  long long b;

  __device__ __forceinline__ Patch(int tpi, int gb, int tiles_w, int tiles, int gblocks) {
    const int per_px = tpi * gb;  // lanes per pixel
    npx = THREADS / per_px;
    slice = threadIdx.x % tpi, gl = (threadIdx.x / tpi) % gb, px = threadIdx.x / per_px;
    pr = px / PATCH_W, pc = px % PATCH_W;
    const int t = blockIdx.x % tiles, rest = blockIdx.x / tiles;
    g0 = (rest % gblocks) * gb, b = rest / gblocks;
    r0 = (t / tiles_w) * (npx / PATCH_W), c0 = (t % tiles_w) * PATCH_W;
  }
};

// Copies the block's kernel rows between global memory (the (B, rows, cols, G, K*K) tensor at
// base; GT is const T when reading it) and shared memory ([pixel][gb * K*K]): one warp per patch
// pixel, lanes along its row, 32 bits a lane when the rows are 4-byte aligned.
template <bool TO_SHARED, typename T, typename GT>
__device__ __forceinline__ void kernel_rows(T* rows_sm, GT* base, const Patch& pt, int rows, int cols, int G, int gb,
                                            int kk) {
  const int n = gb * kk;  // values per pixel
  const bool words = (n * (int)sizeof(T)) % 4 == 0 && (G * kk * (int)sizeof(T)) % 4 == 0;
  const int lane = threadIdx.x % 32;
  for (int px = threadIdx.x / 32; px < pt.npx; px += THREADS / 32) {
    const int r = pt.r0 + px / PATCH_W, c = pt.c0 + px % PATCH_W;
    if (r >= rows || c >= cols) continue;
    GT* gl = base + ((pt.b * rows + r) * cols + c) * G * kk + (i64)pt.g0 * kk;
    T* sm = rows_sm + px * n;
    if constexpr (TO_SHARED) {
      if (words) {
        for (int e = lane; e < n * (int)sizeof(T) / 4; e += 32) {
          reinterpret_cast<unsigned*>(sm)[e] = load_raw(reinterpret_cast<const unsigned*>(gl) + e);
        }
      } else {
        for (int e = lane; e < n; e += 32) sm[e] = load_raw(gl + e);
      }
    } else {
      if (words) {
        for (int e = lane; e < n * (int)sizeof(T) / 4; e += 32) {
          store_raw(reinterpret_cast<unsigned*>(gl) + e, reinterpret_cast<const unsigned*>(sm)[e]);
        }
      } else {
        for (int e = lane; e < n; e += 32) store_raw(gl + e, sm[e]);
      }
    }
  }
}

template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS, 4) involution_fwd_nhwc(
    const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int tpi, int gb, int tiles_w, int tiles, int gblocks) {
  typedef typename Acc<T>::type A;
  typedef V16<T> V;
  constexpr int KK = K * K, N = V::N;
  __shared__ uint4 chunk[Chunk<K>::VECS];  // the block's kernel rows, [pixel][gb * K*K]
  T* rows_sm = reinterpret_cast<T*>(chunk);

  const Patch pt(tpi, gb, tiles_w, tiles, gblocks);
  kernel_rows<true>(rows_sm, w, pt, Ho, Wo, G, gb, KK);
  __syncthreads();
  const int i = pt.r0 + pt.pr, j = pt.c0 + pt.pc;
  if (i >= Ho || j >= Wo) return;
  const int ch = (pt.g0 + pt.gl) * (C / G) + pt.slice * N;  // first channel of this thread's 16 bytes
  const T* xb = x + pt.b * H * W * C + ch;
  const T* kr = rows_sm + (pt.px * gb + pt.gl) * KK;

  A acc[N];
#pragma unroll
  for (int e = 0; e < N; ++e) acc[e] = A(0);
#pragma unroll
  for (int u = 0; u < K; ++u) {
    const int yy = i * S - pad + u * D;
#pragma unroll
    for (int v = 0; v < K; ++v) {
      const int xx = j * S - pad + v * D;
      if (yy >= 0 && yy < H && xx >= 0 && xx < W) {
        const A kv = to_acc(kr[u * K + v]);  // one kernel value for the N channels
        A xv[N];
        V::unpack(load16(xb + ((i64)yy * W + xx) * C), xv);
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] += kv * xv[e];
      }
    }
  }
  store16(y + ((pt.b * Ho + i) * Wo + j) * C + ch, V::pack(acc));
}

// grad_w[pixel, g, u, v] = sum over the group's channels of grad_y[pixel] * x[tap pixel]: each
// thread's 16-byte dot product, summed over the item's tpi threads by xor shuffles (consecutive
// lanes of one warp), kept in shared memory and stored as the block's kernel rows.
template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS, 6) involution_bwd_kernel_nhwc(
    const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gw,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int tpi, int gb, int tiles_w, int tiles, int gblocks) {
  typedef typename Acc<T>::type A;
  typedef V16<T> V;
  constexpr int KK = K * K, N = V::N;
  __shared__ uint4 chunk[Chunk<K>::VECS];
  T* rows_sm = reinterpret_cast<T*>(chunk);

  const Patch pt(tpi, gb, tiles_w, tiles, gblocks);
  const int i = pt.r0 + pt.pr, j = pt.c0 + pt.pc;
  const bool live = i < Ho && j < Wo;  // every lane takes part in the shuffles and the barrier
  const int ch = (pt.g0 + pt.gl) * (C / G) + pt.slice * N;
  const T* xb = x + pt.b * H * W * C + ch;
  T* kr = rows_sm + (pt.px * gb + pt.gl) * KK;

  A gv[N];
  if (live) {
    V::unpack(load16(gy + ((pt.b * Ho + i) * Wo + j) * C + ch), gv);
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) gv[e] = A(0);
  }
#pragma unroll
  for (int u = 0; u < K; ++u) {
    const int yy = i * S - pad + u * D;
#pragma unroll
    for (int v = 0; v < K; ++v) {
      const int xx = j * S - pad + v * D;
      A part = 0;
      if (live && yy >= 0 && yy < H && xx >= 0 && xx < W) {
        A xv[N];
        V::unpack(load16(xb + ((i64)yy * W + xx) * C), xv);
#pragma unroll
        for (int e = 0; e < N; ++e) part += gv[e] * xv[e];
      }
      for (int m = tpi >> 1; m > 0; m >>= 1) part += __shfl_xor_sync(FULL_MASK, part, m);
      if (pt.slice == ((u * K + v) & (tpi - 1))) kr[u * K + v] = from_acc<T>(part);  // spread the shared stores
    }
  }
  __syncthreads();
  kernel_rows<false>(rows_sm, gw, pt, Ho, Wo, G, gb, KK);
}

// grad_x: the gather over output pixels, per input-pixel item, the patch over input pixels.
// Each tap's kernel value belongs to another pixel's row, so it is one scalar load (shared by
// the item's tpi threads); grad_y is one 128-bit load per tap.
template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS) involution_bwd_input_nhwc(
    const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int tpi, int gb, int tiles_w, int tiles, int gblocks) {
  typedef typename Acc<T>::type A;
  typedef V16<T> V;
  constexpr int KK = K * K, N = V::N;

  const Patch pt(tpi, gb, tiles_w, tiles, gblocks);
  const int yy = pt.r0 + pt.pr, xx = pt.c0 + pt.pc;
  if (yy >= H || xx >= W) return;
  const int g = pt.g0 + pt.gl;
  const int ch = g * (C / G) + pt.slice * N;
  A acc[N];
#pragma unroll
  for (int e = 0; e < N; ++e) acc[e] = A(0);
#pragma unroll
  for (int u = 0; u < K; ++u) {
    const int a = yy + pad - u * D;
    const bool row = a >= 0 && a % S == 0 && a / S < Ho;
#pragma unroll
    for (int v = 0; v < K; ++v) {
      const int c = xx + pad - v * D;
      if (row && c >= 0 && c % S == 0 && c / S < Wo) {
        const i64 pix = (pt.b * Ho + a / S) * Wo + c / S;
        const A kv = load(w + (pix * G + g) * KK + u * K + v);
        A gv[N];
        V::unpack(load16(gy + pix * C + ch), gv);
#pragma unroll
        for (int e = 0; e < N; ++e) acc[e] += kv * gv[e];
      }
    }
  }
  store16(gx + ((pt.b * H + yy) * W + xx) * C + ch, V::pack(acc));
}

// ---------------------------------------------------------------------------------------
// NHWC, scalar path: any group width, alignment and K. One thread per item (b, pixel, g),
// grid-stride; the item index is decomposed once per item and the thread loops over the
// group's channels (reusing the kernel row, which stays in L1) and the taps. A fallback: the
// row loops stay rolled, which keeps registers and compile time small for large windows.

struct Item64 {
  long long b, p;  // p: the pixel's index in (B, rows, cols)
  int g, c, r;
  __device__ __forceinline__ Item64(long long n, int G, int cols, int rows) {
    g = (int)(n % G);
    p = n / G;
    c = (int)(p % cols);
    const long long q = p / cols;
    r = (int)(q % rows);
    b = q / rows;
  }
};

template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS) involution_fwd_nhwc_scalar(
    const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
    int C, int H, int W, int G, int Ho, int Wo, int pad, i64 items) {
  typedef typename Acc<T>::type A;
  constexpr int KK = K * K;
  const int cg = C / G;
  for (i64 n = (i64)blockIdx.x * THREADS + threadIdx.x; n < items; n += (i64)gridDim.x * THREADS) {
    const Item64 it(n, G, Wo, Ho);
    const T* kr = w + n * KK;
    for (int cc = 0; cc < cg; ++cc) {
      const int ch = it.g * cg + cc;
      A acc = 0;
#pragma unroll 1
      for (int u = 0; u < K; ++u) {
        const int yy = it.r * S - pad + u * D;
#pragma unroll
        for (int v = 0; v < K; ++v) {
          const int xx = it.c * S - pad + v * D;
          if (yy >= 0 && yy < H && xx >= 0 && xx < W) {
            acc += load(kr + u * K + v) * load(x + ((it.b * H + yy) * W + xx) * C + ch);
          }
        }
      }
      store(y + it.p * C + ch, acc);
    }
  }
}

template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS) involution_bwd_kernel_nhwc_scalar(
    const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gw,
    int C, int H, int W, int G, int Ho, int Wo, int pad, i64 items) {
  typedef typename Acc<T>::type A;
  constexpr int KK = K * K;
  const int cg = C / G;
  for (i64 n = (i64)blockIdx.x * THREADS + threadIdx.x; n < items; n += (i64)gridDim.x * THREADS) {
    const Item64 it(n, G, Wo, Ho);
    const T* gp = gy + it.p * C + it.g * cg;
#pragma unroll 1
    for (int u = 0; u < K; ++u) {
      const int yy = it.r * S - pad + u * D;
#pragma unroll
      for (int v = 0; v < K; ++v) {
        const int xx = it.c * S - pad + v * D;
        A acc = 0;
        if (yy >= 0 && yy < H && xx >= 0 && xx < W) {
          const T* xp = x + ((it.b * H + yy) * W + xx) * C + it.g * cg;
          for (int cc = 0; cc < cg; ++cc) acc += load(gp + cc) * load(xp + cc);
        }
        store(gw + n * KK + u * K + v, acc);
      }
    }
  }
}

template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS) involution_bwd_input_nhwc_scalar(
    const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
    int C, int H, int W, int G, int Ho, int Wo, int pad, i64 items) {
  typedef typename Acc<T>::type A;
  constexpr int KK = K * K;
  const int cg = C / G;
  for (i64 n = (i64)blockIdx.x * THREADS + threadIdx.x; n < items; n += (i64)gridDim.x * THREADS) {
    const Item64 it(n, G, W, H);
    for (int cc = 0; cc < cg; ++cc) {
      const int ch = it.g * cg + cc;
      A acc = 0;
#pragma unroll 1
      for (int u = 0; u < K; ++u) {
        const int a = it.r + pad - u * D;
        if (a < 0 || a % S != 0 || a / S >= Ho) continue;
#pragma unroll
        for (int v = 0; v < K; ++v) {
          const int c = it.c + pad - v * D;
          if (c < 0 || c % S != 0 || c / S >= Wo) continue;
          const i64 pix = (it.b * Ho + a / S) * Wo + c / S;
          acc += load(w + (pix * G + it.g) * KK + u * K + v) * load(gy + pix * C + ch);
        }
      }
      store(gx + it.p * C + ch, acc);
    }
  }
}
