// The recurrence op's per-step pieces (sequence.cc): a step's arrays, the
// staged z, and the register tiles that multiply a panel of W_h (forward)
// or W_h^T (backward) and finish their units' gate math.

#ifndef CHARLSTM_KERNELS_TILES_H_
#define CHARLSTM_KERNELS_TILES_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "packets.h"
#include "panels.h"

namespace charlstm {

// A step's panels run in ascending order on even steps and descending on odd
// ones when W_h is larger than kAlternateBytes: a step then starts on the
// panels the previous one finished with, still in L2 (2 MiB per core here),
// where one fixed order streamed all of W_h from L3 at every step. Panels
// hold disjoint units, so every sum and its order, and the bits, are
// unchanged. Two builds in one process, alternating, H=512 float32 (4 MiB):
// forward 1.01-1.05x, backward 1.05-1.08x over 4 runs. At H=256 (1 MiB,
// already in L2) it read 0.92-1.01x, so smaller matrices keep one order.
constexpr int64_t kAlternateBytes = int64_t{1} << 20;
template <typename M>
inline bool Alternate(int64_t h) { return 4 * h * h * int64_t{sizeof(M)} > kAlternateBytes; }

// One chain's arrays at one time step; pointers are to the chain's first row.
// The (B, T, X) arrays are batch-major, as Keras's layers take and give them
// (no transposes around the op): consecutive rows of one time step lie
// `seq` * X floats apart; the (B, X) states X apart, and h_prev / c_prev
// `prev` * X (prev = 1 at t = 0, where they are h0 / c0, else T).
// M is the matmul operands' type: h and W_h forward, dz and W_h backward.
//
// The forward carries h and c from step to step in compact (R, carry)
// buffers beside the outputs, their rows padded by one packet: in the
// (B, T, H) outputs the rows of a step lie a multiple of 4 KiB apart, so
// the 6 rows a tile multiplies map to the same L1 sets as each other and
// as the panel's slice, and evicted each other. With this and the staged z
// below, the forward went from 137 to 170 GF/s at H=256 and from 172 to
// 187 at H=512 (two chains on 2 cores; the same bits).
template <typename M>
struct ForwardStep {
  int64_t seq, carry;   // row strides: seq * X in the (B, T, X) arrays, carry in the states
  const float* xz;      // (R, 4H) this step's input projection + bias, or the table (Stage)
  const M* h_prev;      // (R, carry)
  const float* c_prev;  // (R, carry)
  float* z;             // (R, 4H) out: pre-activations, for the backward
  float* c;             // (R, H) out
  M* h;                 // (R, H) out
  M* h_next;            // (R, carry) out: h and c again, carried to the next step
  float* c_next;        // (R, carry)
  float* stage;         // (R, stride): z by panel, see Stage
  int64_t stride;
  bool reverse;         // this step's panels in descending order, see Alternate
};

// A chain's z for one step, staged in a compact buffer: row r, panel p's
// gate g, lane l at r stride + p 4L + g L + l, the stride padded by one
// packet. A tile's running sums then load and store 4 adjacent packets per
// row, where in the (B, T, 4H) arrays its 24 lines lay a multiple of 4 KiB
// apart (the same L1 sets, and loads 4K-aliased to earlier stores). xz is
// copied in before the step's tiles and z out after them, row by row; z's
// stores stream past the caches (StoreStream): they are read only by the
// backward pass, and a normal store first fetched each line from memory.
inline int64_t StageStride(int64_t h) { return (h + kLanes - 1) / kLanes * kPanel + kLanes; }

// in: the step's xz rows into the stage; else the stage out to its z rows.
// ids (in only, stride seq): row r's xz is then row ids[r seq] of the table xz.
inline void Stage(bool in, const float* xz, float* z, int64_t seq, float* stage, int64_t stride,
                  int64_t rows, int64_t h, const int32_t* ids) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t u = 0, at = r * stride; u < h; u += kLanes, at += kPanel) {
      const int64_t n = std::min(kLanes, h - u);
      for (int g = 0; g < 4; ++g) {
        const int64_t row_at = r * seq * 4 * h + g * h + u;
        if (in) {
          const float* from = ids ? xz + int64_t{ids[r * seq]} * 4 * h + g * h + u : xz + row_at;
          Store(Load(from, n), stage + at + g * kLanes, kLanes);
        } else {
          StoreStream(Load(stage + at + g * kLanes, kLanes), z + row_at, n);
        }
      }
    }
}

// The k dimension runs in blocks whose slice of a panel fits the 48 KiB L1
// beside the rows it multiplies: every row tile of a panel then reads the
// slice from L1, where one pass over all k streamed the whole panel (128 KiB
// forward, 512 KiB backward at H=512) from L2 for each tile. Between blocks
// a tile's partial sums wait in memory, stored and reloaded exactly, so each
// element is still one chain of FMAs in k order: the same bits as one block.
// Slices of `bytes`: the forward takes 16 KiB (64 k of a float32 panel on
// AVX-512); the backward, whose k runs 4H, 32 KiB, which halves its partial
// sums' round trips: 1.08x its time at H=256 and 512 against 16 KiB, in one
// process (64 KiB: the same as 32; 24 KiB: 0.95x at H=256).
template <typename M>
constexpr int64_t Block(int64_t bytes) {
  return std::max<int64_t>(2, bytes / (kPanel * sizeof(M)) / 2 * 2);
}
template <typename M>
constexpr int64_t kBlock = Block<M>(16384);
template <typename M>
constexpr int64_t kBackwardBlock = Block<M>(32768);

// Rows [r0, r0 + MR) of units [p L, p L + n), products over k in [k0, k1):
// z's partial sums; at k1 = H, z, then c and h, from registers.
template <int MR, typename M>
void ForwardTile(const ForwardStep<M>& s, const M* panels, int64_t h, int64_t r0, int64_t p,
                 int64_t k0, int64_t k1) {
  const int64_t u = p * kLanes, n = std::min(kLanes, h - u);
  // The same rows' next units (or, after the last panel, the next step's
  // first): their c and h are written one row sweep from now, into (B, T, H)
  // outputs far larger than the caches. Without this and the backward's
  // prefetch, forward + backward ran 0.88x at H=256 (three alternating runs).
  const bool last = s.reverse ? p == 0 : u + kLanes >= h;
  const int64_t next = last ? h + u : s.reverse ? u - kLanes : u + kLanes;
  for (int r = 0; r < MR && k0 == 0; ++r) {
    const int64_t row = r0 + r;
    Prefetch(s.c + row * s.seq * h + next, true);
    Prefetch(s.h + row * s.seq * h + next, true);
  }
  Packet acc[kMaxRows][4];
  float* const sums = s.stage + r0 * s.stride + p * kPanel;  // xz, then the running sums
  for (int r = 0; r < MR; ++r)
    for (int g = 0; g < 4; ++g) acc[r][g] = Load(sums + r * s.stride + g * kLanes, kLanes);
  Dot<MR>(s.h_prev + r0 * s.carry + k0, s.carry, panels + p * h * kPanel + k0 * kPanel,
          k1 - k0, acc);
  for (int r = 0; r < MR; ++r)  // partial sums, or at k1 = H the finished z
    for (int g = 0; g < 4; ++g) Store(acc[r][g], sums + r * s.stride + g * kLanes, kLanes);
  if (k1 < h) return;
  for (int r = 0; r < MR; ++r) {
    const int64_t row = r0 + r, at = row * s.seq * h + u;
    const Packet c = Add(Mul(Sigmoid(acc[r][1]), Load(s.c_prev + row * s.carry + u, n)),
                         Mul(Sigmoid(acc[r][0]), Tanh(acc[r][2])));
    const Packet h_t = Mul(Sigmoid(acc[r][3]), Tanh(c));
    Store(c, s.c + at, n);
    Store(c, s.c_next + row * s.carry + u, n);
    Store(h_t, s.h + at, n);
    Store(h_t, s.h_next + row * s.carry + u, n);
  }
}

// The backward carries dz from step to step (the next step's products
// broadcast it) and dL/dc in compact padded rows, as the forward carries h
// and c: (R, carry) states, (R, dz_carry) for dz.
template <typename M>
struct BackwardStep {  // seq, prev as in ForwardStep; dh_last is a (B, H) state
  int64_t seq, prev, carry, dz_carry;
  const float* z;       // (R, 4H) this step's pre-activations
  const float* c;       // (R, H) this step's cell state
  const float* c_prev;  // (R, H)
  const float* d_out;   // (R, H) dL/dh_t from the outputs
  const M* dz_next;     // (R, dz_carry) dL/dz_{t+1}, or null at the last step
  const float* dh_last; // (R, H) dL/dh_T from outside, used at the last step only
  float* dc;            // (R, carry) in: dL/dc_t via c_{t+1}; out: dL/dc_{t-1}
  M* dz;                // (R, 4H) out
  M* dz_out;            // (R, dz_carry) out: dz again, for the next step
  bool reverse;         // this step's panels in descending order, see Alternate
  const int32_t* ids;   // (R) at stride seq: the rows' one-hot inputs, or null
  float* d_w_x;         // (V, 4H): with ids, the chain's sums of dz by input id
};

// Stores a float32 output that is not read again soon with StoreStream.
template <typename M>
void StoreOutput(const Packet& v, M* p, int64_t n) {
  if constexpr (std::is_same_v<M, float>) {
    StoreStream(v, p, n);
  } else {
    Store(v, p, n);
  }
}

// Rows [r0, r0 + MR) of units [p 4L, p 4L + 4L), products over k in [k0, k1)
// (of 4H): dh = d_out + dz_{t+1} W_h^T, its partial sums kept in `partial`
// (R, carry) between blocks; at k1 = 4H, cell.cc's backward gate math on each
// packet of units.
template <int MR, typename M>
void BackwardTile(const BackwardStep<M>& s, const M* panels, int64_t h, int64_t r0, int64_t p,
                  int64_t k0, int64_t k1, float* partial) {
  // As in ForwardTile: the same rows' next units, or after the last panel
  // the previous step's first, are read (z, c, c_prev, d_out) and written
  // (dz) one row sweep from now; prefetch them while this tile multiplies.
  const bool last = s.reverse ? p == 0 : (p + 1) * kPanel >= h;
  const int64_t back = last ? 0 : s.reverse ? -kPanel : kPanel;  // units to the next tile's first
  for (int r = 0; r < MR && k0 == 0; ++r) {
    const int64_t row = r0 + r;
    const int64_t z_at = row * s.seq * 4 * h + p * kPanel + back - (last ? 4 * h : 0);
    const int64_t at = row * s.seq * h + p * kPanel + back - (last ? h : 0);
    for (int v = 0; v < 4; ++v) {
      for (int g = 0; g < 4; ++g) Prefetch(s.z + z_at + g * h + v * kLanes, false);
      Prefetch(s.c + at + v * kLanes, false);
      Prefetch(s.d_out + at + v * kLanes, false);
      Prefetch(s.c_prev + row * s.prev * h + p * kPanel + back - (last ? h : 0) + v * kLanes,
               false);
    }
  }
  Packet acc[kMaxRows][4];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) {
      const int64_t u = p * kPanel + v * kLanes, n = std::clamp<int64_t>(h - u, 0, kLanes);
      const int64_t row = r0 + r;
      if (!n) {
        acc[r][v] = Eigen::internal::pset1<Packet>(0.0f);
      } else if (k0) {
        acc[r][v] = Load(partial + row * s.carry + u, n);
      } else {
        acc[r][v] = Load(s.d_out + row * s.seq * h + u, n);
        if (!s.dz_next) acc[r][v] = Add(acc[r][v], Load(s.dh_last + row * h + u, n));
      }
    }
  if (s.dz_next) {
    Dot<MR>(s.dz_next + r0 * s.dz_carry + k0, s.dz_carry,
            panels + p * 4 * h * kPanel + k0 * kPanel, k1 - k0, acc);
  }
  if (k1 < 4 * h) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < 4; ++v) {
        const int64_t u = p * kPanel + v * kLanes, n = std::clamp<int64_t>(h - u, 0, kLanes);
        if (n) Store(acc[r][v], partial + (r0 + r) * s.carry + u, n);
      }
    return;
  }
  for (int r = 0; r < MR; ++r) {
    const int64_t row = r0 + r;
    const float* z = s.z + row * s.seq * 4 * h;
    M* dz = s.dz + row * s.seq * 4 * h;
    M* dz_out = s.dz_out + row * s.dz_carry;
    for (int v = 0; v < 4; ++v) {
      const int64_t j = p * kPanel + v * kLanes, n = std::min(kLanes, h - j);
      if (n <= 0) break;
      const int64_t at = row * s.seq * h + j, state = row * s.carry + j;
      const Packet& dh = acc[r][v];
      const Packet i = Sigmoid(Load(z + j, n));
      const Packet f = Sigmoid(Load(z + h + j, n));
      const Packet g = Tanh(Load(z + 2 * h + j, n));
      const Packet o = Sigmoid(Load(z + 3 * h + j, n));
      const Packet tanh_c = Tanh(Load(s.c + at, n));
      const Packet dc = Add(Load(s.dc + state, n), Mul(Mul(dh, o), OneMinus(Mul(tanh_c, tanh_c))));
      const Packet c_prev = Load(s.c_prev + row * s.prev * h + j, n);
      const Packet dz_g[4] = {Mul(Mul(Mul(dc, g), i), OneMinus(i)),
                              Mul(Mul(Mul(dc, c_prev), f), OneMinus(f)),
                              Mul(Mul(dc, i), OneMinus(Mul(g, g))),
                              Mul(Mul(Mul(dh, tanh_c), o), OneMinus(o))};
      for (int q = 0; q < 4; ++q) {
        StoreOutput(dz_g[q], dz + q * h + j, n);
        Store(dz_g[q], dz_out + q * h + j, n);
      }
      if (s.ids) {  // d_w_x's row for this input: one-hot x_t^T dz_t, in float32
        float* sum = s.d_w_x + s.ids[row * s.seq] * 4 * h;
        for (int q = 0; q < 4; ++q) {
          Store(Add(Load(sum + q * h + j, n), dz_g[q]), sum + q * h + j, n);
        }
      }
      Store(Mul(dc, f), s.dc + state, n);
    }
  }
}

// Calls tile<MR>(r0) over rows [0, rows): MR = kMaxRows, then smaller tiles.
template <template <int> class Tile, typename... Args>
void OverRows(int64_t rows, Args&&... args) {
  int64_t r0 = 0;
  for (; r0 + kMaxRows <= rows; r0 += kMaxRows) Tile<kMaxRows>::Run(r0, args...);
  const int64_t left = rows - r0;
  if constexpr (kMaxRows >= 6) {
    if (left == 5) return Tile<5>::Run(r0, args...);
    if (left == 4) return Tile<4>::Run(r0, args...);
    if (left == 3) return Tile<3>::Run(r0, args...);
  }
  if constexpr (kMaxRows >= 2) {
    if (left == 2) return Tile<2>::Run(r0, args...);
  }
  if (left == 1) Tile<1>::Run(r0, args...);
}

// Rows [r0, r0 + MR) of a (R, 4H) times W_h^T's units [p 4L, p 4L + 4L), into
// out (R, H): the backward's dL/dh0 = dz_0 W_h^T, with no gate math.
template <int MR, typename M>
void ProductsTile(const M* a, int64_t lda, const M* panels, int64_t h, int64_t r0, int64_t p,
                  float* out) {
  Packet acc[kMaxRows][4];
  for (int r = 0; r < MR; ++r)
    for (auto& x : acc[r]) x = Eigen::internal::pset1<Packet>(0.0f);
  Dot<MR>(a + r0 * lda, lda, panels + p * 4 * h * kPanel, 4 * h, acc);
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < 4; ++v) {
      const int64_t u = p * kPanel + v * kLanes, n = std::min(kLanes, h - u);
      if (n > 0) Store(acc[r][v], out + (r0 + r) * h + u, n);
    }
}

template <typename M>
struct Tiles {
  template <int MR>
  struct Forward {
    static void Run(int64_t r0, const ForwardStep<M>& s, const M* panels, int64_t h, int64_t p,
                    int64_t k0, int64_t k1) {
      ForwardTile<MR>(s, panels, h, r0, p, k0, k1);
    }
  };
  template <int MR>
  struct Backward {
    static void Run(int64_t r0, const BackwardStep<M>& s, const M* panels, int64_t h, int64_t p,
                    int64_t k0, int64_t k1, float* partial) {
      BackwardTile<MR>(s, panels, h, r0, p, k0, k1, partial);
    }
  };
  template <int MR>
  struct Products {
    static void Run(int64_t r0, const M* a, int64_t lda, const M* panels, int64_t h, int64_t p,
                    float* out) {
      ProductsTile<MR>(a, lda, panels, h, r0, p, out);
    }
  };
};

}  // namespace charlstm

#endif  // CHARLSTM_KERNELS_TILES_H_
