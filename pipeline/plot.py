"""The loss plot: history.json's train and validation curves as a standalone SVG.

Written by hand rather than with matplotlib: TensorFlow imports Keras, and
Keras imports matplotlib.pyplot whenever it is installed (for an image gallery
helper), which cost every process that imports TensorFlow (each launcher,
worker and sampler job) 0.5-0.7 s of its 3.5 s start-up here. An SVG needs no
library, scales, and opens in any browser; TensorBoard keeps the live curves.
"""

import math
from xml.sax import saxutils

WIDTH, HEIGHT = 720, 400
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 16, 48  # margins around the axes: room for tick labels
COLORS = {'train': '#1f77b4', 'val': '#ff7f0e'}  # the seed plot's (matplotlib's) first two


def nice_ticks(lo, hi, count=6):
  """About `count` round values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
  if not hi > lo:
    lo, hi = lo - 0.5, hi + 0.5
  raw = (hi - lo) / max(count - 1, 1)
  power = 10 ** math.floor(math.log10(raw))
  step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
  first = math.floor(lo / step) * step
  ticks, k = [], 0
  while first + k * step <= hi + step * 1e-9:
    ticks.append(round(first + k * step, 12))
    k += 1
  if ticks[-1] < hi:
    ticks.append(round(ticks[-1] + step, 12))
  return ticks


def _label(value):
  return f'{value:g}' if abs(value) < 1e6 else f'{value:.3g}'


def loss_svg(history):
  """history {'train': [[step, loss], ...], 'val': [...]} -> an SVG document (str).

  Axes span every finite point of both curves; validation points carry markers,
  as in the seed post's plot.
  """
  curves = {name: [(float(s), float(l)) for s, l in history.get(name, [])
                   if math.isfinite(float(s)) and math.isfinite(float(l))]
            for name in ('train', 'val')}
  points = [p for pts in curves.values() for p in pts]
  xs = nice_ticks(min((p[0] for p in points), default=0.0), max((p[0] for p in points), default=1.0))
  ys = nice_ticks(min((p[1] for p in points), default=0.0), max((p[1] for p in points), default=1.0))
  x0, x1, y0, y1 = LEFT, WIDTH - RIGHT, HEIGHT - BOTTOM, TOP

  def px(step):
    return x0 + (step - xs[0]) / (xs[-1] - xs[0]) * (x1 - x0)

  def py(loss):
    return y0 + (loss - ys[0]) / (ys[-1] - ys[0]) * (y1 - y0)

  out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
         f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
         f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>']
  for t in xs:
    out.append(f'<line x1="{px(t):.1f}" y1="{y0}" x2="{px(t):.1f}" y2="{y1}" stroke="#ddd"/>')
    out.append(f'<text x="{px(t):.1f}" y="{y0 + 16}" text-anchor="middle">{_label(t)}</text>')
  for t in ys:
    out.append(f'<line x1="{x0}" y1="{py(t):.1f}" x2="{x1}" y2="{py(t):.1f}" stroke="#ddd"/>')
    out.append(f'<text x="{x0 - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_label(t)}</text>')
  out.append(f'<rect x="{x0}" y="{y1}" width="{x1 - x0}" height="{y0 - y1}" fill="none" '
             'stroke="black"/>')
  out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{HEIGHT - 10}" text-anchor="middle">step</text>')
  out.append(f'<text transform="translate(14 {(y0 + y1) / 2:.1f}) rotate(-90)" '
             'text-anchor="middle">loss (nats per char)</text>')
  legend_y = y1 + 16
  for name, pts in curves.items():
    if not pts:
      continue
    color = COLORS[name]
    coords = ' '.join(f'{px(s):.1f},{py(l):.1f}' for s, l in pts)
    out.append(f'<polyline class="{name}" points="{coords}" fill="none" stroke="{color}" '
               'stroke-width="1.5"/>')
    if name == 'val':
      out.extend(f'<circle cx="{px(s):.1f}" cy="{py(l):.1f}" r="3" fill="{color}"/>'
                 for s, l in pts)
    out.append(f'<line x1="{x1 - 110}" y1="{legend_y - 4}" x2="{x1 - 90}" y2="{legend_y - 4}" '
               f'stroke="{color}" stroke-width="1.5"/>')
    out.append(f'<text x="{x1 - 84}" y="{legend_y}">{saxutils.escape(name)} loss</text>')
    legend_y += 16
  out.append('</svg>')
  return '\n'.join(out) + '\n'
