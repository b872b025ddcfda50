"""pipeline/workdir.py: loss.svg draws history.json's points where they belong."""

import math
from xml.etree import ElementTree

import pytest

from pipeline import workdir

SVG = '{http://www.w3.org/2000/svg}'


def _parse(history):
  root = ElementTree.fromstring(workdir.loss_svg(history))
  assert root.tag == SVG + 'svg'
  curves = {p.get('class'): [tuple(map(float, xy.split(','))) for xy in p.get('points').split()]
            for p in root.iter(SVG + 'polyline')}
  return root, curves


def test_points_map_later_steps_right_and_lower_losses_higher_inside_the_axes():
  history = {'train': [[50, 4.1], [100, 3.0], [150, 2.2], [200, 1.9]],
             'val': [[100, 3.2], [200, 2.1]]}
  root, curves = _parse(history)
  assert {k: len(v) for k, v in curves.items()} == {'train': 4, 'val': 2}
  train = curves['train']
  assert [x for x, _ in train] == sorted(x for x, _ in train)  # steps grow to the right
  assert [y for _, y in train] == sorted(y for _, y in train)  # SVG y grows downwards
  frame = next(r for r in root.iter(SVG + 'rect') if r.get('fill') == 'none')
  left, top = float(frame.get('x')), float(frame.get('y'))
  right, bottom = left + float(frame.get('width')), top + float(frame.get('height'))
  for x, y in train + curves['val']:
    assert left <= x <= right and top <= y <= bottom
  # Same loss, same height on both curves; the same step, the same x.
  y_of = dict(train)
  val_at_200 = dict(curves['val'])[train[-1][0]]
  assert val_at_200 < y_of[train[-1][0]]  # 2.1 > 1.9: drawn higher
  assert len(list(root.iter(SVG + 'circle'))) == 2  # markers on validation points
  labels = [t.text for t in root.iter(SVG + 'text')]
  assert 'step' in labels and 'loss (nats per char)' in labels
  assert 'train loss' in labels and 'val loss' in labels


@pytest.mark.parametrize('lo, hi', [(1.23, 4.56), (0, 2000), (1.4404, 1.5040), (3, 3)])
def test_ticks_are_round_steps_covering_the_range(lo, hi):
  ticks = workdir.nice_ticks(lo, hi)
  assert ticks[0] <= lo and ticks[-1] >= hi and len(ticks) >= 2
  steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
  assert len(steps) == 1
  (step,) = steps
  mantissa = step / 10 ** math.floor(math.log10(step))
  assert round(mantissa, 6) in (1, 2, 5)


def test_empty_single_point_and_non_finite_histories_still_draw():
  _, curves = _parse({'train': [], 'val': []})
  assert curves == {}
  _, curves = _parse({'train': [[1, 2.5]], 'val': []})
  assert len(curves['train']) == 1
  _, curves = _parse({'train': [[1, 2.5], [2, float('nan')], [3, 2.0]], 'val': [[3, float('inf')]]})
  assert len(curves['train']) == 2 and 'val' not in curves
