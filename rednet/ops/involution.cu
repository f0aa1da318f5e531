// Involution kernels: forward, gradient w.r.t. the input, gradient w.r.t. the kernel.
//
//   y[b, c, i, j] = sum_{u,v < K} w[b, g(c), u, v, i, j] * x[b, c, i*S - pad + u*D, j*S - pad + v*D]
//
// Compiled at run time by NVRTC through cupy.RawModule (rednet/ops/_cupy.py), one module
// per (dtype, K, S, D) and device, and in CI by nvcc and NVRTC without a GPU
// (tests/test_kernels.py), which also runs it on the host (tests/cuda_emu.h). The file is
// header-free so both compilers take it as is: NVRTC has no default include path, and the
// half conversions below are one PTX instruction each.
//
// Memory formats. "nchw": x, y (B, C, H, W) contiguous and w (B, G, K, K, Ho, Wo) contiguous.
// "nhwc" (channels_last): x, y stored as (B, H, W, C) and w stored as (B, Ho, Wo, G, K, K),
// which is what a channels_last Conv2d with G*K*K output channels produces, viewed as
// (B, G, K, K, Ho, Wo). Every kernel accumulates in float (double for double) and
// writes each output element once; none uses atomics.
//
// The op moves ~4.5 FLOP per byte (fp32), so the designs aim at reading each element of
// x, w and grad_out from DRAM once:
// - nchw: a block owns a TILE_H x TILE_W tile of pixels of one (b, g); each thread keeps
//   its K*K kernel values in registers and reuses them over the C/G channels of the group,
//   while the input window of the tile (tile plus halo) is staged through shared memory one
//   channel at a time. Reads and writes along W are coalesced.
// - nhwc: one thread per element with C fastest, so x, y, grad_out accesses are coalesced
//   along C and the C/G threads of a group read the same kernel value (one broadcast
//   load); the K*K window reuse between neighbouring pixels comes from L1/L2.

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
__device__ __forceinline__ float load(const half_t* p) {
  REDNET_TRACE_LOAD(p, 2);
  return half_to_float(p->bits);
}
__device__ __forceinline__ void store(half_t* p, float v) {
  REDNET_TRACE_STORE(p, 2);
  p->bits = float_to_half(v);
}
__device__ __forceinline__ float load(const float* p) {
  REDNET_TRACE_LOAD(p, 4);
  return *p;
}
__device__ __forceinline__ double load(const double* p) {
  REDNET_TRACE_LOAD(p, 8);
  return *p;
}
__device__ __forceinline__ float load(const bf16_t* p) {
  REDNET_TRACE_LOAD(p, 2);
  return __uint_as_float(((unsigned int)p->bits) << 16);
}
__device__ __forceinline__ void store(float* p, float v) {
  REDNET_TRACE_STORE(p, 4);
  *p = v;
}
__device__ __forceinline__ void store(double* p, double v) {
  REDNET_TRACE_STORE(p, 8);
  *p = v;
}
__device__ __forceinline__ void store(bf16_t* p, float v) {
  REDNET_TRACE_STORE(p, 2);
  // Round to nearest even, as torch's float -> bfloat16 cast; NaN stays a quiet NaN.
  unsigned int u = __float_as_uint(v);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    p->bits = (unsigned short)((u >> 16) | 0x40u);
    return;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  p->bits = (unsigned short)(u >> 16);
}

constexpr int TILE_W = 32;
constexpr int TILE_H = 8;
constexpr int THREADS = TILE_W * TILE_H;
// Largest shared-memory tile per block; bigger windows (large K * D) read global memory
// directly, which is correct for any K and only slower.
constexpr int MAX_TILE_BYTES = 16384;

__device__ __forceinline__ int floor_div(int a, int b) {  // b > 0
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// Stage rows [r0, r0 + RH) x cols [c0, c0 + RW) of one (rows x cols) plane into smem,
// zero outside the plane (the implicit zero padding).
template <typename T, typename A, int RH, int RW>
__device__ __forceinline__ void stage(A* tile, const T* plane, int rows, int cols, int r0, int c0) {
  for (int e = threadIdx.x; e < RH * RW; e += THREADS) {
    const int r = r0 + e / RW, c = c0 + e % RW;
    tile[e] = (r >= 0 && r < rows && c >= 0 && c < cols) ? load(plane + (i64)r * cols + c) : A(0);
  }
}

// ---------------------------------------------------------------------------------------
// NCHW. Grid: one block per (tile, b, g), blockIdx.x = (b * G + g) * tiles + tile.

template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS) involution_fwd_nchw(
    const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int tiles_w, int tiles) {
  typedef typename Acc<T>::type A;
  constexpr int KK = K * K;
  constexpr int IH = (TILE_H - 1) * S + (K - 1) * D + 1;  // input rows read by the tile
  constexpr int IW = (TILE_W - 1) * S + (K - 1) * D + 1;
  constexpr bool TILED = IH * IW * (int)sizeof(A) <= MAX_TILE_BYTES;
  __shared__ A tile[TILED ? IH * IW : 1];

  const int cg = C / G;
  const int t = blockIdx.x % tiles;
  const i64 bg = blockIdx.x / tiles;  // b * G + g
  const int g = (int)(bg % G);
  const i64 b = bg / G;
  const int ty = threadIdx.x / TILE_W, tx = threadIdx.x % TILE_W;
  const int i0 = (t / tiles_w) * TILE_H, j0 = (t % tiles_w) * TILE_W;
  const int i = i0 + ty, j = j0 + tx;
  const bool active = i < Ho && j < Wo;
  const i64 hwo = (i64)Ho * Wo;

  A k[KK];  // w[b, g, :, :, i, j], reused for all C/G channels of the group
  const T* wp = w + bg * KK * hwo + (i64)i * Wo + j;
#pragma unroll
  for (int q = 0; q < KK; ++q) k[q] = active ? load(wp + q * hwo) : A(0);

  const int r0 = i0 * S - pad, c0 = j0 * S - pad;
  for (int cc = 0; cc < cg; ++cc) {
    const i64 c = (i64)g * cg + cc;
    const T* xp = x + (b * C + c) * H * W;
    if constexpr (TILED) {
      stage<T, A, IH, IW>(tile, xp, H, W, r0, c0);
      __syncthreads();
    }
    if (active) {
      A acc = 0;
#pragma unroll
      for (int u = 0; u < K; ++u) {
#pragma unroll
        for (int v = 0; v < K; ++v) {
          if constexpr (TILED) {
            acc += k[u * K + v] * tile[(ty * S + u * D) * IW + tx * S + v * D];
          } else {
            const int yy = i * S - pad + u * D, xx = j * S - pad + v * D;
            if (yy >= 0 && yy < H && xx >= 0 && xx < W) acc += k[u * K + v] * load(xp + (i64)yy * W + xx);
          }
        }
      }
      store(y + (b * C + c) * hwo + (i64)i * Wo + j, acc);
    }
    if constexpr (TILED) __syncthreads();
  }
}

// grad_w[b, g, u, v, i, j] = sum_{c in g} grad_y[b, c, i, j] * x[b, c, i*S - pad + u*D, j*S - pad + v*D]:
// the same tile walk as the forward, with the K*K sums in registers instead of the kernel.
template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS) involution_bwd_kernel_nchw(
    const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gw,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int tiles_w, int tiles) {
  typedef typename Acc<T>::type A;
  constexpr int KK = K * K;
  constexpr int IH = (TILE_H - 1) * S + (K - 1) * D + 1;
  constexpr int IW = (TILE_W - 1) * S + (K - 1) * D + 1;
  constexpr bool TILED = IH * IW * (int)sizeof(A) <= MAX_TILE_BYTES;
  __shared__ A tile[TILED ? IH * IW : 1];

  const int cg = C / G;
  const int t = blockIdx.x % tiles;
  const i64 bg = blockIdx.x / tiles;
  const int g = (int)(bg % G);
  const i64 b = bg / G;
  const int ty = threadIdx.x / TILE_W, tx = threadIdx.x % TILE_W;
  const int i0 = (t / tiles_w) * TILE_H, j0 = (t % tiles_w) * TILE_W;
  const int i = i0 + ty, j = j0 + tx;
  const bool active = i < Ho && j < Wo;
  const i64 hwo = (i64)Ho * Wo;

  A acc[KK];
#pragma unroll
  for (int q = 0; q < KK; ++q) acc[q] = A(0);

  const int r0 = i0 * S - pad, c0 = j0 * S - pad;
  for (int cc = 0; cc < cg; ++cc) {
    const i64 c = (i64)g * cg + cc;
    const T* xp = x + (b * C + c) * H * W;
    if constexpr (TILED) {
      stage<T, A, IH, IW>(tile, xp, H, W, r0, c0);
      __syncthreads();
    }
    if (active) {
      const A gv = load(gy + (b * C + c) * hwo + (i64)i * Wo + j);
#pragma unroll
      for (int u = 0; u < K; ++u) {
#pragma unroll
        for (int v = 0; v < K; ++v) {
          if constexpr (TILED) {
            acc[u * K + v] += gv * tile[(ty * S + u * D) * IW + tx * S + v * D];
          } else {
            const int yy = i * S - pad + u * D, xx = j * S - pad + v * D;
            if (yy >= 0 && yy < H && xx >= 0 && xx < W) acc[u * K + v] += gv * load(xp + (i64)yy * W + xx);
          }
        }
      }
    }
    if constexpr (TILED) __syncthreads();
  }
  if (active) {
    T* gp = gw + bg * KK * hwo + (i64)i * Wo + j;
#pragma unroll
    for (int q = 0; q < KK; ++q) store(gp + q * hwo, acc[q]);
  }
}

// grad_x[b, c, yy, xx] = sum over the taps (u, v) and output pixels (i, j) with
// i*S - pad + u*D = yy and j*S - pad + v*D = xx of w[b, g, u, v, i, j] * grad_y[b, c, i, j].
// A gather over input pixels: each grad_x element is written once, no atomics. The block
// owns a TILE_H x TILE_W tile of input pixels; the grad_y window it reads is staged per channel.
template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS) involution_bwd_input_nchw(
    const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
    int C, int H, int W, int G, int Ho, int Wo, int pad, int tiles_w, int tiles) {
  typedef typename Acc<T>::type A;
  constexpr int KK = K * K;
  // Rows of grad_y read by TILE_H consecutive input rows: floor(a/S) - floor(b/S) <= (a-b)/S + 1.
  constexpr int GH = (TILE_H - 1 + (K - 1) * D) / S + 2;
  constexpr int GW = (TILE_W - 1 + (K - 1) * D) / S + 2;
  constexpr bool TILED = GH * GW * (int)sizeof(A) <= MAX_TILE_BYTES;
  __shared__ A tile[TILED ? GH * GW : 1];

  const int cg = C / G;
  const int t = blockIdx.x % tiles;
  const i64 bg = blockIdx.x / tiles;
  const int g = (int)(bg % G);
  const i64 b = bg / G;
  const int ty = threadIdx.x / TILE_W, tx = threadIdx.x % TILE_W;
  const int y0 = (t / tiles_w) * TILE_H, x0 = (t % tiles_w) * TILE_W;
  const int yy = y0 + ty, xx = x0 + tx;
  const bool active = yy < H && xx < W;
  const i64 hwo = (i64)Ho * Wo;
  const int gi0 = floor_div(y0 + pad - (K - 1) * D, S);  // first grad_y row of the window
  const int gj0 = floor_div(x0 + pad - (K - 1) * D, S);

  // Output row i read by tap u (or -1): i*S = yy + pad - u*D must be a multiple of S in [0, Ho).
  int iu[K], jv[K];
#pragma unroll
  for (int u = 0; u < K; ++u) {
    const int a = yy + pad - u * D;
    iu[u] = (active && a >= 0 && a % S == 0 && a / S < Ho) ? a / S : -1;
    const int c = xx + pad - u * D;
    jv[u] = (active && c >= 0 && c % S == 0 && c / S < Wo) ? c / S : -1;
  }
  A k[KK];  // the kernel values that read this pixel, reused for all C/G channels
  const T* wg = w + bg * KK * hwo;
#pragma unroll
  for (int u = 0; u < K; ++u) {
#pragma unroll
    for (int v = 0; v < K; ++v) {
      k[u * K + v] = (iu[u] >= 0 && jv[v] >= 0) ? load(wg + (u * K + v) * hwo + (i64)iu[u] * Wo + jv[v]) : A(0);
    }
  }

  for (int cc = 0; cc < cg; ++cc) {
    const i64 c = (i64)g * cg + cc;
    const T* gp = gy + (b * C + c) * hwo;
    if constexpr (TILED) {
      stage<T, A, GH, GW>(tile, gp, Ho, Wo, gi0, gj0);
      __syncthreads();
    }
    if (active) {
      A acc = 0;
#pragma unroll
      for (int u = 0; u < K; ++u) {
#pragma unroll
        for (int v = 0; v < K; ++v) {
          if (iu[u] >= 0 && jv[v] >= 0) {
            if constexpr (TILED) {
              acc += k[u * K + v] * tile[(iu[u] - gi0) * GW + (jv[v] - gj0)];
            } else {
              acc += k[u * K + v] * load(gp + (i64)iu[u] * Wo + jv[v]);
            }
          }
        }
      }
      store(gx + (b * C + c) * H * W + (i64)yy * W + xx, acc);
    }
    if constexpr (TILED) __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------
// NHWC (channels_last). Grid-stride loops over the elements of the output of each kernel.

template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS) involution_fwd_nhwc(
    const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y,
    int C, int H, int W, int G, int Ho, int Wo, int pad, i64 n) {
  typedef typename Acc<T>::type A;
  constexpr int KK = K * K;
  const int cg = C / G;
  for (i64 e = (i64)blockIdx.x * THREADS + threadIdx.x; e < n; e += (i64)gridDim.x * THREADS) {
    // e indexes y stored as (B, Ho, Wo, C)
    const int c = (int)(e % C);
    i64 p = e / C;
    const int j = (int)(p % Wo);
    p /= Wo;
    const int i = (int)(p % Ho);
    const i64 b = p / Ho;
    const T* wp = w + (((b * Ho + i) * Wo + j) * G + c / cg) * KK;  // w stored as (B, Ho, Wo, G, K*K)
    A acc = 0;
#pragma unroll
    for (int u = 0; u < K; ++u) {
      const int yy = i * S - pad + u * D;
      if (yy < 0 || yy >= H) continue;
#pragma unroll
      for (int v = 0; v < K; ++v) {
        const int xx = j * S - pad + v * D;
        if (xx < 0 || xx >= W) continue;
        acc += load(wp + u * K + v) * load(x + ((b * H + yy) * W + xx) * C + c);
      }
    }
    store(y + e, acc);
  }
}

template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS) involution_bwd_input_nhwc(
    const T* __restrict__ gy, const T* __restrict__ w, T* __restrict__ gx,
    int C, int H, int W, int G, int Ho, int Wo, int pad, i64 n) {
  typedef typename Acc<T>::type A;
  constexpr int KK = K * K;
  const int cg = C / G;
  for (i64 e = (i64)blockIdx.x * THREADS + threadIdx.x; e < n; e += (i64)gridDim.x * THREADS) {
    // e indexes grad_x stored as (B, H, W, C)
    const int c = (int)(e % C);
    i64 p = e / C;
    const int xx = (int)(p % W);
    p /= W;
    const int yy = (int)(p % H);
    const i64 b = p / H;
    const int g = c / cg;
    A acc = 0;
#pragma unroll
    for (int u = 0; u < K; ++u) {
      const int a = yy + pad - u * D;
      if (a < 0 || a % S != 0 || a / S >= Ho) continue;
      const int i = a / S;
#pragma unroll
      for (int v = 0; v < K; ++v) {
        const int q = xx + pad - v * D;
        if (q < 0 || q % S != 0 || q / S >= Wo) continue;
        const i64 pix = (b * Ho + i) * Wo + q / S;
        acc += load(w + (pix * G + g) * KK + u * K + v) * load(gy + pix * C + c);
      }
    }
    store(gx + e, acc);
  }
}

template <typename T, int K, int S, int D>
__global__ void __launch_bounds__(THREADS) involution_bwd_kernel_nhwc(
    const T* __restrict__ gy, const T* __restrict__ x, T* __restrict__ gw,
    int C, int H, int W, int G, int Ho, int Wo, int pad, i64 n) {
  typedef typename Acc<T>::type A;
  constexpr int KK = K * K;
  const int cg = C / G;
  for (i64 e = (i64)blockIdx.x * THREADS + threadIdx.x; e < n; e += (i64)gridDim.x * THREADS) {
    // e indexes grad_w stored as (B, Ho, Wo, G, K, K): consecutive threads, consecutive taps
    const int q = (int)(e % KK);
    i64 p = e / KK;
    const int g = (int)(p % G);
    p /= G;
    const int j = (int)(p % Wo);
    p /= Wo;
    const int i = (int)(p % Ho);
    const i64 b = p / Ho;
    const int yy = i * S - pad + (q / K) * D, xx = j * S - pad + (q % K) * D;
    A acc = 0;
    if (yy >= 0 && yy < H && xx >= 0 && xx < W) {
      const T* xp = x + ((b * H + yy) * W + xx) * C + (i64)g * cg;
      const T* gp = gy + ((b * Ho + i) * Wo + j) * C + (i64)g * cg;
      for (int cc = 0; cc < cg; ++cc) acc += load(gp + cc) * load(xp + cc);
    }
    store(gw + e, acc);
  }
}
