// Helpers shared by gemma_opt's CPU kernels (int8_gemv.cpp, decode_attention.cpp).
#pragma once
#include <ATen/ATen.h>
#include <immintrin.h>

namespace gemma_opt {

// Calls f with a zero of `type` (bfloat16, float16 or float32) whose type is the kernel's
// scalar_t; any other type is an error naming `what`.
template <typename F>
void dispatch_float(at::ScalarType type, const char* what, F f) {
  switch (type) {
    case at::kBFloat16: f(at::BFloat16(0)); break;
    case at::kHalf: f(at::Half(0)); break;
    case at::kFloat: f(0.f); break;
    default: TORCH_CHECK(false, what, " must be bfloat16, float16 or float32, got ", type);
  }
}

// 16 values as fp32, converted in registers (a separate conversion to fp32 cost a dispatched
// op per call: ~10 us, 6% of a 270M decode step).
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

}  // namespace gemma_opt
