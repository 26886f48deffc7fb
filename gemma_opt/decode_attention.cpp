// gemma_opt::decode_attention: one query token's attention over a KV cache, with AVX-512 or
// AVX2 (simd.h).
// Built with int8_gemv.cpp (see int8_gemv.py); used by compilation.py for a decoded token.
//
// Flash-decoding: the positions are cut into chunks of CHUNK, and each (batch, KV head, chunk)
// is one work item, so that two threads share even a single KV head (the 270M has one). An
// item computes its query heads' scores, their softmax numerators against the chunk's own
// maximum, and the numerators' weighted sum of V rows, all in fp32; the chunks are then
// combined, each rescaled by exp(its maximum - the overall one). K and V are read once.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <memory>
#include <type_traits>
#include <vector>
#include "simd.h"

namespace {

using namespace gemma_opt;

constexpr int64_t CHUNK = 64;  // positions per work item: a 256-position bucket is 4 items a KV head
constexpr int64_t HEADS = 4;   // query heads handled together: each K and V row is loaded once for them
// K rows prefetched this far ahead of the one being scored, and each V row as its K row is
// scored: with the caches cold, as in a decode step, 1.5x faster on the 4B's 1024 positions.
constexpr int64_t AHEAD = 8;

// Calls f with std::integral_constant<int, nh>, nh = 1..HEADS: loops over a compile-time count
// of heads keep their accumulators in registers.
template <typename F>
void with_heads(int64_t nh, F f) {
  switch (nh) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, HEADS>{});
  }
}

inline void prefetch(const void* row, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(static_cast<const char*>(row) + b, _MM_HINT_T0);
}

// s[j][i] = q_j · k_i + mask_i for NH query heads (fp32, scaled) and the chunk's n K rows;
// also prefetches the chunk's V rows for weighted_values.
template <int NH, typename scalar_t>
void scores(const scalar_t* k, int64_t k_stride, int64_t n, const float* q, int64_t D, const scalar_t* mask, float* s,
            const scalar_t* v, int64_t v_stride) {
  for (int64_t i = 0; i < n; ++i) {
    prefetch(k + (i + AHEAD) * k_stride, D * sizeof(scalar_t));
    prefetch(v + i * v_stride, D * sizeof(scalar_t));
    Vec16 acc[NH][2];
    for (int j = 0; j < NH; ++j) acc[j][0] = acc[j][1] = zero16();
    for (int64_t d = 0; d < D; d += 32) {
      const Vec16 k0 = load16(k + i * k_stride + d), k1 = load16(k + i * k_stride + d + 16);
      for (int j = 0; j < NH; ++j) {
        acc[j][0] = fmadd(k0, load16(q + j * D + d), acc[j][0]);
        acc[j][1] = fmadd(k1, load16(q + j * D + d + 16), acc[j][1]);
      }
    }
    for (int j = 0; j < NH; ++j)
      s[j * CHUNK + i] = reduce_add(acc[j][0] + acc[j][1]) + (mask ? static_cast<float>(mask[i]) : 0.f);
  }
}

// out[j] = sum_i p[j][i] v_i for NH heads; even and odd positions in separate accumulators,
// so that four FMA chains a head run at once.
template <int NH, typename scalar_t>
void weighted_values(const scalar_t* v, int64_t v_stride, int64_t n, const float* p, int64_t D, float* out, int64_t out_stride) {
  for (int64_t d = 0; d < D; d += 32) {
    Vec16 acc[NH][2][2];
    for (int j = 0; j < NH; ++j) acc[j][0][0] = acc[j][0][1] = acc[j][1][0] = acc[j][1][1] = zero16();
    for (int64_t i = 0; i < n; ++i) {
      const Vec16 v0 = load16(v + i * v_stride + d), v1 = load16(v + i * v_stride + d + 16);
      for (int j = 0; j < NH; ++j) {
        const Vec16 w = broadcast16(p[j * CHUNK + i]);
        acc[j][i & 1][0] = fmadd(w, v0, acc[j][i & 1][0]);
        acc[j][i & 1][1] = fmadd(w, v1, acc[j][i & 1][1]);
      }
    }
    for (int j = 0; j < NH; ++j) {
      store16(out + j * out_stride + d, acc[j][0][0] + acc[j][1][0]);
      store16(out + j * out_stride + d + 16, acc[j][0][1] + acc[j][1][1]);
    }
  }
}

template <typename scalar_t>
void attend(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, const scalar_t* mask,
            int64_t mask_rows, int64_t L, double scale, at::Tensor& out) {
  const int64_t B = query.size(0), H = query.size(1), G = key.size(1), D = key.size(3);
  const int64_t heads = H / G, chunks = (L + CHUNK - 1) / CHUNK, stride = D + 2;  // partial: max, sum, D values
  std::vector<float> q(B * H * D);  // the query in fp32, times the scale
  const scalar_t* qp = query.data_ptr<scalar_t>();
  for (int64_t i = 0; i < B * H * D; ++i) q[i] = static_cast<float>(qp[i]) * static_cast<float>(scale);
  const scalar_t *kp = key.data_ptr<scalar_t>(), *vp = value.data_ptr<scalar_t>();
  // Every value is written by its item before the combine reads it: not zero-filled first.
  const std::unique_ptr<float[]> partial(new float[B * G * chunks * heads * stride]);

  at::parallel_for(0, B * G * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(heads * CHUNK);  // scores, then softmax numerators
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / (G * chunks), g = item / chunks % G, l0 = item % chunks * CHUNK;
      const int64_t n = std::min(CHUNK, L - l0);
      const scalar_t* k = kp + b * key.stride(0) + g * key.stride(1) + l0 * key.stride(2);
      const scalar_t* v = vp + b * value.stride(0) + g * value.stride(1) + l0 * value.stride(2);
      const scalar_t* m = mask == nullptr ? nullptr : mask + (mask_rows == 1 ? 0 : b) * L + l0;
      const float* qg = q.data() + (b * H + g * heads) * D;
      float* p = partial.get() + item * heads * stride;
      for (int64_t h = 0; h < heads; h += HEADS)
        with_heads(heads - h, [&](auto nh) { scores<nh>(k, key.stride(2), n, qg + h * D, D, m, s.data() + h * CHUNK, v, value.stride(2)); });
      for (int64_t h = 0; h < heads; ++h) {
        float* sh = s.data() + h * CHUNK;
        const float top = *std::max_element(sh, sh + n);
        float sum = 0.f;
        for (int64_t i = 0; i < n; ++i) sum += (sh[i] = std::exp(sh[i] - top));
        p[h * stride] = top;
        p[h * stride + 1] = sum;
      }
      for (int64_t h = 0; h < heads; h += HEADS)
        with_heads(heads - h, [&](auto nh) {
          weighted_values<nh>(v, value.stride(2), n, s.data() + h * CHUNK, D, p + h * stride + 2, stride);
        });
    }
  });

  scalar_t* op = out.data_ptr<scalar_t>();
  std::vector<float> acc(D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const float* first = partial.get() + ((b * G + h / heads) * chunks * heads + h % heads) * stride;
      float top = -INFINITY, sum = 0.f;
      for (int64_t c = 0; c < chunks; ++c) top = std::max(top, first[c * heads * stride]);
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t c = 0; c < chunks; ++c) {
        const float* p = first + c * heads * stride;
        const float w = std::exp(p[0] - top);
        sum += w * p[1];
        for (int64_t d = 0; d < D; ++d) acc[d] += w * p[2 + d];
      }
      for (int64_t d = 0; d < D; ++d) op[(b * H + h) * D + d] = static_cast<scalar_t>(acc[d] / sum);
    }
}

// query [B, H, 1, D]; key and value [B, G, >= L, D] (a static cache's first L positions);
// mask additive, L positions a row, one row or one per batch, or none (L = the cache's length).
// Returns [B, 1, H, D], as transformers' attention functions do.
at::Tensor decode_attention(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& mask, double scale) {
  TORCH_CHECK(query.dim() == 4 && query.size(2) == 1, "decode_attention: query must be [batch, heads, 1, dim]");
  TORCH_CHECK(key.dim() == 4 && key.sizes() == value.sizes(), "decode_attention: key and value must be [batch, kv_heads, positions, dim], alike");
  const int64_t B = query.size(0), H = query.size(1), D = query.size(3), G = key.size(1);
  TORCH_CHECK(key.size(0) == B && key.size(3) == D && H % G == 0 && D % 32 == 0,
              "decode_attention: query ", query.sizes(), " does not fit key ", key.sizes(), " (dim a multiple of 32)");
  TORCH_CHECK(key.scalar_type() == query.scalar_type() && value.scalar_type() == query.scalar_type(),
              "decode_attention: query, key and value must have one dtype");
  TORCH_CHECK(key.stride(3) == 1 && value.stride(3) == 1, "decode_attention: key and value rows must be contiguous");
  const int64_t L = mask ? mask->size(-1) : key.size(2);
  TORCH_CHECK(L >= 1 && L <= key.size(2), "decode_attention: the mask covers ", L, " positions, the cache has ", key.size(2));
  at::Tensor rows;
  if (mask) {
    TORCH_CHECK(mask->scalar_type() == query.scalar_type(), "decode_attention: the mask must have the query's dtype");
    rows = mask->contiguous();  // its rows through its data pointer, as int8_gemv reads x
    TORCH_CHECK(rows.numel() == L || rows.numel() == B * L, "decode_attention: one mask row, or one per batch, expected");
  }
  const at::Tensor q = query.contiguous();
  at::Tensor out = at::empty({B, 1, H, D}, query.options());
  gemma_opt::dispatch_float(query.scalar_type(), "decode_attention: query", [&](auto zero) {
    using scalar_t = decltype(zero);
    attend<scalar_t>(q, key, value, mask ? rows.data_ptr<scalar_t>() : nullptr, mask ? rows.numel() / L : 1, L, scale, out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(gemma_opt, m) {
  m.def("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gemma_opt, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
