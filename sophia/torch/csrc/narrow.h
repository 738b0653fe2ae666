// The narrow state's rounding (sophia/narrow.py) in C++, shared by the native
// step (fused_cpu.cpp) and the native Hessian EMA (ema_cpu.cpp): the spec's
// counter-based random bits in uint32_t (whose products wrap modulo 2**32 as
// the spec's masks do), stochastic rounding to bfloat16, and the 8-bit block
// form's square-root codes. Every float operation is rounded once, in the
// spec's order; the build's -ffp-contract=off keeps the compiler from fusing
// a multiply and an add.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace sophia_native {

// Elements per work item: big enough that a thread streams, small enough that
// a model's many tensors of very different sizes spread evenly over the threads.
// A multiple of the 8-bit form's block, so that every item starts a block.
constexpr int64_t kChunk = int64_t{1} << 16;
// sophia.narrow.BLOCK_SIZE, and its log2.
constexpr int64_t kBlock = 256;
constexpr int kBlockShift = 8;
// sophia.narrow.CODE_MAX, as a float.
constexpr float kCodeMax = 127.0f;

// sophia.narrow.mix32.
inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  return x ^ (x >> 16);
}

// The key of sophia.narrow.random_bits(seed, step, stream, ...): mix(seed ^ mix(4 step + stream)).
inline uint32_t stream_key(uint32_t seed, int64_t step, uint32_t stream) {
  return mix32(seed ^ mix32(static_cast<uint32_t>(4 * step) + stream));
}

// The random bits of coordinate i of the stream `key`, spread as sophia.narrow.random_bits does.
inline uint32_t bits_at(uint32_t key, uint32_t i) { return mix32(key ^ (i * 0x61C88647u)); }

// sophia.narrow.round_bfloat16: the float32 pattern plus the top 16 random bits,
// truncated to 16 bits. The uint32_t sum wraps only for NaN patterns, which take
// the round-to-nearest conversion instead.
inline c10::BFloat16 round_bfloat16(float x, uint32_t bits) {
  uint32_t pattern;
  std::memcpy(&pattern, &x, sizeof pattern);
  const auto top = static_cast<uint16_t>((pattern + (bits >> 16)) >> 16);
  return std::isnan(x) ? c10::BFloat16(x) : c10::BFloat16(top, c10::BFloat16::from_bits());
}

// The bit pattern of |x|: for non-negative floats the patterns are ordered as the
// values, and a NaN's lies above infinity's, so their integer max (which vectorises,
// unlike a float max that keeps NaN) finds the largest magnitude and any NaN.
inline uint32_t magnitude_bits(float x) {
  uint32_t pattern;
  std::memcpy(&pattern, &x, sizeof pattern);
  return pattern & 0x7FFFFFFFu;
}

// sophia.narrow.decode_block8 of one code: (c |c|) scale. c |c| is an integer of at
// most 127**2, exact in float32, so the product with the scale is the one rounding.
inline float decode_block8(int8_t c, float scale) {
  const float code = static_cast<float>(c);
  return (code * std::fabs(code)) * scale;
}

// sophia.narrow.encode_block8 of one coordinate x of a block whose scale is finite
// and nonzero; u is the coordinate's uniform (bits >> 8) * 2**-24. Branch-free,
// so that a loop over a block vectorises. The spec's floor(sqrt(v)) is taken by
// truncating to an integer: the same for v >= 0 and below 2**31 (v is at most
// about 2 * 127**2, even where a subnormal scale is rounded far from max|x| / 127**2),
// and, unlike std::floor without -fno-trapping-math, a conversion vectorises.
inline int8_t encode_block8(float x, float scale, float u) {
  const float v = std::fabs(x) / scale;
  float a = static_cast<float>(static_cast<int32_t>(std::sqrt(v)));
  a -= (a * a > v) ? 1.0f : 0.0f;
  const float p = (v - a * a) / (2.0f * a + 1.0f);
  const float up = a + ((u < p) ? 1.0f : 0.0f);
  const float magnitude = up < kCodeMax ? up : kCodeMax;
  return static_cast<int8_t>(static_cast<int32_t>(x < 0.0f ? -magnitude : magnitude));
}

// The uniform in [0, 1) of sophia.narrow.encode_block8 from a coordinate's bits.
inline float uniform24(uint32_t bits) {
  return static_cast<float>(bits >> 8) * 5.9604644775390625e-08f;  // 2**-24
}

// Work items: (tensor, first element, count).
struct Item {
  int64_t tensor, begin, count;
};

inline std::vector<Item> work_items(const std::vector<at::Tensor>& ps) {
  std::vector<Item> items;
  for (size_t t = 0; t < ps.size(); ++t) {
    const int64_t n = ps[t].numel();
    for (int64_t b = 0; b < n; b += kChunk) {
      items.push_back({static_cast<int64_t>(t), b, std::min(kChunk, n - b)});
    }
  }
  return items;
}

}  // namespace sophia_native
