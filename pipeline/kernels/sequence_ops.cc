// The recurrence ops' interfaces (sequence.cc holds their CPU kernels):
// inputs, outputs, attributes and shape functions, apart from the kernels so
// that each file stays readable. pipeline/kernels/cell.py compiles all three
// sources (cell.cc too).

#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

REGISTER_OP("CharlstmSequenceForward")
    .Input("xz: float")
    .Input("w_h: T")
    .Input("h0: T")
    .Input("c0: float")
    .Input("tail: N * T")
    .Input("ids: I * int32")
    .Output("hs: T")
    .Output("cs: float")
    .Output("zs: float")
    .Output("left: N * T")
    .Attr("T: {float, bfloat16} = DT_FLOAT")
    .Attr("N: int >= 0 = 0")
    .Attr("I: int >= 0 = 0")
    .Attr("chains: int >= 1")
    .SetShapeFn([](tensorflow::shape_inference::InferenceContext* ctx) {
      using tensorflow::shape_inference::DimensionHandle;
      using tensorflow::shape_inference::ShapeHandle;
      int64_t n;
      TF_RETURN_IF_ERROR(ctx->GetAttr("N", &n));
      ShapeHandle xz, w_h;
      TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(1), 2, &w_h));
      if (ctx->num_inputs() > 4 + n) {  // ids (B, T) and a (V, 4H) table
        ShapeHandle ids, table;
        TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(4 + n), 2, &ids));
        TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(0), 2, &table));
        xz = ctx->MakeShape({ctx->Dim(ids, 0), ctx->Dim(ids, 1), ctx->Dim(table, 1)});
      } else {
        TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(0), 3, &xz));
      }
      ShapeHandle state = ctx->MakeShape({ctx->Dim(xz, 0), ctx->Dim(xz, 1), ctx->Dim(w_h, 0)});
      ctx->set_output(0, state);
      ctx->set_output(1, state);
      ctx->set_output(2, xz);
      for (int i = 4; i < 4 + n; ++i) {  // x, if given, and its left
        ShapeHandle tail;
        DimensionHandle width;
        TF_RETURN_IF_ERROR(ctx->WithRank(ctx->input(i), 3, &tail));
        TF_RETURN_IF_ERROR(ctx->Add(ctx->Dim(w_h, 0), ctx->Dim(tail, 2), &width));
        TF_RETURN_IF_ERROR(ctx->Add(width, 1, &width));
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
    .Input("ids: N * int32")
    .Output("dzs: T")
    .Output("dh0: float")
    .Output("dc0: float")
    .Output("d_w_x: N * float")
    .Attr("T: {float, bfloat16} = DT_FLOAT")
    .Attr("N: int >= 0 = 0")
    .Attr("vocab: int >= 0 = 0")
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
      int64_t vocab;
      TF_RETURN_IF_ERROR(ctx->GetAttr("vocab", &vocab));
      for (int i = 3; i < ctx->num_outputs(); ++i) {  // d_w_x, if ids are given
        ctx->set_output(i, ctx->Matrix(vocab, ctx->Dim(zs, 2)));
      }
      return absl::OkStatus();
    });

REGISTER_OP("CharlstmSequenceAmx")
    .Output("amx: bool")
    .SetShapeFn(tensorflow::shape_inference::ScalarShape);

REGISTER_OP("CharlstmSequenceBf16Native")
    .Output("native: bool")
    .SetShapeFn(tensorflow::shape_inference::ScalarShape);
