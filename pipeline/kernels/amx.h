// sequence.cc's bfloat16 recurrent products on AMX tiles, where the build
// has AMX-BF16 (-march=native on such a CPU): C (16 rows x 64 float32 sums)
// += A (16 rows of bfloat16 h or dz) x a panel (panels.h's bfloat16 layout,
// whose k pairs are already the tiles' VNNI order). A probe of this loop on
// one core here ran 410-428 GFLOP/s against 74-103 for the vdpbf16ps kernel
// (H=256 and 512, 32 rows), the sums within 6e-7 of each other.

#ifndef CHARLSTM_KERNELS_AMX_H_
#define CHARLSTM_KERNELS_AMX_H_

#include <cstdint>

#include "panels.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && CHARLSTM_BF16_DOT
#include <sys/syscall.h>
#include <unistd.h>
#define CHARLSTM_AMX 1
#else
#define CHARLSTM_AMX 0
#endif

namespace charlstm {

#if CHARLSTM_AMX

// Linux gives a process AMX's 8 KiB of tile state only on request; oneDNN
// asks too, but this op may run first. Once per process.
inline bool AmxReady() {
  static const bool ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                    18 /* XFEATURE_XTILEDATA */) == 0;
  return ready;
}

// Tiles 0-3: C, 16 x 16 float32 each; 4: A, 16 rows x 32 bfloat16; 5: B, 16
// k pairs x 16 columns. Configured per thread (tile state is per thread) for
// the life of this object.
class AmxTiles {
 public:
  AmxTiles() {
    struct alignas(64) {
      uint8_t palette = 1, start_row = 0, reserved[14] = {};
      uint16_t colsb[16] = {64, 64, 64, 64, 64, 64};
      uint8_t rows[16] = {16, 16, 16, 16, 16, 16};
    } config;
    _tile_loadconfig(&config);
  }
  ~AmxTiles() { _tile_release(); }
};

// c[r ldc + j] += sum over k of a[r lda + k] W(k, j), r < 16, j < 64 = kPanel,
// k < k_dim (a multiple of 32); lda and ldc in elements.
inline void AmxProducts(const Bf16* a, int64_t lda, const Bf16* panel, int64_t k_dim, float* c,
                        int64_t ldc) {
  static_assert(kPanel == 64, "AMX tiles take 64-column panels (AVX-512)");
  _tile_loadd(0, c, ldc * 4);
  _tile_loadd(1, c + 16, ldc * 4);
  _tile_loadd(2, c + 32, ldc * 4);
  _tile_loadd(3, c + 48, ldc * 4);
  for (int64_t k = 0; k < k_dim; k += 32) {
    _tile_loadd(4, a + k, lda * 2);
    const Bf16* b = panel + k * kPanel;  // k pair k / 2; a pair row is kPanel pairs, 256 bytes
    _tile_loadd(5, b, kPanel * 4);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(5, b + 32, kPanel * 4);
    _tile_dpbf16ps(1, 4, 5);
    _tile_loadd(5, b + 64, kPanel * 4);
    _tile_dpbf16ps(2, 4, 5);
    _tile_loadd(5, b + 96, kPanel * 4);
    _tile_dpbf16ps(3, 4, 5);
  }
  _tile_stored(0, c, ldc * 4);
  _tile_stored(1, c + 16, ldc * 4);
  _tile_stored(2, c + 32, ldc * 4);
  _tile_stored(3, c + 48, ldc * 4);
}

#else

inline bool AmxReady() { return false; }

#endif

}  // namespace charlstm

#endif  // CHARLSTM_KERNELS_AMX_H_
