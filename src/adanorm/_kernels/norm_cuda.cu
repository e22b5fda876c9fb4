// CUDA kernels of the parameter-free variants (AdaNorm, DetachNorm and its ablations,
// LayerNorm-simple), registered as the CUDA implementations of the operators that norm_cpu.cpp
// defines: adanorm::norm, adanorm::norm_forward and adanorm::norm_backward.  The C++ autograd
// kernel of adanorm::norm (norm_cpu.cpp) then runs forward and backward with no Python on the
// hot path, as native LayerNorm does.
//
// One thread block per row; each thread keeps up to 32 elements of the row in registers, read and
// written as 16-byte vectors where the width allows (chunks of 4 float32 or 8 bfloat16/float16,
// consecutive threads on consecutive chunks), statistics in float32.  The forward reads
// x once and writes z once (plus mean and 1/sigma, one float each per row).  The backward reads x
// and g once and writes dx once, recomputing the statistics from x (arithmetic only), so sigma is
// never rebuilt from a rounded 1/sigma; DetachNorm with both statistics detached reads g and
// 1/sigma only.  The numerics are those of triton_norm.py: rows whose peak exceeds 1e15 are scaled
// by an exact power of two first (any finite row normalizes), and the mean is kept as an
// unevaluated sum mean + mean_lo (near-constant rows keep their spread).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace adanorm_cuda {
namespace {

// 512 threads per block leave each thread up to 128 registers (__launch_bounds__ below), enough for
// 32 row elements of x and 32 of g in the backward.
constexpr int kMaxThreads = 512;
constexpr int kMaxPerThread = 32;  // rows up to 16384 elements (the Triton kernels' limit too)
constexpr float kRescaleAbove = 1.0e15f;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide sums of two values (one shared round trip for both).
__device__ __forceinline__ float2 block_sum2(float a, float b, float2* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  a = warp_sum(a);
  b = warp_sum(b);
  __syncthreads();  // the previous reduction's result may still be being read
  if (lane == 0) shared[warp] = make_float2(a, b);
  __syncthreads();
  if (warp == 0) {
    float2 r = lane < warps ? shared[lane] : make_float2(0.f, 0.f);
    r.x = warp_sum(r.x);
    r.y = warp_sum(r.y);
    if (lane == 0) shared[0] = r;
  }
  __syncthreads();
  return shared[0];
}

__device__ __forceinline__ float block_sum(float a, float2* shared) {
  return block_sum2(a, 0.f, shared).x;
}

struct RowStats {
  float rstd_scaled;  // multiplies the (scaled) centered values: y = v * rstd_scaled
  float rstd;         // 1 / sigma of the row as given
  float mean;         // mean of the row as given
  float rho;          // factor of the std derivative (1 in biased mode)
};

// Block-wide sum and max at once.
__device__ __forceinline__ float2 block_sum_max(float a, float b, float2* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  a = warp_sum(a);
  b = warp_max(b);
  __syncthreads();
  if (lane == 0) shared[warp] = make_float2(a, b);
  __syncthreads();
  if (warp == 0) {
    float2 r = lane < warps ? shared[lane] : make_float2(0.f, 0.f);
    r.x = warp_sum(r.x);
    r.y = warp_max(r.y);
    if (lane == 0) shared[0] = r;
  }
  __syncthreads();
  return shared[0];
}

// A thread's share of a row: KV chunks of VEC consecutive elements, chunk c = kv * blockDim.x +
// threadIdx.x, so a warp reads 32 consecutive chunks (16-byte loads when VEC * size == 16).
template <int VEC, int KV>
struct Layout {
  static constexpr int K = VEC * KV;
  __device__ __forceinline__ static int64_t index(int i) {  // element i of this thread's K
    return (static_cast<int64_t>(i / VEC) * blockDim.x + threadIdx.x) * VEC + (i % VEC);
  }
};

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) Pack {
  scalar_t value[VEC];
};

template <typename scalar_t, int VEC, int KV>
__device__ __forceinline__ void load_row(const scalar_t* __restrict__ row, int64_t n,
                                         float (&v)[VEC * KV]) {
#pragma unroll
  for (int kv = 0; kv < KV; ++kv) {
    const int64_t base = (static_cast<int64_t>(kv) * blockDim.x + threadIdx.x) * VEC;
    if (VEC > 1 && base < n) {  // n % VEC == 0 in vector mode: the whole chunk is in the row
      const Pack<scalar_t, VEC> pack = *reinterpret_cast<const Pack<scalar_t, VEC>*>(row + base);
#pragma unroll
      for (int e = 0; e < VEC; ++e) v[kv * VEC + e] = static_cast<float>(pack.value[e]);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        v[kv * VEC + e] = base + e < n ? static_cast<float>(row[base + e]) : 0.f;
    }
  }
}

template <typename scalar_t, int VEC, int KV>
__device__ __forceinline__ void store_row(scalar_t* __restrict__ row, int64_t n,
                                          const float (&v)[VEC * KV]) {
#pragma unroll
  for (int kv = 0; kv < KV; ++kv) {
    const int64_t base = (static_cast<int64_t>(kv) * blockDim.x + threadIdx.x) * VEC;
    if (VEC > 1 && base < n) {
      Pack<scalar_t, VEC> pack;
#pragma unroll
      for (int e = 0; e < VEC; ++e) pack.value[e] = static_cast<scalar_t>(v[kv * VEC + e]);
      *reinterpret_cast<Pack<scalar_t, VEC>*>(row + base) = pack;
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (base + e < n) row[base + e] = static_cast<scalar_t>(v[kv * VEC + e]);
    }
  }
}

// v holds x (0 outside the row) on entry and the scaled, centered row (0 outside) on exit.
template <int VEC, int KV>
__device__ __forceinline__ RowStats row_stats(float (&v)[VEC * KV], int64_t n, float eps,
                                              bool unbiased, float2* shared) {
  constexpr int K = VEC * KV;
  float sum = 0.f;
  float peak = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    sum += v[i];
    peak = fmaxf(peak, fabsf(v[i]));
  }
  const float2 sum_peak = block_sum_max(sum, peak, shared);
  sum = sum_peak.x;
  float inv_unit = 1.f;
  if (sum_peak.y > kRescaleAbove) {  // uniform across the block: every thread takes this branch
    // 2^(10 - E) for peak = m * 2^E: exact, and a normal float for every finite peak.
    const int exponent = (__float_as_int(sum_peak.y) >> 23) & 0xff;
    inv_unit = __int_as_float((264 - exponent) << 23);
    float scaled = 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      v[i] *= inv_unit;
      scaled += v[i];
    }
    sum = block_sum(scaled, shared);
  }
  const float count = static_cast<float>(n);
  const float mean = sum / count;
  // The mean as an unevaluated sum mean + mean_lo: x - mean is exact near the mean, and mean_lo
  // recovers the first mean's rounding, which would dominate the spread of near-constant rows.
  float lo = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if (Layout<VEC, KV>::index(i) < n) lo += v[i] - mean;
  }
  const float mean_lo = block_sum(lo, shared) / count;
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    v[i] = Layout<VEC, KV>::index(i) < n ? (v[i] - mean) - mean_lo : 0.f;
    sum_sq += v[i] * v[i];
  }
  sum_sq = block_sum(sum_sq, shared);
  RowStats stats;
  if (unbiased) {
    const float std_dev = sqrtf(sum_sq / (count - 1.f));
    const float sigma = std_dev + eps * inv_unit;
    stats.rstd_scaled = sigma > 0.f ? 1.f / sigma : 0.f;
    stats.rho = std_dev > 0.f ? sigma / std_dev * count / (count - 1.f) : 0.f;
  } else {
    const float var = sum_sq / count + eps * inv_unit * inv_unit;
    stats.rstd_scaled = var > 0.f ? rsqrtf(var) : 0.f;
    stats.rho = 1.f;
  }
  stats.rstd = stats.rstd_scaled * inv_unit;
  stats.mean = (mean + mean_lo) / inv_unit;
  return stats;
}

template <typename scalar_t, int VEC, int KV>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel(
    const scalar_t* __restrict__ x, scalar_t* __restrict__ out, float* __restrict__ mean_out,
    float* __restrict__ rstd_out, int64_t n, float eps, bool unbiased, bool ada, float c,
    float ck) {
  __shared__ float2 shared[32];
  const int64_t row = blockIdx.x;
  float v[VEC * KV];
  load_row<scalar_t, VEC, KV>(x + row * n, n, v);
  const RowStats stats = row_stats<VEC, KV>(v, n, eps, unbiased, shared);
#pragma unroll
  for (int i = 0; i < VEC * KV; ++i) {
    float y = v[i] * stats.rstd_scaled;
    if (ada) y = y * (c - ck * y);
    v[i] = y;
  }
  store_row<scalar_t, VEC, KV>(out + row * n, n, v);
  if (threadIdx.x == 0) {
    mean_out[row] = stats.mean;
    rstd_out[row] = stats.rstd;
  }
}

template <typename scalar_t, int VEC, int KV>
__global__ void __launch_bounds__(kMaxThreads) backward_kernel(
    const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
    const float* __restrict__ rstd_in, scalar_t* __restrict__ dx, int64_t n, float eps,
    bool unbiased, bool ada, bool detach_mean, bool detach_std, float c, float ck) {
  __shared__ float2 shared[32];
  constexpr int K = VEC * KV;
  const int64_t row = blockIdx.x;
  float gp[K];
  load_row<scalar_t, VEC, KV>(g + row * n, n, gp);
  if (x == nullptr) {  // DetachNorm: dx = g / sigma with sigma constant
    const float rstd = rstd_in[row];
#pragma unroll
    for (int i = 0; i < K; ++i) gp[i] *= rstd;
    store_row<scalar_t, VEC, KV>(dx + row * n, n, gp);
    return;
  }
  float v[K];
  load_row<scalar_t, VEC, KV>(x + row * n, n, v);
  const RowStats stats = row_stats<VEC, KV>(v, n, eps, unbiased, shared);
  float sum_g = 0.f;
  float sum_gy = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    v[i] *= stats.rstd_scaled;             // y (0 outside the row, as is g)
    if (ada) gp[i] *= c - ck * v[i];       // phi(y) = C (1 - k y), a constant in backward
    sum_g += gp[i];
    sum_gy += gp[i] * v[i];
  }
  const float2 sums = block_sum2(sum_g, sum_gy, shared);
  const float count = static_cast<float>(n);
  const float mean_g = detach_mean ? 0.f : sums.x / count;
  const float proj = detach_std ? 0.f : stats.rho * sums.y / count;
#pragma unroll
  for (int i = 0; i < K; ++i) gp[i] = (gp[i] - mean_g - v[i] * proj) * stats.rstd;
  store_row<scalar_t, VEC, KV>(dx + row * n, n, gp);
}

// Launch shape: VEC elements per 16-byte load where the row allows it (n a multiple of VEC),
// threads doubled from one warp while each would get more than 4 chunks (at most 512), then
// KV chunks per thread.
struct Launch {
  int vec;
  int threads;
  int chunks_per_thread;
};

Launch launch_for(int64_t n, int64_t element_size) {
  const int vector = static_cast<int>(16 / element_size);
  const int vec = n % vector == 0 ? vector : 1;
  const int64_t chunks = (n + vec - 1) / vec;
  int threads = 32;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * 4 < chunks) threads *= 2;
  int per_thread = 1;
  while (static_cast<int64_t>(per_thread) * threads < chunks) per_thread *= 2;
  TORCH_CHECK(per_thread <= 8 && vec * per_thread <= kMaxPerThread,
              "adanorm CUDA kernels take rows of at most ", kMaxThreads * 8 * vector,
              " elements (", kMaxThreads * 8, " when the width is not a multiple of ", vector,
              "), got ", n);
  return {vec, threads, per_thread};
}

#define ADANORM_DISPATCH_LAUNCH(launch, scalar_size, KERNEL_CALL)                 \
  do {                                                                             \
    constexpr int kVector = 16 / scalar_size;                                      \
    if (launch.vec == 1) {                                                         \
      constexpr int VEC = 1;                                                       \
      switch (launch.chunks_per_thread) {                                          \
        case 1: { constexpr int KV = 1; KERNEL_CALL; break; }                      \
        case 2: { constexpr int KV = 2; KERNEL_CALL; break; }                      \
        case 4: { constexpr int KV = 4; KERNEL_CALL; break; }                      \
        default: { constexpr int KV = 8; KERNEL_CALL; break; }                     \
      }                                                                            \
    } else {                                                                       \
      constexpr int VEC = kVector;                                                 \
      switch (launch.chunks_per_thread) {                                          \
        case 1: { constexpr int KV = 1; KERNEL_CALL; break; }                      \
        case 2: { constexpr int KV = 2; KERNEL_CALL; break; }                      \
        case 4: { constexpr int KV = 4; KERNEL_CALL; break; }                      \
        default: { constexpr int KV = kMaxPerThread / kVector; KERNEL_CALL; break; } \
      }                                                                            \
    }                                                                              \
  } while (0)

// float32, float16 and bfloat16 only: float64 inputs take the pure-PyTorch reference path.
#define ADANORM_DISPATCH_TYPES(TYPE, ...)                                          \
  switch (TYPE) {                                                                  \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }             \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }           \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }   \
    default: TORCH_CHECK(false, "adanorm CUDA kernels: unsupported dtype ", TYPE); \
  }

// A contiguous tensor whose data starts on a 16-byte boundary (vector loads need it).
at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

void check_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "adanorm CUDA kernels: ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) > 0, "adanorm CUDA kernels: ", name,
              " needs a non-empty last dimension");
  const auto type = t.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "adanorm CUDA kernels take float32, float16 or bfloat16, got ", type);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward_cuda(const at::Tensor& x_in,
                                                                 double eps, bool unbiased,
                                                                 std::optional<double> scale,
                                                                 double k) {
  check_input(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = aligned_contiguous(x_in);
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  at::Tensor out = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, mean, rstd};
  TORCH_CHECK(!unbiased || n >= 2, "std_mode='unbiased' needs at least 2 normalized elements");
  const Launch launch = launch_for(n, x.element_size());
  const float c = static_cast<float>(scale.value_or(1.0));
  const float ck = static_cast<float>(scale.value_or(1.0) * k);
  const bool ada = scale.has_value();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ADANORM_DISPATCH_TYPES(x.scalar_type(), [&] {
    ADANORM_DISPATCH_LAUNCH(launch, sizeof(scalar_t),
      (forward_kernel<scalar_t, VEC, KV><<<rows, launch.threads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), n,
          static_cast<float>(eps), unbiased, ada, c, ck)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, mean, rstd};
}

at::Tensor norm_backward_cuda(const at::Tensor& grad_in, const std::optional<at::Tensor>& x_in,
                              const std::optional<at::Tensor>& /*mean: recomputed from x*/,
                              const at::Tensor& rstd_in, double eps, bool unbiased,
                              bool detach_mean, bool detach_std, std::optional<double> scale,
                              double k) {
  check_input(grad_in, "grad");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = aligned_contiguous(grad_in);
  const int64_t n = grad.size(-1);
  const int64_t rows = grad.numel() / n;
  at::Tensor dx = at::empty_like(grad);
  if (rows == 0) return dx;
  at::Tensor x;
  if (x_in.has_value() && x_in->defined()) {
    x = aligned_contiguous(*x_in);
    TORCH_CHECK(x.scalar_type() == grad.scalar_type() && x.numel() == grad.numel(),
                "adanorm CUDA backward: x and grad differ in dtype or size");
  }
  const at::Tensor rstd = rstd_in.contiguous();
  const Launch launch = launch_for(n, grad.element_size());
  const float c = static_cast<float>(scale.value_or(1.0));
  const float ck = static_cast<float>(scale.value_or(1.0) * k);
  const bool ada = scale.has_value();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ADANORM_DISPATCH_TYPES(grad.scalar_type(), [&] {
    const scalar_t* x_ptr = x.defined() ? x.const_data_ptr<scalar_t>() : nullptr;
    ADANORM_DISPATCH_LAUNCH(launch, sizeof(scalar_t),
      (backward_kernel<scalar_t, VEC, KV><<<rows, launch.threads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), x_ptr, rstd.const_data_ptr<float>(),
          dx.mutable_data_ptr<scalar_t>(), n, static_cast<float>(eps), unbiased, ada,
          detach_mean, detach_std, c, ck)));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

at::Tensor norm_no_grad_cuda(const at::Tensor& x, double eps, bool unbiased, bool /*detach_mean*/,
                             bool /*detach_std*/, std::optional<double> scale, double k) {
  return std::get<0>(norm_forward_cuda(x, eps, unbiased, scale, k));
}

}  // namespace
}  // namespace adanorm_cuda

TORCH_LIBRARY_IMPL(adanorm, CUDA, m) {
  m.impl("norm", adanorm_cuda::norm_no_grad_cuda);
  m.impl("norm_forward", adanorm_cuda::norm_forward_cuda);
  m.impl("norm_backward", adanorm_cuda::norm_backward_cuda);
}
