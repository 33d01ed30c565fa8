// A probe, not part of the plugin: how fast an int4 x int8 GEMM and an int8-weight GEMM can read
// their weights on AVX2 (benchmarks/int4_gemv_avx2.py builds them with torch.utils.cpp_extension
// and measures them).
//
// Weights [N, K/2] uint8: per 64 weights of a row 32 bytes, byte i holding weight i in its low
// nibble and weight i + 32 in its high one, as value + 8 (0..15); fp32 scales per group of 128
// inputs [N, K/128]. Activations int8 [M, K] with fp32 scales per group [M, K/128] and the group's
// sum of int8 values [M, K/128] (the zero point's share):
//   out[m, n] = sum_g w_scale[n, g] * x_scale[m, g] * (sum_k u[n, k] * x[m, k] - 8 * x_sum[m, g]).
// vpmaddubsw multiplies the unsigned nibbles by the signed int8 activations; its int16 pair sums
// stay below 2 * 15 * 128 and four of them below 2^15: exact, unlike int8 weights of full range.
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>
#include <torch/extension.h>

constexpr int64_t kGroup = 128;
constexpr int64_t kPrefetchBytes = 1024;

// out[m, n] = dot(n, m) for every output n (split over the threads) and input row m.
template <typename Dot>
torch::Tensor each_output(int64_t rows, int64_t outputs, const Dot& dot) {
  auto out = torch::empty({rows, outputs}, torch::kFloat32);
  float* os = out.data_ptr<float>();
  at::parallel_for(0, outputs, 16, [&](int64_t first, int64_t last) {
    for (int64_t n = first; n < last; ++n) {
      for (int64_t m = 0; m < rows; ++m) os[m * outputs + n] = dot(n, m);
    }
  });
  return out;
}

inline float horizontal_sum(__m256 v) {
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_hadd_ps(half, half);
  return _mm_cvtss_f32(_mm_hadd_ps(half, half));
}

inline int32_t horizontal_sum(__m256i v) {
  __m128i half = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  half = _mm_hadd_epi32(half, half);
  return _mm_cvtsi128_si32(_mm_hadd_epi32(half, half));
}

torch::Tensor int4_gemm(torch::Tensor x, torch::Tensor x_scale, torch::Tensor x_sum,
                        torch::Tensor weight, torch::Tensor w_scale) {
  const int64_t inputs = x.size(1), groups = inputs / kGroup;
  const int8_t* xs = x.data_ptr<int8_t>();
  const float* xss = x_scale.data_ptr<float>();
  const int32_t* sums = x_sum.data_ptr<int32_t>();
  const uint8_t* ws = weight.data_ptr<uint8_t>();
  const float* wss = w_scale.data_ptr<float>();
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  return each_output(x.size(0), weight.size(0), [&](int64_t n, int64_t m) {
    const uint8_t* w_row = ws + n * (inputs / 2);
    const int8_t* x_row = xs + m * inputs;
    __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    float zero_share = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t* wg = w_row + g * kGroup / 2;
      const int8_t* xg = x_row + g * kGroup;
      _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchBytes), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(wg + kPrefetchBytes + 64), _MM_HINT_T0);
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wg + 32));
      auto dot = [&](__m256i nibbles, int64_t at) {
        return _mm256_maddubs_epi16(
            nibbles, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + at)));
      };
      __m256i pairs = dot(_mm256_and_si256(b0, low), 0);
      pairs = _mm256_add_epi16(pairs, dot(_mm256_and_si256(_mm256_srli_epi16(b0, 4), low), 32));
      pairs = _mm256_add_epi16(pairs, dot(_mm256_and_si256(b1, low), 64));
      pairs = _mm256_add_epi16(pairs, dot(_mm256_and_si256(_mm256_srli_epi16(b1, 4), low), 96));
      const float scale = wss[n * groups + g] * xss[m * groups + g];
      const __m256 part = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
      // Two accumulators: consecutive groups do not wait on each other's add.
      if (g & 1) {
        odd = _mm256_fmadd_ps(part, _mm256_set1_ps(scale), odd);
      } else {
        even = _mm256_fmadd_ps(part, _mm256_set1_ps(scale), even);
      }
      zero_share += scale * 8.f * static_cast<float>(sums[m * groups + g]);
    }
    return horizontal_sum(_mm256_add_ps(even, odd)) - zero_share;
  });
}

inline float horizontal_max(__m256 v) {
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_shuffle_ps(half, half, 1)));
}

// bf16 activations [M, K] -> int8 per group of 128 with portable_kernels.quantize_tokens' formula
// on each group (scale max|x| / 127, at least FLT_MIN; round half to even): the int4 kernel's
// inputs (values, fp32 scales [M, K/128], int sums [M, K/128]), bit for bit those of
// int4_gemv_avx2.py's quantize_groups.
std::vector<torch::Tensor> quantize_groups(torch::Tensor x) {
  const int64_t groups = x.numel() / kGroup;
  auto values = torch::empty_like(x, torch::kInt8);
  auto scales = torch::empty({x.size(0), x.size(1) / kGroup}, torch::kFloat32);
  auto sums = torch::empty({x.size(0), x.size(1) / kGroup}, torch::kInt32);
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  int8_t* vs = values.data_ptr<int8_t>();
  float* ss = scales.data_ptr<float>();
  int32_t* sums_out = sums.data_ptr<int32_t>();
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int64_t g = 0; g < groups; ++g) {
    float widened[kGroup];
    __m256 largest = _mm256_setzero_ps();
    for (int64_t i = 0; i < kGroup; i += 8) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs + g * kGroup + i));
      const __m256 v = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
      _mm256_storeu_ps(widened + i, v);
      largest = _mm256_max_ps(largest, _mm256_andnot_ps(sign, v));
    }
    const float scale = std::max(horizontal_max(largest) / 127.f, FLT_MIN);
    int32_t sum = 0;
    for (int64_t i = 0; i < kGroup; ++i) {
      const float q = std::min(std::max(std::nearbyint(widened[i] / scale), -128.f), 127.f);
      vs[g * kGroup + i] = static_cast<int8_t>(q);
      sum += static_cast<int32_t>(q);
    }
    ss[g] = scale;
    sums_out[g] = sum;
  }
  return {values, scales, sums};
}

// The int4 kernel on bf16 activations: their quantization (above) and the product in one call.
torch::Tensor int4_gemm_bf16(torch::Tensor x, torch::Tensor weight, torch::Tensor w_scale) {
  const auto quantized = quantize_groups(x);
  return int4_gemm(quantized[0], quantized[1], quantized[2], weight, w_scale);
}

// int8 weights [N, K] with fp32 scales per row [N] times fp32 activations [M, K], fp32 sums: the
// int8 lm_head's math as PyTorch's _weight_int8pack_mm computes it, activations not quantized.
torch::Tensor int8_gemm(torch::Tensor x, torch::Tensor weight, torch::Tensor w_scale) {
  const int64_t inputs = x.size(1);
  const float* xs = x.data_ptr<float>();
  const int8_t* ws = weight.data_ptr<int8_t>();
  const float* wss = w_scale.data_ptr<float>();
  return each_output(x.size(0), weight.size(0), [&](int64_t n, int64_t m) {
    const int8_t* w_row = ws + n * inputs;
    const float* x_row = xs + m * inputs;
    __m256 sums[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                      _mm256_setzero_ps()};
    for (int64_t k = 0; k < inputs; k += 32) {
      _mm_prefetch(reinterpret_cast<const char*>(w_row + k + kPrefetchBytes), _MM_HINT_T0);
      for (int j = 0; j < 4; ++j) {
        const __m128i eight = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w_row + k + 8 * j));
        const __m256 w = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(eight));
        sums[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x_row + k + 8 * j), sums[j]);
      }
    }
    const __m256 total =
        _mm256_add_ps(_mm256_add_ps(sums[0], sums[1]), _mm256_add_ps(sums[2], sums[3]));
    return horizontal_sum(total) * wss[n];
  });
}

// int8 weights [N, K] with fp32 row scales [N] times int8 activations [M, K] with fp32 token
// scales [M] (the int8 lm_head's W8A8 math): both sign-extended to int16, vpmaddwd, int32 sums.
torch::Tensor int8_int8_gemm(torch::Tensor x, torch::Tensor x_scale, torch::Tensor weight,
                             torch::Tensor w_scale) {
  const int64_t inputs = x.size(1);
  auto wide = x.to(torch::kInt16).contiguous();
  const int16_t* xs = wide.data_ptr<int16_t>();
  const float* xss = x_scale.data_ptr<float>();
  const int8_t* ws = weight.data_ptr<int8_t>();
  const float* wss = w_scale.data_ptr<float>();
  return each_output(x.size(0), weight.size(0), [&](int64_t n, int64_t m) {
    const int8_t* w_row = ws + n * inputs;
    const int16_t* x_row = xs + m * inputs;
    __m256i sums[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(),
                       _mm256_setzero_si256()};
    for (int64_t k = 0; k < inputs; k += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(w_row + k + kPrefetchBytes), _MM_HINT_T0);
      for (int j = 0; j < 4; ++j) {
        const __m256i w = _mm256_cvtepi8_epi16(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(w_row + k + 16 * j)));
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x_row + k + 16 * j));
        sums[j] = _mm256_add_epi32(sums[j], _mm256_madd_epi16(w, a));
      }
    }
    const __m256i total =
        _mm256_add_epi32(_mm256_add_epi32(sums[0], sums[1]), _mm256_add_epi32(sums[2], sums[3]));
    return static_cast<float>(horizontal_sum(total)) * xss[m] * wss[n];
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_gemm", &int4_gemm);
  m.def("quantize_groups", &quantize_groups);
  m.def("int4_gemm_bf16", &int4_gemm_bf16);
  m.def("int8_gemm", &int8_gemm);
  m.def("int8_int8_gemm", &int8_int8_gemm);
}
