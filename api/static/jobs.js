// #/jobs: newest first, status filter, live progress from each active job's event stream.
import { listJobs, watchJob } from './api.js';
import { ACTIVE, STATUSES, announce, badge, fmtBytes, fmtDate, fmtPpl, h, progressBar, put, setProgress } from './dom.js';

const MAX_STREAMS = 4; // browsers allow 6 HTTP/1.1 connections per host; leave room for other requests
const REFRESH_MS = 15_000;
const RANK = { queued: 0, running: 1, succeeded: 2, failed: 2, cancelled: 2 };

export function jobsView(params) {
  const status = STATUSES.includes(params.get('status')) ? params.get('status') : '';
  const ctrl = new AbortController();
  const streams = new Map(); // job id -> watcher
  const live = new Map(); // job id -> {status, stage, progress} from events (ahead of the list)
  const rows = new Map(); // job id -> <tr>
  let reloadTimer = null;

  const filter = h('select', { id: 'status-filter', onchange: (e) => { location.hash = e.target.value ? `#/jobs?status=${e.target.value}` : '#/jobs'; } },
    h('option', { value: '' }, 'all'), STATUSES.map((s) => h('option', { value: s, selected: s === status }, s)));
  const tbody = h('tbody');
  const msg = h('p', { class: 'muted', id: 'jobs-message' });
  const submitted = params.get('submitted');
  const note = submitted ? h('p', { class: 'notice', role: 'status' }, 'Submitted job ', h('a', { href: `#/jobs/${submitted}` }, h('code', {}, submitted.slice(0, 8))), '.') : '';
  const node = h('section', { 'aria-labelledby': 'jobs-h' },
    h('div', { class: 'row' }, h('h1', { id: 'jobs-h' }, 'Jobs'),
      h('div', { class: 'filter' }, h('label', { for: 'status-filter' }, 'Status'), filter),
      h('a', { class: 'button', href: '#/submit' }, 'New job')),
    note,
    h('table', { class: 'jobs', id: 'jobs' },
      h('caption', { class: 'sr-only' }, 'Jobs, newest first'),
      h('thead', {}, h('tr', {}, ['Job', 'Created', 'Model', 'Method', 'Scheme', 'Status', 'Progress', 'FP → quantized ppl', 'Size']
        .map((t) => h('th', { scope: 'col' }, t)))),
      tbody),
    msg);

  const merged = (j) => {
    const l = live.get(j.id);
    if (!l) return j;
    const st = RANK[l.status] > RANK[j.status] ? l.status : j.status;
    return { ...j, status: st, stage: l.stage ?? j.stage, progress: Math.max(l.progress ?? 0, j.progress ?? 0) };
  };

  function row(j) {
    return h('tr', { 'data-job-id': j.id, class: j.id === submitted ? 'new' : null },
      h('td', {}, h('a', { href: `#/jobs/${j.id}`, 'aria-label': `job ${j.id}` }, h('code', {}, j.id.slice(0, 8)))),
      h('td', {}, h('time', { datetime: j.created_at }, fmtDate(j.created_at))),
      h('td', {}, j.model), h('td', {}, j.method), h('td', {}, j.scheme),
      h('td', { class: 'status' }, badge(j.status), j.error ? h('span', { class: 'muted' }, ` ${j.error.code}`) : null),
      h('td', { class: 'progress' }, progressBar(j.progress, `progress of job ${j.id.slice(0, 8)}`),
        h('span', { class: 'stage muted' }, ACTIVE.has(j.status) && j.stage ? ` ${j.stage}` : '')),
      h('td', { class: 'num' }, j.fp_ppl !== null ? `${fmtPpl(j.fp_ppl)} → ${fmtPpl(j.quant_ppl)}` : '—'),
      h('td', { class: 'num' }, j.checkpoint_bytes ? fmtBytes(j.checkpoint_bytes) : '—'));
  }

  function onEvent(id, type, data) {
    const l = live.get(id) ?? {};
    const tr = rows.get(id);
    if (type === 'status' || type === 'end') {
      l.status = data.status;
      if (data.status === 'succeeded') l.progress = 1;
      if (tr) {
        put(tr.querySelector('.status'), badge(data.status));
        if (data.status !== 'running') tr.querySelector('.stage').textContent = '';
      }
      if (type === 'end') {
        streams.get(id)?.close();
        streams.delete(id);
        announce(`Job ${id.slice(0, 8)} ${data.status}`);
        scheduleReload(); // fetch its perplexities and size, and start streams for jobs it let run
      }
    } else if (type === 'stage' && tr) {
      l.stage = data.stage;
      tr.querySelector('.stage').textContent = ` ${data.stage}`;
    } else if (type === 'progress') {
      l.progress = Math.max(l.progress ?? 0, data.progress ?? 0);
    }
    live.set(id, l);
    if (tr && l.progress !== undefined) setProgress(tr.querySelector('.progress'), l.progress);
  }

  function syncStreams(jobs) {
    const want = jobs.filter((j) => ACTIVE.has(j.status))
      .sort((a, b) => RANK[b.status] - RANK[a.status]).slice(0, MAX_STREAMS).map((j) => j.id);
    for (const [id, w] of streams) if (!want.includes(id)) { w.close(); streams.delete(id); }
    for (const id of want) {
      if (!streams.has(id)) streams.set(id, watchJob(id, (type, data) => onEvent(id, type, data)));
    }
  }

  async function load() {
    try {
      const { jobs } = await listJobs(status, ctrl.signal);
      const shown = jobs.map(merged);
      // Rebuild only rows that changed, in place, so keyboard focus survives the refresh.
      const next = shown.map((j) => {
        const sig = JSON.stringify([j.status, j.stage, j.progress, j.fp_ppl, j.quant_ppl, j.checkpoint_bytes, j.error?.code]);
        const old = rows.get(j.id);
        if (old?.dataset.sig === sig) return old;
        const tr = row(j);
        tr.dataset.sig = sig;
        return tr;
      });
      const cur = [...tbody.children];
      if (cur.length === next.length && cur.every((tr, i) => tr.dataset.jobId === next[i].dataset.jobId)) {
        cur.forEach((tr, i) => { if (tr !== next[i]) tr.replaceWith(next[i]); });
      } else {
        tbody.replaceChildren(...next);
      }
      rows.clear();
      next.forEach((tr) => rows.set(tr.dataset.jobId, tr));
      put(msg, shown.length ? '' : h('span', {}, status ? `No ${status} jobs. ` : 'No jobs yet. ', h('a', { href: '#/submit' }, 'Submit one.')));
      syncStreams(shown);
    } catch (e) {
      if (!ctrl.signal.aborted) msg.textContent = `Could not load jobs: ${e.message}`;
    }
  }

  function scheduleReload() {
    clearTimeout(reloadTimer);
    reloadTimer = setTimeout(load, 300);
  }

  load();
  const timer = setInterval(load, REFRESH_MS);
  return {
    node,
    cleanup: () => { clearInterval(timer); clearTimeout(reloadTimer); ctrl.abort(); streams.forEach((w) => w.close()); },
  };
}
