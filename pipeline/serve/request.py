"""POST /v1/generate's body, checked field by field before anything is queued.

Every problem is a BadRequest naming its field, which the server answers with
HTTP 400 and {"error": message, "field": name}: malformed JSON, a body that
is not an object, unknown fields, wrong types, values out of range, limits
(--max_chars, --max_batch, --max_prompt_chars), and prompt characters outside
the vocabulary after NFC normalisation (as launch.sample checks them).
"""

import dataclasses
import json
import math
import secrets
import unicodedata

# Seeds stay below 2^53 so a browser's JavaScript numbers hold them exactly;
# row i of a request samples with seed + i, still inside int64.
MAX_SEED = 2**53 - 1
MAX_BODY_BYTES = 1 << 20
MAX_STOPS, MAX_STOP_CHARS = 16, 64  # stop strings are checked on every chunk, on the host


class BadRequest(Exception):
  """A request the server refuses (HTTP 400); `field` names the culprit (or None)."""

  def __init__(self, message, field=None):
    super().__init__(message)
    self.message = message
    self.field = field

  def body(self):
    return {'error': self.message, 'field': self.field}


@dataclasses.dataclass(frozen=True)
class Limits:
  max_chars: int = 2000
  max_batch: int = 64
  max_prompt_chars: int = 4000


@dataclasses.dataclass(frozen=True)
class Generate:
  prompts: list
  single: bool  # the request said `prompt`, not `prompts`: answer with `text` too
  num_chars: int
  temperature: float
  top_k: int
  seed: int
  stream: bool
  top_p: float = 1.0  # nucleus sampling; 1 keeps every character
  stop: tuple = ()  # a row ends before the first of these; the stop string is not returned


def _int(body, name, default, lo, hi, hint=''):
  value = body.get(name, default)
  # bool is an int in Python, but `true` is no count; 3.0 is not an int either.
  if isinstance(value, bool) or not isinstance(value, int):
    raise BadRequest(f'{name} must be an integer, got {json.dumps(value)}', name)
  if not lo <= value <= hi:
    raise BadRequest(f'{name} must be between {lo} and {hi}{hint}, got {value}', name)
  return value


def _prompt(value, field, known, limits):
  if not isinstance(value, str):
    raise BadRequest(f'{field} must be a string, got {json.dumps(value)}', field)
  value = unicodedata.normalize('NFC', value)  # as the training text was
  if len(value) > limits.max_prompt_chars:
    raise BadRequest(f'{field} has {len(value)} characters; at most '
                     f'{limits.max_prompt_chars} (--max_prompt_chars)', field)
  bad = sorted(set(value) - known)
  if bad:
    raise BadRequest(f'{field} has characters the model never saw: {"".join(bad)!r} '
                     f'(GET /v1/model lists its {len(known)} characters)', field)
  return value


def parse(raw, chars, limits):
  """Raw request bytes -> Generate; raises BadRequest."""
  if len(raw) > MAX_BODY_BYTES:
    raise BadRequest(f'the body has {len(raw)} bytes; at most {MAX_BODY_BYTES}')
  try:
    body = json.loads(raw)
  except (ValueError, UnicodeDecodeError) as e:
    raise BadRequest(f'the body is not valid JSON: {e}') from None
  if not isinstance(body, dict):
    raise BadRequest('the body must be a JSON object, e.g. {"prompt": "ROMEO:"}')
  fields = {f.name for f in dataclasses.fields(Generate)} - {'single', 'prompts'}
  fields |= {'prompt', 'prompts'}
  unknown = sorted(set(body) - fields)
  if unknown:
    raise BadRequest(f'unknown field {unknown[0]!r}; the fields are '
                     f'{", ".join(sorted(fields))}', unknown[0])
  if ('prompt' in body) == ('prompts' in body):
    raise BadRequest('give exactly one of prompt (a string) and prompts (a list of strings)',
                     'prompts' if 'prompts' in body else 'prompt')
  known = set(chars)
  if 'prompt' in body:
    prompts = [_prompt(body['prompt'], 'prompt', known, limits)]
  else:
    value = body['prompts']
    if not isinstance(value, list) or not value:
      raise BadRequest(f'prompts must be a non-empty list of strings, got {json.dumps(value)}',
                       'prompts')
    if len(value) > limits.max_batch:
      raise BadRequest(f'prompts has {len(value)} entries; at most {limits.max_batch} '
                       '(--max_batch)', 'prompts')
    prompts = [_prompt(p, f'prompts[{i}]', known, limits) for i, p in enumerate(value)]
  num_chars = _int(body, 'num_chars', 200, 0, limits.max_chars, ' (--max_chars)')
  temperature = body.get('temperature', 0.8)
  if (isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or
      not math.isfinite(temperature) or temperature < 0):
    raise BadRequest(f'temperature must be a number >= 0 (0 is greedy), got '
                     f'{json.dumps(temperature)}', 'temperature')
  top_k = _int(body, 'top_k', 0, 0, 2**31 - 1, ' (0 keeps every character)')
  seed = body.get('seed')
  seed = secrets.randbelow(MAX_SEED + 1) if seed is None else _int(body, 'seed', 0, 0, MAX_SEED)
  stream = body.get('stream', False)
  if not isinstance(stream, bool):
    raise BadRequest(f'stream must be true or false, got {json.dumps(stream)}', 'stream')
  top_p = body.get('top_p', 1.0)
  if (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or
      not math.isfinite(top_p) or not 0 < top_p <= 1):
    raise BadRequest(f'top_p must be a number in (0, 1] (1 keeps every character), got '
                     f'{json.dumps(top_p)}', 'top_p')
  stop = body.get('stop', [])
  stop = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stop, list) or len(stop) > MAX_STOPS or
      not all(isinstance(x, str) and 0 < len(x) <= MAX_STOP_CHARS for x in stop)):
    raise BadRequest(f'stop must be a non-empty string or a list of at most {MAX_STOPS} '
                     f'non-empty strings of at most {MAX_STOP_CHARS} characters, got '
                     f'{json.dumps(stop)[:200]}', 'stop')
  return Generate(prompts, 'prompt' in body, num_chars, float(temperature), top_k, seed,
                  stream, float(top_p), tuple(unicodedata.normalize('NFC', x) for x in stop))
