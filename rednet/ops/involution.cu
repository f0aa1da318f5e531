// Involution kernels: forward, gradient w.r.t. the input, gradient w.r.t. the kernel.
//
//   y[b, c, i, j] = sum_{u,v < K} w[b, g(c), u, v, i, j] * x[b, c, i*S - pad + u*D, j*S - pad + v*D]
//
// Compiled at run time by NVRTC through cupy.RawModule (rednet/ops/_cupy.py), one module
// per (dtype, K, S, D) and device, and in CI by nvcc and NVRTC without a GPU
// (tests/ops/test_kernels.py), which also runs it on the host (rednet/analysis/cuda_emu.h). The file is
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
// - nhwc: a block is 8 16-byte channel slices times an 8x8 pixel patch per slice, each thread
//   two pixels side by side of one slice, so every x, y and grad access is a 128-bit load or
//   store. Everything the taps read is staged in shared memory first (the zero-padded window of
//   x or grad_y, and the block's kernel rows), so the unrolled taps have no bounds tests and
//   compile-time shared-memory offsets, and a window column unpacked once serves the taps of both
//   pixels. The vector kernels are compiled for RedNet's 16 channels per group (threads per group
//   = sizeof(T)); other group widths and alignments take the scalar "nhwc_scalar" kernels (one
//   thread per (pixel, group), looping over its channels).

typedef long long i64;

struct half_t { unsigned short bits; };  // IEEE binary16, layout of torch.float16
struct bf16_t { unsigned short bits; };  // bfloat16, layout of torch.bfloat16

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

// The host emulation (rednet/analysis/cuda_emu.h) supplies its own half conversions, asynchronous copies
// and dynamic shared memory, and checks every global and shared vector access through the trace
// hooks, which are empty on the device.
#ifndef REDNET_HOST_EMULATION
#define REDNET_TRACE_LOAD(p, bytes)
#define REDNET_TRACE_STORE(p, bytes)
#define REDNET_TRACE_SHARED(p, bytes)
#define REDNET_DYNAMIC_SHARED(name) extern __shared__ uint4 name[]
__device__ __forceinline__ unsigned dynamic_shared_bytes() {
  unsigned n;
  asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
  return n;
}
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
// Global -> shared copies that complete asynchronously on sm_80+ (cp.async; before, a load and a
// store); async_wait() waits for the calling thread's copies, a barrier after it publishes them.
// A copy16 that is not valid writes zeros and reads nothing (src is any valid address).
__device__ __forceinline__ void copy16_async(uint4* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)),
               "l"(src), "r"(valid ? 16 : 0) : "memory");
#else
  uint4 v;
  v.x = v.y = v.z = v.w = 0u;
  if (valid) v = *reinterpret_cast<const uint4*>(src);
  *dst = v;
#endif
}
__device__ __forceinline__ void copy4_async(unsigned* dst, const unsigned* src) {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"((unsigned)__cvta_generic_to_shared(dst)), "l"(src)
               : "memory");
#else
  *dst = *src;
#endif
}
__device__ __forceinline__ void async_wait() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
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
template <> __device__ __forceinline__ bf16_t from_acc<bf16_t>(float v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(REDNET_HOST_EMULATION)
  unsigned short h;  // one instruction, rounding as bf16_bits
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
  return bf16_t{h};
#else
  return bf16_t{bf16_bits(v)};
#endif
}
// Two values rounded to T, the first in the low half of the word.
template <typename T> __device__ __forceinline__ unsigned pack2(float lo, float hi) {
  return from_acc<T>(lo).bits | ((unsigned)from_acc<T>(hi).bits << 16);
}
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(REDNET_HOST_EMULATION)
template <> __device__ __forceinline__ unsigned pack2<bf16_t>(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
template <> __device__ __forceinline__ unsigned pack2<half_t>(float lo, float hi) {
  unsigned r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
#endif

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
// One 128-bit shared-memory load; p is 16-byte aligned (the emulation checks).
__device__ __forceinline__ uint4 lds16(const uint4* p) {
  REDNET_TRACE_SHARED(p, 16);
  return *p;
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
    uint4 u;
    u.x = pack2<T>(v[0], v[1]), u.y = pack2<T>(v[2], v[3]), u.z = pack2<T>(v[4], v[5]), u.w = pack2<T>(v[6], v[7]);
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
// floor(a/S) - floor(b/S) <= (a-b)/S + 1, plus one zero row and column that, for strides above
// 2, every tap outside the map or off the stride grid reads instead of branching.
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
// channel costs one predicated load and one shared store per element. The prefetch keeps the
// values as loaded and converts them at commit, after the current channel's taps: converting
// right after the load would stall the warp on memory there, every channel.
template <typename T, typename A, int PER_THREAD> struct Stager {
  int off[PER_THREAD];  // offset in the plane; -1: zero (padding, or the gather's zero row/column)
  T v[PER_THREAD];
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
  __device__ __forceinline__ void fetch(const T* plane, bool live) {
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k) {
      v[k] = T{};
      if (live && off[k] >= 0) v[k] = load_raw(plane + off[k]);
    }
  }
  __device__ __forceinline__ void commit(A* buf) const {
#pragma unroll
    for (int k = 0; k < PER_THREAD; ++k)
      if (r + k * nt < size) buf[r + k * nt] = to_acc(v[k]);
  }
};

// The channel loop of the staged NCHW kernels. Channel cc's window is in stage buffer cc & 1, at
// `(cc & 1) * BUF` in buf; taps(cc, that offset) runs while the next channel's loads are in flight,
// and one barrier per channel separates the two buffers.
template <int BUF, typename St, typename T, typename A, typename F>
__device__ __forceinline__ void channel_loop(St& st, A* mine, const T* first, i64 step, int cg, bool live, F&& taps) {
  st.fetch(first, live);
  st.commit(mine);
  const T* plane = first;
  for (int cc = 0; cc < cg; ++cc) {
    __syncthreads();  // channel cc is staged; nobody reads the other buffer any more
    const bool next = cc + 1 < cg;
    plane += step;
    if (next) st.fetch(plane, live);
    taps(cc, (cc & 1) * BUF);
    if (next) st.commit(mine + ((cc + 1) & 1) * BUF);
  }
}

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
  // The block's pixels regrouped so that the 32 threads of a warp share the parity of their row
  // and column (stride-2 grad_input, where the parity decides the taps): warp w takes parity
  // class w % 4, (row, col) % 2 = (class / 2, class % 2), pixels across the block's planes.
  __device__ __forceinline__ NchwThread by_parity(int tw, int planes, int G) const {
    NchwThread p = *this;
    const int cls = (threadIdx.x / 32) % 4, ci = (threadIdx.x / 128) * 32 + threadIdx.x % 32;
    const int nq = np / 4, q = ci % nq;  // a class's pixels in one plane's tile; this one's index
    p.slot = ci / nq;
    p.plane = plane - slot + p.slot;
    p.live = p.plane < planes;
    p.g = (int)(p.plane % G), p.b = p.plane / G;
    p.ty = cls / 2 + 2 * (q / (tw / 2)), p.tx = cls % 2 + 2 * (q % (tw / 2));
    p.r = p.ty * tw + p.tx;
    return p;
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
    Stager<T, A, Win::PER_THREAD> st;
    st.init(th_.r, th_.np, rows, cols, H, W, th_.i0 * S - pad, th_.j0 * S - pad, false);
    A* mine = buf + th_.slot * size;  // this plane's window in buffer 0; buffer 1 is Win::BUF further
    const int at = th_.slot * size + th_.ty * S * cols + th_.tx * S;
    channel_loop<Win::BUF>(st, mine, xg, hw, cg, th_.live, [&](int cc, int off) {
      if (active) {
        const A* tile = buf + off + at;
        A acc = 0;
#pragma unroll
        for (int u = 0; u < K; ++u) {
#pragma unroll
          for (int v = 0; v < K; ++v) acc += k[u * K + v] * tile[u * D * cols + v * D];
        }
        store(yp + cc * hwo, acc);
      }
    });
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
// value of the next channel is loaded with that channel's window, a channel ahead of its use,
// and converted when it is used.
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
    Stager<T, A, Win::PER_THREAD> st;
    st.init(th_.r, th_.np, rows, cols, H, W, th_.i0 * S - pad, th_.j0 * S - pad, false);
    A* mine = buf + th_.slot * size;
    const int at = th_.slot * size + th_.ty * S * cols + th_.tx * S;
    T gnext = active ? load_raw(gp) : T{};
    channel_loop<Win::BUF>(st, mine, xg, hw, cg, th_.live, [&](int cc, int off) {
      const A gv = to_acc(gnext);
      if (active && cc + 1 < cg) gnext = load_raw(gp + (cc + 1) * hwo);
      if (active) {
        const A* tile = buf + off + at;
#pragma unroll
        for (int u = 0; u < K; ++u) {
#pragma unroll
          for (int v = 0; v < K; ++v) acc[u * K + v] += gv * tile[u * D * cols + v * D];
        }
      }
    });
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

template <int V> struct IntC { static constexpr int value = V; };

// Calls f(IntC<ER>, IntC<EC>) with (ER, EC) = (er, ec) in {0, 1}^2, the stride-2 parities.
template <typename F> __device__ __forceinline__ void parity_dispatch(int er, int ec, F&& f) {
  if (er == 0) {
    if (ec == 0) {
      f(IntC<0>{}, IntC<0>{});
    } else {
      f(IntC<0>{}, IntC<1>{});
    }
  } else if (ec == 0) {
    f(IntC<1>{}, IntC<0>{});
  } else {
    f(IntC<1>{}, IntC<1>{});
  }
}

// Stride 2: the taps u of an input row with (row + pad) % 2 = E are those with (E - u*D) even; they
// read grad_y row (row + pad - E) / 2 + (E - u*D) / 2.
template <int K, int D> struct Parity {
  __host__ __device__ static constexpr bool valid(int e, int u) { return ((e - u * D) % 2 + 2) % 2 == 0; }
  __host__ __device__ static constexpr int taps(int e) {
    int n = 0;
    for (int u = 0; u < K; ++u) n += valid(e, u);
    return n;
  }
  static constexpr int MAX = cmax(taps(0), taps(1)) * cmax(taps(0), taps(1));  // taps of a pixel, at most
};

// grad_x[b, c, yy, xx] = sum over the taps (u, v) and output pixels (i, j) with
// i*S - pad + u*D = yy and j*S - pad + v*D = xx of w[b, g, u, v, i, j] * grad_y[b, c, i, j].
// A gather over input pixels: each grad_x element is written once, no atomics. The block's
// tiles are of input pixels; the grad_y window they read is staged per channel, zero outside the
// map. Stride 1: every tap of a pixel is on the grid, at a compile-time offset from its pixel.
// Stride 2: a quarter of the taps are, which ones depending on the parity of the pixel's row and
// column, so the block's pixels are regrouped (NchwThread::by_parity) into warps of one parity
// class and each class runs only its taps: no lane idles through another's. Larger strides: every
// tap runs, and one whose output row (column) is off the grid or outside the map reads the
// window's zero row (column) with a zero kernel value, so the tap loop has no branches and a NaN
// elsewhere in grad_y cannot leak into a sum it does not belong to.
template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS, 2) involution_bwd_input_nchw(
    const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int tw, int th, int tiles_w, int tiles, int planes) {
  typedef typename Acc<T>::type A;
  typedef Window<K, S, D, true> Win;
  constexpr int KK = K * K;
  constexpr bool STAGED = 2 * Win::BUF * (int)sizeof(A) <= MAX_STAGE_BYTES;
  __shared__ A buf[STAGED ? 2 * Win::BUF : 1];

  const NchwThread st(tw, th, tiles_w, tiles, planes, G);  // the share of the window this thread stages
  const NchwThread px = (S == 2 && STAGED) ? st.by_parity(tw, planes, G) : st;  // the pixel it computes
  const int cg = C / G;
  const int yy = px.i0 + px.ty, xx = px.j0 + px.tx;
  const bool active = px.live && yy < H && xx < W;
  const i64 hwo = (i64)Ho * Wo, hw = (i64)H * W;
  const int rows = Win::rows(th), cols = Win::cols(tw);
  const int gi0 = floor_div(st.i0 + pad - (K - 1) * D, S);  // first grad_y row of the window
  const int gj0 = floor_div(st.j0 + pad - (K - 1) * D, S);
  const T* wg = w + px.plane * KK * hwo;
  const T* gg = gy + (st.b * C + (i64)st.g * cg) * hwo;
  T* xp = gx + (px.b * C + (i64)px.g * cg) * hw + (i64)yy * W + xx;
  const int at = px.slot * rows * cols;  // the computed pixel's window in buffer 0

  if constexpr (STAGED && S == 1) {
    A k[KK];  // the kernel values that read this pixel, reused for all C/G channels
#pragma unroll
    for (int u = 0; u < K; ++u) {
#pragma unroll
      for (int v = 0; v < K; ++v) {
        const int a = yy + pad - u * D, c = xx + pad - v * D;
        k[u * K + v] = active && (unsigned)a < (unsigned)Ho && (unsigned)c < (unsigned)Wo
                           ? load(wg + (u * K + v) * hwo + (i64)a * Wo + c) : A(0);
      }
    }
    Stager<T, A, Win::PER_THREAD> sg;
    sg.init(st.r, st.np, rows, cols, Ho, Wo, gi0, gj0, true);
    const int base = at + px.ty * cols + px.tx;  // tap (u, v) reads row ty + (K-1-u)*D, column tx + (K-1-v)*D
    channel_loop<Win::BUF>(sg, buf + st.slot * rows * cols, gg, hwo, cg, st.live, [&](int cc, int off) {
      if (active) {
        const A* tile = buf + off + base;
        A acc = 0;
#pragma unroll
        for (int u = 0; u < K; ++u) {
#pragma unroll
          for (int v = 0; v < K; ++v) acc += k[u * K + v] * tile[(K - 1 - u) * D * cols + (K - 1 - v) * D];
        }
        store(xp + cc * hw, acc);
      }
    });
  } else if constexpr (STAGED && S == 2) {
    typedef Parity<K, D> P;
    A k[P::MAX];  // this pixel's taps' kernel values, in (u, v) order
    const int er = (yy + pad) & 1, ec = (xx + pad) & 1;  // the same across a warp
    const int base = at + ((yy + pad - er) / 2 - gi0) * cols + (xx + pad - ec) / 2 - gj0;
    parity_dispatch(er, ec, [&](auto er_, auto ec_) {
      constexpr int ER = decltype(er_)::value, EC = decltype(ec_)::value;
      int t = 0;
#pragma unroll
      for (int u = 0; u < K; ++u) {
#pragma unroll
        for (int v = 0; v < K; ++v) {
          if (!P::valid(ER, u) || !P::valid(EC, v)) continue;
          const int a = (yy + pad - u * D) / 2, c = (xx + pad - v * D) / 2;  // exact
          k[t++] = active && yy + pad - u * D >= 0 && a < Ho && xx + pad - v * D >= 0 && c < Wo
                       ? load(wg + (u * K + v) * hwo + (i64)a * Wo + c) : A(0);
        }
      }
    });
    Stager<T, A, Win::PER_THREAD> sg;
    sg.init(st.r, st.np, rows, cols, Ho, Wo, gi0, gj0, true);
    channel_loop<Win::BUF>(sg, buf + st.slot * rows * cols, gg, hwo, cg, st.live, [&](int cc, int off) {
      if (!active) return;
      const A* tile = buf + off + base;
      parity_dispatch(er, ec, [&](auto er_, auto ec_) {
        constexpr int ER = decltype(er_)::value, EC = decltype(ec_)::value;
        A acc = 0;
        int t = 0;
#pragma unroll
        for (int u = 0; u < K; ++u) {
#pragma unroll
          for (int v = 0; v < K; ++v) {
            if (!P::valid(ER, u) || !P::valid(EC, v)) continue;
            acc += k[t++] * tile[((ER - u * D) / 2) * cols + (EC - v * D) / 2];
          }
        }
        store(xp + cc * hw, acc);
      });
    });
  } else if constexpr (STAGED) {
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
    A k[KK];
#pragma unroll
    for (int u = 0; u < K; ++u) {
#pragma unroll
      for (int v = 0; v < K; ++v) {
        k[u * K + v] = (iu[u] >= 0 && jv[v] >= 0) ? load(wg + (u * K + v) * hwo + (i64)iu[u] * Wo + jv[v]) : A(0);
      }
    }
    Stager<T, A, Win::PER_THREAD> sg;
    sg.init(st.r, st.np, rows, cols, Ho, Wo, gi0, gj0, true);
    channel_loop<Win::BUF>(sg, buf + st.slot * rows * cols, gg, hwo, cg, st.live, [&](int cc, int off) {
      if (active) {
        const A* tile = buf + off + at;
        A acc = 0;
#pragma unroll
        for (int u = 0; u < K; ++u) {
#pragma unroll
          for (int v = 0; v < K; ++v) acc += k[u * K + v] * tile[ru[u] + cv[v]];
        }
        store(xp + cc * hw, acc);
      }
    });
  } else if (active) {  // windows too large to stage: a fallback, direct loads, the row loop rolled
    for (int cc = 0; cc < cg; ++cc) {
      const T* gp = gg + cc * hwo;
      A acc = 0;
#pragma unroll 1
      for (int u = 0; u < K; ++u) {
        const int a = yy + pad - u * D;
        if (a < 0 || a % S != 0 || a / S >= Ho) continue;
#pragma unroll
        for (int v = 0; v < K; ++v) {
          const int c = xx + pad - v * D;
          if (c >= 0 && c % S == 0 && c / S < Wo) {
            const i64 at2 = (i64)(a / S) * Wo + c / S;
            acc += load(wg + (u * K + v) * hwo + at2) * load(gp + at2);
          }
        }
      }
      store(xp + cc * hw, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------
// NHWC, vector path (the plan takes it when C/G = 16, every pointer is 16-byte aligned, a block's
// kernel rows are whole 32-bit words, K <= NHWC_MAX_K, and the block's shared memory fits the
// device; grad_input also needs S <= 2).
//
// A block covers SLOTS = 8 16-byte channel slices ("slots") times an 8x8 patch of pixels per slot:
// thread t is slot t % 8 of patch row t / 32 (a warp per row), column pair (t / 8) % 4, i.e. two
// pixels side by side with the slot's 16 bytes of channels each. With 16 channels per group a
// group is TPI = sizeof(T) slots, neighbouring lanes, so the 8 slots are gb groups of PPB = 8 /
// (gb * TPI) patches (gb = 8 / TPI unless G is smaller). Before any tap the block stages in shared
// memory what its taps read, asynchronously (cp.async on sm_80+):
// - per slot, its patch's window of x (fwd, grad_kernel) or of grad_y (grad_input), zeros
//   outside the map: 128-bit copies of one pixel's 16 bytes;
// - fwd: the block's kernel rows, gb groups x K*K values for each pixel of its patches, 32-bit copies.
// The taps then read shared memory at compile-time offsets, with no bounds tests: a window column
// is loaded (128 bits) and unpacked once for the taps of both pixels that read it. A window is an
// odd number of 16-byte units long, so the 8 slots of a pixel read 8 different bank groups.
// grad_kernel sums each tap's 16-byte dot products over the group's TPI slots by xor shuffles in
// which every lane finishes a different tap, stages the block's kernel rows in shared memory and
// stores them as fwd loads them. grad_input reads each tap's kernel value from global memory (a
// scalar load; each value serves one input pixel); with stride 2 the pixels of a patch are split
// by parity class ((row, col) % 2), two warps a class, since a class decides which taps exist:
// no lane skips a tap another takes.

constexpr int SLOTS = 8;        // 16-byte channel slices per block (_plan.NHWC_SLOTS)
constexpr int PATCH = 8;        // patch side in pixels (_plan.NHWC_PATCH)
constexpr int PAIR = 2;         // pixels per thread along W
constexpr int NHWC_MAX_K = 11;  // (_plan.NHWC_MAX_K)
static_assert(SLOTS * PATCH * (PATCH / PAIR) == THREADS, "a thread per slot and pixel pair");

__host__ __device__ constexpr int odd_up(int n) { return n | 1; }

// Shared memory of the vector kernels (_plan.nhwc_shared_bytes mirrors it): a window plane of
// 16-byte units per slot, then (fwd, grad_kernel) the kernel rows, PPB patches x 64 pixels x gb
// groups x K*K values = 512 * K*K bytes for any T, since TPI = sizeof(T).
template <int K, int S, int D> struct InWindow {  // of x, read by an 8x8 patch of output pixels
  static_assert(K <= NHWC_MAX_K, "the plan takes larger windows to the scalar kernels");
  static constexpr int SIDE = (PATCH - 1) * S + (K - 1) * D + 1;
  static constexpr int PLANE = odd_up(SIDE * SIDE);
  static constexpr int ROWS_AT = SLOTS * PLANE;  // in 16-byte units: where the kernel rows start
  static constexpr int BYTES = ROWS_AT * 16 + 512 * K * K;
  // The tap of pixel o of a pair that reads column c of a tap row, or -1.
  __host__ __device__ static constexpr int tap(int c, int o) {
    return c - o * S >= 0 && (c - o * S) % D == 0 && (c - o * S) / D < K ? (c - o * S) / D : -1;
  }
  static constexpr int COLS = (PAIR - 1) * S + (K - 1) * D + 1;  // columns a pair's tap row reads
};
// grad_input. An input row i reads grad_y row (i + pad - u*D) / S through the taps u with
// (i + pad - u*D) % S == 0; with E = (i + pad) % S (the row's phase) those are the taps with
// (E - u*D) % S == 0, and the row they read is (i + pad - E) / S + off(u), off(u) = (E - u*D) / S.
template <int K, int S, int D> struct OutWindow {  // of grad_y, read by an 8x8 patch of input pixels
  static_assert(K <= NHWC_MAX_K, "the plan takes larger windows to the scalar kernels");
  __host__ __device__ static constexpr bool valid(int e, int u) { return ((e - u * D) % S + S) % S == 0; }
  __host__ __device__ static constexpr int off(int e, int u) { return (e - u * D) / S; }
  // The tap v of pixel o of a pair that reads column t (relative to the pair's offset-0 column, minus
  // the lowest offset (K - 1) * D / S rounded up) in phase e, or -1.
  __host__ __device__ static constexpr int tap(int e, int t, int o) {
    int r = -1;
    for (int v = 0; v < K; ++v)
      if (valid(e, v) && o + off(e, v) + SPAN == t) r = v;
    return r;
  }
  static constexpr int SPAN = ((K - 1) * D + S - 1) / S;  // -off(e, u) <= SPAN for every valid tap
  // Rows (and columns) of grad_y an 8x8 patch reads: from floor((r0 + pad - (K-1)*D) / S) to
  // floor((r0 + 7 + pad) / S).
  static constexpr int SIDE = S == 1 ? PATCH + (K - 1) * D : (PATCH - 1 + (K - 1) * D) / S + 2;
  static constexpr int PLANE = odd_up(SIDE * SIDE);
  static constexpr int BYTES = SLOTS * PLANE * 16;
  static constexpr int COLS = PAIR + SPAN;  // columns a pair reads, relative as in tap()
};

// What each thread of an NHWC vector block is: slot, pixel pair, group, patches.
template <typename T> struct Slot {
  static constexpr int TPI = sizeof(T);  // slots (16 bytes each) per group of 16 channels
  int k, sl, gl, pk, ppb, row, pair, pos, warp, lane, g0, g, pidx0, phase;
  long long b;

  // blockIdx.x = ((b * G / gb + group block) * phases + phase) * ptiles + patch tile
  __device__ __forceinline__ Slot(int G, int gb, int ptiles, int phases) {
    k = threadIdx.x % SLOTS, pos = threadIdx.x / SLOTS;
    row = pos / (PATCH / PAIR), pair = pos % (PATCH / PAIR);
    warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    ppb = SLOTS / (gb * TPI);
    sl = k % TPI, gl = (k / TPI) % gb, pk = k / (gb * TPI);
    const unsigned bid = blockIdx.x, ngb = (unsigned)(G / gb), rest = bid / (unsigned)ptiles;
    pidx0 = (int)(bid - rest * (unsigned)ptiles) * ppb;
    phase = (int)(rest % (unsigned)phases);
    const unsigned bg = rest / (unsigned)phases;
    g0 = (int)(bg % ngb) * gb, b = bg / ngb;
    g = g0 + gl;
  }
};

// Patch pidx's first pixel (row, column) in a grid of tiles_w patches a row; false past the last.
__device__ __forceinline__ bool patch_origin(int pidx, int tiles_w, int tiles, int& r, int& c) {
  r = (pidx / tiles_w) * PATCH, c = (pidx % tiles_w) * PATCH;
  return pidx < tiles;
}

// Copies a slot's SIDE x SIDE window at (r0, c0) of a rows x cols image (the slot's 16 bytes of
// pixel p at img + p * C + ch) into its plane, zeros outside the image; pos: the thread among the
// slot's 32. A fully unrolled loop: its trip count is a constant.
template <int SIDE, typename T>
__device__ __forceinline__ void stage_window(uint4* plane, const T* img, int ch, int C, int r0, int c0, int rows,
                                             int cols, int pos, bool live) {
#pragma unroll
  for (int it = 0; it < cdiv(SIDE * SIDE, 32); ++it) {
    const int e = pos + 32 * it;
    if (e < SIDE * SIDE) {
      const int r = r0 + e / SIDE, c = c0 + e % SIDE;
      const bool inside = live && (unsigned)r < (unsigned)rows && (unsigned)c < (unsigned)cols;
      copy16_async(plane + e, img + (inside ? (r * cols + c) * C + ch : ch), inside);
    }
  }
}

// Moves the block's kernel rows between shared memory ([patch][8x8 pixels][gb * K*K]) and the
// (rows, cols, G, K*K) storage of one image at img, in 32-bit words: for each patch, a warp per
// patch row, 4 lanes per pixel. TO_SHARED: asynchronously, from global memory.
template <bool TO_SHARED, int KK, typename T, typename GT>
__device__ __forceinline__ void move_rows(unsigned* rows_sm, GT* img, const Slot<T>& s, int gb, int G, int rows,
                                          int cols, int tiles_w, int tiles) {
  const int nw = gb * KK * (int)sizeof(T) / 4;  // words per pixel
  const int px = s.lane / 4, part = s.lane % 4;
#pragma unroll 1
  for (int p = 0; p < s.ppb; ++p) {
    int r, c;
    const bool exists = patch_origin(s.pidx0 + p, tiles_w, tiles, r, c);
    r += s.warp, c += px;
    if (exists && r < rows && c < cols) {
      unsigned* sm = rows_sm + ((p * PATCH + s.warp) * PATCH + px) * nw;
      GT* at = img + ((r * cols + c) * G + s.g0) * KK;
      if constexpr (TO_SHARED) {
        const unsigned* gl = reinterpret_cast<const unsigned*>(at);
#pragma unroll 1
        for (int e = part; e < nw; e += 4) copy4_async(sm + e, gl + e);
      } else {
        unsigned* gl = reinterpret_cast<unsigned*>(at);
#pragma unroll 1
        for (int e = part; e < nw; e += 4) store_raw(gl + e, sm[e]);
      }
    }
  }
}

template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS, 2) involution_fwd_nhwc(
    const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int gb, int tiles_w, int tiles, int ptiles) {
  typedef typename Acc<T>::type A;
  typedef V16<T> V;
  typedef InWindow<K, S, D> Win;
  constexpr int KK = K * K, N = V::N;
  REDNET_DYNAMIC_SHARED(smem);
  if (dynamic_shared_bytes() < Win::BYTES) __trap();  // a plan that disagrees with this file fails loudly

  const Slot<T> s(G, gb, ptiles, 1);
  int r0, c0;
  const bool live = patch_origin(s.pidx0 + s.pk, tiles_w, tiles, r0, c0);
  const int ch = s.g * 16 + s.sl * N;  // the slot's first channel
  stage_window<Win::SIDE>(smem + s.k * Win::PLANE, x + s.b * H * W * C, ch, C, r0 * S - pad, c0 * S - pad, H, W,
                          s.pos, live);
  move_rows<true, KK>(reinterpret_cast<unsigned*>(smem + Win::ROWS_AT), w + s.b * Ho * Wo * G * KK, s, gb, G, Ho,
                      Wo, tiles_w, tiles);
  async_wait();
  __syncthreads();

  const uint4* win = smem + s.k * Win::PLANE + s.row * S * Win::SIDE + s.pair * PAIR * S;
  const T* kr = reinterpret_cast<const T*>(smem + Win::ROWS_AT) +
                (((s.pk * PATCH + s.row) * PATCH + s.pair * PAIR) * gb + s.gl) * KK;
  A acc[PAIR][N];
#pragma unroll
  for (int o = 0; o < PAIR; ++o)
#pragma unroll
    for (int e = 0; e < N; ++e) acc[o][e] = A(0);
#pragma unroll
  for (int u = 0; u < K; ++u) {
    A kv[PAIR][K];
#pragma unroll
    for (int o = 0; o < PAIR; ++o)
#pragma unroll
      for (int v = 0; v < K; ++v) kv[o][v] = to_acc(kr[o * gb * KK + u * K + v]);
#pragma unroll
    for (int c = 0; c < Win::COLS; ++c) {
      if (Win::tap(c, 0) < 0 && Win::tap(c, PAIR - 1) < 0) continue;  // a column no tap of the pair reads
      A xv[N];
      V::unpack(lds16(win + u * D * Win::SIDE + c), xv);
#pragma unroll
      for (int o = 0; o < PAIR; ++o) {
        const int v = Win::tap(c, o);
        if (v >= 0) {
#pragma unroll
          for (int e = 0; e < N; ++e) acc[o][e] += kv[o][v] * xv[e];
        }
      }
    }
  }
  const int i = r0 + s.row, j = c0 + s.pair * PAIR;
  T* yb = y + s.b * Ho * Wo * C;
#pragma unroll
  for (int o = 0; o < PAIR; ++o)
    if (live && i < Ho && j + o < Wo) store16(yb + (i * Wo + j + o) * C + ch, V::pack(acc[o]));
}

// Sums each of P values over the TPI lanes of a group (lanes k ^ m, m < TPI) by halving: at each
// step a lane keeps one half of its values and adds the partner's copy of that half. Lane s of the
// group ends with the sums of values [s * P / TPI, (s + 1) * P / TPI) in p[0, P / TPI).
template <int TPI, int P, typename A>
__device__ __forceinline__ void sum_over_slots(A (&p)[P], int s) {
#pragma unroll
  for (int m = TPI / 2, n = P; m >= 1; m /= 2, n /= 2) {
    const bool hi = s & m;
#pragma unroll
    for (int j = 0; j < n / 2; ++j) {
      const A send = hi ? p[j] : p[j + n / 2], keep = hi ? p[j + n / 2] : p[j];
      p[j] = keep + __shfl_xor_sync(FULL_MASK, send, m);
    }
  }
}

// grad_w[pixel, g, u, v] = sum over the group's channels of grad_y[pixel] * x[tap pixel].
template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS, 2) involution_bwd_kernel_nhwc(
    const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gw,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int gb, int tiles_w, int tiles, int ptiles) {
  typedef typename Acc<T>::type A;
  typedef V16<T> V;
  typedef InWindow<K, S, D> Win;
  constexpr int KK = K * K, N = V::N, TPI = Slot<T>::TPI, R = cdiv(K, TPI);  // R: taps a lane finishes per row
  REDNET_DYNAMIC_SHARED(smem);
  if (dynamic_shared_bytes() < Win::BYTES) __trap();

  const Slot<T> s(G, gb, ptiles, 1);
  int r0, c0;
  const bool live = patch_origin(s.pidx0 + s.pk, tiles_w, tiles, r0, c0);
  const int ch = s.g * 16 + s.sl * N;
  stage_window<Win::SIDE>(smem + s.k * Win::PLANE, x + s.b * H * W * C, ch, C, r0 * S - pad, c0 * S - pad, H, W,
                          s.pos, live);
  const int i = r0 + s.row, j = c0 + s.pair * PAIR;
  const T* gyb = gy + s.b * Ho * Wo * C;
  A gv[PAIR][N];
#pragma unroll
  for (int o = 0; o < PAIR; ++o) {
    if (live && i < Ho && j + o < Wo) {
      V::unpack(load16(gyb + (i * Wo + j + o) * C + ch), gv[o]);
    } else {
#pragma unroll
      for (int e = 0; e < N; ++e) gv[o][e] = A(0);
    }
  }
  async_wait();
  __syncthreads();

  const uint4* win = smem + s.k * Win::PLANE + s.row * S * Win::SIDE + s.pair * PAIR * S;
  T* kr = reinterpret_cast<T*>(smem + Win::ROWS_AT) + (((s.pk * PATCH + s.row) * PATCH + s.pair * PAIR) * gb + s.gl) * KK +
          s.sl * R;  // this lane's taps v = sl * R + j of each row
#pragma unroll
  for (int u = 0; u < K; ++u) {
    A part[PAIR][R * TPI];
#pragma unroll
    for (int o = 0; o < PAIR; ++o)
#pragma unroll
      for (int v = 0; v < R * TPI; ++v) part[o][v] = A(0);
#pragma unroll
    for (int c = 0; c < Win::COLS; ++c) {
      if (Win::tap(c, 0) < 0 && Win::tap(c, PAIR - 1) < 0) continue;
      A xv[N];
      V::unpack(lds16(win + u * D * Win::SIDE + c), xv);
#pragma unroll
      for (int o = 0; o < PAIR; ++o) {
        const int v = Win::tap(c, o);
        if (v >= 0) {
          A d = gv[o][0] * xv[0];
#pragma unroll
          for (int e = 1; e < N; ++e) d += gv[o][e] * xv[e];
          part[o][v] = d;
        }
      }
    }
#pragma unroll
    for (int o = 0; o < PAIR; ++o) {
      sum_over_slots<TPI>(part[o], s.sl);
#pragma unroll
      for (int q = 0; q < R; ++q)
        if (s.sl * R + q < K) kr[o * gb * KK + u * K + q] = from_acc<T>(part[o][q]);
    }
  }
  __syncthreads();
  move_rows<false, KK>(reinterpret_cast<unsigned*>(smem + Win::ROWS_AT), gw + s.b * Ho * Wo * G * KK, s, gb, G, Ho,
                       Wo, tiles_w, tiles);
}

// grad_x of the pixels of one stride phase (ER, EC: (row + pad) % S, (col + pad) % S) of the block's
// patch, the thread's pixel pair being (i, j) and (i, j + S): taps at compile-time offsets from the
// thread's window position (hr, hc) (that of tap offset 0, pixel 0).
template <int ER, int EC, typename T, int K, int S, int D>
__device__ __forceinline__ void bwd_input_phase(const T* __restrict__ w, T* __restrict__ gx, const uint4* win,
                                                const Slot<T>& s, int i, int j, int a0, int c0, bool live, int C,
                                                int H, int W, int G, int Ho, int Wo) {
  typedef typename Acc<T>::type A;
  typedef V16<T> V;
  typedef OutWindow<K, S, D> Win;
  constexpr int KK = K * K, N = V::N;
  // The kernel value of tap (u, v) for pixel o is w[b, a0 + off(ER, u), c0 + o + off(EC, v), g, u, v].
  const T* wb = w + s.b * Ho * Wo * G * KK;
  const int at = (a0 * Wo + c0) * G * KK + s.g * KK, rs = Wo * G * KK, cs = G * KK;
  A acc[PAIR][N];
#pragma unroll
  for (int o = 0; o < PAIR; ++o)
#pragma unroll
    for (int e = 0; e < N; ++e) acc[o][e] = A(0);
  // Tap rows one at a time for 4- and 8-byte types: unrolled, the compiler hoists every row's
  // kernel-value loads and spills (fp32, K = 7).
#pragma unroll(sizeof(T) >= 4 ? 1 : K)
  for (int u = 0; u < K; ++u) {
    if (!Win::valid(ER, u)) continue;
    const bool row_ok = (unsigned)(a0 + Win::off(ER, u)) < (unsigned)Ho;
#pragma unroll
    for (int t = 0; t < Win::COLS; ++t) {
      if (Win::tap(EC, t, 0) < 0 && Win::tap(EC, t, PAIR - 1) < 0) continue;
      A gv[N];
      V::unpack(lds16(win + Win::off(ER, u) * Win::SIDE + t - Win::SPAN), gv);
#pragma unroll
      for (int o = 0; o < PAIR; ++o) {
        const int v = Win::tap(EC, t, o);
        if (v >= 0) {
          const int m = o + Win::off(EC, v);
          const bool ok = row_ok && (unsigned)(c0 + m) < (unsigned)Wo;
          const A kv = ok ? load(wb + at + Win::off(ER, u) * rs + m * cs + u * K + v) : A(0);
#pragma unroll
          for (int e = 0; e < N; ++e) acc[o][e] += kv * gv[e];
        }
      }
    }
  }
  const int ch = s.g * 16 + s.sl * N;
  T* gxb = gx + s.b * H * W * C;
#pragma unroll
  for (int o = 0; o < PAIR; ++o)
    if (live && i < H && j + S * o < W) store16(gxb + (i * W + j + S * o) * C + ch, V::pack(acc[o]));
}

// grad_x: the gather over output pixels, a block an 8x8 patch of input pixels per slot. With
// stride 2 the patch's four parity classes ((row, col) % 2) take two warps each, 4x4 pixels
// (pairs of pixels two columns apart), so a warp's pixels share their taps. Strides above 2 are
// not planned here (the scalar kernels take them); the instantiation exists for every module.
template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS, 2) involution_bwd_input_nhwc(
    const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int gb, int tiles_w, int tiles, int ptiles) {
  typedef OutWindow<K, S, D> Win;
  REDNET_DYNAMIC_SHARED(smem);
  if constexpr (S <= 2) {
    if (dynamic_shared_bytes() < Win::BYTES) __trap();
    const Slot<T> s(G, gb, ptiles, 1);
    int r0, c0;
    const bool live = patch_origin(s.pidx0 + s.pk, tiles_w, tiles, r0, c0);
    const int orow = floor_div(r0 + pad - (K - 1) * D, S), ocol = floor_div(c0 + pad - (K - 1) * D, S);
    stage_window<Win::SIDE>(smem + s.k * Win::PLANE, gy + s.b * Ho * Wo * C, s.g * 16 + s.sl * V16<T>::N, C, orow,
                            ocol, Ho, Wo, s.pos, live);
    async_wait();
    __syncthreads();

    // This thread's pixels: stride 1, row s.row and columns 2 * pair + {0, 1}; stride 2, parity
    // class warp / 2, sub-row (pos % 8) / 2 and sub-columns 2 * (pos % 2) + {0, 1}.
    const int cls = S == 1 ? 0 : s.warp / 2, q = s.pos % 8;
    const int pr = cls / 2, pc = cls % 2;
    const int sr = S == 1 ? s.row : q / 2, pair = S == 1 ? s.pair : q % 2;
    const int i = r0 + pr + S * sr, j = c0 + pc + S * PAIR * pair;
    const int er = (pr + pad) % S, ec = (pc + pad) % S;  // (i + pad) % S: r0 is a multiple of 8
    const int a0 = (i + pad - er) / S, cc0 = (j + pad - ec) / S;  // grad_y row and column of tap offset 0
    const uint4* win = smem + s.k * Win::PLANE + (a0 - orow) * Win::SIDE + (cc0 - ocol);
    if (er == 0) {
      if (ec == 0) {
        bwd_input_phase<0, 0, T, K, S, D>(w, gx, win, s, i, j, a0, cc0, live, C, H, W, G, Ho, Wo);
      } else {
        bwd_input_phase<0, S - 1, T, K, S, D>(w, gx, win, s, i, j, a0, cc0, live, C, H, W, G, Ho, Wo);
      }
    } else if (ec == 0) {
      bwd_input_phase<S - 1, 0, T, K, S, D>(w, gx, win, s, i, j, a0, cc0, live, C, H, W, G, Ho, Wo);
    } else {
      bwd_input_phase<S - 1, S - 1, T, K, S, D>(w, gx, win, s, i, j, a0, cc0, live, C, H, W, G, Ho, Wo);
    }
  }
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
