// sequence.cc's matmul: W_h packed into panels once per call, and a
// register-blocked kernel that multiplies MR rows of a by one panel.
// float32 panels go through FMAs; bfloat16 panels through AVX512-BF16's
// vdpbf16ps (pairs of bfloat16 products summed into float32 lanes).

#ifndef CHARLSTM_KERNELS_PANELS_H_
#define CHARLSTM_KERNELS_PANELS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "packets.h"

#if defined(__AVX512BF16__) && defined(EIGEN_VECTORIZE_AVX512)
#include <immintrin.h>
#define CHARLSTM_BF16_DOT 1
#else
#define CHARLSTM_BF16_DOT 0
#endif

namespace charlstm {

using Bf16 = Eigen::bfloat16;

// MR rows x 4 packets of accumulators, the 4 packets of the panel's current
// k and one broadcast must fit the vector registers (32 on AVX-512: MR = 6;
// 16 on AVX/SSE/NEON: MR = 2).
constexpr int kMaxRows = (EIGEN_ARCH_DEFAULT_NUMBER_OF_REGISTERS - 5) / 4;
constexpr int64_t kPanel = 4 * kLanes;  // a panel's width, in values per k

// Where a panel keeps W's element (k, col), col in [0, kPanel). float32:
// k-major rows. bfloat16: k pairs interleaved, the operand order of vdpbf16ps
// (lane l of a packet sums pair elements 2l and 2l + 1). A panel spans
// K kPanel values either way (K even for bfloat16).
template <typename M>
constexpr int64_t At(int64_t k, int64_t col) {
  if constexpr (std::is_same_v<M, float>) {
    return k * kPanel + col;
  } else {
    return ((k >> 1) * kPanel + col) * 2 + (k & 1);
  }
}

// Forward panels: panel p holds units [p L, p L + L) of gates i, f, g, o for
// every k, col = g L + l holding w[k 4H + g H + p L + l], zero past H.
template <typename M>
void PackForward(const M* w, int64_t k_dim, int64_t h, M* out) {
  for (int64_t p = 0; p * kLanes < h; ++p, out += k_dim * kPanel)
    for (int64_t k = 0; k < k_dim; ++k)
      for (int g = 0; g < 4; ++g)
        for (int64_t l = 0; l < kLanes; ++l) {
          const int64_t u = p * kLanes + l;
          out[At<M>(k, g * kLanes + l)] = u < h ? w[k * 4 * h + g * h + u] : M(0.0f);
        }
}

// Backward panels of W_h^T (4H x H): panel p holds units [p 4L, p 4L + 4L)
// for every k in [0, 4H), col v holding w[(p 4L + v) 4H + k], zero past H.
// Blocks of 16 k: a block reads each of the panel's kPanel rows of w
// contiguously (w is read across its rows, which a k-major loop strided).
template <typename M>
void PackBackward(const M* w, int64_t h, M* out) {
  for (int64_t p = 0; p * kPanel < h; ++p, out += 4 * h * kPanel)
    for (int64_t k0 = 0; k0 < 4 * h; k0 += 16)
      for (int64_t v = 0; v < kPanel; ++v) {
        const int64_t u = p * kPanel + v;
        for (int64_t k = k0; k < std::min(k0 + 16, 4 * h); ++k) {
          out[At<M>(k, v)] = u < h ? w[u * 4 * h + k] : M(0.0f);
        }
      }
}

// acc[r][v] += sum over k of a[r lda + k] * W(k, v L + lane), k in order.
template <int MR>
EIGEN_ALWAYS_INLINE void Dot(const float* a, int64_t lda, const float* panel, int64_t k_dim,
                             Packet (&acc)[kMaxRows][4]) {
  using Eigen::internal::pmadd;
  using Eigen::internal::ploadu;
  using Eigen::internal::pset1;
  for (int64_t k = 0; k < k_dim; ++k) {
    const float* b = panel + k * kPanel;
    const Packet b0 = ploadu<Packet>(b), b1 = ploadu<Packet>(b + kLanes),
                 b2 = ploadu<Packet>(b + 2 * kLanes), b3 = ploadu<Packet>(b + 3 * kLanes);
    for (int r = 0; r < MR; ++r) {
      const Packet x = pset1<Packet>(a[r * lda + k]);
      acc[r][0] = pmadd(x, b0, acc[r][0]);
      acc[r][1] = pmadd(x, b1, acc[r][1]);
      acc[r][2] = pmadd(x, b2, acc[r][2]);
      acc[r][3] = pmadd(x, b3, acc[r][3]);
    }
  }
}

#if CHARLSTM_BF16_DOT
// The same on bfloat16 a and panels (k_dim even): one vdpbf16ps per k pair
// and packet, float32 accumulators, each lane's sum in one fixed order.
template <int MR>
EIGEN_ALWAYS_INLINE void Dot(const Bf16* a, int64_t lda, const Bf16* panel, int64_t k_dim,
                             Packet (&acc)[kMaxRows][4]) {
  for (int64_t k = 0; k < k_dim; k += 2) {
    const Bf16* b = panel + k * kPanel;  // pair k / 2: 2 kPanel values
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b),
                   b1 = (__m512bh)_mm512_loadu_si512(b + 2 * kLanes),
                   b2 = (__m512bh)_mm512_loadu_si512(b + 4 * kLanes),
                   b3 = (__m512bh)_mm512_loadu_si512(b + 6 * kLanes);
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + k, sizeof(pair));
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], x, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], x, b3);
    }
  }
}
#endif

}  // namespace charlstm

#endif  // CHARLSTM_KERNELS_PANELS_H_
