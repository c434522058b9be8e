// The dashboard's entry: sign-in, hash routes, and tidying up each view (streams, timers) on navigation.
import { request, setUnauthorizedHandler, token } from './api.js';
import { $, h } from './dom.js';
import { compareView } from './compare.js';
import { jobView } from './job.js';
import { jobsView } from './jobs.js';
import { submitView } from './submit.js';

const main = $('#main');
let cleanup = () => {};

function show(...nodes) {
  cleanup();
  cleanup = () => {};
  main.replaceChildren(...nodes);
}

// Move focus to the new view's heading so keyboard and screen-reader users land on it.
function focusHeading() {
  const h1 = main.querySelector('h1');
  if (h1) { h1.tabIndex = -1; h1.focus({ preventScroll: true }); }
}

function signInView(message) {
  const input = h('input', { id: 'token', name: 'token', type: 'password', autocomplete: 'off', required: true, spellcheck: false,
    'aria-describedby': 'token-help token-error' });
  const err = h('p', { id: 'token-error', class: 'error', role: 'alert' }, message ?? '');
  const form = h('form', { class: 'card signin', onsubmit: async (e) => {
    e.preventDefault();
    const t = input.value.trim();
    if (!t) { err.textContent = 'Enter a token.'; input.focus(); return; }
    token.set(t);
    try {
      await request('/v1/jobs?limit=1'); // checks the token
      route();
    } catch (ex) {
      token.clear();
      err.textContent = ex.status === 401 ? `That token was refused: ${ex.message}` : `Could not reach the API: ${ex.message}`;
      input.focus();
    }
  } },
  h('h1', {}, 'Sign in'),
  h('label', { for: 'token' }, 'API token'), input,
  h('p', { id: 'token-help', class: 'hint' }, 'A bearer token from: python -m api tokens create --name NAME. ',
    'It is kept in this tab only (sessionStorage) and sent as Authorization: Bearer.'),
  err, h('button', { type: 'submit' }, 'Sign in'));
  show(form);
  $('#nav').hidden = true;
  $('#signout').hidden = true;
  input.focus();
}

// A 401 while signed in (token revoked): back to the sign-in form. The form handles its own 401.
setUnauthorizedHandler((detail) => {
  if ($('#nav').hidden) return;
  token.clear();
  signInView(`Signed out: ${detail}`);
});

function route() {
  if (!token.get()) { signInView(); return; }
  $('#nav').hidden = false;
  $('#signout').hidden = false;
  const raw = location.hash.replace(/^#/, '') || '/jobs';
  const [path, query] = raw.split('?');
  const params = new URLSearchParams(query ?? '');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  for (const a of document.querySelectorAll('#nav a')) {
    a.toggleAttribute('aria-current', a.getAttribute('href') === `#/${parts[0]}`);
    if (a.hasAttribute('aria-current')) a.setAttribute('aria-current', 'page');
  }
  const view = parts[0] === 'jobs' && parts[1] ? jobView(parts[1])
    : parts[0] === 'submit' ? submitView()
      : parts[0] === 'compare' ? compareView(params)
        : jobsView(params);
  show(view.node);
  cleanup = view.cleanup ?? (() => {});
  focusHeading();
}

window.addEventListener('hashchange', () => { if (location.hash.startsWith('#/') || !location.hash) route(); });
$('#signout').addEventListener('click', () => { token.clear(); location.hash = '#/jobs'; signInView('Signed out.'); });
$('#skip').addEventListener('click', (e) => { e.preventDefault(); main.focus(); });
route();
