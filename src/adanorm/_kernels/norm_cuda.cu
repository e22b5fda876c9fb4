// CUDA kernels of the parameter-free variants (AdaNorm, DetachNorm and its ablations,
// LayerNorm-simple), registered as the CUDA implementations of the operators that norm_cpu.cpp
// defines: adanorm::norm, adanorm::norm_forward and adanorm::norm_backward.  The C++ autograd
// kernel of adanorm::norm (norm_cpu.cpp) then runs forward and backward with no Python on the
// hot path, as native LayerNorm does.
//
// One thread block per row; each thread keeps K elements of the row in registers (element
// j * blockDim.x + threadIdx.x, so loads are coalesced), statistics in float32.  The forward reads
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

#include <optional>
#include <tuple>

namespace adanorm_cuda {
namespace {

// 512 threads per block leave each thread up to 128 registers (__launch_bounds__ below), enough for
// 32 row elements in the forward and, with g read twice in the widest case, in the backward.
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

__device__ __forceinline__ float block_max(float a, float2* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int warps = (blockDim.x + 31) >> 5;
  a = warp_max(a);
  __syncthreads();
  if (lane == 0) shared[warp].x = a;
  __syncthreads();
  if (warp == 0) {
    float r = lane < warps ? shared[lane].x : 0.f;
    r = warp_max(r);
    if (lane == 0) shared[0].x = r;
  }
  __syncthreads();
  return shared[0].x;
}

struct RowStats {
  float rstd_scaled;  // multiplies the (scaled) centered values: y = v * rstd_scaled
  float rstd;         // 1 / sigma of the row as given
  float mean;         // mean of the row as given
  float rho;          // factor of the std derivative (1 in biased mode)
};

// v[k] holds x (0 outside the row) on entry and the scaled, centered row on exit.
template <int K>
__device__ __forceinline__ RowStats row_stats(float (&v)[K], int64_t n, float eps, bool unbiased,
                                              float2* shared) {
  float peak = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) peak = fmaxf(peak, fabsf(v[k]));
  peak = block_max(peak, shared);
  float inv_unit = 1.f;
  if (peak > kRescaleAbove) {
    // 2^(10 - E) for peak = m * 2^E: exact, and a normal float for every finite peak.
    const int exponent = (__float_as_int(peak) >> 23) & 0xff;
    inv_unit = __int_as_float((264 - exponent) << 23);
  }
  float sum = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] *= inv_unit;
    sum += v[k];
  }
  const float count = static_cast<float>(n);
  const float mean = block_sum(sum, shared) / count;
  float lo = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
    if (j < n) lo += v[k] - mean;
  }
  const float mean_lo = block_sum(lo, shared) / count;
  float sum_sq = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
    v[k] = j < n ? (v[k] - mean) - mean_lo : 0.f;
    sum_sq += v[k] * v[k];
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

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kMaxThreads) forward_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                               float* __restrict__ mean_out, float* __restrict__ rstd_out,
                               int64_t n, float eps, bool unbiased, bool ada, float c, float ck) {
  __shared__ float2 shared[32];
  const int64_t row = blockIdx.x;
  const scalar_t* xr = x + row * n;
  float v[K];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
    v[k] = j < n ? static_cast<float>(xr[j]) : 0.f;
  }
  const RowStats stats = row_stats<K>(v, n, eps, unbiased, shared);
  scalar_t* outr = out + row * n;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
    if (j < n) {
      float y = v[k] * stats.rstd_scaled;
      if (ada) y = y * (c - ck * y);
      outr[j] = static_cast<scalar_t>(y);
    }
  }
  if (threadIdx.x == 0) {
    mean_out[row] = stats.mean;
    rstd_out[row] = stats.rstd;
  }
}

template <typename scalar_t, int K>
__global__ void __launch_bounds__(kMaxThreads) backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                const float* __restrict__ rstd_in, scalar_t* __restrict__ dx,
                                int64_t n, float eps, bool unbiased, bool ada, bool detach_mean,
                                bool detach_std, float c, float ck) {
  __shared__ float2 shared[32];
  const int64_t row = blockIdx.x;
  const scalar_t* gr = g + row * n;
  scalar_t* dxr = dx + row * n;
  if (x == nullptr) {  // DetachNorm: dx = g / sigma with sigma constant
    const float rstd = rstd_in[row];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
      if (j < n) dxr[j] = static_cast<scalar_t>(static_cast<float>(gr[j]) * rstd);
    }
    return;
  }
  const scalar_t* xr = x + row * n;
  // Up to 16 elements per thread keep g in registers; the widest rows read it a second time (an
  // L2 hit: one row is at most 64 KiB) rather than spill.
  constexpr bool kReloadG = K > 16;
  constexpr int KG = kReloadG ? 1 : K;
  float v[K];
  float gp[KG];
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
    v[k] = j < n ? static_cast<float>(xr[j]) : 0.f;
  }
  if constexpr (!kReloadG) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int64_t j = static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
      gp[k] = j < n ? static_cast<float>(gr[j]) : 0.f;
    }
  }
  const RowStats stats = row_stats<K>(v, n, eps, unbiased, shared);
  float sum_g = 0.f;
  float sum_gy = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    v[k] *= stats.rstd_scaled;  // y
    float gk;
    if constexpr (kReloadG) {
      const int64_t j = static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
      gk = j < n ? static_cast<float>(gr[j]) : 0.f;
    } else {
      gk = gp[k];
    }
    if (ada) gk *= c - ck * v[k];  // phi(y) = C (1 - k y), a constant in backward
    if constexpr (!kReloadG) gp[k] = gk;
    sum_g += gk;
    sum_gy += gk * v[k];
  }
  const float2 sums = block_sum2(sum_g, sum_gy, shared);
  const float count = static_cast<float>(n);
  const float mean_g = detach_mean ? 0.f : sums.x / count;
  const float proj = detach_std ? 0.f : stats.rho * sums.y / count;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int64_t j = static_cast<int64_t>(k) * blockDim.x + threadIdx.x;
    if (j < n) {
      float gk;
      if constexpr (kReloadG) {
        gk = static_cast<float>(gr[j]);
        if (ada) gk *= c - ck * v[k];
      } else {
        gk = gp[k];
      }
      dxr[j] = static_cast<scalar_t>((gk - mean_g - v[k] * proj) * stats.rstd);
    }
  }
}

// Threads per row and elements per thread: about 4 elements per thread, up to 512 threads, then
// more elements per thread.
struct Launch {
  int threads;
  int per_thread;
};

Launch launch_for(int64_t n) {
  int threads = 32;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * 4 < n) threads *= 2;
  int per_thread = 1;
  while (static_cast<int64_t>(per_thread) * threads < n) per_thread *= 2;
  TORCH_CHECK(per_thread <= kMaxPerThread, "adanorm CUDA kernels take rows of at most ",
              kMaxThreads * kMaxPerThread, " elements, got ", n);
  return {threads, per_thread};
}

#define ADANORM_DISPATCH_PER_THREAD(per_thread, KERNEL_CALL) \
  switch (per_thread) {                                    \
    case 1: { constexpr int K = 1; KERNEL_CALL; break; }   \
    case 2: { constexpr int K = 2; KERNEL_CALL; break; }   \
    case 4: { constexpr int K = 4; KERNEL_CALL; break; }   \
    case 8: { constexpr int K = 8; KERNEL_CALL; break; }   \
    case 16: { constexpr int K = 16; KERNEL_CALL; break; } \
    default: { constexpr int K = 32; KERNEL_CALL; break; } \
  }

// float32, float16 and bfloat16 only: float64 inputs take the pure-PyTorch reference path.
#define ADANORM_DISPATCH_TYPES(TYPE, ...)                                          \
  switch (TYPE) {                                                                  \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }             \
    case at::kHalf: { using scalar_t = at::Half; __VA_ARGS__(); break; }           \
    case at::kBFloat16: { using scalar_t = at::BFloat16; __VA_ARGS__(); break; }   \
    default: TORCH_CHECK(false, "adanorm CUDA kernels: unsupported dtype ", TYPE); \
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
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  at::Tensor out = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, mean, rstd};
  TORCH_CHECK(!unbiased || n >= 2, "std_mode='unbiased' needs at least 2 normalized elements");
  const Launch launch = launch_for(n);
  const float c = static_cast<float>(scale.value_or(1.0));
  const float ck = static_cast<float>(scale.value_or(1.0) * k);
  const bool ada = scale.has_value();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ADANORM_DISPATCH_TYPES(x.scalar_type(), [&] {
    ADANORM_DISPATCH_PER_THREAD(launch.per_thread,
      (forward_kernel<scalar_t, K><<<rows, launch.threads, 0, stream>>>(
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
  const at::Tensor grad = grad_in.contiguous();
  const int64_t n = grad.size(-1);
  const int64_t rows = grad.numel() / n;
  at::Tensor dx = at::empty_like(grad);
  if (rows == 0) return dx;
  at::Tensor x;
  if (x_in.has_value() && x_in->defined()) {
    x = x_in->contiguous();
    TORCH_CHECK(x.scalar_type() == grad.scalar_type() && x.numel() == grad.numel(),
                "adanorm CUDA backward: x and grad differ in dtype or size");
  }
  const at::Tensor rstd = rstd_in.contiguous();
  const Launch launch = launch_for(n);
  const float c = static_cast<float>(scale.value_or(1.0));
  const float ck = static_cast<float>(scale.value_or(1.0) * k);
  const bool ada = scale.has_value();
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ADANORM_DISPATCH_TYPES(grad.scalar_type(), [&] {
    const scalar_t* x_ptr = x.defined() ? x.const_data_ptr<scalar_t>() : nullptr;
    ADANORM_DISPATCH_PER_THREAD(launch.per_thread,
      (backward_kernel<scalar_t, K><<<rows, launch.threads, 0, stream>>>(
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
