// The page at /: streams POST /v1/generate's server-sent events into #text.
// EventSource can only GET, so the events are read from fetch's body stream
// and split by hand: an event ends at a blank line, and lines may end in
// \r\n, \n or \r (the SSE spec allows all three; sse-starlette sends \r\n).
'use strict';

const $ = (id) => document.getElementById(id);
let controller = null;

function setState(state, message, isError) {
  document.body.dataset.state = state;
  $('generate').disabled = state === 'streaming';
  $('stop').disabled = state !== 'streaming';
  $('status').textContent = message;
  $('status').className = isError ? 'error' : '';
}

function fmt(x) {
  return Math.round(x).toLocaleString('en-US');
}

async function loadModel() {
  try {
    const m = await (await fetch('/v1/model')).json();
    $('model').textContent = `${m.num_layers} x LSTM(${m.hidden_size}), ${m.vocab_size} characters, ` +
        `exported ${m.exported_at}`;
  } catch (e) {
    $('model').textContent = `cannot read /v1/model: ${e}`;
  }
}

function number(id) {
  const v = $(id).value.trim();
  return v === '' ? null : Number(v);
}

// One event block ("event: x\ndata: {...}") -> [name, parsed data], or null for a ping.
function parseEvent(block) {
  let name = 'message';
  const data = [];
  for (const line of block.split(/\r\n|\r|\n/)) {
    if (line.startsWith(':')) continue;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? '' : line.slice(colon + 1).replace(/^ /, '');
    if (field === 'event') name = value;
    else if (field === 'data') data.push(value);
  }
  return data.length ? [name, JSON.parse(data.join('\n'))] : null;
}

async function generate() {
  const body = {
    prompt: $('prompt').value,
    num_chars: number('num_chars'),
    temperature: number('temperature'),
    top_k: number('top_k'),
    stream: true,
  };
  const seed = number('seed');
  if (seed !== null) body.seed = seed;
  $('echo').textContent = body.prompt;
  $('text').textContent = '';
  controller = new AbortController();
  setState('streaming', 'waiting for the first characters...');
  const t0 = performance.now();
  let chars = 0;
  try {
    const res = await fetch('/v1/generate', {
      method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({error: res.statusText}));
      setState('error', `${res.status}: ${err.error}`, true);
      return;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = '';
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      // A separator split across reads stays in the buffer until it is whole.
      let m;
      while ((m = /\r\n\r\n|\n\n|\r\r/.exec(buffer)) !== null) {
        const event = parseEvent(buffer.slice(0, m.index));
        buffer = buffer.slice(m.index + m[0].length);
        if (!event) continue;
        const [name, data] = event;
        if (name === 'chunk') {
          $('text').textContent += data.text;
          chars += [...data.text].length;
          const seconds = (performance.now() - t0) / 1000;
          setState('streaming', `${fmt(chars)} characters, ${fmt(chars / seconds)} chars/s`);
        } else if (name === 'done') {
          setState('done', `${fmt(data.chars)} characters in ${data.seconds.toFixed(2)} s: ` +
              `${fmt(data.chars_per_s)} chars/s; first characters after ` +
              `${fmt(data.first_chunk_ms ?? 0)} ms; seed ${data.seed}`);
        } else if (name === 'error') {
          setState('error', data.error, true);
        }
      }
    }
    if (document.body.dataset.state === 'streaming') {
      setState('error', 'the stream ended early', true);
    }
  } catch (e) {
    if (e.name === 'AbortError') {
      setState('stopped', `stopped after ${fmt(chars)} characters`);
    } else {
      setState('error', String(e), true);
    }
  }
}

$('generate').addEventListener('click', generate);
$('stop').addEventListener('click', () => controller && controller.abort());
$('prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && (e.ctrlKey || e.metaKey)) generate();
});
loadModel();
