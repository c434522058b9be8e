// #/compare?model=...&ids=a,b: finished jobs of one model side by side (one column per job).
import { getJob, listJobs } from './api.js';
import { fmtBytes, fmtDate, fmtPpl, fmtSeconds, gapPct, h, put } from './dom.js';

const DEFAULT_SHOWN = 6;

export function compareView(params) {
  const ctrl = new AbortController();
  const details = new Map(); // job id -> GET /v1/jobs/{id} (for total time and steps)
  const picker = h('fieldset', { class: 'picker' });
  const tableBox = h('div', { class: 'scroll', id: 'compare-box' });
  const msg = h('p', { class: 'muted', role: 'status' });
  const modelSel = h('select', { id: 'compare-model' });
  const node = h('section', { 'aria-labelledby': 'cmp-h' }, h('h1', { id: 'cmp-h' }, 'Compare finished jobs'),
    h('div', { class: 'field' }, h('label', { for: 'compare-model' }, 'Model'), modelSel), picker, msg, tableBox);
  let byModel = new Map();

  const selected = () => [...picker.querySelectorAll('input:checked')].map((c) => c.value);

  function remember(model, ids) { // shareable URL without re-rendering the view
    history.replaceState(null, '', `#/compare?model=${encodeURIComponent(model)}${ids ? `&ids=${ids.join(',')}` : ''}`);
  }

  function drawPicker(model, ids) {
    const jobs = byModel.get(model) ?? [];
    const want = new Set(ids ?? jobs.slice(0, DEFAULT_SHOWN).map((j) => j.id));
    put(picker, h('legend', {}, `Jobs of ${model} (newest first)`), jobs.map((j) => h('label', { class: 'check' },
      h('input', { type: 'checkbox', value: j.id, checked: want.has(j.id), onchange: () => { remember(model, selected()); drawTable(); } }),
      ` ${j.id.slice(0, 8)} · ${j.method} · ${j.scheme} · ${fmtDate(j.created_at)}`)));
  }

  async function drawTable() {
    const model = modelSel.value;
    const all = byModel.get(model) ?? [];
    const ids = selected();
    const jobs = all.filter((j) => ids.includes(j.id));
    if (!jobs.length) { put(tableBox, h('p', { class: 'muted' }, 'Pick at least one job.')); return; }
    msg.textContent = 'Loading…';
    await Promise.all(jobs.filter((j) => !details.has(j.id)).map(async (j) => {
      try { details.set(j.id, await getJob(j.id, ctrl.signal)); } catch { details.set(j.id, null); }
    }));
    if (ctrl.signal.aborted) return;
    msg.textContent = '';
    const best = Math.min(...jobs.map((j) => j.quant_ppl ?? Infinity));
    const d = (j) => details.get(j.id);
    const rows = [
      ['Method', (j) => j.method],
      ['Scheme', (j) => j.scheme],
      ['Group size', (j) => String(d(j)?.settings?._data?.weights?.group_size ?? '—')],
      ['Steps', (j) => (d(j)?.settings?._data?.rotation?.r1r2 === 'learned' ? String(d(j).settings._data.train.steps) : '—')],
      ['FP perplexity', (j) => fmtPpl(j.fp_ppl)],
      ['Quantized perplexity', (j) => (j.quant_ppl === best && jobs.length > 1 ? h('strong', {}, `${fmtPpl(j.quant_ppl)} (best)`) : fmtPpl(j.quant_ppl))],
      ['Gap', (j) => { const g = gapPct(j.fp_ppl, j.quant_ppl); return g === null ? '—' : `${g > 0 ? '+' : ''}${g}%`; }],
      ['Checkpoint size', (j) => fmtBytes(j.checkpoint_bytes)],
      ['Total time', (j) => fmtSeconds(d(j)?.report?.timings_s?.total)],
      ['Finished', (j) => fmtDate(j.finished_at)],
    ];
    put(tableBox, h('table', { class: 'compare', id: 'compare' },
      h('caption', { class: 'sr-only' }, `Finished jobs of ${model}, one column per job`),
      h('thead', {}, h('tr', {}, h('th', { scope: 'col' }, 'Job'),
        jobs.map((j) => h('th', { scope: 'col', 'data-job-id': j.id }, h('a', { href: `#/jobs/${j.id}` }, h('code', {}, j.id.slice(0, 8))))))),
      h('tbody', {}, rows.map(([label, f]) => h('tr', {}, h('th', { scope: 'row' }, label), jobs.map((j) => h('td', { class: 'num' }, f(j))))))));
  }

  (async () => {
    try {
      const { jobs } = await listJobs('succeeded', ctrl.signal);
      byModel = new Map();
      for (const j of jobs) byModel.set(j.model, [...(byModel.get(j.model) ?? []), j]);
      if (!byModel.size) { put(msg, 'No finished jobs yet. ', h('a', { href: '#/submit' }, 'Submit one.')); return; }
      const model = byModel.has(params.get('model')) ? params.get('model') : [...byModel.keys()][0];
      modelSel.replaceChildren(...[...byModel.keys()].map((m) => h('option', { value: m, selected: m === model }, `${m} (${byModel.get(m).length})`)));
      modelSel.addEventListener('change', () => { remember(modelSel.value, null); drawPicker(modelSel.value, null); drawTable(); });
      drawPicker(model, params.get('ids')?.split(',').filter(Boolean) ?? null);
      drawTable();
    } catch (e) {
      if (!ctrl.signal.aborted) msg.textContent = `Could not load jobs: ${e.message}`;
    }
  })();
  return { node, cleanup: () => ctrl.abort() };
}
