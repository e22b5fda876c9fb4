// Fused CPU kernels for the norm family of Xu et al. (NeurIPS 2019): LayerNorm-simple, DetachNorm
// (and its detach-mean / detach-std ablations) and AdaNorm, in either std convention.
//
// The CPU implementations of adanorm::norm_forward and adanorm::norm_backward; the operators, their
// autograd kernel and the no-grad adanorm::norm are in norm_ops.cpp (one library with this file).
//
// Per row, everything after the first read works on an L1-resident row:
//   forward:  sum -> centred sum of squares (exact two-pass variance, no serial Welford chain)
//             -> one sweep writing y or AdaNorm's z = y * (C - C k y)
//   backward: one sweep for the two row sums s1 = sum(g'), s2 = sum(g' y) with g' = phi(y) g,
//             one sweep writing dx = rstd * (g' - s1/H - rho y s2/H)
//             (the mean / std terms dropped when detached; rho = 1 in biased mode).
// Reduced-precision rows (bf16, fp16) are converted to float once into a per-thread buffer, so
// statistics and arithmetic are float32 and the output is rounded once.
//
// Range: a row whose float32 statistics cannot be trusted -- its sum or its centred squares
// overflow (|x| >~ 1e19), it holds NaN/inf, or its squares fall into the subnormal range -- is
// computed in double instead (row_stats returns false; the two checks cost nothing per element),
// and so, in backward, is a row with sigma > 2^60.  Every finite row normalizes correctly.
//
// Unbiased std (sigma = s + eps): the backward needs sigma / s.  It is taken from the data,
// sum(y^2) = (H-1) s^2 / sigma^2, not rebuilt as 1/rstd - eps, which cancels when s << eps.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cfloat>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

namespace adanorm {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kV = Vec::size();

inline float reduce_add(const Vec& v) {
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, v);
}

// Row sum with four independent accumulators, so the adds are not one serial dependency chain.
inline float row_sum(const float* x, int64_t n) {
  Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  int64_t j = 0;
  for (; j + 4 * kV <= n; j += 4 * kV) {
    a0 += Vec::loadu(x + j);
    a1 += Vec::loadu(x + j + kV);
    a2 += Vec::loadu(x + j + 2 * kV);
    a3 += Vec::loadu(x + j + 3 * kV);
  }
  for (; j + kV <= n; j += kV) a0 += Vec::loadu(x + j);
  float s = reduce_add((a0 + a1) + (a2 + a3));
  for (; j < n; ++j) s += x[j];
  return s;
}

inline float row_centered_sum_of_squares(const float* x, int64_t n, float mean) {
  const Vec m(mean);
  Vec a0(0.f), a1(0.f), a2(0.f), a3(0.f);
  int64_t j = 0;
  for (; j + 4 * kV <= n; j += 4 * kV) {
    Vec d0 = Vec::loadu(x + j) - m;
    Vec d1 = Vec::loadu(x + j + kV) - m;
    Vec d2 = Vec::loadu(x + j + 2 * kV) - m;
    Vec d3 = Vec::loadu(x + j + 3 * kV) - m;
    a0 = at::vec::fmadd(d0, d0, a0);
    a1 = at::vec::fmadd(d1, d1, a1);
    a2 = at::vec::fmadd(d2, d2, a2);
    a3 = at::vec::fmadd(d3, d3, a3);
  }
  for (; j + kV <= n; j += kV) {
    Vec d = Vec::loadu(x + j) - m;
    a0 = at::vec::fmadd(d, d, a0);
  }
  float s = reduce_add((a0 + a1) + (a2 + a3));
  for (; j < n; ++j) {
    const float d = x[j] - mean;
    s += d * d;
  }
  return s;
}

struct RowStats {
  float mean;
  float rstd;
};

// Float32 statistics of a row; false when they cannot be trusted (see the header): then the
// row goes through the double path.
inline bool row_stats(const float* x, int64_t n, double eps, bool unbiased, RowStats& out) {
  const float sum = row_sum(x, n);
  const float mean = sum / static_cast<float>(n);
  const float ss = row_centered_sum_of_squares(x, n, mean);
  // Squares below ~2^-100 lose precision or vanish; that only matters when eps does not
  // dominate them (eps < 2^-60), or when they are not all lost (ss > 0).
  if (!(std::isfinite(sum) && ss <= FLT_MAX) || (ss < 0x1p-100f && (ss > 0.f || eps < 0x1p-60)))
    return false;
  double rstd;
  if (unbiased) {
    rstd = 1.0 / (std::sqrt(static_cast<double>(ss) / static_cast<double>(n - 1)) + eps);
  } else {
    rstd = 1.0 / std::sqrt(static_cast<double>(ss) / static_cast<double>(n) + eps);
  }
  out = {mean, static_cast<float>(rstd)};
  return true;
}

// Statistics in double: no finite float row overflows or underflows there.
struct RowStatsDouble {
  double mean;
  double sigma;    // what y divides by
  double std_dev;  // s in unbiased mode (sigma = s + eps)
};

inline RowStatsDouble row_stats_double(const float* x, int64_t n, double eps, bool unbiased) {
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  const double mean = sum / static_cast<double>(n);
  double ss = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double d = x[j] - mean;
    ss += d * d;
  }
  if (unbiased) {
    const double s = std::sqrt(ss / static_cast<double>(n - 1));
    return {mean, s + eps, s};
  }
  return {mean, std::sqrt(ss / static_cast<double>(n) + eps), 0.0};
}

template <bool kAda>
inline RowStats write_normalized_double(const float* x, float* out, int64_t n, double eps,
                                        bool unbiased, float c, float ck) {
  const RowStatsDouble s = row_stats_double(x, n, eps, unbiased);
  for (int64_t j = 0; j < n; ++j) {
    double y = (x[j] - s.mean) / s.sigma;
    if constexpr (kAda) y = y * (static_cast<double>(c) - static_cast<double>(ck) * y);
    out[j] = static_cast<float>(y);
  }
  return {static_cast<float>(s.mean), static_cast<float>(1.0 / s.sigma)};
}

// y = (x - mean) * rstd, or AdaNorm's z = y * (C - C k y).
template <bool kAda>
inline void write_normalized(const float* x, float* out, int64_t n, RowStats s, float c,
                             float ck) {
  const Vec m(s.mean), r(s.rstd), vc(c), vnck(-ck);
  int64_t j = 0;
  for (; j + kV <= n; j += kV) {
    Vec y = (Vec::loadu(x + j) - m) * r;
    if constexpr (kAda) y = y * at::vec::fmadd(y, vnck, vc);
    y.store(out + j);
  }
  for (; j < n; ++j) {
    float y = (x[j] - s.mean) * s.rstd;
    if constexpr (kAda) y = y * (c - ck * y);
    out[j] = y;
  }
}

struct BackwardFlags {
  bool detach_mean;
  bool detach_std;
  bool unbiased;
  double eps;
};

// The double-precision backward of one row, from x alone (sigma > 2^60: float32 y, products
// or 1/sigma would overflow or go subnormal).
template <bool kAda>
inline void backward_row_double(const float* x, const float* g, float* dx, int64_t n, float c,
                                float ck, const BackwardFlags& f) {
  const RowStatsDouble s = row_stats_double(x, n, f.eps, f.unbiased);
  double sum_g = 0.0, sum_gy = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    const double y = (x[j] - s.mean) / s.sigma;
    double gp = g[j];
    if constexpr (kAda) gp *= static_cast<double>(c) - static_cast<double>(ck) * y;
    sum_g += gp;
    sum_gy += gp * y;
  }
  const double mean_term = f.detach_mean ? 0.0 : sum_g / static_cast<double>(n);
  double rho = 1.0;
  if (f.unbiased) rho = s.std_dev > 0 ? s.sigma / s.std_dev * n / (n - 1.0) : 0.0;
  const double proj_term = f.detach_std ? 0.0 : rho * sum_gy / static_cast<double>(n);
  for (int64_t j = 0; j < n; ++j) {
    const double y = (x[j] - s.mean) / s.sigma;
    double gp = g[j];
    if constexpr (kAda) gp *= static_cast<double>(c) - static_cast<double>(ck) * y;
    dx[j] = static_cast<float>((gp - mean_term - y * proj_term) / s.sigma);
  }
}

// dx = rstd * (g' - [mean(g')] - [rho * y * mean(g' y)]), g' = phi(y) g with phi = C - C k y for
// AdaNorm (a constant in backward, as the paper prescribes) and phi = 1 otherwise.  kRho: the
// unbiased std's factor rho = H/(H-1) * sigma/s is needed (from sum(y^2), see the header).
template <bool kAda, bool kRho>
inline void backward_row(const float* x, const float* g, float* dx, int64_t n, RowStats s,
                         float c, float ck, const BackwardFlags& f) {
  if (!(s.rstd >= 0x1p-60f)) {
    backward_row_double<kAda>(x, g, dx, n, c, ck, f);
    return;
  }
  const Vec m(s.mean), r(s.rstd), vc(c), vnck(-ck);
  Vec s1a(0.f), s1b(0.f), s2a(0.f), s2b(0.f), s3a(0.f), s3b(0.f);
  int64_t j = 0;
  for (; j + 2 * kV <= n; j += 2 * kV) {
    Vec y0 = (Vec::loadu(x + j) - m) * r;
    Vec y1 = (Vec::loadu(x + j + kV) - m) * r;
    Vec g0 = Vec::loadu(g + j);
    Vec g1 = Vec::loadu(g + j + kV);
    if constexpr (kAda) {
      g0 = g0 * at::vec::fmadd(y0, vnck, vc);
      g1 = g1 * at::vec::fmadd(y1, vnck, vc);
    }
    s1a += g0;
    s1b += g1;
    s2a = at::vec::fmadd(g0, y0, s2a);
    s2b = at::vec::fmadd(g1, y1, s2b);
    if constexpr (kRho) {
      s3a = at::vec::fmadd(y0, y0, s3a);
      s3b = at::vec::fmadd(y1, y1, s3b);
    }
  }
  for (; j + kV <= n; j += kV) {
    Vec y0 = (Vec::loadu(x + j) - m) * r;
    Vec g0 = Vec::loadu(g + j);
    if constexpr (kAda) g0 = g0 * at::vec::fmadd(y0, vnck, vc);
    s1a += g0;
    s2a = at::vec::fmadd(g0, y0, s2a);
    if constexpr (kRho) s3a = at::vec::fmadd(y0, y0, s3a);
  }
  float sum_g = reduce_add(s1a + s1b);
  float sum_gy = reduce_add(s2a + s2b);
  float sum_yy = kRho ? reduce_add(s3a + s3b) : 0.f;
  for (; j < n; ++j) {
    const float y = (x[j] - s.mean) * s.rstd;
    float gp = g[j];
    if constexpr (kAda) gp *= c - ck * y;
    sum_g += gp;
    sum_gy += gp * y;
    if constexpr (kRho) sum_yy += y * y;
  }

  const float inv_n = 1.f / static_cast<float>(n);
  const float mean_term = f.detach_mean ? 0.f : sum_g * inv_n;
  float rho = 1.f;
  if constexpr (kRho) {
    // sigma = s + eps, d sigma / d x_j = y_j sigma / ((H-1) s): rho = H/(H-1) * sigma / s, and
    // sum(y^2) = (H-1) s^2 / sigma^2 gives rho = H / sqrt((H-1) sum(y^2)).  Constant rows
    // (y == 0) may take any finite rho: 0.
    rho = sum_yy > 0.f
              ? static_cast<float>(n / std::sqrt((n - 1.0) * static_cast<double>(sum_yy)))
              : 0.f;
  }
  const float proj_term = f.detach_std ? 0.f : rho * sum_gy * inv_n;

  const Vec vmean_term(mean_term), vproj(proj_term);
  j = 0;
  for (; j + kV <= n; j += kV) {
    Vec y = (Vec::loadu(x + j) - m) * r;
    Vec gp = Vec::loadu(g + j);
    if constexpr (kAda) gp = gp * at::vec::fmadd(y, vnck, vc);
    // (gp - mean_term - y * proj) * rstd
    Vec d = at::vec::fnmadd(y, vproj, gp - vmean_term) * r;
    d.store(dx + j);
  }
  for (; j < n; ++j) {
    const float y = (x[j] - s.mean) * s.rstd;
    float gp = g[j];
    if constexpr (kAda) gp *= c - ck * y;
    dx[j] = (gp - mean_term - y * proj_term) * s.rstd;
  }
}

inline void scale_row(const float* g, float* dx, int64_t n, float rstd) {
  const Vec r(rstd);
  int64_t j = 0;
  for (; j + kV <= n; j += kV) (Vec::loadu(g + j) * r).store(dx + j);
  for (; j < n; ++j) dx[j] = g[j] * rstd;
}

// ---- reduced precision <-> float rows ---------------------------------------------------------

template <typename scalar_t>
inline void to_float_row(const scalar_t* src, float* dst, int64_t n) {
  using RVec = at::vec::Vectorized<scalar_t>;
  int64_t j = 0;
  for (; j + RVec::size() <= n; j += RVec::size()) {
    auto [lo, hi] = at::vec::convert_to_float<scalar_t>(RVec::loadu(src + j));
    lo.store(dst + j);
    hi.store(dst + j + kV);
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

template <typename scalar_t>
inline void from_float_row(const float* src, scalar_t* dst, int64_t n) {
  using RVec = at::vec::Vectorized<scalar_t>;
  int64_t j = 0;
  for (; j + RVec::size() <= n; j += RVec::size()) {
    at::vec::convert_from_float<scalar_t>(Vec::loadu(src + j), Vec::loadu(src + j + kV))
        .store(dst + j);
  }
  for (; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

// Rows per parallel task: enough elements per task that the fork/join cost is amortised; tiny
// tensors stay on one thread.
inline int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

template <typename scalar_t, bool kAda>
void forward_rows(const scalar_t* x, scalar_t* out, float* mean, float* rstd, int64_t rows,
                  int64_t n, double eps, bool unbiased, float c, float ck) {
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (int64_t i = begin; i < end; ++i) {
        RowStats s;
        if (row_stats(x + i * n, n, eps, unbiased, s)) {
          write_normalized<kAda>(x + i * n, out + i * n, n, s, c, ck);
        } else {
          s = write_normalized_double<kAda>(x + i * n, out + i * n, n, eps, unbiased, c, ck);
        }
        mean[i] = s.mean;
        rstd[i] = s.rstd;
      }
    } else {
      std::vector<float> xf(n), of(n);
      for (int64_t i = begin; i < end; ++i) {
        to_float_row(x + i * n, xf.data(), n);
        RowStats s;
        if (row_stats(xf.data(), n, eps, unbiased, s)) {
          write_normalized<kAda>(xf.data(), of.data(), n, s, c, ck);
        } else {
          s = write_normalized_double<kAda>(xf.data(), of.data(), n, eps, unbiased, c, ck);
        }
        from_float_row(of.data(), out + i * n, n);
        mean[i] = s.mean;
        rstd[i] = s.rstd;
      }
    }
  });
}

template <typename scalar_t, bool kAda, bool kRho>
void backward_rows(const scalar_t* g, const scalar_t* x, const float* mean, const float* rstd,
                   scalar_t* dx, int64_t rows, int64_t n, float c, float ck,
                   const BackwardFlags& f) {
  at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      for (int64_t i = begin; i < end; ++i) {
        if (x == nullptr) {
          scale_row(g + i * n, dx + i * n, n, rstd[i]);
        } else {
          backward_row<kAda, kRho>(x + i * n, g + i * n, dx + i * n, n, {mean[i], rstd[i]}, c,
                                   ck, f);
        }
      }
    } else {
      std::vector<float> xf(x == nullptr ? 0 : n), gf(n), df(n);
      for (int64_t i = begin; i < end; ++i) {
        to_float_row(g + i * n, gf.data(), n);
        if (x == nullptr) {
          scale_row(gf.data(), df.data(), n, rstd[i]);
        } else {
          to_float_row(x + i * n, xf.data(), n);
          backward_row<kAda, kRho>(xf.data(), gf.data(), df.data(), n, {mean[i], rstd[i]}, c,
                                   ck, f);
        }
        from_float_row(df.data(), dx + i * n, n);
      }
    }
  });
}

void check_2d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "adanorm: ", name, " must be 2-D (rows, H), got ", t.dim(), "-D");
  TORCH_CHECK(t.device().is_cpu(), "adanorm: the C++ kernels run on CPU tensors only");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "adanorm: the C++ kernels take float32, bfloat16 or float16, got ", dt);
}

// Calls fn(scalar value tag, std::bool_constant<ada>) for float32, bfloat16 and float16 only.
template <typename Fn>
void dispatch_float_types(at::ScalarType dtype, bool ada, const Fn& fn) {
  auto with_ada = [&](auto scalar_tag) {
    ada ? fn(scalar_tag, std::true_type{}) : fn(scalar_tag, std::false_type{});
  };
  switch (dtype) {
    case at::kFloat: return with_ada(float{});
    case at::kBFloat16: return with_ada(at::BFloat16{});
    case at::kHalf: return with_ada(at::Half{});
    default: TORCH_CHECK(false, "adanorm: unsupported dtype ", dtype);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward_cpu(const at::Tensor& x_in,
                                                                double eps, bool unbiased,
                                                                std::optional<double> scale,
                                                                double k) {
  check_2d(x_in, "input");
  const at::Tensor x = x_in.contiguous();
  const int64_t rows = x.size(0), n = x.size(1);
  TORCH_CHECK(!unbiased || n >= 2, "adanorm: std_mode='unbiased' needs H >= 2");
  at::Tensor out = at::empty_like(x);
  at::Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  if (rows == 0 || n == 0) return {out, mean, rstd};
  const bool ada = scale.has_value();
  const float c = ada ? static_cast<float>(*scale) : 1.f;
  const float ck = ada ? static_cast<float>(*scale * k) : 0.f;
  auto run = [&](auto scalar_tag, auto ada_tag) {
    using scalar_t = decltype(scalar_tag);
    forward_rows<scalar_t, decltype(ada_tag)::value>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), rows, n, eps, unbiased, c,
        ck);
  };
  dispatch_float_types(x.scalar_type(), ada, run);
  return {out, mean, rstd};
}

at::Tensor norm_backward_cpu(const at::Tensor& grad_in, const std::optional<at::Tensor>& x_opt,
                             const std::optional<at::Tensor>& mean_opt, const at::Tensor& rstd_in,
                             double eps, bool unbiased, bool detach_mean, bool detach_std,
                             std::optional<double> scale, double k) {
  check_2d(grad_in, "grad");
  const at::Tensor g = grad_in.contiguous();
  const at::Tensor rstd = rstd_in.contiguous();
  const int64_t rows = g.size(0), n = g.size(1);
  // AdaNorm's phi(y) multiplies g even with both statistics detached, which needs y, hence x.
  const bool ada = scale.has_value();
  const bool only_scale = detach_mean && detach_std && !ada;
  at::Tensor x, mean;
  if (!only_scale) {
    TORCH_CHECK(x_opt.has_value() && mean_opt.has_value(),
                "adanorm: backward needs the input and the row means unless both statistics are "
                "detached");
    x = x_opt->contiguous();
    mean = mean_opt->contiguous();
    TORCH_CHECK(x.sizes() == g.sizes() && x.scalar_type() == g.scalar_type(),
                "adanorm: grad and input must have the same shape and dtype");
  }
  TORCH_CHECK(rstd.scalar_type() == at::kFloat && rstd.numel() == rows,
              "adanorm: rstd must be float32 with one entry per row");
  at::Tensor dx = at::empty_like(g);
  if (rows == 0 || n == 0) return dx;
  const float c = ada ? static_cast<float>(*scale) : 1.f;
  const float ck = ada ? static_cast<float>(*scale * k) : 0.f;
  const BackwardFlags flags{detach_mean, detach_std, unbiased, eps};
  const bool need_rho = unbiased && !detach_std;
  auto run = [&](auto scalar_tag, auto ada_tag) {
    using scalar_t = decltype(scalar_tag);
    constexpr bool kAda = decltype(ada_tag)::value;
    const scalar_t* x_ptr = only_scale ? nullptr : x.const_data_ptr<scalar_t>();
    const float* mean_ptr = only_scale ? nullptr : mean.const_data_ptr<float>();
    if (need_rho) {
      backward_rows<scalar_t, kAda, true>(g.const_data_ptr<scalar_t>(), x_ptr, mean_ptr,
                                          rstd.const_data_ptr<float>(),
                                          dx.mutable_data_ptr<scalar_t>(), rows, n, c, ck, flags);
    } else {
      backward_rows<scalar_t, kAda, false>(g.const_data_ptr<scalar_t>(), x_ptr, mean_ptr,
                                           rstd.const_data_ptr<float>(),
                                           dx.mutable_data_ptr<scalar_t>(), rows, n, c, ck, flags);
    }
  };
  dispatch_float_types(g.scalar_type(), ada, run);
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(adanorm, CPU, m) {
  m.impl("norm_forward", norm_forward_cpu);
  m.impl("norm_backward", norm_backward_cpu);
}

}  // namespace adanorm
