// SophiaG's fused CPU step: one pass that reads param, grad, exp_avg, hessian
// and writes param, exp_avg (24 bytes per float32 parameter), for every tensor
// of a (device, dtype) group in one call spread over torch's intra-op threads.
//
// The arithmetic is sophia.torch._fused.fused_update's, operation by
// operation in the compute type (float for float/bf16/half, double for double),
// so the result matches the other paths and the NumPy reference to the bit.
// That needs the build flags -ffp-contract=off and no -ffast-math: a fused
// multiply-add or a reassociation would change the rounding.
//
// fused_step_narrow_ is the same pass over narrow state (sophia/narrow.py):
// exp_avg stored as float32 or bfloat16 (rounded stochastically with the
// spec's counter-based hash, in uint32_t), hessian read from float32, bfloat16
// or 8-bit square-root codes c, as c |c| times their block's float32 scale.
// Both are converted element by element inside the loop, so no full-size
// float32 copy of m or h is made.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "narrow.h"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using sophia_native::bits_at;
using sophia_native::decode_block8;
using sophia_native::Item;
using sophia_native::kBlock;
using sophia_native::kBlockShift;
using sophia_native::kChunk;
using sophia_native::round_bfloat16;
using sophia_native::stream_key;
using sophia_native::work_items;

template <typename C>
struct Coeffs {
  C b1, signed_one_minus_b1, rho_bs, eps, weight_decay, lr;
};

// How exp_avg is stored: cast to its dtype (round to nearest) or, for the
// "bfloat16" form, rounded stochastically.
enum class MuStore { kNearest, kStochastic };

// One work item: n elements of a tensor, the first at coordinate `first`. For
// the 8-bit form H is int8_t and `scale` the scale of the (single) block the
// item lies in; `key` is the momentum stream's key for the stochastic form.
// The loop body is branch-free on purpose, so the compiler vectorises it.
template <typename T, typename M, typename H, MuStore kMu, typename C>
int32_t update_range(T* __restrict p, const T* __restrict g, M* __restrict m,
                     const H* __restrict h, int64_t n, Coeffs<C> c, float scale = 0.0f,
                     uint32_t key = 0, uint32_t first = 0) {
  int32_t wins = 0;  // n <= kChunk, so it cannot overflow
  for (int64_t i = 0; i < n; ++i) {
    const C t = static_cast<C>(p[i]);
    const C mc =
        static_cast<C>(m[i]) * c.b1 + static_cast<C>(g[i]) * c.signed_one_minus_b1;
    C hv;
    if constexpr (std::is_same_v<H, int8_t>) {
      hv = static_cast<C>(decode_block8(h[i], scale));  // in float32, as the spec decodes
    } else {
      hv = static_cast<C>(h[i]);
    }
    const C hc = hv < C(0) ? C(0) : hv;  // clamp_min(h, 0): NaN stays NaN
    const C den = hc * c.rho_bs + c.eps;
    const C q = (mc + C(0)) / den;  // + 0 maps -0 to +0, like sign(m) does
    const C r = q > C(1) ? C(1) : (q < C(-1) ? C(-1) : q);
    const C u = r + t * c.weight_decay;
    p[i] = static_cast<T>(t - u * c.lr);
    if constexpr (kMu == MuStore::kStochastic) {
      // coordinate first + i of the tensor (mod 2**32, as the spec's index)
      const uint32_t bits = bits_at(key, first + static_cast<uint32_t>(i));
      m[i] = round_bfloat16(static_cast<float>(mc), bits);
    } else {
      m[i] = static_cast<M>(mc);
    }
    wins += std::fabs(q) < C(1);
  }
  return wins;
}

// A work item of the narrow pass: its 8-bit hessian one block at a time.
template <typename T, typename M, typename H, MuStore kMu, typename C>
int32_t update_item(T* p, const T* g, M* m, const H* h, const float* scales, int64_t begin,
                    int64_t n, Coeffs<C> c, uint32_t key) {
  if constexpr (std::is_same_v<H, int8_t>) {
    int32_t wins = 0;
    for (int64_t b = 0; b < n; b += kBlock) {
      const int64_t o = begin + b;
      wins += update_range<T, M, H, kMu, C>(p + o, g + o, m + o, h + o, std::min(kBlock, n - b),
                                            c, scales[o >> kBlockShift], key,
                                            static_cast<uint32_t>(o));
    }
    return wins;
  } else {
    return update_range<T, M, H, kMu, C>(p + begin, g + begin, m + begin, h + begin, n, c, 0.0f,
                                         key, static_cast<uint32_t>(begin));
  }
}

void check_list(const std::vector<at::Tensor>& xs, const std::vector<at::Tensor>& ps,
                const char* name, at::ScalarType dtype) {
  TORCH_CHECK(xs.size() == ps.size(), "sophia fused_step_: ", name, " has ", xs.size(),
              " tensors, params has ", ps.size());
  for (size_t i = 0; i < xs.size(); ++i) {
    TORCH_CHECK(xs[i].device().is_cpu() && xs[i].is_contiguous() &&
                    xs[i].scalar_type() == dtype && xs[i].numel() == ps[i].numel(),
                "sophia fused_step_: ", name, "[", i, "] must be a contiguous CPU tensor of ",
                dtype, " and the parameter's size");
  }
}

void check_lists(const std::vector<at::Tensor>& ps, at::TensorList grads,
                 at::TensorList exp_avgs, at::TensorList hessians, const at::Tensor& coeffs) {
  const at::ScalarType dtype = ps.empty() ? at::kFloat : ps[0].scalar_type();
  check_list(ps, ps, "params", dtype);
  check_list({grads.begin(), grads.end()}, ps, "grads", dtype);
  check_list({exp_avgs.begin(), exp_avgs.end()}, ps, "exp_avgs",
             ps.empty() ? dtype : exp_avgs[0].scalar_type());
  check_list({hessians.begin(), hessians.end()}, ps, "hessians",
             ps.empty() ? dtype : hessians[0].scalar_type());
  TORCH_CHECK(coeffs.dim() == 1 && coeffs.numel() == 6 && coeffs.device().is_cpu() &&
                  coeffs.is_contiguous(),
              "sophia fused_step_: coeffs must be 6 CPU scalars");
}

template <typename C>
Coeffs<C> read_coeffs(const at::Tensor& coeffs) {
  TORCH_CHECK(coeffs.scalar_type() == c10::CppTypeToScalarType<C>::value,
              "sophia fused_step_: coeffs must be in the compute dtype ",
              c10::CppTypeToScalarType<C>::value, ", got ", coeffs.scalar_type());
  const C* cp = coeffs.const_data_ptr<C>();
  return Coeffs<C>{cp[0], cp[1], cp[2], cp[3], cp[4], cp[5]};
}

template <typename X>
std::vector<X*> pointers(at::TensorList xs) {
  std::vector<X*> out;
  for (const auto& x : xs) out.push_back(static_cast<X*>(x.data_ptr()));
  return out;
}

// Runs body(k) for every work item in parallel and returns the sum of the counts.
template <typename F>
at::Tensor run_items(const std::vector<Item>& items, const F& body) {
  std::vector<int64_t> counts(items.size(), 0);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) counts[k] = body(items[k]);
  });
  int64_t total = 0;
  for (int64_t x : counts) total += x;
  auto wins = at::empty({}, at::TensorOptions().dtype(at::kLong));
  wins.fill_(total);
  return wins;
}

at::Tensor fused_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList hessians, const at::Tensor& coeffs) {
  const std::vector<at::Tensor> ps(params.begin(), params.end());
  check_lists(ps, grads, exp_avgs, hessians, coeffs);
  if (ps.empty()) return run_items({}, [](const Item&) { return int64_t{0}; });
  TORCH_CHECK(exp_avgs[0].scalar_type() == ps[0].scalar_type() &&
                  hessians[0].scalar_type() == ps[0].scalar_type(),
              "sophia fused_step_: exp_avgs and hessians must have the parameters' dtype "
              "(fused_step_narrow_ takes other forms)");
  const std::vector<Item> items = work_items(ps);
  at::Tensor wins;
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, ps[0].scalar_type(), "sophia_fused_step_cpu", [&] {
        using C = at::opmath_type<scalar_t>;
        const Coeffs<C> c = read_coeffs<C>(coeffs);
        const auto p = pointers<scalar_t>(params), g = pointers<scalar_t>(grads);
        const auto m = pointers<scalar_t>(exp_avgs), h = pointers<scalar_t>(hessians);
        wins = run_items(items, [&](const Item& it) -> int64_t {
          const int64_t t = it.tensor, o = it.begin;
          return update_range<scalar_t, scalar_t, scalar_t, MuStore::kNearest, C>(
              p[t] + o, g[t] + o, m[t] + o, h[t] + o, it.count, c);
        });
      });
  return wins;
}

// Calls f with a value of the C++ type of a state dtype the narrow pass takes.
template <typename F>
void with_state_type(at::ScalarType s, const char* name, const F& f) {
  switch (s) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    case at::kChar:
      return f(int8_t{});
    default:
      TORCH_CHECK(false, "sophia fused_step_narrow_: ", name, " of dtype ", s, " not supported");
  }
}

// The step index a 0-dim step counter holds (read in place: no dispatch per tensor).
int64_t read_step(const at::Tensor& s) {
  TORCH_CHECK(s.device().is_cpu() && s.numel() == 1,
              "sophia fused_step_narrow_: steps must be one-element CPU tensors");
  int64_t out = 0;
  AT_DISPATCH_ALL_TYPES(s.scalar_type(), "sophia_read_step",
                        [&] { out = static_cast<int64_t>(*s.const_data_ptr<scalar_t>()); });
  return out;
}

at::Tensor fused_step_narrow_cpu(at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList hessians,
                                 at::TensorList hessian_scales, at::TensorList steps,
                                 const at::Tensor& coeffs, int64_t seed, bool stochastic_mu) {
  const std::vector<at::Tensor> ps(params.begin(), params.end());
  check_lists(ps, grads, exp_avgs, hessians, coeffs);
  if (ps.empty()) return run_items({}, [](const Item&) { return int64_t{0}; });
  const at::ScalarType pt = ps[0].scalar_type(), mt = exp_avgs[0].scalar_type(),
                       ht = hessians[0].scalar_type();
  TORCH_CHECK(mt == pt || mt == at::kFloat || mt == at::kBFloat16,
              "sophia fused_step_narrow_: exp_avgs must be the parameters' dtype, float32 or "
              "bfloat16, got ",
              mt);
  TORCH_CHECK(!stochastic_mu || mt == at::kBFloat16,
              "sophia fused_step_narrow_: stochastic rounding stores exp_avgs in bfloat16, got ",
              mt);
  TORCH_CHECK(ht == pt || ht == at::kFloat || ht == at::kBFloat16 || ht == at::kChar,
              "sophia fused_step_narrow_: hessians must be the parameters' dtype, float32, "
              "bfloat16 or int8 codes, got ",
              ht);
  const bool block8 = ht == at::kChar;
  TORCH_CHECK(hessian_scales.size() == (block8 ? ps.size() : 0),
              "sophia fused_step_narrow_: hessian_scales has ", hessian_scales.size(),
              " tensors; one per parameter with int8 hessians, none otherwise");
  std::vector<const float*> scale_ptrs;
  for (size_t i = 0; i < hessian_scales.size(); ++i) {
    const at::Tensor& s = hessian_scales[i];
    TORCH_CHECK(s.device().is_cpu() && s.is_contiguous() && s.scalar_type() == at::kFloat &&
                    s.numel() == (ps[i].numel() + kBlock - 1) / kBlock,
                "sophia fused_step_narrow_: hessian_scales[", i,
                "] must be a contiguous float32 CPU tensor of one scale per 256 coordinates");
    scale_ptrs.push_back(s.const_data_ptr<float>());
  }
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFLL, "sophia fused_step_narrow_: seed ", seed,
              " is not in [0, 2**32)");
  std::vector<uint32_t> keys(ps.size(), 0);
  if (stochastic_mu) {
    TORCH_CHECK(steps.size() == ps.size(), "sophia fused_step_narrow_: steps has ", steps.size(),
                " tensors, params has ", ps.size());
    for (size_t i = 0; i < ps.size(); ++i) {
      keys[i] = stream_key(static_cast<uint32_t>(seed), read_step(steps[i]), 0);  // STREAM_MU
    }
  }
  const std::vector<Item> items = work_items(ps);
  at::Tensor wins;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, pt, "sophia_fused_step_narrow", [&] {
    using T = scalar_t;
    using C = at::opmath_type<T>;
    const Coeffs<C> c = read_coeffs<C>(coeffs);
    const auto p = pointers<T>(params), g = pointers<T>(grads);
    with_state_type(mt, "exp_avgs", [&](auto m_tag) {
      using M = decltype(m_tag);
      if constexpr (std::is_same_v<M, T> || std::is_same_v<M, float> ||
                    std::is_same_v<M, c10::BFloat16>) {
        const auto m = pointers<M>(exp_avgs);
        with_state_type(ht, "hessians", [&](auto h_tag) {
          using H = decltype(h_tag);
          if constexpr (std::is_same_v<H, T> || std::is_same_v<H, float> ||
                        std::is_same_v<H, c10::BFloat16> || std::is_same_v<H, int8_t>) {
            const auto h = pointers<H>(hessians);
            auto run = [&](auto mode) {
              constexpr MuStore kMu = decltype(mode)::value;
              wins = run_items(items, [&](const Item& it) -> int64_t {
                const int64_t t = it.tensor;
                return update_item<T, M, H, kMu, C>(p[t], g[t], m[t], h[t],
                                                    block8 ? scale_ptrs[t] : nullptr, it.begin,
                                                    it.count, c, keys[t]);
              });
            };
            if constexpr (std::is_same_v<M, c10::BFloat16>) {
              if (stochastic_mu) {
                return run(std::integral_constant<MuStore, MuStore::kStochastic>{});
              }
            }
            run(std::integral_constant<MuStore, MuStore::kNearest>{});
          }
        });
      }
    });
  });
  return wins;
}

}  // namespace

TORCH_LIBRARY(sophia_native, m) {
  m.def(
      "fused_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor[] hessians, Tensor coeffs) -> Tensor");
  m.def(
      "fused_step_narrow_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor[] hessians, Tensor[] hessian_scales, Tensor[] steps, Tensor coeffs, int seed, "
      "bool stochastic_mu) -> Tensor");
}

TORCH_LIBRARY_IMPL(sophia_native, CPU, m) {
  m.impl("fused_step_", &fused_step_cpu);
  m.impl("fused_step_narrow_", &fused_step_narrow_cpu);
}
