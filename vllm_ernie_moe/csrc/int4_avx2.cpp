// The plugin's W4A16 kernels for x86 CPUs with AVX2 and FMA, where vLLM has no int4 GEMM (its
// cpu_gemm_wna16 is AVX-512 only) and PyTorch's _weight_int4pack_mm_for_cpu reads the weights at
// a fraction of the memory's rate (docs/cpu-tiers.md). Built at first use by native_int4.py.
//
// Weights [N, K/2] uint8, the AVX2 layout: per 64 inputs of a row 32 bytes, byte i holding input i
// in its low nibble and input i + 32 in its high one, as value + 8 (0..15). Scales fp32 [N, K/G]
// for groups of G = 32, 64 or 128 inputs.
//
// int4_gemm: activations [M, K] are quantized to int8 per group of G (scale max|x| / 127, round
// half to even) and multiplied by the unsigned nibbles with vpmaddubsw; the zero point's share is
// taken off with each group's sum of int8 values:
//   out[m, n] = sum_g w_scale[n, g] * x_scale[m, g] * (sum_k u[n, k] * x[m, k] - 8 * x_sum[m, g]).
// A pair sum is at most 2 * 15 * 128 = 3840 in magnitude and a group's int16 lanes sum at most 4
// pairs (G = 128): exact, unlike an int8 x int8 vpmaddubsw on full-range weights.
//
// dequantize_int4: value * scale into fp32 rows, optionally rounded to bf16 (half to even) as a
// bf16 checkpoint would hold the product.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cstdint>

namespace {

constexpr int64_t kUnit = 32;             // inputs per nibble half of a 32-byte chunk
constexpr int64_t kPrefetchBytes = 1024;  // how far ahead of its reads a row is fetched
constexpr int kRowsPerBlock = 4;          // activation rows that share one weight chunk's nibbles
constexpr int64_t kOutputsPerTile = 32;   // weight rows (40 KB at 2560 inputs) per pass over x

float horizontal_sum(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_hadd_ps(half, half);
  return _mm_cvtss_f32(_mm_hadd_ps(half, half));
}

float horizontal_max(__m256 v) {
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_shuffle_ps(half, half, 1)));
}

struct QuantizedRows {
  at::Tensor values;  // int8 [M, K]
  at::Tensor scales;  // fp32 [M, K / G]
  at::Tensor sums;    // int32 [M, K / G]
};

// Activations to int8 per group of `group` inputs, portable_kernels.quantize_tokens' formula on
// each group: scale max|x| / 127 (at least FLT_MIN), values round(x / scale) clamped to int8.
QuantizedRows quantize_groups(const at::Tensor& x, int64_t group) {
  const at::Tensor wide = x.to(at::kFloat).contiguous();
  const int64_t rows = wide.size(0), groups = wide.size(1) / group;
  QuantizedRows out{at::empty(wide.sizes(), at::kChar), at::empty({rows, groups}, at::kFloat),
                    at::empty({rows, groups}, at::kInt)};
  const float* xs = wide.data_ptr<float>();
  int8_t* values = out.values.data_ptr<int8_t>();
  float* scales = out.scales.data_ptr<float>();
  int32_t* sums = out.sums.data_ptr<int32_t>();
  const __m256 sign = _mm256_set1_ps(-0.f), lowest = _mm256_set1_ps(-128.f),
               highest = _mm256_set1_ps(127.f);
  at::parallel_for(0, rows * groups, 64, [&](int64_t first, int64_t last) {
    alignas(32) int32_t rounded[8];
    for (int64_t g = first; g < last; ++g) {
      const float* xg = xs + g * group;
      __m256 largest = _mm256_setzero_ps();
      for (int64_t i = 0; i < group; i += 8) {
        largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign, _mm256_loadu_ps(xg + i)));
      }
      const float scale = std::max(horizontal_max(largest) / 127.f, FLT_MIN);
      const __m256 divisor = _mm256_set1_ps(scale);
      int32_t sum = 0;
      for (int64_t i = 0; i < group; i += 8) {
        __m256 q = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(xg + i), divisor),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_min_ps(_mm256_max_ps(q, lowest), highest);
        _mm256_store_si256(reinterpret_cast<__m256i*>(rounded), _mm256_cvtps_epi32(q));
        for (int j = 0; j < 8; ++j) {
          values[g * group + i + j] = static_cast<int8_t>(rounded[j]);
          sum += rounded[j];
        }
      }
      scales[g] = scale;
      sums[g] = sum;
    }
  });
  return out;
}

// R activation rows times one weight row: out[r * out_stride] for r < R. Units are the 32-input
// halves of the row's chunks; a group holds Units of them.
template <int R, int Units>
void dot_rows(const uint8_t* w_row, const float* w_scales, const int8_t* x, const float* x_scales,
              const int32_t* x_sums, int64_t inputs, int64_t groups, float* out,
              int64_t out_stride) {
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 total[R];
  float zero_share[R];
  for (int r = 0; r < R; ++r) {
    total[r] = _mm256_setzero_ps();
    zero_share[r] = 0.f;
  }
  for (int64_t g = 0; g < groups; ++g) {
    __m256i pairs[R];
    for (int r = 0; r < R; ++r) pairs[r] = _mm256_setzero_si256();
    for (int u = 0; u < Units; ++u) {
      const int64_t unit = g * Units + u;
      const uint8_t* chunk = w_row + (unit / 2) * kUnit;
      const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(chunk));
      __m256i nibbles;
      if (unit % 2 == 0) {
        _mm_prefetch(reinterpret_cast<const char*>(chunk + kPrefetchBytes), _MM_HINT_T0);
        nibbles = _mm256_and_si256(bytes, low);
      } else {
        nibbles = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
      }
      for (int r = 0; r < R; ++r) {
        const __m256i xr =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + r * inputs + unit * kUnit));
        pairs[r] = _mm256_add_epi16(pairs[r], _mm256_maddubs_epi16(nibbles, xr));
      }
    }
    for (int r = 0; r < R; ++r) {
      const float scale = w_scales[g] * x_scales[r * groups + g];
      const __m256 part = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs[r], ones));
      total[r] = _mm256_fmadd_ps(part, _mm256_set1_ps(scale), total[r]);
      zero_share[r] += scale * 8.f * static_cast<float>(x_sums[r * groups + g]);
    }
  }
  for (int r = 0; r < R; ++r) out[r * out_stride] = horizontal_sum(total[r]) - zero_share[r];
}

// Outputs [first, last) for every activation row: a block of rows stays in the L1 cache while
// the tile's weight rows (in the L2 cache) pass it.
template <int Units>
void dot_tile(const uint8_t* ws, const float* wss, const QuantizedRows& x, int64_t inputs,
              int64_t groups, int64_t first, int64_t last, float* out, int64_t outputs) {
  const int64_t rows = x.values.size(0);
  const int8_t* xs = x.values.data_ptr<int8_t>();
  const float* scales = x.scales.data_ptr<float>();
  const int32_t* sums = x.sums.data_ptr<int32_t>();
  for (int64_t m = 0; m < rows; m += kRowsPerBlock) {
    const int8_t* xm = xs + m * inputs;
    const float* sm = scales + m * groups;
    const int32_t* um = sums + m * groups;
    const int64_t block = std::min<int64_t>(rows - m, kRowsPerBlock);
    for (int64_t n = first; n < last; ++n) {
      const uint8_t* w = ws + n * (inputs / 2);
      const float* s = wss + n * groups;
      float* o = out + m * outputs + n;
      switch (block) {
        case 1: dot_rows<1, Units>(w, s, xm, sm, um, inputs, groups, o, outputs); break;
        case 2: dot_rows<2, Units>(w, s, xm, sm, um, inputs, groups, o, outputs); break;
        case 3: dot_rows<3, Units>(w, s, xm, sm, um, inputs, groups, o, outputs); break;
        default: dot_rows<4, Units>(w, s, xm, sm, um, inputs, groups, o, outputs);
      }
    }
  }
}

void check_weight(const at::Tensor& weight, const at::Tensor& scale, int64_t inputs) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous(),
              "int4 weight: a contiguous uint8 [N, K/2] tensor expected");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
                  scale.size(0) == weight.size(0),
              "int4 scale: a contiguous fp32 [N, K/G] tensor expected");
  TORCH_CHECK(inputs % 64 == 0 && weight.size(1) * 2 == inputs, "int4 weight of ", inputs,
              " inputs: K must be a multiple of 64 and the weight [N, K/2]");
  const int64_t group = inputs / scale.size(1);
  TORCH_CHECK(scale.size(1) * group == inputs && (group == 32 || group == 64 || group == 128),
              "int4 groups of ", inputs, " / ", scale.size(1), " inputs: 32, 64 or 128 expected");
}

// x [M, K] (any float dtype) times the int4 weight [N, K/2] with scales [N, K/G]: fp32 [M, N].
at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2, "int4_gemm: activations [M, K] expected");
  const int64_t inputs = x.size(1), outputs = weight.size(0), groups = scale.size(1);
  check_weight(weight, scale, inputs);
  const int64_t group = inputs / groups;
  const QuantizedRows quantized = quantize_groups(x, group);
  at::Tensor out = at::empty({x.size(0), outputs}, at::kFloat);
  const uint8_t* ws = weight.data_ptr<uint8_t>();
  const float* wss = scale.data_ptr<float>();
  float* os = out.data_ptr<float>();
  at::parallel_for(0, outputs, kOutputsPerTile, [&](int64_t first, int64_t last) {
    for (int64_t tile = first; tile < last; tile += kOutputsPerTile) {
      const int64_t end = std::min(tile + kOutputsPerTile, last);
      if (group == 32) {
        dot_tile<1>(ws, wss, quantized, inputs, groups, tile, end, os, outputs);
      } else if (group == 64) {
        dot_tile<2>(ws, wss, quantized, inputs, groups, tile, end, os, outputs);
      } else {
        dot_tile<4>(ws, wss, quantized, inputs, groups, tile, end, os, outputs);
      }
    }
  });
  return out;
}

// fp32 rounded to the nearest bf16 (half to even), kept in fp32; finite values.
__m256 round_to_bf16(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd);
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(bits, bias),
                                              _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// The weight's rows [first, first + out.size(0)) as value * scale into out (fp32 [rows, K]).
void dequantize_int4(const at::Tensor& weight, const at::Tensor& scale, int64_t first,
                     at::Tensor out, bool round_bf16) {
  const int64_t inputs = weight.size(1) * 2, rows = out.size(0);
  check_weight(weight, scale, inputs);
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.is_contiguous() && out.size(1) == inputs &&
                  first >= 0 && first + rows <= weight.size(0),
              "dequantize_int4: a contiguous fp32 [rows, K] output within the weight expected");
  const int64_t groups = scale.size(1), group = inputs / groups;
  const uint8_t* ws = weight.data_ptr<uint8_t>() + first * (inputs / 2);
  const float* wss = scale.data_ptr<float>() + first * groups;
  float* os = out.data_ptr<float>();
  const __m256i low = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t unit = 0; unit < inputs / kUnit; ++unit) {
        const __m256i bytes = _mm256_loadu_si256(
            reinterpret_cast<const __m256i*>(ws + n * (inputs / 2) + (unit / 2) * kUnit));
        const __m256i nibbles = unit % 2 == 0
                                    ? _mm256_and_si256(bytes, low)
                                    : _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
        alignas(32) int8_t values[kUnit];
        _mm256_store_si256(reinterpret_cast<__m256i*>(values), _mm256_sub_epi8(nibbles, eight));
        const __m256 s = _mm256_set1_ps(wss[n * groups + unit * kUnit / group]);
        float* o = os + n * inputs + unit * kUnit;
        for (int j = 0; j < kUnit; j += 8) {
          const __m128i eight_values = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(values + j));
          __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight_values)), s);
          _mm256_storeu_ps(o + j, round_bf16 ? round_to_bf16(v) : v);
        }
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY(vllm_ernie_moe_avx2, m) {
  m.def("int4_gemm(Tensor x, Tensor weight, Tensor scale) -> Tensor");
  m.def("dequantize_int4(Tensor weight, Tensor scale, int first, Tensor(a!) out, bool round_bf16)"
        " -> ()");
}

TORCH_LIBRARY_IMPL(vllm_ernie_moe_avx2, CPU, m) {
  m.impl("int4_gemm", &int4_gemm);
  m.impl("dequantize_int4", &dequantize_int4);
}
