// Helpers shared by gemma_opt's CPU kernels (int8_gemv.cpp, decode_attention.cpp): 16 fp32
// lanes, `Vec16`, in one AVX-512 register or, built without AVX-512 (-mavx2 -mfma -mf16c),
// in two AVX2 registers. The kernels are written once against these; int8_gemv.py builds
// them for the ISA that torch reports for the CPU.
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

// Values are loaded as fp32, converted in registers (a separate conversion to fp32 cost a
// dispatched op per call: ~10 us, 6% of a 270M decode step).
#ifdef __AVX512F__
struct Vec16 {
  __m512 v;
};

inline Vec16 zero16() { return {_mm512_setzero_ps()}; }
inline Vec16 broadcast16(float a) { return {_mm512_set1_ps(a)}; }
inline Vec16 load16(const float* p) { return {_mm512_loadu_ps(p)}; }
inline Vec16 load16(const at::BFloat16* p) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16))};
}
inline Vec16 load16(const at::Half* p) { return {_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p))}; }
inline Vec16 load16(const int8_t* p) { return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)))}; }
inline void store16(float* p, Vec16 a) { _mm512_storeu_ps(p, a.v); }
inline Vec16 fmadd(Vec16 a, Vec16 b, Vec16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec16 operator+(Vec16 a, Vec16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline float reduce_add(Vec16 a) { return _mm512_reduce_add_ps(a.v); }
#else
struct Vec16 {
  __m256 lo, hi;
};

inline __m256 bf16x8(const void* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
inline __m256 f16x8(const void* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
inline __m256 i8x8(const int8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }

inline Vec16 zero16() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline Vec16 broadcast16(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline Vec16 load16(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline Vec16 load16(const at::BFloat16* p) { return {bf16x8(p), bf16x8(p + 8)}; }
inline Vec16 load16(const at::Half* p) { return {f16x8(p), f16x8(p + 8)}; }
inline Vec16 load16(const int8_t* p) { return {i8x8(p), i8x8(p + 8)}; }
inline void store16(float* p, Vec16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline Vec16 fmadd(Vec16 a, Vec16 b, Vec16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline Vec16 operator+(Vec16 a, Vec16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline float reduce_add(Vec16 a) {
  const __m256 sum8 = _mm256_add_ps(a.lo, a.hi);
  __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
  sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
  return _mm_cvtss_f32(_mm_add_ss(sum4, _mm_movehdup_ps(sum4)));
}
#endif

}  // namespace gemma_opt
