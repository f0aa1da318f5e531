// An ONNX Runtime custom op running the native fused involution: rednet.Involution (domain
// "ai.rednet", version 1), registered by loading this library into a session's options
// (SessionOptions.register_custom_ops_library in Python, RegisterCustomOpsLibrary in C/C++).
//
// rednet/ops/_ort.py compiles this file as one translation unit with involution_cpu.cpp in
// front of it (the two sources concatenated), so it calls the kernel's fused pass directly.
//
// The op (float32):
//   inputs   X (B, H, W, C)  channels-last input          reduce_weight (C, R), reduce_bias (R)
//            span_weight (R, N), span_bias (N)             scale (C), shift (C)
//   output   Y (B, Ho, Wo, C), Ho = ceil(H / stride), Wo = ceil(W / stride)
//   attrs    kernel_size (odd), stride, groups (C / groups a multiple of 16), relu (0 or 1)
// with the weights laid out as rednet.ops.pack_fused_weights makes them (R and N multiples of
// 16, N >= groups * kernel_size^2) and Y = act(scale * involution(X, k) + shift); see the
// "Fused inference" section of involution_cpu.cpp.
//
// Threads: the pass runs its chunks on ORT's intra-op thread pool (KernelContext_ParallelFor),
// never on OpenMP threads of its own: a second spinning pool beside ORT's ran RedNet-50 at
// 0.3-1.0x of its speed with ORT's pool.
//
// No ORT header is needed to build it. The few entries of ORT's C ABI that it uses are declared
// below from the layout documented in onnxruntime_c_api.h (ONNX Runtime 1.17 and later;
// 1.31.1 pinned in requirements.lock): OrtApi is a table of function pointers whose entries keep
// their positions across versions (new ones are appended), and OrtCustomOp is a struct of
// callbacks that ORT reads up to the version the op declares.

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <mutex>
#include <new>

extern "C" {
struct OrtStatus;
struct OrtApi;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtValue;
struct OrtTensorTypeAndShapeInfo;

struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
};
}

namespace {

namespace ortabi {

// API version 17 (ONNX Runtime 1.17) added KernelContext_ParallelFor, the newest entry used.
constexpr uint32_t kApiVersion = 17;
// OrtCustomOp version 16 is the first whose CreateKernelV2 / KernelComputeV2 return a status.
constexpr uint32_t kCustomOpVersion = 16;

constexpr int kFloat = 1;        // ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT
constexpr int kFail = 1;         // ORT_FAIL
constexpr int kInvalidArg = 2;   // ORT_INVALID_ARGUMENT
constexpr int kRequired = 0;     // INPUT_OUTPUT_REQUIRED
constexpr int kMemDefault = 0;   // OrtMemTypeDefault

// Positions of the entries used in the OrtApi table.
enum Entry : int {
  CreateStatus = 0,
  CreateCustomOpDomain = 26,
  CustomOpDomain_Add = 27,
  AddCustomOpDomain = 28,
  GetTensorMutableData = 51,
  GetTensorElementType = 60,
  GetDimensionsCount = 61,
  GetDimensions = 62,
  GetTensorTypeAndShape = 65,
  KernelInfoGetAttribute_int64 = 86,
  KernelContext_GetInputCount = 88,
  KernelContext_GetInput = 90,
  KernelContext_GetOutput = 91,
  ReleaseStatus = 93,
  ReleaseTensorTypeAndShapeInfo = 99,
  KernelContext_ParallelFor = 274,
};

// The callbacks of OrtCustomOp, in ABI order, up to the version-16 fields.
struct CustomOp {
  uint32_t version;
  void* (*CreateKernel)(const CustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const CustomOp*);
  const char* (*GetExecutionProviderType)(const CustomOp*);
  int (*GetInputType)(const CustomOp*, size_t);
  size_t (*GetInputTypeCount)(const CustomOp*);
  int (*GetOutputType)(const CustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const CustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const CustomOp*, size_t);
  int (*GetOutputCharacteristic)(const CustomOp*, size_t);
  int (*GetInputMemoryType)(const CustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const CustomOp*);
  int (*GetVariadicInputHomogeneity)(const CustomOp*);
  int (*GetVariadicOutputMinArity)(const CustomOp*);
  int (*GetVariadicOutputHomogeneity)(const CustomOp*);
  OrtStatus* (*CreateKernelV2)(const CustomOp*, const OrtApi*, const OrtKernelInfo*, void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
};

const OrtApi* g_api = nullptr;

template <class F> F entry(Entry e) { return reinterpret_cast<F>(reinterpret_cast<void* const*>(g_api)[e]); }

OrtStatus* status(int code, const char* msg) {
  return entry<OrtStatus* (*)(int, const char*)>(CreateStatus)(code, msg);
}

void release(OrtStatus* s) {
  if (s) entry<void (*)(OrtStatus*)>(ReleaseStatus)(s);
}

}  // namespace ortabi

using namespace ortabi;

constexpr int kInputs = 7;
const char* const kInputNames[kInputs] = {"X", "reduce_weight", "reduce_bias", "span_weight", "span_bias", "scale",
                                          "shift"};

struct Kernel {
  i64 kernel_size, stride, groups, relu;
};

// One input tensor: its float data and shape (up to 4 dimensions).
struct Tensor {
  float* data = nullptr;
  i64 dims[4] = {0, 0, 0, 0};
  size_t rank = 0;
};

OrtStatus* read_value(const OrtValue* value, const char* name, Tensor* out) {
  char msg[256];
  OrtTensorTypeAndShapeInfo* info = nullptr;
  if (OrtStatus* s = entry<OrtStatus* (*)(const OrtValue*, OrtTensorTypeAndShapeInfo**)>(GetTensorTypeAndShape)(
          value, &info))
    return s;
  int type = 0;
  OrtStatus* s = entry<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int*)>(GetTensorElementType)(info, &type);
  if (!s) s = entry<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, size_t*)>(GetDimensionsCount)(info, &out->rank);
  if (!s && out->rank > 4) {
    std::snprintf(msg, sizeof msg, "rednet.Involution: input %s has %zu dimensions, at most 4 expected", name,
                  out->rank);
    s = status(kInvalidArg, msg);
  }
  if (!s) s = entry<OrtStatus* (*)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t)>(GetDimensions)(
              info, out->dims, out->rank);
  entry<void (*)(OrtTensorTypeAndShapeInfo*)>(ReleaseTensorTypeAndShapeInfo)(info);
  if (s) return s;
  if (type != kFloat) {
    std::snprintf(msg, sizeof msg, "rednet.Involution: input %s must be float32 (ONNX type 1), got type %d", name,
                  type);
    return status(kInvalidArg, msg);
  }
  void* data = nullptr;
  if (OrtStatus* s2 = entry<OrtStatus* (*)(OrtValue*, void**)>(GetTensorMutableData)(const_cast<OrtValue*>(value),
                                                                                       &data))
    return s2;
  out->data = static_cast<float*>(data);
  return nullptr;
}

bool shape_is(const Tensor& t, std::initializer_list<i64> dims) {
  if (t.rank != dims.size()) return false;
  size_t i = 0;
  for (i64 d : dims)
    if (t.dims[i++] != d) return false;
  return true;
}

// Runs the kernel's chunks on ORT's thread pool.
struct OrtRunner : ChunkRunner {
  const OrtKernelContext* ctx;
  OrtStatus* error = nullptr;
};

struct Job {
  ChunkFn fn;
  const void* body;
  i64 n, chunks;
  std::atomic<bool> failed{false};  // an exception (out of memory for scratch) in a chunk
};

// Runs on ORT's threads: nothing may escape into ORT's pool.
void run_chunk(void* data, size_t index) {
  Job* job = static_cast<Job*>(data);
  const i64 c = static_cast<i64>(index);
  const i64 lo = job->n * c / job->chunks, hi = job->n * (c + 1) / job->chunks;
  try {
    if (lo < hi) job->fn(job->body, lo, hi);
  } catch (...) {
    job->failed = true;
  }
}

void run_on_ort_pool(ChunkRunner* self, i64 n, ChunkFn fn, const void* body) {
  OrtRunner* runner = static_cast<OrtRunner*>(self);
  // More chunks than threads, so a thread that is not scheduled (a busy machine) holds back
  // only a small share; each chunk allocates nothing (the pass's scratch is per thread).
  Job job{fn, body, n, n < 64 ? n : 64};
  OrtStatus* s = entry<OrtStatus* (*)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t, void*)>(
      KernelContext_ParallelFor)(runner->ctx, &run_chunk, static_cast<size_t>(job.chunks), 0, &job);
  if (!s && job.failed) s = status(kFail, "rednet.Involution: a worker failed (out of memory?)");
  if (s && !runner->error)
    runner->error = s;
  else
    release(s);
}

OrtStatus* compute(void* state, OrtKernelContext* ctx) {
  const Kernel& k = *static_cast<const Kernel*>(state);
  char msg[512];
  size_t count = 0;
  if (OrtStatus* s = entry<OrtStatus* (*)(const OrtKernelContext*, size_t*)>(KernelContext_GetInputCount)(ctx, &count))
    return s;
  if (count != kInputs) {
    std::snprintf(msg, sizeof msg, "rednet.Involution: %zu inputs, expected %d", count, kInputs);
    return status(kInvalidArg, msg);
  }
  Tensor in[kInputs];
  for (int i = 0; i < kInputs; ++i) {
    const OrtValue* value = nullptr;
    if (OrtStatus* s = entry<OrtStatus* (*)(const OrtKernelContext*, size_t, const OrtValue**)>(
            KernelContext_GetInput)(ctx, i, &value))
      return s;
    if (!value) {
      std::snprintf(msg, sizeof msg, "rednet.Involution: input %s is missing", kInputNames[i]);
      return status(kInvalidArg, msg);
    }
    if (OrtStatus* s = read_value(value, kInputNames[i], &in[i])) return s;
  }
  const Tensor &x = in[0], &wr = in[1], &br = in[2], &ws = in[3], &bs = in[4], &scale = in[5], &shift = in[6];
  if (x.rank != 4) return status(kInvalidArg, "rednet.Involution: X must be 4-D (B, H, W, C), channels last");
  const i64 B = x.dims[0], H = x.dims[1], W = x.dims[2], C = x.dims[3], K = k.kernel_size, G = k.groups;
  const i64 R = wr.rank == 2 ? wr.dims[1] : -1, N = ws.rank == 2 ? ws.dims[1] : -1;
  if (G < 1 || C % G || (C / G) % 16) {
    std::snprintf(msg, sizeof msg, "rednet.Involution: %ld channels in %ld groups; each group needs 16k channels",
                  long(C), long(G));
    return status(kInvalidArg, msg);
  }
  if (!shape_is(wr, {C, R}) || R % 16 || !shape_is(br, {R}) || !shape_is(ws, {R, N}) || N % 16 ||
      N < G * K * K || !shape_is(bs, {N}) || !shape_is(scale, {C}) || !shape_is(shift, {C})) {
    std::snprintf(msg, sizeof msg,
                  "rednet.Involution: weights do not fit X (B, H, W, C=%ld) with %ld groups, K=%ld: expected "
                  "reduce_weight (C, R), reduce_bias (R), span_weight (R, N), span_bias (N), scale (C), shift (C) "
                  "with R and N multiples of 16 and N >= groups*K*K (rednet.ops.pack_fused_weights)",
                  long(C), long(G), long(K));
    return status(kInvalidArg, msg);
  }
  const i64 Ho = (H + k.stride - 1) / k.stride, Wo = (W + k.stride - 1) / k.stride;
  const int64_t out_dims[4] = {B, Ho, Wo, C};
  OrtValue* out = nullptr;
  if (OrtStatus* s = entry<OrtStatus* (*)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**)>(
          KernelContext_GetOutput)(ctx, 0, out_dims, 4, &out))
    return s;
  void* y = nullptr;
  if (OrtStatus* s = entry<OrtStatus* (*)(OrtValue*, void**)>(GetTensorMutableData)(out, &y)) return s;
  if (B * Ho * Wo * C == 0) return nullptr;

  const Dims D{B, C, H, W, G, K, Ho, Wo, k.stride, (K - 1) / 2, 1};
  const FusedParams P{wr.data, br.data, ws.data, bs.data, scale.data, shift.data, R, N, k.relu != 0};
  OrtRunner runner;
  runner.run = &run_on_ort_pool;
  runner.ctx = ctx;
  t_runner = &runner;
  try {
    fused_nhwc(x.data, static_cast<float*>(y), D, P, 1);
  } catch (const std::exception& e) {  // scratch allocation on this thread
    release(runner.error);
    std::snprintf(msg, sizeof msg, "rednet.Involution: %s", e.what());
    runner.error = status(kFail, msg);
  }
  t_runner = nullptr;
  return runner.error;
}

OrtStatus* create_kernel(const CustomOp*, const OrtApi*, const OrtKernelInfo* info, void** out) {
  Kernel k{0, 1, 1, 0};
  const char* names[4] = {"kernel_size", "stride", "groups", "relu"};
  i64* fields[4] = {&k.kernel_size, &k.stride, &k.groups, &k.relu};
  for (int i = 0; i < 4; ++i) {
    int64_t v = 0;
    OrtStatus* s = entry<OrtStatus* (*)(const OrtKernelInfo*, const char*, int64_t*)>(KernelInfoGetAttribute_int64)(
        info, names[i], &v);
    if (s) {
      if (i == 3) {  // relu defaults to 0
        release(s);
        continue;
      }
      return s;
    }
    *fields[i] = v;
  }
  if (k.kernel_size < 1 || k.kernel_size % 2 == 0 || k.stride < 1 || k.groups < 1) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "rednet.Involution: kernel_size must be odd and positive, stride and groups "
                  "positive; got %ld, %ld, %ld", long(k.kernel_size), long(k.stride), long(k.groups));
    return status(kInvalidArg, msg);
  }
  *out = new (std::nothrow) Kernel(k);
  return *out ? nullptr : status(kFail, "rednet.Involution: out of memory");
}

void destroy_kernel(void* state) { delete static_cast<Kernel*>(state); }

CustomOp make_op() {
  CustomOp op{};
  op.version = kCustomOpVersion;
  op.GetName = [](const CustomOp*) { return "Involution"; };
  op.GetExecutionProviderType = [](const CustomOp*) -> const char* { return nullptr; };  // the CPU provider
  op.GetInputType = [](const CustomOp*, size_t) { return kFloat; };
  op.GetInputTypeCount = [](const CustomOp*) { return size_t(kInputs); };
  op.GetOutputType = [](const CustomOp*, size_t) { return kFloat; };
  op.GetOutputTypeCount = [](const CustomOp*) { return size_t(1); };
  op.KernelDestroy = &destroy_kernel;
  op.GetInputCharacteristic = [](const CustomOp*, size_t) { return kRequired; };
  op.GetOutputCharacteristic = [](const CustomOp*, size_t) { return kRequired; };
  op.GetInputMemoryType = [](const CustomOp*, size_t) { return kMemDefault; };
  op.GetVariadicInputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicInputHomogeneity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputMinArity = [](const CustomOp*) { return 1; };
  op.GetVariadicOutputHomogeneity = [](const CustomOp*) { return 1; };
  op.CreateKernelV2 = &create_kernel;
  op.KernelComputeV2 = &compute;
  return op;
}

CustomOp g_op = make_op();
OrtCustomOpDomain* g_domain = nullptr;
std::mutex g_domain_lock;

}  // namespace

extern "C" {

// The entry point ORT looks up when the library is registered with a session's options.
__attribute__((visibility("default"))) OrtStatus* RegisterCustomOps(OrtSessionOptions* options,
                                                                    const OrtApiBase* base) {
  const OrtApi* api = base->GetApi(kApiVersion);
  if (!api) {  // an older runtime: say so through the oldest table, which every runtime has
    g_api = base->GetApi(1);
    if (!g_api) return nullptr;
    char msg[200];
    std::snprintf(msg, sizeof msg, "rednet.Involution needs ONNX Runtime 1.17 or later (C API %u); this is %s",
                  kApiVersion, base->GetVersionString());
    return status(kFail, msg);
  }
  std::lock_guard<std::mutex> lock(g_domain_lock);
  g_api = api;
  if (!g_domain) {  // one domain for every session; it must outlive them, so it lives as long as the library
    OrtCustomOpDomain* domain = nullptr;
    if (OrtStatus* s = entry<OrtStatus* (*)(const char*, OrtCustomOpDomain**)>(CreateCustomOpDomain)("ai.rednet",
                                                                                                   &domain))
      return s;
    if (OrtStatus* s = entry<OrtStatus* (*)(OrtCustomOpDomain*, const CustomOp*)>(CustomOpDomain_Add)(domain, &g_op))
      return s;
    g_domain = domain;
  }
  return entry<OrtStatus* (*)(OrtSessionOptions*, OrtCustomOpDomain*)>(AddCustomOpDomain)(options, g_domain);
}

}  // extern "C"
