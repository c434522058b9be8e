// #/submit: the job form. Empty fields keep the preset's defaults; the API validates, and its 422
// messages are shown next to the field they name (detail[].loc, e.g. ["body", "settings", "w_bits"]).
import { ApiError, submitJob, uploadText } from './api.js';
import { announce, h, put } from './dom.js';

const METHODS = ['spinquant', 'spinquant-vllm', 'quarot', 'gptq', 'rtn'];
const NUMBERS = [ // [setting, label, hint]
  ['w_bits', 'Weight bits', '4, 8 or 16 (16 = not quantized)'],
  ['a_bits', 'Activation bits', '16 = not quantized'],
  ['kv_bits', 'KV-cache bits', '16 = not quantized'],
  ['w_group_size', 'Weight group size', '-1 = per output channel'],
  ['steps', 'Learning steps', 'rotation-learning steps (learned presets)'],
  ['seed', 'Seed', ''],
  ['seq_len', 'Sequence length', 'tokens per calibration and evaluation window'],
];

function field(name, label, input, hint) {
  input.id = `f-${name}`;
  input.name = name;
  const err = h('p', { class: 'error field-error', id: `e-${name}`, 'data-error-for': name });
  input.setAttribute('aria-describedby', `${hint ? `h-${name} ` : ''}e-${name}`);
  return h('div', { class: 'field', 'data-field': name }, h('label', { for: input.id }, label), input,
    hint ? h('p', { class: 'hint', id: `h-${name}` }, hint) : null, err);
}

function dataFieldset(name, legend) {
  return h('fieldset', { 'data-field': name }, h('legend', {}, legend),
    field(`${name}-dataset`, 'datasets name', h('input', { type: 'text', placeholder: 'wikitext2', autocomplete: 'off' }), 'e.g. wikitext2 or name:config; empty = the preset default'),
    field(`${name}-file`, 'or upload a text file', h('input', { type: 'file', accept: '.txt,text/plain' }), 'UTF-8 plain text; used instead of the datasets name'),
    h('p', { class: 'error field-error', id: `e-${name}`, 'data-error-for': name }));
}

export function submitView() {
  const summary = h('div', { class: 'error', role: 'alert', id: 'form-errors', tabIndex: -1 });
  const submitBtn = h('button', { type: 'submit', id: 'submit' }, 'Submit job');
  const form = h('form', { id: 'job-form', novalidate: true, onsubmit: onSubmit },
    h('h1', {}, 'New quantization job'),
    field('model', 'Model', h('input', { type: 'text', required: true, placeholder: 'org/name or local:<name>', autocomplete: 'off' }),
      "Hugging Face id, or local:<name> from the server's models directory"),
    field('method', 'Method preset', h('select', {}, METHODS.map((m) => h('option', { value: m }, m))), ''),
    h('fieldset', { class: 'numbers' }, h('legend', {}, 'Settings (empty = preset default)'),
      NUMBERS.map(([n, l, hint]) => field(n, l, h('input', { type: 'number', inputmode: 'numeric', step: 1 }), hint))),
    dataFieldset('calib', 'Calibration data'),
    dataFieldset('eval', 'Evaluation data'),
    h('fieldset', { 'data-field': 'formats' }, h('legend', {}, 'Formats'),
      h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'formats', value: 'ct', checked: true, id: 'f-formats-ct' }), ' compressed-tensors (vLLM)'),
      h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'formats', value: 'gptq', id: 'f-formats-gptq' }), ' GPTQ v1 (W4A16 only)'),
      h('p', { class: 'error field-error', id: 'e-formats', 'data-error-for': 'formats' })),
    h('details', {}, h('summary', {}, 'More settings'),
      field('extra', 'Other settings (JSON object)', h('textarea', { rows: 3, spellcheck: false, placeholder: '{"calib_samples": 64, "weights.gptq.damp": 0.02}' }),
        'any config field by flat or dotted name; merged over the fields above'),
      h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'force', id: 'f-force' }), ' rebuild even if an identical finished job exists')),
    summary, submitBtn);
  const $f = (n) => form.querySelector(`#f-${n}`);

  function showErrors(list) {
    const unplaced = [];
    for (const { loc = [], msg } of list) {
      const path = loc[0] === 'body' ? loc.slice(1) : loc;
      let key = path[0] === 'settings' && path.length > 1 ? String(path[1]) : String(path[0] ?? '');
      if (path[0] === 'settings' && !form.querySelector(`[data-error-for="${CSS.escape(key)}"]`)) key = 'extra';
      const slot = form.querySelector(`[data-error-for="${CSS.escape(key)}"]`);
      if (slot) {
        slot.textContent = msg;
        const input = $f(key);
        input?.setAttribute('aria-invalid', 'true');
      } else unplaced.push(`${loc.join('.')}: ${msg}`);
    }
    put(summary, list.length ? h('p', {}, `The API refused the job (${list.length} problem${list.length > 1 ? 's' : ''}).`) : '',
      unplaced.length ? h('ul', {}, unplaced.map((t) => h('li', {}, t))) : '');
    const first = form.querySelector('[aria-invalid="true"]');
    (first ?? summary).focus?.();
  }

  async function dataRef(name) {
    const file = $f(`${name}-file`).files[0];
    if (file) {
      try { return { text_id: (await uploadText(file)).id }; } catch (e) {
        throw new ApiError(e.status, [{ loc: [`${name}-file`], msg: `upload failed: ${e.message}` }]);
      }
    }
    const ds = $f(`${name}-dataset`).value.trim();
    return ds ? { dataset: ds } : undefined;
  }

  async function onSubmit(e) {
    e.preventDefault();
    for (const el of form.querySelectorAll('.field-error')) el.textContent = '';
    for (const el of form.querySelectorAll('[aria-invalid]')) el.removeAttribute('aria-invalid');
    put(summary);
    const settings = {};
    const extra = $f('extra').value.trim();
    try {
      if (extra) {
        const obj = JSON.parse(extra);
        if (typeof obj !== 'object' || Array.isArray(obj) || obj === null) throw new Error('not an object');
        Object.assign(settings, obj);
      }
    } catch (ex) { showErrors([{ loc: ['extra'], msg: `not a JSON object: ${ex.message}` }]); return; }
    for (const [n] of NUMBERS) {
      const v = $f(n).value.trim();
      if (v !== '') settings[n] = Number(v);
    }
    submitBtn.disabled = true;
    submitBtn.textContent = 'Submitting…';
    try {
      const body = { model: $f('model').value.trim(), method: $f('method').value, settings,
        formats: [...form.querySelectorAll('input[name=formats]:checked')].map((c) => c.value), force: $f('force').checked };
      const calib = await dataRef('calib');
      const evals = await dataRef('eval');
      if (calib) body.calib = calib;
      if (evals) body.eval = evals;
      const res = await submitJob(body);
      announce(res.cache_hit ? `Reused finished job ${res.reused_from}` : `Job ${res.id} submitted`);
      location.hash = `#/jobs?submitted=${res.id}`;
    } catch (ex) {
      showErrors(ex instanceof ApiError && Array.isArray(ex.detail) ? ex.detail : [{ loc: [], msg: ex.message }]);
    } finally {
      submitBtn.disabled = false;
      submitBtn.textContent = 'Submit job';
    }
  }

  return { node: form };
}
