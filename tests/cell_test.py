"""pipeline.kernels.cell: the C++ gate op is built once per machine, loads anywhere after, and fails clearly.

Its values and gradients against Keras's are in fused_lstm_test (every
Keras-match test runs with both gate kernels).
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from conftest import error_lines, run
from pipeline import fused_lstm
from pipeline import model as model_lib
from pipeline.cloud import bootstrap
from pipeline.kernels import cell as cell_kernels



@pytest.fixture(autouse=True)
def _compiler():
  bootstrap.cxx()  # installs g++ where it is missing (conftest.kernels)


# Run in a child: resolve the kind in argv[1], print the result, the cache's files.
_RESOLVE = '''
import json, os, sys
from pipeline.kernels import cell as cell_kernels
try:
  print('resolved', cell_kernels.resolve(sys.argv[1]))
except cell_kernels.BuildError as e:
  print('error', e)
print('files', json.dumps(sorted(os.listdir(cell_kernels.cache_dir()))))
'''


def _resolve(kind, cache, no_compiler=False):
  env = {'CHARLSTM_OPS_DIR': str(cache)}
  if no_compiler:
    # No g++ or c++ anywhere: PATH is an empty directory and CXX names nothing.
    empty = cache.parent / 'empty-bin'
    empty.mkdir(exist_ok=True)
    env.update(PATH=str(empty), CXX='')
  proc = run(['-c', _RESOLVE, kind], env=env)
  out = dict(line.split(' ', 1) for line in proc.stdout.splitlines())
  return out, proc.stderr


def test_a_binary_built_in_one_process_loads_in_another_without_a_compiler(tmp_path):
  cache = tmp_path / 'ops'
  built, _ = _resolve('cc', cache)
  assert built['resolved'] == 'cc'
  binaries = [f for f in eval(built['files']) if f.endswith('.so')]  # pylint: disable=eval-used
  assert len(binaries) == 1 and binaries[0].startswith('cell-')
  mtime = os.path.getmtime(cache / binaries[0])
  loaded, _ = _resolve('cc', cache, no_compiler=True)
  assert loaded['resolved'] == 'cc'
  assert loaded['files'] == built['files']  # nothing rebuilt, no temp files left
  assert os.path.getmtime(cache / binaries[0]) == mtime


def test_without_a_compiler_auto_warns_once_and_takes_the_xla_kernels(tmp_path):
  out, stderr = _resolve('auto', tmp_path / 'ops', no_compiler=True)
  assert out['resolved'] == 'xla'
  warnings = [l for l in stderr.splitlines() if 'kernels.cell: no C++ compiler' in l]
  assert len(warnings) == 1, stderr
  assert 'XLA gate kernels instead' in warnings[0]
  assert [f for f in eval(out['files']) if f.endswith('.so')] == []  # pylint: disable=eval-used


def test_a_compiler_that_fails_is_one_error_naming_its_message_and_leaves_no_files(tmp_path):
  cxx = tmp_path / 'failing-cxx'
  cxx.write_text('#!/bin/sh\necho "failing-cxx: fatal error: no space left on device" >&2\nexit 1\n')
  cxx.chmod(0o755)
  cache = tmp_path / 'ops'
  proc = run(['-c', _RESOLVE, 'cc'], env={'CHARLSTM_OPS_DIR': str(cache), 'CXX': str(cxx)})
  out = dict(line.split(' ', 1) for line in proc.stdout.splitlines())
  assert 'could not compile' in out['error'], proc.stdout
  assert 'no space left on device' in out['error'] and 'cell_kernels=xla' in out['error']
  assert eval(out['files']) == ['.lock']  # pylint: disable=eval-used  # no .so, .o or temp file


def test_asking_for_cc_without_a_compiler_is_a_one_line_error_before_training(tmp_path):
  empty = tmp_path / 'empty-bin'
  empty.mkdir()
  proc = run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
              f'--workdir={tmp_path / "run"}', '--config.train.cell_kernels=cc',
              '--config.train.jit_compile=false'], check=False,
             env={'CHARLSTM_OPS_DIR': str(tmp_path / 'ops'), 'PATH': str(empty), 'CXX': ''})
  assert proc.returncode == 2, proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert 'no C++ compiler' in lines[0] and 'train.cell_kernels=xla' in lines[0]
  assert not list(tmp_path.glob('run/checkpoints/ckpt-*'))


def test_asking_for_cc_in_an_xla_compiled_step_is_a_one_line_error(tmp_path):
  proc = run(['-m', 'launch.train', '--config=configs/shakespeare.py:smoke',
              f'--workdir={tmp_path}', '--config.train.cell_kernels=cc',
              '--config.train.jit_compile=true'], check=False)
  assert proc.returncode == 2, proc.stderr
  lines = error_lines(proc.stderr)
  assert len(lines) == 1, proc.stderr
  assert 'XLA-compiled' in lines[0] and 'jit_compile=false' in lines[0]


def _gate_ops(kernels, precision='float32'):
  """The op types in the graph of a fused train-step-like function, nested functions included."""
  models = model_lib.build(11, 8, 1, 5, precision)
  x = tf.one_hot(np.arange(20).reshape(4, 5) % 11, 11)
  zeros = tf.zeros([4, 1, 8])

  @tf.function
  def grads():
    with tf.GradientTape() as tape, fused_lstm.swap_in(models.lstms, kernels=kernels):
      logits, _, _ = models.train([x, zeros, zeros], training=True)
      loss = tf.reduce_sum(logits * logits)  # not their sum: a softmax's is constant
    return tape.gradient(loss, models.train.trainable_variables)
  graph = grads.get_concrete_function().graph.as_graph_def()
  nodes = list(graph.node) + [n for f in graph.library.function for n in f.node_def]
  return {n.op for n in nodes}


_CELL = {'CharlstmCellForward', 'CharlstmCellBackward'}
_SEQUENCE = {'CharlstmSequenceForward', 'CharlstmSequenceBackward'}


_BF16_WHOLE = tf.bfloat16 in cell_kernels.sequence_dtypes()  # AVX512-BF16 (and AMX) builds
# The op's bfloat16 kernels exist wherever the build has vdpbf16ps (AMX hosts
# too, where training takes the per-step path), so they can be tested there.
_BF16_KERNELS = bool(cell_kernels.load().charlstm_sequence_bf16_native())


@pytest.fixture
def per_step_bfloat16(monkeypatch):
  """bfloat16 on the per-step loop with the cell op, as on AMX or non-BF16 CPUs."""
  monkeypatch.setattr(cell_kernels, 'sequence_dtypes', lambda: (tf.float32,))


def test_the_cc_kernels_replace_the_xla_ones_in_the_traced_step():
  # float32: the whole recurrence is one op per pass; bfloat16 too where the
  # build has vdpbf16ps (and no AMX), else the per-step loop of oneDNN's
  # bfloat16 matmuls with the gate op.
  cc, cc16, xla = _gate_ops('cc'), _gate_ops('cc', 'bfloat16'), _gate_ops('xla')
  assert _SEQUENCE <= cc and not _CELL & cc and 'While' not in cc
  if _BF16_WHOLE:
    assert _SEQUENCE <= cc16 and not _CELL & cc16 and 'While' not in cc16
  else:
    assert _CELL <= cc16 and not _SEQUENCE & cc16
  assert not (_CELL | _SEQUENCE) & xla


def test_without_the_whole_sequence_bfloat16_takes_the_per_step_cell_op(per_step_bfloat16):
  cc16 = _gate_ops('cc', 'bfloat16')
  assert _CELL <= cc16 and not _SEQUENCE & cc16


def test_bfloat16_products_run_on_amx_tiles_exactly_where_the_cpu_has_amx():
  ops = cell_kernels.load()
  flags = open('/proc/cpuinfo', encoding='utf-8').read()
  amx = bool(ops.charlstm_sequence_amx())
  assert amx == ('amx_bf16' in flags and 'avx512_bf16' in flags)  # built with -march=native
  if amx:  # then bfloat16 takes the whole-sequence op (2.29x float32 at H=512
    # here), not the per-step loop of oneDNN's matmuls (1.36x)
    assert tf.bfloat16 in cell_kernels.sequence_dtypes()


def test_the_bfloat16_sequence_op_is_registered_only_with_vdpbf16ps():
  ops = cell_kernels.load()
  native = bool(ops.charlstm_sequence_bf16_native())
  flags = open('/proc/cpuinfo', encoding='utf-8').read()
  assert native == ('avx512_bf16' in flags)  # built with -march=native
  w, state = tf.zeros([4, 16], tf.bfloat16), tf.zeros([2, 4], tf.bfloat16)
  if native:
    hs = ops.charlstm_sequence_forward(tf.zeros([2, 3, 16]), w, state, tf.zeros([2, 4]), [], [],
                                       chains=1)[0]
    assert hs.dtype == tf.bfloat16
    with pytest.raises(tf.errors.InvalidArgumentError, match='bfloat16 needs an even H'):
      ops.charlstm_sequence_forward(tf.zeros([2, 3, 12]), tf.zeros([3, 12], tf.bfloat16),
                                    tf.zeros([2, 3], tf.bfloat16), tf.zeros([2, 3]), [], [],
                                    chains=1)
  else:
    with pytest.raises(tf.errors.NotFoundError):
      ops.charlstm_sequence_forward(tf.zeros([2, 3, 16]), w, state, tf.zeros([2, 4]), [], [],
                                    chains=1)


def _bits(x):
  """A float32 or bfloat16 tensor's bits, for exact comparisons."""
  return tf.bitcast(x, tf.uint16 if x.dtype == tf.bfloat16 else tf.uint32).numpy()


def _sequence_outputs(kernels, input_grad, h=72, b=16, t=9, v=11, chains=2, dtype=tf.float32):
  """lstm_sequence's outputs and gradients (w.r.t. x too where input_grad) on random data."""
  rng = np.random.default_rng(1)
  x = (tf.constant(rng.normal(size=(b, t, v)), tf.float32) if input_grad
       else tf.one_hot(rng.integers(v, size=(b, t)), v))
  w_x, w_h = (tf.constant(rng.normal(size=(d, 4 * h)) * 0.3, tf.float32) for d in (v, h))
  bias = tf.constant(rng.normal(size=(4 * h,)), tf.float32)
  h0, c0 = (tf.constant(rng.normal(size=(b, h)), tf.float32) for _ in range(2))
  d_out = tf.constant(rng.normal(size=(b, t, h)), tf.float32)
  with tf.GradientTape() as tape:
    tape.watch([x, h0, c0, w_x, w_h, bias])
    out, h_t, c_t = fused_lstm.lstm_sequence(tf.cast(x, dtype), h0, c0, w_x, w_h, bias,
                                             input_grad=input_grad, chains=chains, kernels=kernels)
    loss = tf.reduce_sum(tf.cast(out, tf.float32) * d_out) + tf.reduce_sum(h_t * h_t) + tf.reduce_sum(c_t)
  grads = tape.gradient(loss, [x, h0, c0, w_x, w_h, bias])
  return [out, h_t, c_t] + [g for g in grads if g is not None]


@pytest.mark.parametrize('input_grad', [False, True])
def test_the_whole_sequence_op_matches_the_per_step_loop(input_grad):
  # H=72: whole packets and a partial one forward, a partial 4-packet panel
  # backward; 8 rows per chain: a full row tile and a smaller one.
  cc, xla = _sequence_outputs('cc', input_grad), _sequence_outputs('xla', input_grad)
  assert len(cc) == len(xla) == (9 if input_grad else 8)
  for got, want in zip(cc, xla):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('input_grad', [False, True])
def test_a_w_h_over_a_mib_alternates_its_panel_order_and_still_matches_the_loop(input_grad):
  # H=264: 4H^2 float32 is 1.1 MB, over kernels/tiles.h's kAlternateBytes, so
  # odd steps run their panels in descending order; 264 leaves a partial
  # packet forward and a partial panel backward; T=5 ends on an even step.
  kw = dict(h=264, b=8, t=5)
  cc, xla = _sequence_outputs('cc', input_grad, **kw), _sequence_outputs('xla', input_grad, **kw)
  for got, want in zip(cc, xla):
    np.testing.assert_allclose(got, want, rtol=5e-5, atol=5e-5)


@pytest.mark.skipif(not _BF16_KERNELS, reason='no vdpbf16ps build on this CPU')
@pytest.mark.parametrize('input_grad', [False, True])
@pytest.mark.parametrize('h,b', [(72, 16), (128, 32)])  # 8 rows a chain; 16 and whole panels (AMX)
def test_the_bfloat16_sequence_op_tracks_the_per_step_bfloat16_loop(input_grad, h, b, monkeypatch):
  monkeypatch.setattr(cell_kernels, 'sequence_dtypes', lambda: (tf.float32, tf.bfloat16))
  whole = _sequence_outputs('cc', input_grad, h=h, b=b, dtype=tf.bfloat16)
  monkeypatch.setattr(cell_kernels, 'sequence_dtypes', lambda: (tf.float32,))
  per_step = _sequence_outputs('cc', input_grad, h=h, b=b, dtype=tf.bfloat16)
  exact = _sequence_outputs('xla', input_grad, h=h, b=b)  # float32
  assert len(whole) == len(per_step) == len(exact)
  for got, loop, want in zip(whole, per_step, exact):
    scale = np.max(np.abs(want))
    # Both round h and dz to bfloat16 at every step (0.3-1.6% off float32 here,
    # each path on either side of the other); a wrong panel layout is off by O(1).
    err, err_loop = (np.max(np.abs(tf.cast(a, tf.float32) - want)) / scale for a in (got, loop))
    # Rounding error grows with the terms in each sum: about sqrt(h).
    assert err < 3e-2 * np.sqrt(h / 72) and err < 2 * err_loop + 2e-3, (err, err_loop)


def test_the_kernels_check_their_shapes():
  ops = cell_kernels.load()
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'z must be \(B, 4H\)'):
    ops.charlstm_cell_forward(tf.zeros([2, 8]), tf.zeros([2, 8]), tf.zeros([2, 3]))
  with pytest.raises(tf.errors.InvalidArgumentError, match="must have c's shape"):
    ops.charlstm_cell_backward(tf.zeros([2, 12]), *[tf.zeros([2, 3])] * 3, tf.zeros([3, 3]),
                               tf.zeros([2, 3]))
  state, seq = tf.zeros([4, 3]), tf.zeros([4, 5, 12])  # B=4, T=5, H=3
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'W_h \(H, 4H\).*do not match'):
    ops.charlstm_sequence_forward(seq, tf.zeros([3, 8]), state, state, [], [], chains=2)
  with pytest.raises(tf.errors.InvalidArgumentError, match='chains must divide the batch'):
    ops.charlstm_sequence_forward(seq, tf.zeros([3, 12]), state, state, [], [], chains=3)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'h0 has shape \[4,2\]'):
    ops.charlstm_sequence_forward(seq, tf.zeros([3, 12]), tf.zeros([4, 2]), state, [], [], chains=2)
  fwd = lambda table, ids: ops.charlstm_sequence_forward(table, tf.zeros([3, 12]), state, state,
                                                        [], [ids], chains=2)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'xz must be a \(V, 4H\) table'):
    fwd(tf.zeros([7, 8]), tf.zeros([4, 5], tf.int32))
  with pytest.raises(tf.errors.InvalidArgumentError,
                     match=r'id 7 is outside the vocabulary \[0, 7\)'):
    fwd(tf.zeros([7, 12]), tf.fill([4, 5], 7))
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'd_out has shape \[4,3\]'):
    ops.charlstm_sequence_backward(seq, tf.zeros([4, 5, 3]), state, state, state, state,
                                   tf.zeros([3, 12]), [], chains=1)
  back = lambda ids, vocab: ops.charlstm_sequence_backward(
      seq, tf.zeros([4, 5, 3]), tf.zeros([4, 5, 3]), state, state, state, tf.zeros([3, 12]),
      [ids], vocab=vocab, chains=1)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'ids has shape \[4,4\]; it must be'):
    back(tf.zeros([4, 4], tf.int32), 7)
  with pytest.raises(tf.errors.InvalidArgumentError, match=r'id 7 is outside the vocabulary'):
    back(tf.fill([4, 5], 7), 7)


@pytest.mark.parametrize('chains', [1, 2])
def test_the_backward_sums_the_first_layers_input_gradient_by_id(chains):
  """d_w_x = one_hot(ids)^T dz, from the op's own dz: what the matmul over x gave."""
  ops = cell_kernels.load()
  rng = np.random.default_rng(4)
  b, t, h, v = 6, 5, 40, 9
  for dtype in cell_kernels.sequence_dtypes():
    arrays = [rng.normal(size=s) for s in [(b, t, 4 * h), (b, t, h), (b, t, h)] + [(b, h)] * 3]
    zs, cs, d_out, c0, dh, dc = (tf.constant(a, tf.float32) for a in arrays)
    w = tf.cast(rng.normal(size=(h, 4 * h)) / np.sqrt(h), dtype)
    ids = tf.constant(rng.integers(v, size=(b, t)), tf.int32)
    dzs, _, _, (d_w_x,) = ops.charlstm_sequence_backward(zs, cs, d_out, c0, dh, dc, w, [ids],
                                                         vocab=v, chains=chains)
    want = tf.matmul(tf.one_hot(tf.reshape(ids, [-1]), v),
                     tf.reshape(tf.cast(dzs, tf.float32), [-1, 4 * h]), transpose_a=True)
    # bfloat16's dz is rounded on its way out; the sums take it before that.
    tol = 1e-5 if dtype == tf.float32 else 2e-2
    np.testing.assert_allclose(d_w_x, want, rtol=tol, atol=tol * np.max(np.abs(want)))
    assert d_w_x.shape == (v, 4 * h)
    # and without ids, no such output
    no_ids = ops.charlstm_sequence_backward(zs, cs, d_out, c0, dh, dc, w, [], chains=chains)
    assert len(no_ids[3]) == 0


def test_the_forward_reads_the_first_layers_projection_from_the_table_by_id():
  """With ids, xz row (b, t) is table[ids[b, t]]: the same bits as the gathered xz."""
  ops = cell_kernels.load()
  rng = np.random.default_rng(6)
  b, t, h, v = 6, 5, 40, 9
  for dtype in cell_kernels.sequence_dtypes():
    table = tf.constant(rng.normal(size=(v, 4 * h)), tf.float32)
    ids = tf.constant(rng.integers(v, size=(b, t)), tf.int32)
    w = tf.cast(rng.normal(size=(h, 4 * h)) / np.sqrt(h), dtype)
    h0, c0 = tf.cast(rng.normal(size=(b, h)), dtype), tf.constant(rng.normal(size=(b, h)), tf.float32)
    by_id = ops.charlstm_sequence_forward(table, w, h0, c0, [], [ids], chains=2)
    gathered = ops.charlstm_sequence_forward(tf.gather(table, ids), w, h0, c0, [], [], chains=2)
    assert by_id[2].shape == (b, t, 4 * h)
    for got, want in zip(by_id[:3], gathered[:3]):
      np.testing.assert_array_equal(_bits(got), _bits(want))


def test_a_first_layer_input_that_is_not_one_hot_takes_the_matmul_for_its_gradient():
  # The op sums d_w_x by argmax id; a soft input must not: both paths agree with XLA's loop.
  rng = np.random.default_rng(5)
  b, t, h, v = 8, 4, 24, 7
  x = tf.nn.softmax(tf.constant(rng.normal(size=(b, t, v)), tf.float32))
  w_x, w_h = (tf.constant(rng.normal(size=(d, 4 * h)) * 0.3, tf.float32) for d in (v, h))
  bias = tf.zeros([4 * h])
  h0 = c0 = tf.zeros([b, h])
  grads = {}
  for kernels in ('cc', 'xla'):
    with tf.GradientTape() as tape:
      tape.watch([w_x, w_h])
      out, _, _ = fused_lstm.lstm_sequence(x, h0, c0, w_x, w_h, bias, input_grad=False,
                                           chains=2, kernels=kernels)
      loss = tf.reduce_sum(out * out)
    grads[kernels] = tape.gradient(loss, [w_x, w_h])
  for got, want in zip(grads['cc'], grads['xla']):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_the_sequence_op_writes_the_weight_gradients_left_operand():
  """left = [h_{t-1}, x_t, 1] per row: h0 at t = 0, then the op's own hs, bit for bit."""
  ops = cell_kernels.load()
  rng = np.random.default_rng(3)
  b, t, h, e = 6, 5, 40, 7
  for dtype in cell_kernels.sequence_dtypes():
    xz = tf.constant(rng.normal(size=(b, t, 4 * h)), tf.float32)
    w = tf.cast(rng.normal(size=(h, 4 * h)) / np.sqrt(h), dtype)
    h0, c0 = tf.cast(rng.normal(size=(b, h)), dtype), tf.constant(rng.normal(size=(b, h)), tf.float32)
    tail = tf.cast(rng.normal(size=(b, t, e)), dtype)
    hs, _, _, (left,) = ops.charlstm_sequence_forward(xz, w, h0, c0, [tail], [], chains=2)
    want = tf.concat([h0[:, None], hs[:, :-1]], 1), tail, tf.ones([b, t, 1], dtype)
    want = tf.concat(want, -1)
    assert left.dtype == dtype and left.shape == (b, t, h + e + 1)
    np.testing.assert_array_equal(_bits(left), _bits(want))
    for bad in (tail[:, :2], tail[0]):  # another T; rank 2
      with pytest.raises(tf.errors.InvalidArgumentError, match=r'tail has shape \[.*must be'):
        ops.charlstm_sequence_forward(xz, w, h0, c0, [bad], [], chains=2)


@pytest.mark.parametrize('dtype,per_step,h,b', [(tf.float32, False, 72, 8),
                                                (tf.bfloat16, False, 72, 8),
                                                (tf.bfloat16, False, 64, 32),  # AMX tiles
                                                (tf.bfloat16, True, 72, 8)])
def test_the_fused_gradient_with_cc_kernels_is_bitwise_repeatable(dtype, per_step, h, b,
                                                                  monkeypatch):
  # Exact resume needs every run of a step to give the same bits wherever its
  # buffers happen to be allocated (Eigen's array code computes the unaligned
  # head of a buffer with its scalar tanh, which differs in the last bit).
  if per_step:  # the cell op between oneDNN's matmuls
    monkeypatch.setattr(cell_kernels, 'sequence_dtypes', lambda: (tf.float32,))
  elif _BF16_KERNELS:  # else the sequence op, in bfloat16 too wherever its kernels exist
    monkeypatch.setattr(cell_kernels, 'sequence_dtypes', lambda: (tf.float32, tf.bfloat16))
  t, v = 16, 11  # h=72: whole packets and a partial one; 64 with 16 rows a chain: AMX tiles
  rng = np.random.default_rng(0)
  x = tf.one_hot(rng.integers(v, size=(b, t)), v, dtype=dtype)
  w_x, w_h = (tf.constant(rng.normal(size=(d, 4 * h)), tf.float32) for d in (v, h))
  bias, zeros = tf.zeros([4 * h]), tf.zeros([b, h])

  @tf.function
  def run():
    with tf.GradientTape() as tape:
      tape.watch([w_x, w_h, bias])
      out, _, c = fused_lstm.lstm_sequence(x, zeros, zeros, w_x, w_h, bias, input_grad=False,
                                           chains=2, kernels='cc')
      loss = tf.reduce_sum(tf.cast(out, tf.float32) ** 2) + tf.reduce_sum(c)
    return [out] + tape.gradient(loss, [w_x, w_h, bias])
  first = [a.numpy() for a in run()]
  shifts = []
  for i in range(40):
    shifts.append(tf.zeros([int(rng.integers(1, 200))]))  # moves later allocations around
    again = [a.numpy() for a in run()]
    for a, want in zip(again, first):
      np.testing.assert_array_equal(a, want, err_msg=f'call {i + 1}')


def test_no_compiler_for_the_tests_is_one_line_saying_how_to_install_it(monkeypatch, tmp_path):
  monkeypatch.setattr(os, 'geteuid', lambda: 1000)  # not root: no apt-get
  monkeypatch.setenv('PATH', str(tmp_path))  # no g++ or c++
  monkeypatch.delenv('CXX', raising=False)
  with pytest.raises(bootstrap.MissingCompiler) as e:
    bootstrap.cxx()
  assert 'sudo apt-get install -y g++' in str(e.value) and '\n' not in str(e.value)
