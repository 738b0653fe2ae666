// SophiaG's fused CPU step: one pass that reads param, grad, exp_avg, hessian
// and writes param, exp_avg (24 bytes per float32 parameter), for every tensor
// of a (device, dtype) group in one call spread over torch's intra-op threads.
//
// The arithmetic is sophia.torch._fused.fused_update's, operation by
// operation in the compute type (float for float/bf16/half, double for double),
// so the result matches the other paths and the NumPy reference to the bit.
// That needs the build flags -ffp-contract=off and no -ffast-math: a fused
// multiply-add or a reassociation would change the rounding.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

// Elements per work item: big enough that a thread streams, small enough that
// a model's many tensors of very different sizes spread evenly over the threads.
constexpr int64_t kChunk = int64_t{1} << 16;

template <typename C>
struct Coeffs {
  C b1, signed_one_minus_b1, rho_bs, eps, weight_decay, lr;
};

// The loop body is branch-free on purpose, so the compiler vectorises it.
template <typename T, typename C>
int64_t update_range(T* __restrict p, const T* __restrict g, T* __restrict m,
                     const T* __restrict h, int64_t n, Coeffs<C> c) {
  int32_t wins = 0;  // n <= kChunk, so it cannot overflow
  for (int64_t i = 0; i < n; ++i) {
    const C t = static_cast<C>(p[i]);
    const C mc =
        static_cast<C>(m[i]) * c.b1 + static_cast<C>(g[i]) * c.signed_one_minus_b1;
    const C hv = static_cast<C>(h[i]);
    const C hc = hv < C(0) ? C(0) : hv;  // clamp_min(h, 0): NaN stays NaN
    const C den = hc * c.rho_bs + c.eps;
    const C q = (mc + C(0)) / den;  // + 0 maps -0 to +0, like sign(m) does
    const C r = q > C(1) ? C(1) : (q < C(-1) ? C(-1) : q);
    const C u = r + t * c.weight_decay;
    p[i] = static_cast<T>(t - u * c.lr);
    m[i] = static_cast<T>(mc);
    wins += std::fabs(q) < C(1);
  }
  return wins;
}

void check_list(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ps,
                const char* name) {
  TORCH_CHECK(xs.size() == ps.size(), "sophia fused_step_: ", name, " has ", xs.size(),
              " tensors, params has ", ps.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].device().is_cpu() && xs[i].is_contiguous() &&
                    xs[i].scalar_type() == ps[i].scalar_type() &&
                    xs[i].numel() == ps[i].numel(),
                "sophia fused_step_: ", name, "[", i,
                "] must be a contiguous CPU tensor of the parameter's dtype and size");
  }
}

at::Tensor fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList hessians, const at::Tensor& coeffs) {
  const std::vector<at::Tensor> ps(params.begin(), params.end());
  check_list(ps, ps, "params");
  check_list({grads.begin(), grads.end()}, ps, "grads");
  check_list({exp_avgs.begin(), exp_avgs.end()}, ps, "exp_avgs");
  check_list({hessians.begin(), hessians.end()}, ps, "hessians");
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.numel() == 6 && coeffs.device().is_cpu() &&
                  coeffs.is_contiguous(),
              "sophia fused_step_: coeffs must be 6 CPU scalars");
  auto wins = at::empty({}, at::TensorOptions().dtype(at::kLong));
  if (ps.empty()) {
    wins.fill_(0);
    return wins;
  }
  // work items: (tensor, first element, count)
  struct Item {
    int64_t tensor, begin, count;
  };
  std::vector<Item> items;
  for (size_t t = 0; t < ps.size(); ++t) {
    const int64_t n = ps[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      items.push_back({static_cast<int64_t>(t), b, std::min(kChunk, n - b)});
    }
  }
  std::vector<int64_t> counts(items.size(), 0);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, ps[0].scalar_type(), "sophia_fused_step_cpu", [&] {
        using C = at::opmath_type<scalar_t>;
        TORCH_CHECK(coeffs.scalar_type() == c10::CppTypeToScalarType<C>::value,
                    "sophia fused_step_: coeffs must be in the compute dtype ",
                    c10::CppTypeToScalarType<C>::value, ", got ", coeffs.scalar_type());
        const C* cp = coeffs.const_data_ptr<C>();
        const Coeffs<C> c{cp[0], cp[1], cp[2], cp[3], cp[4], cp[5]};
        std::vector<scalar_t*> param_ptrs, exp_avg_ptrs;
        std::vector<const scalar_t*> grad_ptrs, hessian_ptrs;
        for (size_t t = 0; t < ps.size(); ++t) {
          param_ptrs.push_back(params[t].data_ptr<scalar_t>());
          exp_avg_ptrs.push_back(exp_avgs[t].data_ptr<scalar_t>());
          grad_ptrs.push_back(grads[t].const_data_ptr<scalar_t>());
          hessian_ptrs.push_back(hessians[t].const_data_ptr<scalar_t>());
        }
        at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
          for (int64_t k = lo; k < hi; ++k) {
            const Item& it = items[k];
            const int64_t o = it.begin;
            counts[k] = update_range<scalar_t, C>(
                param_ptrs[it.tensor] + o, grad_ptrs[it.tensor] + o,
                exp_avg_ptrs[it.tensor] + o, hessian_ptrs[it.tensor] + o, it.count, c);
          }
        });
      });
  int64_t total = 0;
  for (int64_t x : counts) total += x;
  wins.fill_(total);
  return wins;
}

}  // namespace

TORCH_LIBRARY(sophia_native, m) {
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor[] hessians, Tensor coeffs) -> Tensor");
}

TORCH_LIBRARY_IMPL(sophia_native, CPU, m) { m.impl("fused_step_", &fused_step_cpu); }
