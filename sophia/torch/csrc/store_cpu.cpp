// The for-loop and foreach bodies' narrow state (sophia/narrow.py) on the CPU,
// read and written in one pass each, spread over torch's intra-op threads:
//
// store_bfloat16_: new momenta into a bfloat16 m (mu_dtype="bfloat16"), each
// value converted to float32 (round to nearest) and rounded stochastically to
// bfloat16 with the spec's bits of its coordinate, for every piece of a batch.
// The eager code takes a dozen full-size int64 passes per batch for the bits.
//
// decode_block8: a piece of block8 h as float32, (c |c|) times its block's
// scale, where the eager code pads, widens, squares and scales in four passes.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <cstdint>
#include <type_traits>
#include <vector>

#include "narrow.h"

namespace {

using sophia_native::bits_at;
using sophia_native::decode_block8;
using sophia_native::kBlock;
using sophia_native::kBlockShift;
using sophia_native::Item;
using sophia_native::round_bfloat16;
using sophia_native::work_items;

template <typename S>
void store_range(c10::BFloat16* __restrict out, const S* __restrict src, int64_t begin,
                 int64_t n, uint32_t key, uint32_t offset) {
  for (int64_t i = begin; i < begin + n; ++i) {
    const float x = static_cast<float>(src[i]);
    out[i] = round_bfloat16(x, bits_at(key, offset + static_cast<uint32_t>(i)));
  }
}

void store_bfloat16_cpu(at::TensorList out, at::TensorList src, at::IntArrayRef keys,
                        at::IntArrayRef offsets) {
  const std::vector<at::Tensor> outs(out.begin(), out.end());
  TORCH_CHECK(src.size() == outs.size() && keys.size() == outs.size() &&
                  offsets.size() == outs.size(),
              "sophia store_bfloat16_: one source, key and offset per output");
  for (size_t i = 0; i < outs.size(); ++i) {
    const at::Tensor &o = outs[i], &s = src[i];
    TORCH_CHECK(o.device().is_cpu() && o.is_contiguous() && o.scalar_type() == at::kBFloat16 &&
                    s.device().is_cpu() && s.is_contiguous() &&
                    (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble) &&
                    s.numel() == o.numel(),
                "sophia store_bfloat16_: out[", i, "] must be a contiguous bfloat16 CPU tensor ",
                "and src[", i, "] a contiguous float32 or float64 CPU tensor of its size");
    TORCH_CHECK(keys[i] >= 0 && keys[i] <= 0xFFFFFFFFLL && offsets[i] >= 0,
                "sophia store_bfloat16_: keys[", i, "] must be in [0, 2**32) and offsets[", i,
                "] non-negative");
  }
  const std::vector<Item> items = work_items(outs);
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Item& it = items[k];
      const int64_t t = it.tensor;
      auto* o = static_cast<c10::BFloat16*>(outs[t].data_ptr());
      const auto key = static_cast<uint32_t>(keys[t]);
      const auto offset = static_cast<uint32_t>(offsets[t]);  // coordinates wrap mod 2**32
      if (src[t].scalar_type() == at::kDouble) {
        store_range(o, src[t].const_data_ptr<double>(), it.begin, it.count, key, offset);
      } else {
        store_range(o, src[t].const_data_ptr<float>(), it.begin, it.count, key, offset);
      }
    }
  });
}

at::Tensor decode_block8_cpu(const at::Tensor& codes, const at::Tensor& scales) {
  TORCH_CHECK(codes.device().is_cpu() && codes.is_contiguous() &&
                  codes.scalar_type() == at::kChar && scales.device().is_cpu() &&
                  scales.is_contiguous() && scales.scalar_type() == at::kFloat &&
                  scales.numel() == (codes.numel() + kBlock - 1) / kBlock,
              "sophia decode_block8: codes must be contiguous int8 CPU codes and scales the "
              "contiguous float32 CPU scales of their blocks, one per 256");
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const int8_t* c = codes.const_data_ptr<int8_t>();
  const float* s = scales.const_data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t n = codes.numel();
  at::parallel_for(0, n, sophia_native::kChunk, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) o[i] = decode_block8(c[i], s[i >> kBlockShift]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sophia_native, m) {
  m.def("store_bfloat16_(Tensor(a!)[] out, Tensor[] src, int[] keys, int[] offsets) -> ()");
  m.def("decode_block8(Tensor codes, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(sophia_native, CPU, m) {
  m.impl("store_bfloat16_", &store_bfloat16_cpu);
  m.impl("decode_block8", &decode_block8_cpu);
}
