// CUDA kernels of the parameter-free variants (AdaNorm, DetachNorm and its ablations,
// LayerNorm-simple), registered as the CUDA implementations of the operators that norm_cpu.cpp
// defines: adanorm::norm, adanorm::norm_forward and adanorm::norm_backward.  The C++ autograd
// kernel of adanorm::norm (norm_cpu.cpp) then runs forward and backward with no Python on the
// hot path, as native LayerNorm does.
//
// Layout.  Each row lives in registers, statistics in float32.  Rows of up to 1024 elements get
// one warp each (4 rows per block) and reduce with warp shuffles alone; wider rows (up to 16384)
// get a block of 64-512 threads and one shared-memory round with a single barrier per reduction,
// several sums reduced together where the algorithm allows.  Data moves as 16-byte vectors (4
// float32 or 8 bfloat16/float16, reinterpreted as uint4) whenever every pointer is 16-byte
// aligned and the width a multiple of the vector; otherwise element by element (odd widths,
// misaligned views), with the same arithmetic.
//
// Passes.  The forward reads x once and writes z once (plus mean and 1/sigma, one float each per
// row).  The backward reads x and g once and writes dx once, recomputing the statistics from x
// (arithmetic only), so sigma is never rebuilt from a rounded 1/sigma; DetachNorm with both
// statistics detached reads g and 1/sigma only.  The numerics are those of triton_norm.py: rows
// whose peak exceeds 1e15 are scaled by an exact power of two first (any finite row normalizes),
// and the mean is kept as an unevaluated sum mean + mean_lo (near-constant rows keep their
// spread).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace adanorm_cuda {
namespace {

constexpr int kMaxThreads = 512;        // threads of a block-per-row launch (16 warps)
constexpr int kMaxWarps = kMaxThreads / 32;
constexpr int kMaxPerThread = 32;       // row elements a thread keeps in registers
// Block-per-row rows: threads are added while a thread would hold more than this many chunks
// (16 float32 or 32 16-bit elements with 16-byte vectors, 16 element-wise).  The Triton kernels
// of the same design measured this on an H200 (benchmarks/results/gpu_tuning.json): 16-bit rows
// move the most bytes with 32 elements per thread (bf16 8192: 3987 / 3304 GB/s forward / backward
// at 8 warps against 3676 / 2853 at 16), float32 rows are flat from 8 to 32.
constexpr int kSoftChunksPerThread = 4;
constexpr int kSoftPerThreadScalar = 16;
constexpr int kWarpRowsPerBlock = 4;    // warp-per-row launches: 4 rows (warps) per block
constexpr int kMaxWidth = kMaxThreads * kMaxPerThread;  // 16384, _kernels.CUDA_MAX_WIDTH
constexpr float kRescaleAbove = 1.0e15f;

// ---- row reductions -----------------------------------------------------------------------------

// The butterfly over one warp's 32 lanes: every lane ends with the warp's result.
template <bool kLastMax, int N>
__device__ __forceinline__ void warp_reduce(float (&v)[N]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      const float other = __shfl_xor_sync(0xffffffffu, v[i], offset);
      v[i] = (kLastMax && i == N - 1) ? fmaxf(v[i], other) : v[i] + other;
    }
  }
}

// Reduces N per-thread values over the threads of one row at once: sums, and a max in the last
// slot when kLastMax.  A warp-per-row row needs shuffles only; a block-per-row row adds one
// shared-memory round with a single barrier: every warp then reduces the warps' partials itself,
// so no second barrier broadcasts the result.  Each reduction of a kernel gets its own scratch
// slice, so a fast warp writing the next reduction's partials never races a slow warp still
// reading this one's.  Every lane ends with the same bits (IEEE sums and max are commutative, and
// the butterfly pairs lanes symmetrically), so branches on the result are uniform.
template <bool kWarpRow, bool kLastMax, int N>
__device__ __forceinline__ void row_reduce(float (&v)[N], float* scratch) {
  warp_reduce<kLastMax>(v);
  if constexpr (!kWarpRow) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) scratch[i * kMaxWarps + warp] = v[i];
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = lane < warps ? scratch[i * kMaxWarps + lane] : 0.f;
    warp_reduce<kLastMax>(v);
  }
}

template <bool kWarpRow>
__device__ __forceinline__ float row_sum(float value, float* scratch) {
  float v[1] = {value};
  row_reduce<kWarpRow, false, 1>(v, scratch);
  return v[0];
}

// Scratch floats per reduction (N <= 2 values per warp), and reductions per kernel: forward sum and
// peak, the rescaled sum, mean_lo, the sum of squares; the backward adds sum(g') and sum(g' y).
constexpr int kScratchPerReduction = 2 * kMaxWarps;
constexpr int kReductions = 5;

// ---- loads and stores ---------------------------------------------------------------------------
// Rows are read and written either as 16-byte vectors (VEC = 16 / element size consecutive
// elements; needs 16-byte aligned data and a width that is a multiple of VEC) or element by
// element (VEC = 1).  A thread's share of a row: KV chunks of VEC elements, chunk kv * tpr + t for
// thread t of the tpr threads of the row, so a warp touches 32 consecutive chunks at a time.

__device__ __forceinline__ float bf16_bits_to_float(unsigned bits) {
  return __uint_as_float(bits << 16);
}
__device__ __forceinline__ float half_bits_to_float(unsigned bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
__device__ __forceinline__ unsigned float_to_bf16_bits(float f) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));  // round to nearest even, NaN kept
}
__device__ __forceinline__ unsigned float_to_half_bits(float f) {
  return __half_as_ushort(__float2half_rn(f));
}

template <typename T>
__device__ __forceinline__ float load_one(const T* __restrict__ p) {
  if constexpr (std::is_same_v<T, float>) {
    return __ldg(p);
  } else {
    const unsigned bits = __ldg(reinterpret_cast<const unsigned short*>(p));
    if constexpr (std::is_same_v<T, at::BFloat16>) return bf16_bits_to_float(bits);
    else return half_bits_to_float(bits);
  }
}

template <typename T>
__device__ __forceinline__ void store_one(T* __restrict__ p, float f) {
  if constexpr (std::is_same_v<T, float>) {
    *p = f;
  } else if constexpr (std::is_same_v<T, at::BFloat16>) {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(float_to_bf16_bits(f));
  } else {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(float_to_half_bits(f));
  }
}

// One 16-byte load of 4 float32 or 8 16-bit values.
template <typename T>
__device__ __forceinline__ void load_vector(const T* __restrict__ p, float* out) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  const unsigned words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (std::is_same_v<T, float>) {
      out[w] = __uint_as_float(words[w]);
    } else if constexpr (std::is_same_v<T, at::BFloat16>) {  // element 2w in the low half
      out[2 * w] = bf16_bits_to_float(words[w] & 0xffffu);
      out[2 * w + 1] = __uint_as_float(words[w] & 0xffff0000u);
    } else {
      out[2 * w] = half_bits_to_float(words[w] & 0xffffu);
      out[2 * w + 1] = half_bits_to_float(words[w] >> 16);
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_vector(T* __restrict__ p, const float* in) {
  unsigned words[4];
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    if constexpr (std::is_same_v<T, float>) {
      words[w] = __float_as_uint(in[w]);
    } else if constexpr (std::is_same_v<T, at::BFloat16>) {
      words[w] = float_to_bf16_bits(in[2 * w]) | (float_to_bf16_bits(in[2 * w + 1]) << 16);
    } else {
      words[w] = float_to_half_bits(in[2 * w]) | (float_to_half_bits(in[2 * w + 1]) << 16);
    }
  }
  *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
}

// Where this thread's element i (of its VEC * KV) sits in the row.
template <int VEC>
__device__ __forceinline__ int element_index(int i, int t, int tpr) {
  return ((i / VEC) * tpr + t) * VEC + (i % VEC);
}

// v[i] = row element (0 outside the row).  In vector mode n % VEC == 0, so a chunk that starts in
// the row lies in it entirely.
template <typename T, int VEC, int KV>
__device__ __forceinline__ void load_row(const T* __restrict__ row, int n, int t, int tpr,
                                         float (&v)[VEC * KV]) {
#pragma unroll
  for (int kv = 0; kv < KV; ++kv) {
    const int base = (kv * tpr + t) * VEC;
    if constexpr (VEC > 1) {
      if (base < n) {
        load_vector<T>(row + base, v + kv * VEC);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) v[kv * VEC + e] = 0.f;
      }
    } else {
      v[kv] = base < n ? load_one<T>(row + base) : 0.f;
    }
  }
}

template <typename T, int VEC, int KV>
__device__ __forceinline__ void store_row(T* __restrict__ row, int n, int t, int tpr,
                                          const float (&v)[VEC * KV]) {
#pragma unroll
  for (int kv = 0; kv < KV; ++kv) {
    const int base = (kv * tpr + t) * VEC;
    if (base < n) {
      if constexpr (VEC > 1) store_vector<T>(row + base, v + kv * VEC);
      else store_one<T>(row + base, v[kv]);
    }
  }
}

// ---- statistics ---------------------------------------------------------------------------------

struct RowStats {
  float rstd_scaled;  // multiplies the (scaled) centered values: y = v * rstd_scaled
  float rstd;         // 1 / sigma of the row as given
  float mean;         // mean of the row as given
  float rho;          // factor of the std derivative (1 in biased mode)
};

// v holds x (0 outside the row) on entry and the scaled, centered row (0 outside) on exit.
// Uses scratch slices 0..3.
template <int VEC, int KV, bool kWarpRow>
__device__ __forceinline__ RowStats row_stats(float (&v)[VEC * KV], int n, int t, int tpr,
                                              float eps, bool unbiased, float* scratch) {
  constexpr int K = VEC * KV;
  float sum_peak[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < K; ++i) {
    sum_peak[0] += v[i];
    sum_peak[1] = fmaxf(sum_peak[1], fabsf(v[i]));
  }
  row_reduce<kWarpRow, true, 2>(sum_peak, scratch);
  float sum = sum_peak[0];
  float inv_unit = 1.f;
  if (sum_peak[1] > kRescaleAbove) {  // uniform across the row's threads
    // 2^(10 - E) for peak = m * 2^E: exact, and a normal float for every finite peak.
    const int exponent = (__float_as_int(sum_peak[1]) >> 23) & 0xff;
    inv_unit = __int_as_float((264 - exponent) << 23);
    float scaled = 0.f;
#pragma unroll
    for (int i = 0; i < K; ++i) {
      v[i] *= inv_unit;
      scaled += v[i];
    }
    sum = row_sum<kWarpRow>(scaled, scratch + kScratchPerReduction);
  }
  const float count = static_cast<float>(n);
  const float mean = sum / count;
  // The mean as an unevaluated sum mean + mean_lo: x - mean is exact near the mean, and mean_lo
  // recovers the first mean's rounding, which would dominate the spread of near-constant rows.
  float lo = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if (element_index<VEC>(i, t, tpr) < n) lo += v[i] - mean;
  }
  const float mean_lo = row_sum<kWarpRow>(lo, scratch + 2 * kScratchPerReduction) / count;
  float sum_sq = 0.f;
#pragma unroll
  for (int i = 0; i < K; ++i) {
    v[i] = element_index<VEC>(i, t, tpr) < n ? (v[i] - mean) - mean_lo : 0.f;
    sum_sq += v[i] * v[i];
  }
  sum_sq = row_sum<kWarpRow>(sum_sq, scratch + 3 * kScratchPerReduction);
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

// ---- kernels ------------------------------------------------------------------------------------
// kWarpRow: one warp per row, kWarpRowsPerBlock rows per block (blockDim (32, 4)), reductions by
// shuffles only.  Otherwise one block of blockDim.x threads per row.

struct RowPlace {
  int64_t row;
  int t;    // this thread's rank among its row's threads
  int tpr;  // threads per row
};

template <bool kWarpRow>
__device__ __forceinline__ RowPlace row_place() {
  if constexpr (kWarpRow) {
    return {static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y,
            static_cast<int>(threadIdx.x), 32};
  } else {
    return {static_cast<int64_t>(blockIdx.x), static_cast<int>(threadIdx.x),
            static_cast<int>(blockDim.x)};
  }
}

template <typename T, int VEC, int KV, bool kWarpRow>
__global__ void __launch_bounds__(kMaxThreads, 1) forward_kernel(
    const T* __restrict__ x, T* __restrict__ out, float* __restrict__ mean_out,
    float* __restrict__ rstd_out, int64_t rows, int n, float eps, bool unbiased, bool ada,
    float c, float ck) {
  __shared__ float scratch[kWarpRow ? 1 : kReductions * kScratchPerReduction];
  const RowPlace place = row_place<kWarpRow>();
  if (kWarpRow && place.row >= rows) return;  // a whole warp: no barrier is skipped
  constexpr int K = VEC * KV;
  float v[K];
  load_row<T, VEC, KV>(x + place.row * n, n, place.t, place.tpr, v);
  const RowStats stats =
      row_stats<VEC, KV, kWarpRow>(v, n, place.t, place.tpr, eps, unbiased, scratch);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    float y = v[i] * stats.rstd_scaled;
    if (ada) y = y * (c - ck * y);
    v[i] = y;
  }
  store_row<T, VEC, KV>(out + place.row * n, n, place.t, place.tpr, v);
  if (place.t == 0) {
    mean_out[place.row] = stats.mean;
    rstd_out[place.row] = stats.rstd;
  }
}

template <typename T, int VEC, int KV, bool kWarpRow>
__global__ void __launch_bounds__(kMaxThreads, 1) backward_kernel(
    const T* __restrict__ g, const T* __restrict__ x, const float* __restrict__ rstd_in,
    T* __restrict__ dx, int64_t rows, int n, float eps, bool unbiased, bool ada, bool detach_mean,
    bool detach_std, float c, float ck) {
  __shared__ float scratch[kWarpRow ? 1 : kReductions * kScratchPerReduction];
  const RowPlace place = row_place<kWarpRow>();
  if (kWarpRow && place.row >= rows) return;
  constexpr int K = VEC * KV;
  float gp[K];
  load_row<T, VEC, KV>(g + place.row * n, n, place.t, place.tpr, gp);
  if (x == nullptr) {  // DetachNorm: dx = g / sigma with sigma constant
    const float rstd = rstd_in[place.row];
#pragma unroll
    for (int i = 0; i < K; ++i) gp[i] *= rstd;
    store_row<T, VEC, KV>(dx + place.row * n, n, place.t, place.tpr, gp);
    return;
  }
  float v[K];
  load_row<T, VEC, KV>(x + place.row * n, n, place.t, place.tpr, v);
  const RowStats stats =
      row_stats<VEC, KV, kWarpRow>(v, n, place.t, place.tpr, eps, unbiased, scratch);
  float sums[2] = {0.f, 0.f};  // sum(g'), sum(g' y)
#pragma unroll
  for (int i = 0; i < K; ++i) {
    v[i] *= stats.rstd_scaled;        // y (0 outside the row, as is g)
    if (ada) gp[i] *= c - ck * v[i];  // phi(y) = C (1 - k y), a constant in backward
    sums[0] += gp[i];
    sums[1] += gp[i] * v[i];
  }
  row_reduce<kWarpRow, false, 2>(sums, scratch + 4 * kScratchPerReduction);
  const float count = static_cast<float>(n);
  const float mean_g = detach_mean ? 0.f : sums[0] / count;
  const float proj = detach_std ? 0.f : stats.rho * sums[1] / count;
#pragma unroll
  for (int i = 0; i < K; ++i) gp[i] = (gp[i] - mean_g - v[i] * proj) * stats.rstd;
  store_row<T, VEC, KV>(dx + place.row * n, n, place.t, place.tpr, gp);
}

// ---- launch configuration -----------------------------------------------------------------------

// VEC elements per 16-byte access where every pointer is 16-byte aligned and the width a
// multiple of VEC, else 1.  Rows whose chunks fit kMaxPerThread elements per lane of one warp get
// a warp each; wider rows a block whose thread count doubles from 64 while a thread would hold
// more than kSoftChunksPerThread vectors (kSoftPerThreadScalar elements element-wise), up to
// kMaxThreads, then KV chunks per thread.
struct Launch {
  int vec;
  bool warp_row;
  int threads;  // per row
  int kv;
};

int next_power_of_two(int64_t value) {
  int p = 1;
  while (p < value) p *= 2;
  return p;
}

Launch launch_for(int64_t n, int64_t element_size, bool aligned) {
  const int vector = static_cast<int>(16 / element_size);
  TORCH_CHECK(n <= kMaxWidth, "adanorm CUDA kernels take rows of at most ", kMaxWidth,
              " elements, got ", n, " (wider rows take the Triton or pure-PyTorch path)");
  const int vec = aligned && n % vector == 0 ? vector : 1;
  const int64_t chunks = (n + vec - 1) / vec;
  const int max_kv = kMaxPerThread / vec;
  if (chunks <= 32 * max_kv) {
    return {vec, true, 32, next_power_of_two((chunks + 31) / 32)};
  }
  const int soft_kv = vec == 1 ? kSoftPerThreadScalar : kSoftChunksPerThread;
  int threads = 64;
  while (threads < kMaxThreads && static_cast<int64_t>(threads) * soft_kv < chunks) threads *= 2;
  return {vec, false, threads, next_power_of_two((chunks + threads - 1) / threads)};
}

template <int... KVs, typename Body>
void with_kv(int kv, Body&& body) {
  const bool launched =
      ((kv == KVs ? (body(std::integral_constant<int, KVs>{}), true) : false) || ...);
  TORCH_CHECK(launched, "adanorm CUDA kernels: no kernel instance for ", kv,
              " chunks per thread (a bug in launch_for)");
}

// Calls body(VEC, KV, kWarpRow) as integral constants for launch's configuration; the lists are
// every KV that launch_for can choose for the element size.
template <typename T, typename Body>
void dispatch_launch(const Launch& launch, Body&& body) {
  constexpr int kVector = 16 / sizeof(T);
  using Scalar = std::integral_constant<int, 1>;
  using Vector = std::integral_constant<int, kVector>;
  using Warp = std::true_type;
  using Block = std::false_type;
  if (launch.vec == 1) {
    if (launch.warp_row) {
      with_kv<1, 2, 4, 8, 16, 32>(launch.kv, [&](auto kv) { body(Scalar{}, kv, Warp{}); });
    } else {
      with_kv<16, 32>(launch.kv, [&](auto kv) { body(Scalar{}, kv, Block{}); });
    }
  } else if constexpr (kVector == 4) {
    if (launch.warp_row) {
      with_kv<1, 2, 4, 8>(launch.kv, [&](auto kv) { body(Vector{}, kv, Warp{}); });
    } else {
      with_kv<4, 8>(launch.kv, [&](auto kv) { body(Vector{}, kv, Block{}); });
    }
  } else {
    if (launch.warp_row) {
      with_kv<1, 2, 4>(launch.kv, [&](auto kv) { body(Vector{}, kv, Warp{}); });
    } else {
      with_kv<4>(launch.kv, [&](auto kv) { body(Vector{}, kv, Block{}); });
    }
  }
}

struct Grid {
  dim3 blocks;
  dim3 threads;
};

Grid grid_for(const Launch& launch, int64_t rows) {
  const int64_t blocks =
      launch.warp_row ? (rows + kWarpRowsPerBlock - 1) / kWarpRowsPerBlock : rows;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "adanorm CUDA kernels: ", rows,
              " rows exceed the grid limit; split the input");
  return {dim3(static_cast<unsigned>(blocks)),
          launch.warp_row ? dim3(32, kWarpRowsPerBlock) : dim3(launch.threads)};
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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

// A checked input made contiguous and seen as rows of its last dimension, its device current for
// the caller's scope (the copy that makes a strided input contiguous runs on that device).
struct Rows {
  Rows(const at::Tensor& t_in, const char* name)
      : guard((check_input(t_in, name), t_in.device())),
        t(t_in.contiguous()),
        n(t.size(-1)),
        rows(t.numel() / n) {}
  const c10::cuda::CUDAGuard guard;
  const at::Tensor t;
  const int64_t n;
  const int64_t rows;
};

// AdaNorm's z = c*y - ck*y^2 (c = C, ck = C*k); the other variants ignore c and ck.
struct AdaConstants {
  bool ada;
  float c;
  float ck;
};

AdaConstants ada_constants(std::optional<double> scale, double k) {
  return {scale.has_value(), static_cast<float>(scale.value_or(1.0)),
          static_cast<float>(scale.value_or(1.0) * k)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward_cuda(const at::Tensor& x_in,
                                                                 double eps, bool unbiased,
                                                                 std::optional<double> scale,
                                                                 double k) {
  // A misaligned contiguous view is read element by element rather than copied.
  const Rows input(x_in, "x");
  const at::Tensor& x = input.t;
  const int64_t n = input.n, rows = input.rows;
  at::Tensor out = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0) return {out, mean, rstd};
  TORCH_CHECK(!unbiased || n >= 2, "std_mode='unbiased' needs at least 2 normalized elements");
  const Launch launch = launch_for(
      n, x.element_size(), aligned16(x.const_data_ptr()) && aligned16(out.const_data_ptr()));
  const Grid grid = grid_for(launch, rows);
  const AdaConstants ada = ada_constants(scale, k);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ADANORM_DISPATCH_TYPES(x.scalar_type(), [&] {
    dispatch_launch<scalar_t>(launch, [&](auto vec, auto kv, auto warp_row) {
      forward_kernel<scalar_t, decltype(vec)::value, decltype(kv)::value,
                     decltype(warp_row)::value><<<grid.blocks, grid.threads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), rows,
          static_cast<int>(n), static_cast<float>(eps), unbiased, ada.ada, ada.c, ada.ck);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, mean, rstd};
}

at::Tensor norm_backward_cuda(const at::Tensor& grad_in, const std::optional<at::Tensor>& x_in,
                              const std::optional<at::Tensor>& /*mean: recomputed from x*/,
                              const at::Tensor& rstd_in, double eps, bool unbiased,
                              bool detach_mean, bool detach_std, std::optional<double> scale,
                              double k) {
  const Rows input(grad_in, "grad");
  const at::Tensor& grad = input.t;
  const int64_t n = input.n, rows = input.rows;
  at::Tensor dx = at::empty_like(grad);
  if (rows == 0) return dx;
  at::Tensor x;
  bool aligned = aligned16(grad.const_data_ptr()) && aligned16(dx.const_data_ptr());
  if (x_in.has_value() && x_in->defined()) {
    x = x_in->contiguous();
    TORCH_CHECK(x.scalar_type() == grad.scalar_type() && x.numel() == grad.numel() &&
                    x.size(-1) == n,
                "adanorm CUDA backward: x and grad differ in dtype or shape");
    aligned = aligned && aligned16(x.const_data_ptr());
  } else {
    TORCH_CHECK(detach_mean && detach_std && !scale.has_value(),
                "adanorm CUDA backward: x is needed unless both statistics are detached "
                "(DetachNorm)");
  }
  const at::Tensor rstd = rstd_in.contiguous();
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows,
              "adanorm CUDA backward: rstd must be float32 with one entry per row");
  const Launch launch = launch_for(n, grad.element_size(), aligned);
  const Grid grid = grid_for(launch, rows);
  const AdaConstants ada = ada_constants(scale, k);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  ADANORM_DISPATCH_TYPES(grad.scalar_type(), [&] {
    const scalar_t* x_ptr = x.defined() ? x.const_data_ptr<scalar_t>() : nullptr;
    dispatch_launch<scalar_t>(launch, [&](auto vec, auto kv, auto warp_row) {
      backward_kernel<scalar_t, decltype(vec)::value, decltype(kv)::value,
                      decltype(warp_row)::value><<<grid.blocks, grid.threads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), x_ptr, rstd.const_data_ptr<float>(),
          dx.mutable_data_ptr<scalar_t>(), rows, static_cast<int>(n), static_cast<float>(eps),
          unbiased, ada.ada, detach_mean, detach_std, ada.c, ada.ck);
    });
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
