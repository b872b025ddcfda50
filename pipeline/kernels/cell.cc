// The fused LSTM's per-step gate math (pipeline/fused_lstm.py's _cell_forward
// and _cell_backward) as two CPU TensorFlow ops. pipeline/kernels/cell.py
// compiles this file for the machine it runs on, at first use.
//
// Why not XLA: each step of the train step's recurrence calls one small
// kernel per chain, 400 calls per train step at T=100. An XLA call runs a
// dozen fusions, each its own thunk, and cost 67 us (H=256) and 166 us
// (H=512) per forward + backward pair at 32 rows; these loops, one pass over
// each row with Eigen's vectorised tanh and logistic, 38 and 54 us
// (BUILD.md, "The gate math as a C++ op").
//
// The math and the dtypes are the XLA kernels': z and the cell state c are
// float32; h (the next matmul's operand) and dL/dz (the backward matmuls'
// operand) are in the matmul dtype T, float32 or bfloat16, rounded to nearest
// even as TensorFlow's Cast does. Keras's gate layout: z = [i | f | g | o].

#include <algorithm>
#include <initializer_list>
#include <type_traits>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "packets.h"

namespace {

using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using namespace charlstm;  // NOLINT: the packet helpers

// Inputs are checked once here, not per row: a wrong shape would otherwise
// read past a buffer. The Python wrapper always passes matching shapes.
void CheckShapes(OpKernelContext* ctx, const Tensor& z, const Tensor& c) {
  OP_REQUIRES(ctx, z.dims() == 2 && c.dims() == 2 && z.dim_size(0) == c.dim_size(0) &&
                       z.dim_size(1) == 4 * c.dim_size(1),
              absl::InvalidArgumentError("charlstm cell: z must be (B, 4H) and c (B, H)"));
}

template <typename T>
class CellForward : public OpKernel {
 public:
  explicit CellForward(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  // (xz, hw, c) -> (h, c', z): z = xz + hw, c' = f c + i g, h = o tanh(c').
  void Compute(OpKernelContext* ctx) override {
    const Tensor& xz_in = ctx->input(0);
    const Tensor& hw_in = ctx->input(1);
    const Tensor& c_in = ctx->input(2);
    CheckShapes(ctx, xz_in, c_in);
    if (!ctx->status().ok()) return;
    OP_REQUIRES(ctx, hw_in.shape() == xz_in.shape(),
                absl::InvalidArgumentError("charlstm cell: hw must have xz's shape"));
    const int64_t rows = c_in.dim_size(0), h = c_in.dim_size(1);
    Tensor *h_out, *c_out, *z_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, c_in.shape(), &h_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, c_in.shape(), &c_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, xz_in.shape(), &z_out));
    // Pointers taken once: flat() checks the dtype and shape on every call.
    const float* xz_all = xz_in.flat<float>().data();
    const T* hw_all = hw_in.flat<T>().data();
    const float* c_all = c_in.flat<float>().data();
    float* z_all = z_out->flat<float>().data();
    float* c_new = c_out->flat<float>().data();
    T* h_new = h_out->flat<T>().data();
    for (int64_t r = 0; r < rows; ++r) {
      const float* xz = xz_all + r * 4 * h;
      const T* hw = hw_all + r * 4 * h;
      float* z = z_all + r * 4 * h;
      for (int64_t j = 0; j < h; j += kLanes) {
        const int64_t n = std::min(kLanes, h - j);
        Packet zs[4];
        for (int gate = 0; gate < 4; ++gate) {
          const int64_t at = gate * h + j;
          zs[gate] = Add(Load(xz + at, n), Load(hw + at, n));
          Store(zs[gate], z + at, n);
        }
        const Packet c = Add(Mul(Sigmoid(zs[1]), Load(c_all + r * h + j, n)),
                             Mul(Sigmoid(zs[0]), Tanh(zs[2])));
        Store(c, c_new + r * h + j, n);
        Store(Mul(Sigmoid(zs[3]), Tanh(c)), h_new + r * h + j, n);
      }
    }
  }
};

template <typename T>
class CellBackward : public OpKernel {
 public:
  explicit CellBackward(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  // (z, c, c_prev, d_out, dh_w, dc_next) -> (dL/dz, dL/dc_prev); dL/dh is
  // d_out + dh_w, dL/dc_next the gradient reaching c through c_{t+1}.
  void Compute(OpKernelContext* ctx) override {
    const Tensor& z_in = ctx->input(0);
    const Tensor& c_in = ctx->input(1);
    const Tensor* same[] = {&ctx->input(2), &ctx->input(3), &ctx->input(4), &ctx->input(5)};
    CheckShapes(ctx, z_in, c_in);
    if (!ctx->status().ok()) return;
    for (const Tensor* t : same) {
      OP_REQUIRES(ctx, t->shape() == c_in.shape(),
                  absl::InvalidArgumentError("charlstm cell: c_prev, d_out, dh_w and dc_next "
                                             "must have c's shape"));
    }
    const int64_t rows = c_in.dim_size(0), h = c_in.dim_size(1);
    Tensor *dz_out, *dc_out;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, z_in.shape(), &dz_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, c_in.shape(), &dc_out));
    const float* z_all = z_in.flat<float>().data();
    const float* c_all = c_in.flat<float>().data();
    const float* c_prev_all = ctx->input(2).flat<float>().data();
    const float* d_out = ctx->input(3).flat<float>().data();
    const T* dh_w = ctx->input(4).flat<T>().data();
    const float* dc_next = ctx->input(5).flat<float>().data();
    T* dz_all = dz_out->flat<T>().data();
    float* dc_prev = dc_out->flat<float>().data();
    for (int64_t r = 0; r < rows; ++r) {
      const float* z = z_all + r * 4 * h;
      T* dz = dz_all + r * 4 * h;
      const int64_t row = r * h;
      for (int64_t j = 0; j < h; j += kLanes) {
        const int64_t n = std::min(kLanes, h - j);
        const Packet i = Sigmoid(Load(z + j, n));
        const Packet f = Sigmoid(Load(z + h + j, n));
        const Packet g = Tanh(Load(z + 2 * h + j, n));
        const Packet o = Sigmoid(Load(z + 3 * h + j, n));
        const Packet dh = Add(Load(d_out + row + j, n), Load(dh_w + row + j, n));
        const Packet tanh_c = Tanh(Load(c_all + row + j, n));
        const Packet dc = Add(Load(dc_next + row + j, n),
                              Mul(Mul(dh, o), OneMinus(Mul(tanh_c, tanh_c))));
        const Packet c_prev = Load(c_prev_all + row + j, n);
        Store(Mul(Mul(Mul(dc, g), i), OneMinus(i)), dz + j, n);
        Store(Mul(Mul(Mul(dc, c_prev), f), OneMinus(f)), dz + h + j, n);
        Store(Mul(Mul(dc, i), OneMinus(Mul(g, g))), dz + 2 * h + j, n);
        Store(Mul(Mul(Mul(dh, tanh_c), o), OneMinus(o)), dz + 3 * h + j, n);
        Store(Mul(dc, f), dc_prev + row + j, n);
      }
    }
  }
};

// Shapes merged over the inputs: inside tf.while_loop a TensorArray read may
// not know its batch size, and an output with less shape than the loop
// variable it replaces stops the loop's shape check.
absl::Status CellShapes(tensorflow::shape_inference::InferenceContext* ctx,
                        std::initializer_list<int> z_inputs, std::initializer_list<int> state_inputs,
                        int z_output, std::initializer_list<int> state_outputs) {
  using tensorflow::shape_inference::DimensionHandle;
  using tensorflow::shape_inference::ShapeHandle;
  ShapeHandle z = ctx->UnknownShapeOfRank(2), state = ctx->UnknownShapeOfRank(2), in;
  for (int i : z_inputs) {
    TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(i), 2, &in));
    TF_RETURN_IF_ERROR(ctx->Merge(z, in, &z));
  }
  for (int i : state_inputs) {
    TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(i), 2, &in));
    TF_RETURN_IF_ERROR(ctx->Merge(state, in, &state));
  }
  DimensionHandle batch;
  TF_RETURN_IF_ERROR(ctx->Merge(ctx->Dim(z, 0), ctx->Dim(state, 0), &batch));
  ctx->set_output(z_output, ctx->Matrix(batch, ctx->Dim(z, 1)));
  for (int i : state_outputs) ctx->set_output(i, ctx->Matrix(batch, ctx->Dim(state, 1)));
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("CharlstmCellForward")
    .Input("xz: float")
    .Input("hw: T")
    .Input("c: float")
    .Output("h: T")
    .Output("c_out: float")
    .Output("z: float")
    .Attr("T: {float, bfloat16}")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* ctx) {
      // xz and hw: (B, 4H); c: (B, H). Outputs h, c': (B, H); z: (B, 4H).
      return CellShapes(ctx, {0, 1}, {2}, 2, {0, 1});
    });

REGISTER_OP("CharlstmCellBackward")
    .Input("z: float")
    .Input("c: float")
    .Input("c_prev: float")
    .Input("d_out: float")
    .Input("dh_w: T")
    .Input("dc_next: float")
    .Output("dz: T")
    .Output("dc_prev: float")
    .Attr("T: {float, bfloat16}")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* ctx) {
      // z: (B, 4H); the rest (B, H). Outputs dz: (B, 4H); dc_prev: (B, H).
      return CellShapes(ctx, {0}, {1, 2, 3, 4, 5}, 0, {1});
    });

#define CHARLSTM_REGISTER(T)                                                          \
  REGISTER_KERNEL_BUILDER(                                                            \
      Name("CharlstmCellForward").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      CellForward<T>);                                                                \
  REGISTER_KERNEL_BUILDER(                                                            \
      Name("CharlstmCellBackward").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      CellBackward<T>);

CHARLSTM_REGISTER(float)
CHARLSTM_REGISTER(tensorflow::bfloat16)
