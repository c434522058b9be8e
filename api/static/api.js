// The /v1 API from the browser: bearer token (sessionStorage), JSON requests, SSE over fetch, downloads.
const KEY = 'spinquant.token';

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, detail) {
    super(typeof detail === 'string' ? detail : Array.isArray(detail) ? detail.map((d) => d.msg).join('; ') : `HTTP ${status}`);
    this.status = status;
    this.detail = detail; // a string, or [{loc, msg, type}] for 422
  }
}

let onUnauthorized = () => {};
export const setUnauthorizedHandler = (fn) => { onUnauthorized = fn; };

function headers(extra = {}) {
  const t = token.get();
  return t ? { Authorization: `Bearer ${t}`, ...extra } : extra;
}

async function fail(r) {
  let detail = `${r.status} ${r.statusText}`;
  try { detail = (await r.json()).detail ?? detail; } catch { /* not JSON */ }
  if (r.status === 401) onUnauthorized(detail);
  throw new ApiError(r.status, detail);
}

// fetch with the bearer header; JSON in and out unless `raw` (then the Response is returned).
export async function request(path, { method = 'GET', body, json, hdrs = {}, signal, raw = false } = {}) {
  const h = headers(hdrs);
  if (json !== undefined) { h['Content-Type'] = 'application/json'; body = JSON.stringify(json); }
  const r = await fetch(path, { method, body, headers: h, signal, cache: 'no-store' });
  if (!r.ok) await fail(r);
  return raw ? r : r.json();
}

export const listJobs = (status, signal) => request(`/v1/jobs?limit=200${status ? `&status=${encodeURIComponent(status)}` : ''}`, { signal });
export const getJob = (id, signal) => request(`/v1/jobs/${encodeURIComponent(id)}`, { signal });
export const cancelJob = (id) => request(`/v1/jobs/${encodeURIComponent(id)}/cancel`, { method: 'POST' });
export const submitJob = (body) => request('/v1/jobs', { method: 'POST', json: body });
export const uploadText = (file) => request(`/v1/texts?name=${encodeURIComponent(file.name || 'text')}`,
  { method: 'POST', body: file, hdrs: { 'Content-Type': 'text/plain; charset=utf-8' } });
export const artifactText = async (url, signal) => (await request(url, { raw: true, signal })).text();

// Save an artifact: the download needs the bearer header, so fetch it as a blob and save via an object URL.
export async function saveArtifact(url, filename) {
  const blob = await (await request(url, { raw: true })).blob();
  const href = URL.createObjectURL(blob);
  const a = Object.assign(document.createElement('a'), { href, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(href), 60_000);
  return blob.size;
}

const sleep = (ms, signal) => new Promise((res) => {
  const t = setTimeout(res, ms);
  signal?.addEventListener('abort', () => { clearTimeout(t); res(); }, { once: true });
});

// Server-Sent Events with the bearer header (EventSource cannot send one): fetch + ReadableStream,
// frames parsed per the SSE rules (id/event/data/retry, comments), reconnecting with Last-Event-ID
// until an `end` event arrives or close() is called. onEvent(type, data, id) gets parsed JSON data.
export function watchJob(id, onEvent, { onError } = {}) {
  const ctrl = new AbortController();
  let lastId = null;
  let retry = 2000;
  let ended = false;
  (async () => {
    let failures = 0;
    while (!ended && !ctrl.signal.aborted) {
      try {
        const h = lastId ? { 'Last-Event-ID': lastId } : {};
        const r = await request(`/v1/jobs/${encodeURIComponent(id)}/events`, { raw: true, hdrs: h, signal: ctrl.signal });
        failures = 0;
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        let ev = { data: [], type: '', id: null };
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          const cut = buf.endsWith('\r') ? buf.length - 1 : buf.length; // a CR whose LF may come next
          const lines = buf.slice(0, cut).split(/\r\n|\n|\r/);
          buf = lines.pop() + buf.slice(cut); // the unfinished line
          for (const line of lines) {
            if (line === '') { // blank line: dispatch
              if (ev.id !== null) lastId = ev.id;
              if (ev.data.length) {
                let data;
                try { data = JSON.parse(ev.data.join('\n')); } catch { data = ev.data.join('\n'); }
                const type = ev.type || 'message';
                onEvent(type, data, lastId);
                if (type === 'end') { ended = true; ctrl.abort(); return; }
              }
              ev = { data: [], type: '', id: null };
              continue;
            }
            if (line.startsWith(':')) continue; // comment (keep-alive)
            const i = line.indexOf(':');
            const field = i < 0 ? line : line.slice(0, i);
            let val = i < 0 ? '' : line.slice(i + 1);
            if (val.startsWith(' ')) val = val.slice(1);
            if (field === 'data') ev.data.push(val);
            else if (field === 'event') ev.type = val;
            else if (field === 'id' && !val.includes('\0')) ev.id = val;
            else if (field === 'retry' && /^\d+$/.test(val)) retry = Number(val);
          }
        }
      } catch (e) {
        if (ctrl.signal.aborted) return;
        if (e instanceof ApiError && e.status < 500 && e.status !== 429) { onError?.(e); return; } // 401/404: give up
        failures += 1;
        onError?.(e);
      }
      await sleep(Math.min(retry * 2 ** Math.min(failures, 4), 30_000), ctrl.signal); // then resume at lastId
    }
  })();
  return { close: () => ctrl.abort() };
}
