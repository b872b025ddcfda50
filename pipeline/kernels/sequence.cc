// The fused LSTM's whole recurrence, forward and backward, as two CPU
// TensorFlow ops: the time loop, the recurrent matmul h_{t-1} W_h (forward)
// and dz_{t+1} W_h^T (backward), and the gate math, in one kernel call per
// layer per train step instead of ~15 TensorFlow ops per time step per chain.
// pipeline/kernels/cell.py compiles it with cell.cc for the machine it runs on.
//
// Why: with the per-step ops, the matmuls ran near oneDNN's rate, but the
// rest of each step (the gate kernels' dispatch, TensorArray reads and
// writes, the while loop's control, the stacks afterwards) cost about as
// much as the matmuls at H=256 (BUILD.md, "The recurrence as one op").
//
// How: the batch rows split into `chains` blocks, one per thread of the op's
// intra-op pool; a chain's rows depend only on that chain's rows, so the
// threads never wait for each other. W_h is repacked once per call into
// panels that a register-blocked kernel (MR rows x 4 packets of
// accumulators) streams through; the forward panel holds the same units of
// all four gates, so a tile of z leaves the registers as finished h and c,
// and the backward panel holds W_h^T's rows for a block of units, so a tile
// of dh leaves as finished dz. Each output element is one fixed chain of
// multiply-adds in k order, so results do not depend on threads or buffer
// addresses: exact resume holds.
//
// The math is cell.cc's (the same packet functions, in the same order); the
// difference from the per-step path is only rounding: z = xz + h W_h is
// accumulated in one float32 chain instead of a matmul rounded to the
// operand dtype and then added.

#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>
#include <type_traits>

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/blocking_counter.h"
#include "tensorflow/core/platform/threadpool.h"
#include "amx.h"
#include "packets.h"
#include "panels.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using namespace charlstm;  // NOLINT: the packet helpers

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
  const float* xz;      // (R, 4H) this step's input projection + bias
  const M* h_prev;      // (R, carry)
  const float* c_prev;  // (R, carry)
  float* z;             // (R, 4H) out: pre-activations, for the backward
  float* c;             // (R, H) out
  M* h;                 // (R, H) out
  M* h_next;            // (R, carry) out: h and c again, carried to the next step
  float* c_next;        // (R, carry)
  float* stage;         // (R, stride): z by panel, see Stage
  int64_t stride;
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
inline void Stage(bool in, const float* xz, float* z, int64_t seq, float* stage, int64_t stride,
                  int64_t rows, int64_t h) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t u = 0, at = r * stride; u < h; u += kLanes, at += kPanel) {
      const int64_t n = std::min(kLanes, h - u);
      for (int g = 0; g < 4; ++g) {
        const int64_t row_at = r * seq * 4 * h + g * h + u;
        if (in) {
          Store(Load(xz + row_at, n), stage + at + g * kLanes, kLanes);
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
  const bool last = u + kLanes >= h;
  const int64_t next = last ? h : u + kLanes;
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
  const bool last = (p + 1) * kPanel >= h;
  const int64_t back = last ? -(p * kPanel) : kPanel;  // units to the next tile's first
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

// Runs chain(j) for j in [0, chains): chain 0 on this thread, the others on
// the op's intra-op pool.
void ForChains(OpKernelContext* ctx, int64_t chains, const std::function<void(int64_t)>& chain) {
  auto* pool = ctx->device()->tensorflow_cpu_worker_threads()->workers;
  tensorflow::BlockingCounter done(static_cast<int>(chains - 1));
  for (int64_t j = 1; j < chains; ++j) {
    pool->Schedule([&chain, &done, j] {
      chain(j);
      done.DecrementCount();
    });
  }
  chain(0);
  done.Wait();
}

// bfloat16 products on AMX tiles (amx.h) where the build and the kernel
// allow them, for 16-row blocks of whole 64-unit panels; other shapes, and
// float32, run the kernels above.
template <typename M>
bool UseAmx(int64_t rows, int64_t h) {
  return std::is_same_v<M, Bf16> && AmxReady() && rows % 16 == 0 && h % 64 == 0;
}

// Holds the calling thread's tile configuration while a chain runs.
class AmxScope {
 public:
  explicit AmxScope(bool on) {
#if CHARLSTM_AMX
    if (on) tiles_.emplace();
#endif
  }

 private:
#if CHARLSTM_AMX
  std::optional<AmxTiles> tiles_;
#endif
};

template <typename M>
void AmxRows(const M* a, int64_t lda, const M* panel, int64_t k_dim, float* c, int64_t ldc) {
#if CHARLSTM_AMX
  if constexpr (std::is_same_v<M, Bf16>) AmxProducts(a, lda, panel, k_dim, c, ldc);
#endif
}

// Shapes are checked once here, not per step: a wrong one would read past a buffer.
template <typename M>
absl::Status CheckSequence(const Tensor& seq4, const Tensor& w_h, int64_t chains) {
  if (seq4.dims() != 3 || w_h.dims() != 2 || w_h.dim_size(1) != 4 * w_h.dim_size(0) ||
      seq4.dim_size(2) != w_h.dim_size(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "charlstm sequence: the (B, T, 4H) input ", seq4.shape().DebugString(),
        " and W_h (H, 4H) ", w_h.shape().DebugString(), " do not match"));
  }
  if (chains < 1 || seq4.dim_size(0) % chains) {
    return absl::InvalidArgumentError("charlstm sequence: chains must divide the batch");
  }
  if (!std::is_same_v<M, float> && w_h.dim_size(0) % 2) {  // k pairs: H must be even
    return absl::InvalidArgumentError("charlstm sequence: bfloat16 needs an even H");
  }
  return absl::OkStatus();
}

absl::Status CheckState(const Tensor& t, int64_t t_len, int64_t batch, int64_t h,
                        const char* name) {
  const bool ok = t_len ? t.shape() == TensorShape({batch, t_len, h})
                        : t.shape() == TensorShape({batch, h});
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("charlstm sequence: ", name, " has shape ",
                                                 t.shape().DebugString()));
}

// M = float or bfloat16: the type of W_h, h0 and hs (the forward's matmul
// operands); everything else is float32.
template <typename M>
class SequenceForward : public OpKernel {
 public:
  explicit SequenceForward(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("chains", &chains_));
  }

  // (xz (B, T, 4H), W_h (H, 4H), h0, c0 (B, H), [tail (B, T, E)])
  //   -> (hs, cs (B, T, H), zs (B, T, 4H), [left (B, T, H + E)]).
  // left, if a tail is given, is [h_{t-1}, tail_t] per row: the left operand
  // of the weight gradients' matmul ([h, x, 1]^T dz, pipeline.fused_lstm).
  // Written here from the carried h, it replaced a slice and two concats over
  // (B, T, H) that cost about 6 ms of a train step at H=512.
  void Compute(OpKernelContext* ctx) override {
    const Tensor& xz = ctx->input(0);
    const Tensor& w_h = ctx->input(1);
    OP_REQUIRES_OK(ctx, CheckSequence<M>(xz, w_h, chains_));
    const int64_t batch = xz.dim_size(0), t_len = xz.dim_size(1), h = w_h.dim_size(0);
    OP_REQUIRES_OK(ctx, CheckState(ctx->input(2), 0, batch, h, "h0"));
    OP_REQUIRES_OK(ctx, CheckState(ctx->input(3), 0, batch, h, "c0"));
    tensorflow::OpInputList tails;
    OP_REQUIRES_OK(ctx, ctx->input_list("tail", &tails));
    tensorflow::OpOutputList lefts;
    OP_REQUIRES_OK(ctx, ctx->output_list("left", &lefts));
    OP_REQUIRES(ctx, tails.size() <= 1,
                absl::InvalidArgumentError("charlstm sequence: at most one tail"));
    const int64_t e = tails.size() ? tails[0].dim_size(2) : 0;
    const M* tail = nullptr;
    M* left = nullptr;
    if (tails.size()) {
      OP_REQUIRES(ctx, tails[0].dims() == 3 && tails[0].dim_size(0) == batch &&
                           tails[0].dim_size(1) == t_len,
                  absl::InvalidArgumentError(absl::StrCat(
                      "charlstm sequence: tail has shape ", tails[0].shape().DebugString())));
      Tensor* out;
      OP_REQUIRES_OK(ctx, lefts.allocate(0, TensorShape({batch, t_len, h + e}), &out));
      tail = tails[0].flat<M>().data();
      left = out->flat<M>().data();
    }
    Tensor *hs, *cs, *zs, panels, staged;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({batch, t_len, h}), &hs));
    const int64_t stride = StageStride(h);
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({batch, stride}),
                                           &staged));
    float* stage = staged.flat<float>().data();
    const int64_t carry = h + kLanes;
    Tensor h_carried, c_carried;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<M>::value,
                                           TensorShape({2, batch, carry}), &h_carried));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({2, batch, carry}),
                                           &c_carried));
    M* h_carry = h_carried.flat<M>().data();
    float* c_carry = c_carried.flat<float>().data();
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({batch, t_len, h}), &cs));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, xz.shape(), &zs));
    const int64_t n_panels = (h + kLanes - 1) / kLanes;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<M>::value,
                                           TensorShape({n_panels * h * kPanel}), &panels));
    M* packed = panels.flat<M>().data();
    PackForward(w_h.flat<M>().data(), h, h, packed);
    const float* xz_p = xz.flat<float>().data();
    const M* h0 = ctx->input(2).flat<M>().data();
    const float* c0 = ctx->input(3).flat<float>().data();
    M* hs_p = hs->flat<M>().data();
    float* cs_p = cs->flat<float>().data();
    float* zs_p = zs->flat<float>().data();
    const int64_t rows = batch / chains_;
    const bool amx = UseAmx<M>(rows, h);
    ForChains(ctx, chains_, [&](int64_t j) {
      const int64_t first = j * rows;
      const AmxScope tiles(amx);
      for (int64_t r = first; r < first + rows; ++r) {
        std::copy_n(h0 + r * h, h, h_carry + r * carry);
        std::copy_n(c0 + r * h, h, c_carry + r * carry);
      }
      for (int64_t t = 0; t < t_len; ++t) {
        const int64_t now = first * t_len + t;  // (row first, step t) of a (B, T, X) array
        const int64_t in = (t & 1) * batch * carry, out = batch * carry - in;
        const ForwardStep<M> s{t_len, carry, xz_p + now * 4 * h,
                               h_carry + in + first * carry, c_carry + in + first * carry,
                               zs_p + now * 4 * h, cs_p + now * h, hs_p + now * h,
                               h_carry + out + first * carry, c_carry + out + first * carry,
                               stage + first * stride, stride};
        Stage(true, s.xz, s.z, t_len, s.stage, stride, rows, h);
        for (int64_t r = 0; left && r < rows; ++r) {
          M* row = left + (now + r * t_len) * (h + e);
          std::copy_n(s.h_prev + r * carry, h, row);
          std::copy_n(tail + (now + r * t_len) * e, e, row + h);
        }
        for (int64_t p = 0; p < n_panels; ++p) {
          if (amx) {  // the products on tiles, then the tiles' gate math alone (k in [H, H))
            for (int64_t r0 = 0; r0 < rows; r0 += 16) {
              AmxRows(s.h_prev + r0 * carry, carry, packed + p * h * kPanel, h,
                      s.stage + r0 * stride + p * kPanel, stride);
            }
            OverRows<Tiles<M>::template Forward>(rows, s, packed, h, p, h, h);
            continue;
          }
          for (int64_t k0 = 0; k0 < h; k0 += kBlock<M>) {
            OverRows<Tiles<M>::template Forward>(rows, s, packed, h, p, k0,
                                                 std::min(h, k0 + kBlock<M>));
          }
        }
        Stage(false, s.xz, s.z, t_len, s.stage, stride, rows, h);
      }
      StreamFence();  // z's streamed stores, before another thread reads them
    });
  }

 private:
  int64_t chains_;
};

// M as above: the type of W_h and dzs (the backward's matmul operands).
template <typename M>
class SequenceBackward : public OpKernel {
 public:
  explicit SequenceBackward(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("chains", &chains_));
  }

  // (zs (B, T, 4H), cs, d_out (B, T, H), c0, dh_last, dc_last (B, H), W_h)
  //   -> (dzs (B, T, 4H), dh0, dc0 (B, H)).
  void Compute(OpKernelContext* ctx) override {
    const Tensor& zs = ctx->input(0);
    const Tensor& w_h = ctx->input(6);
    OP_REQUIRES_OK(ctx, CheckSequence<M>(zs, w_h, chains_));
    const int64_t batch = zs.dim_size(0), t_len = zs.dim_size(1), h = w_h.dim_size(0);
    const char* names[] = {"", "cs", "d_out", "c0", "dh_last", "dc_last"};
    for (int i = 1; i < 6; ++i) {
      OP_REQUIRES_OK(ctx, CheckState(ctx->input(i), i < 3 ? t_len : 0, batch, h, names[i]));
    }
    Tensor *dzs, *dh0, *dc0, panels, sums;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, zs.shape(), &dzs));
    const int64_t carry = h + kLanes, dz_carry = 4 * h + kLanes;
    Tensor dc_carried, dz_carried;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({batch, carry}),
                                           &sums));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT, TensorShape({batch, carry}),
                                           &dc_carried));
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<M>::value,
                                           TensorShape({2, batch, dz_carry}), &dz_carried));
    float* partial = sums.flat<float>().data();  // dh's partial sums between k blocks
    float* dc = dc_carried.flat<float>().data();  // dL/dc, carried back step by step in place
    M* dz_c = dz_carried.flat<M>().data();
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, TensorShape({batch, h}), &dh0));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, TensorShape({batch, h}), &dc0));
    const int64_t n_panels = (h + kPanel - 1) / kPanel;
    OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DataTypeToEnum<M>::value,
                                           TensorShape({n_panels * 4 * h * kPanel}), &panels));
    M* packed = panels.flat<M>().data();
    PackBackward(w_h.flat<M>().data(), h, packed);
    const float* zs_p = zs.flat<float>().data();
    const float* cs_p = ctx->input(1).flat<float>().data();
    const float* d_out = ctx->input(2).flat<float>().data();
    const float* c0 = ctx->input(3).flat<float>().data();
    const float* dh_last = ctx->input(4).flat<float>().data();
    M* dzs_p = dzs->flat<M>().data();
    float* dh0_p = dh0->flat<float>().data();
    const float* dc_last = ctx->input(5).flat<float>().data();
    float* dc0_p = dc0->flat<float>().data();
    const int64_t rows = batch / chains_;
    const bool amx = UseAmx<M>(rows, h);
    ForChains(ctx, chains_, [&](int64_t j) {
      const int64_t first = j * rows;
      const AmxScope tiles(amx);
      for (int64_t r = first; r < first + rows; ++r) std::copy_n(dc_last + r * h, h, dc + r * carry);
      for (int64_t t = t_len - 1; t >= 0; --t) {
        const int64_t now = first * t_len + t;
        const int64_t out = (t & 1) * batch * dz_carry, in = batch * dz_carry - out;
        const BackwardStep<M> s{t_len, t ? t_len : 1, carry, dz_carry, zs_p + now * 4 * h,
                                cs_p + now * h, t ? cs_p + (now - 1) * h : c0 + first * h,
                                d_out + now * h,
                                t + 1 < t_len ? dz_c + in + first * dz_carry : nullptr,
                                dh_last + first * h, dc + first * carry, dzs_p + now * 4 * h,
                                dz_c + out + first * dz_carry};
        for (int64_t p = 0; p < n_panels; ++p) {
          if (amx && s.dz_next) {  // dh = d_out + dz_{t+1} W_h^T on tiles, then the gate math
            float* sums = partial + first * carry;
            for (int64_t r = 0; r < rows; ++r) {
              std::copy_n(s.d_out + r * s.seq * h + p * kPanel, kPanel, sums + r * carry + p * kPanel);
            }
            for (int64_t r0 = 0; r0 < rows; r0 += 16) {
              AmxRows(s.dz_next + r0 * dz_carry, dz_carry, packed + p * 4 * h * kPanel, 4 * h,
                      sums + r0 * carry + p * kPanel, carry);
            }
            OverRows<Tiles<M>::template Backward>(rows, s, packed, h, p, 4 * h, 4 * h, sums);
            continue;
          }
          // The last step has no dz_{t+1}: one call, no products.
          const int64_t block = s.dz_next ? kBackwardBlock<M> : 4 * h;
          for (int64_t k0 = 0; k0 < 4 * h; k0 += block) {
            OverRows<Tiles<M>::template Backward>(rows, s, packed, h, p, k0,
                                                  std::min(4 * h, k0 + block),
                                                  partial + first * carry);
          }
        }
      }
      // dL/dh0 = dz_0 W_h^T: the products alone, no gate math.
      for (int64_t p = 0; p < n_panels; ++p) {
        OverRows<Tiles<M>::template Products>(rows, dz_c + first * dz_carry, dz_carry, packed, h,
                                              p, dh0_p + first * h);
      }
      for (int64_t r = first; r < first + rows; ++r) std::copy_n(dc + r * carry, h, dc0_p + r * h);
      StreamFence();  // dz's streamed stores, before another thread reads them
    });
  }

 private:
  int64_t chains_;
};

// Whether this build multiplies bfloat16 with vdpbf16ps (the bfloat16
// kernels above are registered only then): pipeline.fused_lstm asks before
// it picks them, so bfloat16 never runs a slow emulation silently.
class SequenceAmx : public OpKernel {  // whether bfloat16 products run on AMX tiles here
 public:
  explicit SequenceAmx(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<bool>()() = AmxReady();
  }
};

class SequenceBf16Native : public OpKernel {
 public:
  explicit SequenceBf16Native(OpKernelConstruction* ctx) : OpKernel(ctx) {}
  void Compute(OpKernelContext* ctx) override {
    Tensor* out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, TensorShape({}), &out));
    out->scalar<bool>()() = CHARLSTM_BF16_DOT;
  }
};

}  // namespace

REGISTER_OP("CharlstmSequenceForward")
    .Input("xz: float")
    .Input("w_h: T")
    .Input("h0: T")
    .Input("c0: float")
    .Input("tail: N * T")
    .Output("hs: T")
    .Output("cs: float")
    .Output("zs: float")
    .Output("left: N * T")
    .Attr("T: {float, bfloat16} = DT_FLOAT")
    .Attr("N: int >= 0 = 0")
    .Attr("chains: int >= 1")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* ctx) {
      using tensorflow::shape_inference::DimensionHandle;
      using tensorflow::shape_inference::ShapeHandle;
      ShapeHandle xz, w_h;
      TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(0), 3, &xz));
      TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(1), 2, &w_h));
      ShapeHandle state = ctx->MakeShape({ctx->Dim(xz, 0), ctx->Dim(xz, 1), ctx->Dim(w_h, 0)});
      ctx->set_output(0, state);
      ctx->set_output(1, state);
      ctx->set_output(2, xz);
      for (int i = 4; i < ctx->num_inputs(); ++i) {  // the tail, if any, and its left
        ShapeHandle tail;
        DimensionHandle width;
        TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(i), 3, &tail));
        TF_RETURN_IF_ERROR(ctx->Add(ctx->Dim(w_h, 0), ctx->Dim(tail, 2), &width));
        ctx->set_output(3 + i - 4,
                        ctx->MakeShape({ctx->Dim(xz, 0), ctx->Dim(xz, 1), width}));
      }
      return absl::OkStatus();
    });

REGISTER_OP("CharlstmSequenceBackward")
    .Input("zs: float")
    .Input("cs: float")
    .Input("d_out: float")
    .Input("c0: float")
    .Input("dh_last: float")
    .Input("dc_last: float")
    .Input("w_h: T")
    .Output("dzs: T")
    .Output("dh0: float")
    .Output("dc0: float")
    .Attr("T: {float, bfloat16} = DT_FLOAT")
    .Attr("chains: int >= 1")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* ctx) {
      using tensorflow::shape_inference::ShapeHandle;
      ShapeHandle zs, w_h;
      TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(0), 3, &zs));
      TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(6), 2, &w_h));
      ctx->set_output(0, zs);
      ShapeHandle state = ctx->Matrix(ctx->Dim(zs, 0), ctx->Dim(w_h, 0));
      ctx->set_output(1, state);
      ctx->set_output(2, state);
      return absl::OkStatus();
    });

REGISTER_OP("CharlstmSequenceAmx")
    .Output("amx: bool")
    .SetShapeFn(tensorflow::shape_inference::ScalarShape);

REGISTER_OP("CharlstmSequenceBf16Native")
    .Output("native: bool")
    .SetShapeFn(tensorflow::shape_inference::ScalarShape);

#define CHARLSTM_REGISTER(M)                                                                   \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("CharlstmSequenceForward").Device(tensorflow::DEVICE_CPU).TypeConstraint<M>("T"),  \
      SequenceForward<M>);                                                                     \
  REGISTER_KERNEL_BUILDER(                                                                     \
      Name("CharlstmSequenceBackward").Device(tensorflow::DEVICE_CPU).TypeConstraint<M>("T"), \
      SequenceBackward<M>)

CHARLSTM_REGISTER(float);
#if CHARLSTM_BF16_DOT
CHARLSTM_REGISTER(Eigen::bfloat16);
#endif
REGISTER_KERNEL_BUILDER(Name("CharlstmSequenceBf16Native").Device(tensorflow::DEVICE_CPU),
                        SequenceBf16Native);
REGISTER_KERNEL_BUILDER(Name("CharlstmSequenceAmx").Device(tensorflow::DEVICE_CPU), SequenceAmx);
