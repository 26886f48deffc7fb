// gemma_opt::int8_gemv: y = x @ (w * scale)ᵀ for INT8 weight-only linears, one row of x at a time,
// with AVX-512 or AVX2 (simd.h). Built and explained by int8_gemv.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include "simd.h"

namespace {

using namespace gemma_opt;

// Weight rows per step: four streams share each load of x. The four are a quarter of the
// matrix apart, so that each reads on through consecutive rows: four long sequential streams
// per thread read 30-45% faster than four adjacent rows (2.5 KB streams, restarted each step) on
// every 270M and 4B shape on an Intel Xeon, at 1.03-1.12x a plain sum's rate there and 0.83-1.03x
// on an AMD EPYC (scripts/int8_gemv_bench.py, docs/speed.md).
constexpr int64_t ROWS = 4;
// Bytes ahead of the read position that each stream prefetches into L2. With four adjacent
// rows a step, the kernel read no faster than ATen's without it; with the four streams, on an
// AMD EPYC (Zen 4), 2 KB reads 5-14% faster than none, 1, 4, 8 or 16 KB (docs/speed.md); on an
// AMD EPYC (Zen 5) none, 2 and 8 KB read alike, as 4-16 KB did on an Intel Xeon.
constexpr int64_t PREFETCH_BYTES = 2048;

// Dot products of `rows` weight rows (int8, K long, `stride` rows apart) with x, times their
// scales, into y (`stride` apart).
template <int64_t rows, typename scalar_t>
inline void dot_rows(const scalar_t* x, const int8_t* w, int64_t K, const float* scale, scalar_t* y, int64_t stride) {
  Vec16 acc[rows][2];
  for (int64_t r = 0; r < rows; ++r) acc[r][0] = acc[r][1] = zero16();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const Vec16 x0 = load16(x + k), x1 = load16(x + k + 16);
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* row = w + r * stride * K + k;
      _mm_prefetch(reinterpret_cast<const char*>(row + PREFETCH_BYTES), _MM_HINT_T1);
      acc[r][0] = fmadd(load16(row), x0, acc[r][0]);
      acc[r][1] = fmadd(load16(row + 16), x1, acc[r][1]);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float sum = reduce_add(acc[r][0] + acc[r][1]);
    for (int64_t j = k; j < K; ++j) sum += static_cast<float>(x[j]) * w[r * stride * K + j];
    y[r * stride] = static_cast<scalar_t>(sum * scale[r * stride]);
  }
}

template <typename scalar_t>
void gemv_rows(const at::Tensor& x, int64_t M, const at::Tensor& w, const at::Tensor& scale, at::Tensor& y) {
  const int64_t K = w.size(1), N = w.size(0);
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const scalar_t* xp = x.data_ptr<scalar_t>() + m * K;
    scalar_t* yp = y.data_ptr<scalar_t>() + m * N;
    const int64_t stride = N / ROWS;  // step i reads rows i, i + stride, ..., i + (ROWS - 1) stride
    at::parallel_for(0, stride, 16, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) dot_rows<ROWS>(xp, wp + i * K, K, sp + i, yp + i, stride);
    });
    for (int64_t n = stride * ROWS; n < N; ++n) dot_rows<1>(xp, wp + n * K, K, sp + n, yp + n, 0);
  }
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "int8_gemv: weight must be a 2-D int8 tensor");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "int8_gemv: x has ", x.size(-1), " features, weight has ", K);
  TORCH_CHECK(scale.numel() == N, "int8_gemv: one scale per weight row expected, got ", scale.numel());
  // x's rows and the N scales are read through their data pointers, whatever their shapes: a
  // reshape is a dispatched op, and without two of them a call takes 1.9 us instead of 2.6
  // (one-off, the op alone from Python on a tiny matrix; 73 calls a step of the 270M)
  const at::Tensor rows = x.contiguous(), w = weight.contiguous(), s = scale.to(at::kFloat).contiguous();
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = N;
  at::Tensor y = at::empty(sizes, x.options());
  gemma_opt::dispatch_float(x.scalar_type(), "int8_gemv: x", [&](auto zero) {
    gemv_rows<decltype(zero)>(rows, x.numel() / K, w, s, y);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(gemma_opt, m) {
  m.def("int8_gemv(Tensor x, Tensor weight, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gemma_opt, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
}
