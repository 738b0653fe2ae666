// SophiaG's Hessian EMA into narrow state (sophia/narrow.py) on the CPU: the
// write of SophiaG.update_hessian with a hessian_dtype, for every tensor of a
// call in one pass spread over torch's intra-op threads.
//
// Per coordinate it reads h in its form (float32, bfloat16, or the 8-bit
// square-root codes times their block's scale), reads the estimate h_hat in
// its own dtype, computes b2 h + (1 - b2) h_hat in the compute type as
// sophia.spec.hessian_ema does (float for float/bf16/half parameters, double
// for double; each product and the sum rounded once, in that order), and
// stores it back in the same form: float32 rounded to nearest, bfloat16
// rounded stochastically with the spec's bits of the Hessian stream, 8-bit
// codes re-encoded a block at a time (the block's EMA in a local buffer of
// 256, its largest magnitude, its new scale, its codes). The eager torch code
// makes several full-size temporaries and a dozen int64 passes for the random
// bits; this makes none.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "narrow.h"

namespace {

using sophia_native::bits_at;
using sophia_native::decode_block8;
using sophia_native::encode_block8;
using sophia_native::Item;
using sophia_native::kBlock;
using sophia_native::kBlockShift;
using sophia_native::kCodeMax;
using sophia_native::magnitude_bits;
using sophia_native::round_bfloat16;
using sophia_native::stream_key;
using sophia_native::uniform24;
using sophia_native::work_items;

// sophia.narrow.STREAM_HESSIAN.
constexpr uint32_t kStreamHessian = 1;
// The bit pattern of float32 infinity.
constexpr uint32_t kInfinityBits = 0x7F800000u;

// The EMA of one coordinate in the compute type C: b2 h + (1 - b2) h_hat.
template <typename C, typename E>
inline C ema(C h, E e, C b2, C one_minus_b2) {
  return h * b2 + static_cast<C>(e) * one_minus_b2;
}

// One work item of a float32 or bfloat16 h: n coordinates from `first`.
template <typename H, typename E, typename C>
void ema_range(H* __restrict h, const E* __restrict e, int64_t first, int64_t n, C b2,
               C one_minus_b2, uint32_t key) {
  for (int64_t i = first; i < first + n; ++i) {
    const C x = ema(static_cast<C>(h[i]), e[i], b2, one_minus_b2);
    if constexpr (std::is_same_v<H, c10::BFloat16>) {
      h[i] = round_bfloat16(static_cast<float>(x), bits_at(key, static_cast<uint32_t>(i)));
    } else {
      h[i] = static_cast<H>(x);
    }
  }
}

// One block of the 8-bit form: codes[0 .. n) (n <= kBlock) at coordinate `first`,
// whose scale is *scale; both are replaced by the encoding of the block's EMA.
template <typename E, typename C>
void ema_block8(int8_t* __restrict codes, float* scale, const E* __restrict e, int64_t first,
                int64_t n, C b2, C one_minus_b2, uint32_t key) {
  float x[kBlock];
  const float old_scale = *scale;
  uint32_t largest = 0;  // magnitude_bits of the largest |x|, or above infinity's for a NaN
  for (int64_t i = 0; i < n; ++i) {
    const C hv = static_cast<C>(decode_block8(codes[i], old_scale));
    x[i] = static_cast<float>(ema(hv, e[i], b2, one_minus_b2));
    const uint32_t m = magnitude_bits(x[i]);
    largest = m > largest ? m : largest;
  }
  float top;  // np.max(|x|) of the block: the spec's max propagates a NaN, abs clears its sign
  if (largest > kInfinityBits) {
    int64_t i = 0;
    while (!std::isnan(x[i])) ++i;  // the block's first NaN
    top = std::fabs(x[i]);
  } else {
    std::memcpy(&top, &largest, sizeof top);
  }
  const float s = top / (kCodeMax * kCodeMax);
  *scale = s;
  if (!(std::isfinite(s) && s > 0.0f)) {  // zeros, or not finite: the codes are all 0
    for (int64_t i = 0; i < n; ++i) codes[i] = 0;
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const float u = uniform24(bits_at(key, static_cast<uint32_t>(first + i)));
    codes[i] = encode_block8(x[i], s, u);
  }
}

// One work item of the 8-bit form, a block at a time (items start on a block).
template <typename E, typename C>
void ema_item8(int8_t* codes, float* scales, const E* e, int64_t first, int64_t n, C b2,
               C one_minus_b2, uint32_t key) {
  for (int64_t b = first; b < first + n; b += kBlock) {
    ema_block8<E, C>(codes + b, scales + (b >> kBlockShift), e + b, b,
                     std::min(kBlock, first + n - b), b2, one_minus_b2, key);
  }
}

// Calls f with a value of the C++ type of an estimate's dtype.
template <typename F>
void with_estimate_type(at::ScalarType s, const F& f) {
  switch (s) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kBFloat16:
      return f(c10::BFloat16{});
    case at::kHalf:
      return f(c10::Half{});
    default:
      TORCH_CHECK(false, "sophia hessian_ema_narrow_: estimates of dtype ", s, " not supported");
  }
}

void check_inputs(const std::vector<at::Tensor>& hs, at::TensorList scales,
                  at::TensorList estimates, at::IntArrayRef steps, const at::Tensor& rates,
                  int64_t seed) {
  const at::ScalarType ht = hs.empty() ? at::kFloat : hs[0].scalar_type();
  TORCH_CHECK(ht == at::kFloat || ht == at::kBFloat16 || ht == at::kChar,
              "sophia hessian_ema_narrow_: hessians must be float32, bfloat16 or int8 codes, "
              "got ",
              ht);
  const bool block8 = ht == at::kChar;
  TORCH_CHECK(estimates.size() == hs.size() && steps.size() == hs.size() &&
                  scales.size() == (block8 ? hs.size() : 0),
              "sophia hessian_ema_narrow_: one estimate and step per Hessian, and one scale "
              "tensor per Hessian of int8 codes (none otherwise)");
  for (size_t i = 0; i < hs.size(); ++i) {
    const at::Tensor &h = hs[i], &e = estimates[i];
    TORCH_CHECK(h.device().is_cpu() && h.is_contiguous() && h.scalar_type() == ht &&
                    e.device().is_cpu() && e.is_contiguous() && e.numel() == h.numel(),
                "sophia hessian_ema_narrow_: hessians[", i, "] and estimates[", i,
                "] must be contiguous CPU tensors of one size, the Hessians of one dtype");
    const at::ScalarType et = e.scalar_type();
    TORCH_CHECK(et == at::kFloat || et == at::kDouble || et == at::kBFloat16 || et == at::kHalf,
                "sophia hessian_ema_narrow_: estimates[", i, "] of dtype ", et,
                " not supported (float32, float64, bfloat16, float16)");
    if (block8) {
      const at::Tensor& s = scales[i];
      TORCH_CHECK(s.device().is_cpu() && s.is_contiguous() && s.scalar_type() == at::kFloat &&
                      s.numel() == (h.numel() + kBlock - 1) / kBlock,
                  "sophia hessian_ema_narrow_: hessian_scales[", i,
                  "] must be a contiguous float32 CPU tensor of one scale per 256 coordinates");
    }
  }
  TORCH_CHECK(rates.dim() == 1 && rates.numel() == 2 && rates.device().is_cpu() &&
                  rates.is_contiguous() &&
                  (rates.scalar_type() == at::kFloat || rates.scalar_type() == at::kDouble),
              "sophia hessian_ema_narrow_: rates must be (b2, 1 - b2) as a float32 or float64 "
              "CPU tensor of the compute dtype");
  TORCH_CHECK(seed >= 0 && seed <= 0xFFFFFFFFLL, "sophia hessian_ema_narrow_: seed ", seed,
              " is not in [0, 2**32)");
}

void hessian_ema_narrow_cpu(at::TensorList hessians, at::TensorList hessian_scales,
                            at::TensorList estimates, at::IntArrayRef steps,
                            const at::Tensor& rates, int64_t seed) {
  const std::vector<at::Tensor> hs(hessians.begin(), hessians.end());
  check_inputs(hs, hessian_scales, estimates, steps, rates, seed);
  if (hs.empty()) return;
  const at::ScalarType ht = hs[0].scalar_type();
  std::vector<uint32_t> keys(hs.size(), 0);
  if (ht != at::kFloat) {  // the stochastic forms
    for (size_t i = 0; i < hs.size(); ++i) {
      keys[i] = stream_key(static_cast<uint32_t>(seed), steps[i], kStreamHessian);
    }
  }
  const std::vector<Item> items = work_items(hs);
  AT_DISPATCH_FLOATING_TYPES(rates.scalar_type(), "sophia_hessian_ema_narrow", [&] {
    using C = scalar_t;
    const C b2 = rates.const_data_ptr<C>()[0], one_minus_b2 = rates.const_data_ptr<C>()[1];
    at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const Item& it = items[k];
        const int64_t t = it.tensor;
        with_estimate_type(estimates[t].scalar_type(), [&](auto e_tag) {
          using E = decltype(e_tag);
          const E* e = static_cast<const E*>(estimates[t].const_data_ptr());
          void* h = hs[t].data_ptr();
          if (ht == at::kChar) {
            ema_item8<E, C>(static_cast<int8_t*>(h), hessian_scales[t].data_ptr<float>(), e,
                            it.begin, it.count, b2, one_minus_b2, keys[t]);
          } else if (ht == at::kBFloat16) {
            ema_range<c10::BFloat16, E, C>(static_cast<c10::BFloat16*>(h), e, it.begin,
                                           it.count, b2, one_minus_b2, keys[t]);
          } else {
            ema_range<float, E, C>(static_cast<float*>(h), e, it.begin, it.count, b2,
                                   one_minus_b2, keys[t]);
          }
        });
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sophia_native, m) {
  m.def(
      "hessian_ema_narrow_(Tensor(a!)[] hessians, Tensor(b!)[] hessian_scales, "
      "Tensor[] estimates, int[] steps, Tensor rates, int seed) -> ()");
}

TORCH_LIBRARY_IMPL(sophia_native, CPU, m) {
  m.impl("hessian_ema_narrow_", &hessian_ema_narrow_cpu);
}
