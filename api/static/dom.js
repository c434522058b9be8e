// Small DOM and formatting helpers: no innerHTML anywhere, so API strings are always text.
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k in el && !k.includes('-') && k !== 'list') el[k] = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  el.append(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

export const $ = (sel, root = document) => root.querySelector(sel);

export function announce(text) {
  const el = document.getElementById('announce');
  el.textContent = '';
  setTimeout(() => { el.textContent = text; }, 50);
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function fmtSeconds(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return '—';
  if (s < 1) return `${(s * 1000).toFixed(0)} ms`;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

export const fmtPpl = (x) => (x === null || x === undefined ? '—' : Number(x).toFixed(3));
export const fmtDate = (iso) => (iso ? new Date(iso).toLocaleString() : '—');
export const pct = (p) => Math.round((p ?? 0) * 100);
export const gapPct = (fp, q) => (fp && q ? ((q / fp - 1) * 100).toFixed(2) : null);
export const ACTIVE = new Set(['queued', 'running']);
export const STATUSES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];

export function badge(status) {
  return h('span', { class: `badge ${status}`, 'data-status': status }, status);
}

// A labelled progress bar (native <progress> is announced by screen readers) with its percentage.
export function progressBar(p, label) {
  const v = pct(p);
  return h('span', { class: 'bar' },
    h('progress', { max: 100, value: v, 'aria-label': label }), h('span', { class: 'pct' }, `${v}%`));
}

export function setProgress(container, p) {
  const v = pct(p);
  const bar = container.querySelector('progress');
  if (bar && Number(bar.value) <= v) { bar.value = v; container.querySelector('.pct').textContent = `${v}%`; }
}

// replaceChildren that takes nested arrays and skips null/undefined/false (like h()).
export function put(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}
