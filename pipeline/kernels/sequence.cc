// The fused LSTM's whole recurrence, forward and backward, as two CPU
// TensorFlow ops: the time loop, the recurrent matmul h_{t-1} W_h (forward)
// and dz_{t+1} W_h^T (backward), and the gate math, in one kernel call per
// layer per train step instead of ~15 TensorFlow ops per time step per chain.
// pipeline/kernels/cell.py compiles it with cell.cc and sequence_ops.cc (the ops' interfaces).
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

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/platform/blocking_counter.h"
#include "tensorflow/core/platform/threadpool.h"
#include "amx.h"
#include "packets.h"
#include "panels.h"
#include "tiles.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using namespace charlstm;  // NOLINT: the packet helpers

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
absl::Status CheckSequence(const TensorShape& seq4, const Tensor& w_h, int64_t chains) {
  if (seq4.dims() != 3 || w_h.dims() != 2 || w_h.dim_size(1) != 4 * w_h.dim_size(0) ||
      seq4.dim_size(2) != w_h.dim_size(1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "charlstm sequence: the (B, T, 4H) input ", seq4.DebugString(),
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

// The optional `ids` input (a list of 0 or 1 tensors): *ids is null without it.
absl::Status OptionalIds(OpKernelContext* ctx, const Tensor** ids) {
  tensorflow::OpInputList list;
  TF_RETURN_IF_ERROR(ctx->input_list("ids", &list));
  if (list.size() > 1) {
    return absl::InvalidArgumentError("charlstm sequence: at most one ids input");
  }
  *ids = list.size() ? &list[0] : nullptr;
  return absl::OkStatus();
}

// The first layer's ids index a (V, 4H) table or sum: each must lie in [0, V).
absl::Status CheckIds(const Tensor& ids, int64_t v) {
  const int32_t* id = ids.flat<int32_t>().data();
  for (int64_t i = 0; i < ids.NumElements(); ++i) {
    if (id[i] < 0 || id[i] >= v) {
      return absl::InvalidArgumentError(absl::StrCat(
          "charlstm sequence: id ", id[i], " is outside the vocabulary [0, ", v, ")"));
    }
  }
  return absl::OkStatus();
}

// M = float or bfloat16: the type of W_h, h0 and hs (the forward's matmul
// operands); everything else is float32.
template <typename M>
class SequenceForward : public OpKernel {
 public:
  explicit SequenceForward(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("chains", &chains_));
  }

  // (xz (B, T, 4H), W_h (H, 4H), h0, c0 (B, H), [x (B, T, D)], [ids (B, T)])
  //   -> (hs, cs (B, T, H), zs (B, T, 4H), [left (B, T, H + D + 1)]).
  // left, if x is given, is [h_{t-1}, x_t, 1] per row: the left operand of
  // the weight gradients' matmul ([h, x, 1]^T dz, pipeline.fused_lstm).
  // Written here from the carried h, it replaced a slice and two concats over
  // (B, T, H) that cost about 6 ms of a train step at H=512.
  // With ids (the first layer's one-hot inputs as indices), xz is instead a
  // table (V, 4H), W_x + b, and row (b, t) of xz is its row ids[b, t]: read
  // from a table that stays in cache, where a (B, T, 4H) gather was written
  // out and read back (2.9 ms of the H=512 step, 52 MB each way).
  void Compute(OpKernelContext* ctx) override {
    const Tensor& xz = ctx->input(0);
    const Tensor& w_h = ctx->input(1);
    const Tensor* id_input;
    OP_REQUIRES_OK(ctx, OptionalIds(ctx, &id_input));
    const int32_t* ids = nullptr;
    if (id_input) {
      const Tensor& id = *id_input;
      OP_REQUIRES(ctx, id.dims() == 2 && xz.dims() == 2 && w_h.dims() == 2 &&
                           xz.dim_size(1) == w_h.dim_size(1),
                  absl::InvalidArgumentError(absl::StrCat(
                      "charlstm sequence: with ids ", id.shape().DebugString(),
                      " (B, T), xz must be a (V, 4H) table matching W_h; got ",
                      xz.shape().DebugString(), " and ", w_h.shape().DebugString())));
      OP_REQUIRES_OK(ctx, CheckIds(id, xz.dim_size(0)));
      ids = id.flat<int32_t>().data();
    }
    const TensorShape seq_shape = ids ? TensorShape({id_input->dim_size(0),
                                                     id_input->dim_size(1), xz.dim_size(1)})
                                      : xz.shape();
    OP_REQUIRES_OK(ctx, CheckSequence<M>(seq_shape, w_h, chains_));
    const int64_t batch = seq_shape.dim_size(0), t_len = seq_shape.dim_size(1);
    const int64_t h = w_h.dim_size(0);
    OP_REQUIRES_OK(ctx, CheckState(ctx->input(2), 0, batch, h, "h0"));
    OP_REQUIRES_OK(ctx, CheckState(ctx->input(3), 0, batch, h, "c0"));
    tensorflow::OpInputList tails;
    OP_REQUIRES_OK(ctx, ctx->input_list("tail", &tails));
    tensorflow::OpOutputList lefts;
    OP_REQUIRES_OK(ctx, ctx->output_list("left", &lefts));
    OP_REQUIRES(ctx, tails.size() <= 1,
                absl::InvalidArgumentError("charlstm sequence: at most one tail"));
    int64_t e = 0;  // x's width D
    const M* tail = nullptr;
    M* left = nullptr;
    if (tails.size()) {
      OP_REQUIRES(ctx, tails[0].dims() == 3 && tails[0].dim_size(0) == batch &&
                           tails[0].dim_size(1) == t_len,
                  absl::InvalidArgumentError(absl::StrCat(
                      "charlstm sequence: tail has shape ", tails[0].shape().DebugString(),
                      "; it must be (B, T, D) with xz's B and T")));
      e = tails[0].dim_size(2);
      Tensor* out;
      OP_REQUIRES_OK(ctx, lefts.allocate(0, TensorShape({batch, t_len, h + e + 1}), &out));
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
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, seq_shape, &zs));
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
    const bool alternate = Alternate<M>(h);
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
        const ForwardStep<M> s{t_len, carry, ids ? xz_p : xz_p + now * 4 * h,
                               h_carry + in + first * carry, c_carry + in + first * carry,
                               zs_p + now * 4 * h, cs_p + now * h, hs_p + now * h,
                               h_carry + out + first * carry, c_carry + out + first * carry,
                               stage + first * stride, stride, alternate && (t & 1)};
        Stage(true, s.xz, s.z, t_len, s.stage, stride, rows, h, ids ? ids + now : nullptr);
        for (int64_t r = 0; left && r < rows; ++r) {
          M* row = left + (now + r * t_len) * (h + e + 1);
          std::copy_n(s.h_prev + r * carry, h, row);
          std::copy_n(tail + (now + r * t_len) * e, e, row + h);
          row[h + e] = M(1.0f);  // d_b's column
        }
        for (int64_t i = 0; i < n_panels; ++i) {
          const int64_t p = s.reverse ? n_panels - 1 - i : i;
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
        Stage(false, s.xz, s.z, t_len, s.stage, stride, rows, h, nullptr);
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
    OP_REQUIRES_OK(ctx, ctx->GetAttr("vocab", &vocab_));
  }

  // (zs (B, T, 4H), cs, d_out (B, T, H), c0, dh_last, dc_last (B, H), W_h, [ids (B, T)])
  //   -> (dzs (B, T, 4H), dh0, dc0 (B, H), [d_w_x (vocab, 4H)]).
  // ids, if given, are the first layer's one-hot inputs as indices, and
  // d_w_x = one_hot(ids)^T dz, summed here as each dz leaves the gate math:
  // the weight-gradient matmul then runs on [h_{t-1}, 1] alone, V columns
  // narrower (pipeline.fused_lstm).
  void Compute(OpKernelContext* ctx) override {
    const Tensor& zs = ctx->input(0);
    const Tensor& w_h = ctx->input(6);
    OP_REQUIRES_OK(ctx, CheckSequence<M>(zs.shape(), w_h, chains_));
    const int64_t batch = zs.dim_size(0), t_len = zs.dim_size(1), h = w_h.dim_size(0);
    const char* names[] = {"", "cs", "d_out", "c0", "dh_last", "dc_last"};
    for (int i = 1; i < 6; ++i) {
      OP_REQUIRES_OK(ctx, CheckState(ctx->input(i), i < 3 ? t_len : 0, batch, h, names[i]));
    }
    const Tensor* id_input;
    OP_REQUIRES_OK(ctx, OptionalIds(ctx, &id_input));
    tensorflow::OpOutputList d_w_xs;
    OP_REQUIRES_OK(ctx, ctx->output_list("d_w_x", &d_w_xs));
    const int32_t* ids = nullptr;
    float* d_w_x = nullptr;
    Tensor per_chain;  // each chain's own d_w_x sums, added in chain order at the end
    if (id_input) {
      OP_REQUIRES(ctx, id_input->shape() == TensorShape({batch, t_len}),
                  absl::InvalidArgumentError(absl::StrCat(
                      "charlstm sequence: ids has shape ", id_input->shape().DebugString(),
                      "; it must be (B, T) with zs's B and T")));
      OP_REQUIRES_OK(ctx, CheckIds(*id_input, vocab_));
      ids = id_input->flat<int32_t>().data();
      Tensor* out;
      OP_REQUIRES_OK(ctx, d_w_xs.allocate(0, TensorShape({vocab_, 4 * h}), &out));
      d_w_x = out->flat<float>().data();
      OP_REQUIRES_OK(ctx, ctx->allocate_temp(tensorflow::DT_FLOAT,
                                             TensorShape({chains_, vocab_, 4 * h}), &per_chain));
      std::fill_n(per_chain.flat<float>().data(), chains_ * vocab_ * 4 * h, 0.0f);
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
    const bool alternate = Alternate<M>(h);
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
                                dz_c + out + first * dz_carry, alternate && (t & 1),
                                ids ? ids + now : nullptr,
                                ids ? per_chain.flat<float>().data() + j * vocab_ * 4 * h
                                    : nullptr};
        for (int64_t i = 0; i < n_panels; ++i) {
          const int64_t p = s.reverse ? n_panels - 1 - i : i;
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
    if (d_w_x) {
      const float* sums = per_chain.flat<float>().data();
      std::copy_n(sums, vocab_ * 4 * h, d_w_x);
      for (int64_t j = 1; j < chains_; ++j) {
        const float* chain = sums + j * vocab_ * 4 * h;
        for (int64_t i = 0; i < vocab_ * 4 * h; ++i) d_w_x[i] += chain[i];
      }
    }
  }

 private:
  int64_t chains_, vocab_;
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
