// The adanorm operators (Xu et al., NeurIPS 2019: LayerNorm-simple, DetachNorm and its ablations,
// AdaNorm) and what every device shares: their schemas, the C++ autograd kernel of adanorm::norm
// and its no-grad CPU entry.  Built into one library with norm_cpu.cpp (the CPU kernels);
// norm_cuda.cu adds CUDA implementations of the same operators.
//
// Registered as torch.library operators in the `adanorm` namespace:
//   adanorm::norm           -- the user-facing op, with a C++ autograd kernel (no Python on the
//                              training path: autograd.Function costs tens of microseconds/call)
//   adanorm::norm_forward   -- (out, mean, rstd); mean and rstd are float32 per row
//   adanorm::norm_backward  -- grad_input from (grad, x, mean, rstd)
// The Python side registers fake (meta) kernels for all three so torch.compile and torch.export
// can trace them.
//
// The autograd kernel calls norm_forward / norm_backward through the dispatcher, so one kernel
// serves CPU and CUDA tensors.
//
// Double backward: the autograd kernel's backward, when a graph of it is being recorded
// (create_graph=True), calls adanorm::norm_input_grad, which the Python side implements with
// differentiable reference operations (adanorm.reference.input_grad_ref).

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace adanorm {
namespace {

using ForwardFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, double, bool,
                                                                 std::optional<double>, double);
using BackwardFn = at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                              const std::optional<at::Tensor>&, const at::Tensor&, double, bool,
                              bool, bool, std::optional<double>, double);

// ---- autograd -----------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_forward(const at::Tensor& x, double eps,
                                                            bool unbiased,
                                                            std::optional<double> scale,
                                                            double k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adanorm::norm_forward", "")
                       .typed<ForwardFn>();
  return op.call(x, eps, unbiased, scale, k);
}

at::Tensor call_backward(const at::Tensor& g, const std::optional<at::Tensor>& x,
                         const std::optional<at::Tensor>& mean, const at::Tensor& rstd,
                         double eps, bool unbiased, bool detach_mean, bool detach_std,
                         std::optional<double> scale, double k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("adanorm::norm_backward", "")
                       .typed<BackwardFn>();
  return op.call(g, x, mean, rstd, eps, unbiased, detach_mean, detach_std, scale, k);
}

at::Tensor call_input_grad(const at::Tensor& g, const std::optional<at::Tensor>& x,
                           const at::Tensor& rstd, double eps, bool unbiased, bool detach_mean,
                           bool detach_std, std::optional<double> scale, double k) {
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("adanorm::norm_input_grad", "")
          .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&,
                            const at::Tensor&, double, bool, bool, bool, std::optional<double>,
                            double)>();
  return op.call(g, x, rstd, eps, unbiased, detach_mean, detach_std, scale, k);
}

class NormFunction : public torch::autograd::Function<NormFunction> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            double eps, bool unbiased, bool detach_mean, bool detach_std,
                            std::optional<double> scale, double k) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, mean, rstd] = call_forward(x, eps, unbiased, scale, k);
    // DetachNorm with both statistics detached needs only rstd: the input can be freed.
    const bool full = !(detach_mean && detach_std) || scale.has_value();
    if (full) {
      ctx->save_for_backward({x, mean, rstd});
    } else {
      ctx->save_for_backward({rstd});
    }
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["unbiased"] = unbiased;
    ctx->saved_data["detach_mean"] = detach_mean;
    ctx->saved_data["detach_std"] = detach_std;
    ctx->saved_data["has_scale"] = scale.has_value();
    ctx->saved_data["scale"] = scale.value_or(1.0);
    ctx->saved_data["k"] = k;
    return out;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    std::optional<at::Tensor> x, mean;
    at::Tensor rstd;
    if (saved.size() == 3) {
      x = saved[0];
      mean = saved[1];
      rstd = saved[2];
    } else {
      rstd = saved[0];
    }
    const std::optional<double> scale =
        ctx->saved_data["has_scale"].toBool()
            ? std::optional<double>(ctx->saved_data["scale"].toDouble())
            : std::nullopt;
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool unbiased = ctx->saved_data["unbiased"].toBool();
    const bool detach_mean = ctx->saved_data["detach_mean"].toBool();
    const bool detach_std = ctx->saved_data["detach_std"].toBool();
    const double k = ctx->saved_data["k"].toDouble();
    at::Tensor dx;
    if (at::GradMode::is_enabled()) {
      // create_graph=True: a backward that autograd can differentiate again (see the header).
      dx = call_input_grad(grads[0], x, rstd, eps, unbiased, detach_mean, detach_std, scale, k);
    } else {
      dx = call_backward(grads[0], x, mean, rstd, eps, unbiased, detach_mean, detach_std, scale,
                         k);
    }
    return {dx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor norm_autograd(const at::Tensor& x, double eps, bool unbiased, bool detach_mean,
                         bool detach_std, std::optional<double> scale, double k) {
  return NormFunction::apply(x, eps, unbiased, detach_mean, detach_std, scale, k);
}

// Below autograd (inference mode, or once the autograd kernel has run): just the forward.
at::Tensor norm_no_grad(const at::Tensor& x, double eps, bool unbiased, bool detach_mean,
                        bool detach_std, std::optional<double> scale, double k) {
  return std::get<0>(call_forward(x, eps, unbiased, scale, k));
}

}  // namespace

TORCH_LIBRARY(adanorm, m) {
  m.def(
      "norm(Tensor x, float eps, bool unbiased, bool detach_mean, bool detach_std, "
      "float? scale, float k) -> Tensor");
  m.def(
      "norm_forward(Tensor x, float eps, bool unbiased, float? scale, float k) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "norm_backward(Tensor grad, Tensor? x, Tensor? mean, Tensor rstd, float eps, "
      "bool unbiased, bool detach_mean, bool detach_std, float? scale, float k) -> Tensor");
  // Implemented in Python (CompositeImplicitAutograd), see adanorm/_kernels/__init__.py.
  m.def(
      "norm_input_grad(Tensor grad, Tensor? x, Tensor rstd, float eps, bool unbiased, "
      "bool detach_mean, bool detach_std, float? scale, float k) -> Tensor");
}

TORCH_LIBRARY_IMPL(adanorm, CPU, m) { m.impl("norm", norm_no_grad); }

TORCH_LIBRARY_IMPL(adanorm, Autograd, m) { m.impl("norm", norm_autograd); }

}  // namespace adanorm
