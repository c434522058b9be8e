// The rotation-learning loss curve as inline SVG: one point per step, axes labelled with min/max.
const NS = 'http://www.w3.org/2000/svg';
const W = 640;
const H = 240;
const PAD = { l: 64, r: 16, t: 16, b: 36 };

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (text !== undefined) el.textContent = text;
  return el;
}

const fmt = (v) => (Math.abs(v) >= 100 || v === 0 ? v.toPrecision(4) : v.toPrecision(3));

// points: [[step, loss], ...] in step order. Returns an <svg> with role=img, a title and a description.
export function lossChart(points, { total } = {}) {
  const svg = s('svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', role: 'img', 'aria-labelledby': 'loss-title loss-desc' });
  const ys = points.map((p) => p[1]);
  const last = points.at(-1);
  svg.append(s('title', { id: 'loss-title' }, 'Rotation-learning loss per step'),
    s('desc', { id: 'loss-desc' }, points.length
      ? `${points.length} steps; loss from ${fmt(ys[0])} to ${fmt(last[1])}, lowest ${fmt(Math.min(...ys))}.`
      : 'No learning steps yet.'));
  const x0 = PAD.l; const x1 = W - PAD.r; const y0 = H - PAD.b; const y1 = PAD.t;
  svg.append(s('line', { x1: x0, y1: y0, x2: x1, y2: y0, class: 'axis' }), s('line', { x1: x0, y1: y0, x2: x0, y2: y1, class: 'axis' }));
  svg.append(s('text', { x: (x0 + x1) / 2, y: H - 4, class: 'label', 'text-anchor': 'middle' }, 'step'));
  if (!points.length) return svg;
  const first = points[0][0];
  const lastStep = Math.max(total ?? 0, last[0]);
  let lo = Math.min(...ys); let hi = Math.max(...ys);
  if (hi - lo < 1e-12) { lo -= 0.5 * Math.abs(lo || 1); hi += 0.5 * Math.abs(hi || 1); }
  const sx = (st) => x0 + (lastStep === first ? 0.5 : (st - first) / (lastStep - first)) * (x1 - x0);
  const sy = (v) => y0 - ((v - lo) / (hi - lo)) * (y0 - y1);
  const d = points.map(([st, v], i) => `${i ? 'L' : 'M'}${sx(st).toFixed(1)},${sy(v).toFixed(1)}`).join(' ');
  svg.append(
    s('text', { x: x0 - 6, y: y1 + 4, class: 'label', 'text-anchor': 'end' }, fmt(hi)),
    s('text', { x: x0 - 6, y: y0, class: 'label', 'text-anchor': 'end' }, fmt(lo)),
    s('text', { x: x0, y: y0 + 16, class: 'label', 'text-anchor': 'middle' }, String(first)),
    s('text', { x: x1, y: y0 + 16, class: 'label', 'text-anchor': 'end' }, String(lastStep)),
    s('path', { d, class: 'line', 'data-points': points.length, fill: 'none' }));
  if (points.length <= 60) {
    for (const [st, v] of points) svg.append(s('circle', { cx: sx(st).toFixed(1), cy: sy(v).toFixed(1), r: 2.5, class: 'dot' }));
  }
  return svg;
}
