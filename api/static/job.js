// #/jobs/<id>: live progress, stage timeline, loss chart, evaluation, artifacts, serve snippet, settings.
import { ApiError, artifactText, cancelJob, getJob, saveArtifact, watchJob } from './api.js';
import { lossChart } from './chart.js';
import {
  ACTIVE, announce, badge, fmtBytes, fmtDate, fmtPpl, fmtSeconds, gapPct, h, progressBar, put, setProgress,
} from './dom.js';

const STAGES = ['load', 'evaluate_fp', 'prepare', 'learn', 'quantize', 'evaluate', 'export'];

export function jobView(id) {
  const ctrl = new AbortController();
  const points = new Map(); // learning step -> loss, from live progress events
  let job = null;
  let watcher = null;
  let serveFor = null; // the job whose serve.sh is shown
  let chartFrame = 0;

  const head = h('div');
  const liveBox = h('section', { 'aria-labelledby': 'live-h', hidden: true });
  const errorBox = h('div');
  const timeline = h('section', { 'aria-labelledby': 'timeline-h' });
  const chartBox = h('section', { 'aria-labelledby': 'loss-h' });
  const evalBox = h('section', { 'aria-labelledby': 'eval-h' });
  const artBox = h('section', { 'aria-labelledby': 'art-h' });
  const serveBox = h('section', { 'aria-labelledby': 'serve-h' });
  const settingsBox = h('section');
  const msg = h('p', { class: 'error', role: 'alert' });
  const node = h('article', { class: 'job', 'data-job-id': id }, head, msg, liveBox, errorBox,
    h('div', { class: 'grid' }, timeline, chartBox), evalBox, artBox, serveBox, settingsBox);

  // -- header, cancel (redrawn only when they change, so focus stays put) ------------------------
  const title = h('h1', {}, 'Job ', h('code', {}, id.slice(0, 8)));
  const statusEl = h('span', { id: 'job-status' });
  const actions = h('span', { class: 'actions' });
  const facts = h('div');
  head.append(h('div', { class: 'row' }, title, statusEl, actions), facts);
  let headSig = '';

  function drawHead() {
    const sig = JSON.stringify([job.status, job.cancel_requested, job.started_at, job.finished_at, job.attempts]);
    if (sig === headSig) return;
    headSig = sig;
    const canCancel = ACTIVE.has(job.status) && !job.cancel_requested;
    put(statusEl, badge(job.status));
    put(actions,
      canCancel ? h('button', { type: 'button', class: 'danger', id: 'cancel', onclick: onCancel }, 'Cancel job') : '',
      job.cancel_requested && ACTIVE.has(job.status) ? h('span', { class: 'muted' }, 'Cancel requested; stopping at the next step…') : '',
      job.status === 'succeeded' ? h('a', { href: `#/compare?model=${encodeURIComponent(job.model)}` }, 'Compare with other jobs of this model') : '');
    put(facts, h('p', { class: 'muted' }, 'id ', h('code', {}, id)), h('dl', { class: 'facts' }, [
      ['Model', job.model + (job.revision ? ` @ ${job.revision}` : '')], ['Method', job.method], ['Scheme', job.scheme],
      ['Formats', job.formats.join(', ')], ['Created', fmtDate(job.created_at)], ['Started', fmtDate(job.started_at)],
      ['Finished', fmtDate(job.finished_at)], ['Attempts', String(job.attempts)],
    ].map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]),
    job.reused_from ? [h('dt', {}, 'Reused from'), h('dd', {}, h('a', { href: `#/jobs/${job.reused_from}` }, job.reused_from))] : null));
  }

  async function onCancel(e) {
    if (!window.confirm(`Cancel job ${id.slice(0, 8)}? A running job stops at its next step; nothing is kept.`)) return;
    e.target.disabled = true;
    try {
      job = await cancelJob(id);
      announce(job.status === 'cancelled' ? 'Job cancelled' : 'Cancel requested');
      draw();
    } catch (ex) { msg.textContent = `Cancel failed: ${ex.message}`; e.target.disabled = false; }
  }

  // -- live progress ---------------------------------------------------------------------------
  function drawLive() {
    liveBox.hidden = !ACTIVE.has(job.status);
    if (liveBox.hidden) return;
    put(liveBox, h('h2', { id: 'live-h' }, 'Progress'),
      h('div', { class: 'live' }, progressBar(job.progress, 'job progress'),
        h('span', { id: 'live-stage' }, job.stage ? `stage ${job.stage}` : job.status),
        h('span', { id: 'live-eta', class: 'muted' }, job.eta_s ? `about ${fmtSeconds(job.eta_s)} left` : ''),
        h('span', { id: 'live-step', class: 'muted' }, job.step ? `step ${job.step}, loss ${job.loss?.toFixed(4) ?? '—'}` : '')));
  }

  function onEvent(type, data) {
    const learnStep = type === 'progress' && data.stage === 'learn' && data.step > 0 && typeof data.loss === 'number';
    if (learnStep) {
      points.set(data.step, data.loss);
      if (!chartFrame) chartFrame = requestAnimationFrame(() => { chartFrame = 0; drawChart(); });
    }
    if (!ACTIVE.has(job.status)) return; // replaying a finished job's events: only the loss points matter
    const $l = (sel) => liveBox.querySelector(sel) ?? {};
    if (type === 'progress') {
      setProgress(liveBox, data.progress);
      if (data.eta_s) $l('#live-eta').textContent = `about ${fmtSeconds(data.eta_s)} left`;
      if (learnStep) {
        $l('#live-step').textContent = `step ${data.step}${data.steps ? ` of ${data.steps}` : ''}, loss ${data.loss.toFixed(4)}`;
      } else if (data.stage === 'learn' && data.phase === 'prefit' && data.prefit_step > 0) {
        $l('#live-step').textContent = `R1 pre-fit step ${data.prefit_step} of ${data.prefit_steps}`;
      }
    } else if (type === 'stage' && STAGES.indexOf(data.stage) > STAGES.indexOf(job.stage)) { // not a replayed one
      $l('#live-stage').textContent = `stage ${data.stage}`;
      announce(`Stage ${data.stage}`);
      job.stage = data.stage;
      refresh(); // new timings; one request per stage change
    } else if (type === 'status' && data.status === 'running' && job.status === 'queued') {
      refresh();
    } else if (type === 'end') {
      announce(`Job ${data.status}`);
      refresh();
    }
  }

  // -- timeline --------------------------------------------------------------------------------
  function drawTimeline() {
    const t = job.timings ?? {};
    const names = [...STAGES.filter((s) => s in t), ...Object.keys(t).filter((s) => !STAGES.includes(s))];
    const longest = Math.max(1e-9, ...names.map((s) => t[s].seconds ?? 0), (performance.now() - fetchedAt) / 1000);
    const total = job.report?.timings_s?.total;
    put(timeline, h('h2', { id: 'timeline-h' }, 'Stages'),
      names.length ? h('ol', { class: 'timeline', id: 'timeline' }, names.map((s) => {
        const running = ACTIVE.has(job.status) && t[s].end === null && s === job.stage;
        const sec = running ? (t[s].seconds ?? 0) + (performance.now() - fetchedAt) / 1000 : t[s].seconds;
        const bar = h('span', { class: 'tbar' });
        bar.style.width = `${Math.max(1, ((sec ?? 0) / longest) * 100)}%`;
        return h('li', { 'data-stage': s }, h('span', { class: 'tname' }, s), h('span', { class: 'track' }, bar),
          h('span', { class: 'tsec' }, running ? `${fmtSeconds(sec)}…` : fmtSeconds(sec)));
      })) : h('p', { class: 'muted' }, job.status === 'queued' ? 'Waiting for a worker.' : 'No stages recorded.'),
      total ? h('p', { class: 'muted' }, `Total ${fmtSeconds(total)} (pipeline; queue time not included)`) : null);
  }

  // -- loss chart ------------------------------------------------------------------------------
  function drawChart() {
    const curve = job.report?.loss_curve;
    const pts = curve?.length ? curve.map((v, i) => [i + 1, v]) : [...points].sort((a, b) => a[0] - b[0]);
    const data = job.settings?._data ?? {};
    const learned = data.rotation?.r1r2 === 'learned';
    put(chartBox, h('h2', { id: 'loss-h' }, 'Rotation-learning loss'),
      pts.length ? h('figure', { id: 'loss-chart' }, lossChart(pts, { total: data.train?.steps }),
        h('figcaption', { class: 'muted' }, `${pts.length} step${pts.length === 1 ? '' : 's'}, last loss ${pts.at(-1)[1].toFixed(4)}`))
        : h('p', { class: 'muted' }, !learned ? `The ${job.method} preset learns no rotations.`
          : ACTIVE.has(job.status) ? 'No learning steps yet.' : 'No learning steps recorded.'));
  }

  // -- evaluation ------------------------------------------------------------------------------
  function drawEval() {
    const r = job.report;
    if (!r) { put(evalBox); return; }
    const gap = gapPct(r.fp_ppl, r.quant_ppl);
    const num = (v, key) => h('td', { class: 'num', 'data-key': key, 'data-value': String(v) }, fmtPpl(v));
    const rows = [h('tr', {}, h('th', { scope: 'row' }, 'Perplexity'), num(r.fp_ppl, 'fp_ppl'), num(r.quant_ppl, 'quant_ppl'),
      h('td', { class: 'num', 'data-key': 'gap' }, gap === null ? '—' : `${gap > 0 ? '+' : ''}${gap}%`))];
    const zs = r.zero_shot;
    for (const [task, fp] of Object.entries(zs?.fp?.tasks ?? zs?.quant?.tasks ?? {})) {
      const q = zs?.quant?.tasks?.[task];
      const f = zs?.fp?.tasks?.[task];
      const d = f && q ? ((q.value - f.value) * 100).toFixed(2) : null;
      rows.push(h('tr', {}, h('th', { scope: 'row' }, `${task} (${(f ?? q ?? fp).metric})`),
        h('td', { class: 'num' }, f ? f.value.toFixed(4) : '—'), h('td', { class: 'num' }, q ? q.value.toFixed(4) : '—'),
        h('td', { class: 'num' }, d === null ? '—' : `${d > 0 ? '+' : ''}${d} pts`)));
    }
    const ev = r.eval ?? {};
    put(evalBox, h('h2', { id: 'eval-h' }, 'Evaluation'),
      h('table', { class: 'eval', id: 'eval-table' },
        h('caption', {}, `Same text and windows for both (${ev.windows ?? '?'} windows × ${ev.seq_len ?? '?'} tokens${ev.source ? `, ${ev.source}` : ''}). Lower perplexity is better.`),
        h('thead', {}, h('tr', {}, ['Metric', 'Full precision', 'Quantized', 'Gap'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, rows)),
      r.serving?.vllm === true ? h('p', { class: 'muted' }, 'vLLM serves exactly what was evaluated.')
        : Array.isArray(r.serving?.vllm) ? h('p', { class: 'muted' }, `vLLM serves an approximation: ${r.serving.vllm.join('; ')}.`) : null);
  }

  // -- artifacts and serve snippet ----------------------------------------------------------------
  function drawArtifacts() {
    if (!job.artifacts.length) { put(artBox); return; }
    put(artBox, h('h2', { id: 'art-h' }, 'Artifacts'),
      h('table', { class: 'artifacts', id: 'artifacts' },
        h('thead', {}, h('tr', {}, ['File', 'Size', 'SHA-256', ''].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, job.artifacts.map((a) => h('tr', { 'data-name': a.name },
          h('td', {}, h('code', {}, a.name)), h('td', { class: 'num', title: `${a.bytes} bytes` }, fmtBytes(a.bytes)),
          h('td', {}, h('code', { class: 'sha' }, a.sha256)),
          h('td', {}, h('button', { type: 'button', 'aria-label': `Download ${a.name}`, onclick: async (e) => {
            e.target.disabled = true;
            e.target.textContent = 'Downloading…';
            try { await saveArtifact(a.url, a.name.replaceAll('/', '_')); e.target.textContent = 'Downloaded'; } catch (ex) {
              e.target.textContent = 'Download';
              msg.textContent = `Download of ${a.name} failed: ${ex.message}`;
            } finally { e.target.disabled = false; }
          } }, 'Download')))))));
  }

  async function drawServe() {
    if (job.status !== 'succeeded' || serveFor === job.id) { if (job.status !== 'succeeded') put(serveBox); return; }
    serveFor = job.id;
    const sh = job.artifacts.find((a) => a.name === 'model/serve.sh') ?? job.artifacts.find((a) => a.name.endsWith('/serve.sh'));
    const cmds = job.report?.serve_commands ?? {};
    let text = cmds.model ?? Object.values(cmds)[0] ?? null; // the report carries serve.sh's command
    if (!text && sh) {
      try { text = await artifactText(sh.url, ctrl.signal); } catch { /* keep the report's command */ }
    }
    put(serveBox, h('h2', { id: 'serve-h' }, 'Serve it'), (text
      ? [h('p', {}, `From the downloaded job folder${sh ? ` (${sh.name})` : ''}:`), h('pre', { id: 'serve' }, h('code', {}, text.trim()))]
      : [h('p', { class: 'muted' }, 'This job has no serve.sh artifact and its report names no serve command.')]));
  }

  function drawSettings() {
    put(settingsBox, h('details', { id: 'settings' }, h('summary', {}, h('h2', { class: 'inline' }, 'Settings')),
      h('pre', {}, JSON.stringify(job.settings?._data ?? job.settings, null, 2))));
  }

  function drawError() {
    const e = job.error;
    put(errorBox, e ? h('div', { class: `notice ${e.code === 'cancelled' ? '' : 'failed'}`, id: 'job-error', role: e.code === 'cancelled' ? 'status' : 'alert' },
      h('strong', {}, e.code), ': ', e.message) : '');
  }

  function draw() {
    const openSettings = settingsBox.querySelector('details')?.open;
    drawHead(); drawLive(); drawError(); drawTimeline(); drawChart(); drawEval(); drawArtifacts(); drawServe(); drawSettings();
    if (openSettings) settingsBox.querySelector('details').open = true;
  }

  let seq = 0;
  let fetchedAt = 0;
  let replayed = false;
  async function refresh() {
    const mine = ++seq;
    try {
      const fresh = await getJob(id, ctrl.signal);
      if (mine !== seq) return; // a later refresh is on its way
      job = fresh;
      fetchedAt = performance.now();
      msg.textContent = '';
      draw();
      // Active: follow the events live. Finished without a loss curve in a report (failed, cancelled):
      // replay its events once for the learning steps it got through.
      const replay = !ACTIVE.has(job.status) && !job.report?.loss_curve?.length && job.settings?._data?.rotation?.r1r2 === 'learned';
      if (!watcher && (ACTIVE.has(job.status) || (replay && !replayed))) {
        replayed = true;
        watcher = watchJob(id, onEvent, { onError: (e) => { if (e instanceof ApiError) msg.textContent = `Live updates: ${e.message}`; } });
      }
    } catch (e) {
      if (ctrl.signal.aborted) return;
      msg.textContent = e.status === 404 ? `No job ${id} for this token.` : `Could not load the job: ${e.message}`;
    }
  }

  refresh();
  const ticker = setInterval(() => { if (job && ACTIVE.has(job.status)) drawTimeline(); }, 1000); // running stage's clock
  return { node, cleanup: () => { ctrl.abort(); watcher?.close(); cancelAnimationFrame(chartFrame); clearInterval(ticker); } };
}
