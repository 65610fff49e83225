// DOM helpers. Everything that shows data goes through textContent: names, labels, YAML and
// audit events are rendered inert, never parsed as HTML.

/**
 * h('button', {class: 'btn', testid: 'save', onclick: fn, disabled: true}, 'Save')
 * Props: class, text, testid, style (object), dataset (object), on<event> (function),
 * boolean props (disabled, checked, ...) and any other attribute (setAttribute).
 */
export function h(tag, props, ...children) {
  const el = document.createElement(tag);
  if (props && (typeof props !== 'object' || props instanceof Node || Array.isArray(props))) {
    children.unshift(props);
    props = null;
  }
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') el.className = Array.isArray(v) ? v.filter(Boolean).join(' ') : v;
    else if (k === 'text') el.textContent = String(v);
    else if (k === 'testid') el.dataset.testid = v;
    else if (k === 'style' && typeof v === 'object') Object.assign(el.style, v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'value') el.value = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  clear(el);
  return append(el, children);
}

// ---------------------------------------------------------------- formatting

const pad = (n) => String(n).padStart(2, '0');

export function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return String(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

export function timeCell(iso) {
  return h('time', { datetime: iso || '', title: iso || '' }, fmtTime(iso));
}

export function fmtAgo(iso) {
  if (!iso) return '—';
  const t = new Date(iso).getTime();
  if (Number.isNaN(t)) return String(iso);
  const s = Math.round((Date.now() - t) / 1000);
  if (s < 0) return 'in ' + fmtDuration(-s);
  if (s < 45) return 'just now';
  return fmtDuration(s) + ' ago';
}

// seconds (number) -> "1h 02m", "3m 05s", "12s"
export function fmtDuration(sec) {
  if (sec === null || sec === undefined || sec === '') return '—';
  if (typeof sec === 'string' && !/^\d+(\.\d+)?$/.test(sec)) return sec; // already "1h2m"
  let s = Math.max(0, Math.round(Number(sec)));
  const d = Math.floor(s / 86400);
  s -= d * 86400;
  const hh = Math.floor(s / 3600);
  s -= hh * 3600;
  const mm = Math.floor(s / 60);
  s -= mm * 60;
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${pad(mm)}m`;
  if (mm) return `${mm}m ${pad(s)}s`;
  return `${s}s`;
}

// "30m", "1h30m", "90s", "1800" (seconds) or a number of seconds -> milliseconds
export function parseDurationMs(v) {
  if (v === null || v === undefined || v === '') return 0;
  if (typeof v === 'number') return v * 1000;
  const s = String(v).trim();
  if (/^\d+(\.\d+)?$/.test(s)) return Number(s) * 1000;
  const units = { ms: 1, s: 1000, m: 60000, h: 3600000, d: 86400000 };
  let total = 0;
  const re = /(\d+(?:\.\d+)?)(ms|s|m|h|d)/g;
  let m;
  while ((m = re.exec(s))) total += Number(m[1]) * units[m[2]];
  return total;
}

export function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many || one + 's'}`;
}

// ---------------------------------------------------------------- widgets

export function chip(text, props = {}) {
  return h('span', { class: ['chip', props.class], title: props.title || text, testid: props.testid }, text);
}

export function labelChips(labels, onClick) {
  const entries = Object.entries(labels || {}).sort(([a], [b]) => a.localeCompare(b));
  if (!entries.length) return h('span', { class: 'muted' }, '—');
  return h(
    'div',
    { class: 'chips' },
    entries.map(([k, v]) => {
      const text = `${k}=${v}`;
      if (!onClick) return chip(text, { testid: 'label-chip' });
      return h(
        'button',
        { type: 'button', class: 'chip chip-btn', title: `Filter by ${text}`, testid: 'label-chip', onclick: () => onClick(k, v) },
        text,
      );
    }),
  );
}

export function badge(text, kind = 'neutral', testid) {
  return h('span', { class: `badge badge-${kind}`, testid }, text);
}

export function button(label, props = {}) {
  const { kind = 'secondary', size, class: extra, ...rest } = props;
  return h('button', { type: 'button', ...rest, class: ['btn', `btn-${kind}`, size && `btn-${size}`, extra] }, label);
}

// Forms: a labelled field
export function field(labelText, input, hint) {
  const id = input.id || 'f-' + Math.random().toString(36).slice(2, 9);
  input.id = id;
  return h('div', { class: 'field' }, h('label', { for: id }, labelText), input, hint ? h('div', { class: 'hint' }, hint) : null);
}

export function input(props = {}) {
  return h('input', { class: 'input', type: 'text', ...props });
}

// An error (or notice) box that is empty until set.
export function messageBox(testid, kind = 'error') {
  const el = h('div', { class: `msg msg-${kind}`, role: kind === 'error' ? 'alert' : 'status', testid, hidden: true });
  el.set = (text, k) => {
    if (!text) {
      el.hidden = true;
      el.textContent = '';
      return;
    }
    if (k) el.className = `msg msg-${k}`;
    el.hidden = false;
    el.textContent = typeof text === 'string' ? text : text.message || String(text);
  };
  el.clear = () => el.set('');
  return el;
}

export function spinner(text = 'Loading…') {
  return h('div', { class: 'loading', testid: 'loading' }, h('span', { class: 'spin', 'aria-hidden': 'true' }), text);
}

export function emptyState(title, hint, testid = 'empty') {
  return h('div', { class: 'empty', testid }, h('div', { class: 'empty-title' }, title), hint ? h('div', { class: 'empty-hint' }, hint) : null);
}

/**
 * table({testid, columns: [{title, class, render(row) -> Node|string}], rows, empty, rowProps(row)})
 */
export function table({ testid, columns, rows, empty, rowProps }) {
  if (!rows.length && empty) return empty;
  const thead = h('thead', h('tr', columns.map((c) => h('th', { class: c.class, scope: 'col' }, c.title))));
  const tbody = h(
    'tbody',
    rows.map((r) => h('tr', rowProps ? rowProps(r) : {}, columns.map((c) => h('td', { class: c.class, 'data-col': c.key || undefined }, c.render(r))))),
  );
  return h('div', { class: 'table-wrap' }, h('table', { class: 'table', testid }, thead, tbody));
}

export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const ta = h('textarea', { style: { position: 'fixed', opacity: '0', top: '0' } });
    ta.value = text;
    document.body.appendChild(ta);
    ta.select();
    let ok = false;
    try {
      ok = document.execCommand('copy');
    } catch {
      ok = false;
    }
    ta.remove();
    return ok;
  }
}

export function copyButton(getText, props = {}) {
  const label = props.label || 'Copy';
  const b = button(label, { size: 'sm', testid: props.testid || 'copy', title: props.title || 'Copy to clipboard' });
  b.addEventListener('click', async () => {
    const ok = await copyText(typeof getText === 'function' ? getText() : getText);
    b.textContent = ok ? 'Copied' : 'Press Ctrl+C';
    setTimeout(() => (b.textContent = label), 1500);
  });
  return b;
}

// A read-only text box with a copy button (invite links, secrets).
export function copyField(text, testid) {
  const inp = h('input', { class: 'input mono', readonly: true, value: text, testid, 'aria-label': 'Link' });
  inp.addEventListener('focus', () => inp.select());
  return h('div', { class: 'copy-field' }, inp, copyButton(() => inp.value, { testid: testid ? testid + '-copy' : 'copy' }));
}

// ---------------------------------------------------------------- toasts

let toastRoot = null;
export function toast(text, kind = 'ok') {
  if (!toastRoot || !toastRoot.isConnected) {
    toastRoot = h('div', { class: 'toasts', 'aria-live': 'polite' });
    document.body.appendChild(toastRoot);
  }
  const t = h('div', { class: `toast toast-${kind}`, testid: 'toast' }, text);
  toastRoot.appendChild(t);
  setTimeout(() => t.classList.add('out'), 3200);
  setTimeout(() => t.remove(), 3600);
}

// ---------------------------------------------------------------- modals

/**
 * modal({title, body: Node, actions: [Node], testid, onClose, wide}) -> {el, close}
 * Escape and the backdrop close it; focus goes to the first input.
 */
export function modal({ title, body, actions = [], testid = 'modal', onClose, wide }) {
  const prevFocus = document.activeElement;
  let closed = false;
  const close = () => {
    if (closed) return;
    closed = true;
    document.removeEventListener('keydown', onKey, true);
    back.remove();
    if (prevFocus && prevFocus.focus) prevFocus.focus();
    if (onClose) onClose();
  };
  const onKey = (e) => {
    if (e.key === 'Escape') {
      e.stopPropagation();
      close();
    }
  };
  const titleId = 'm-' + Math.random().toString(36).slice(2, 8);
  const dialog = h(
    'div',
    { class: ['modal', wide && 'modal-wide'], role: 'dialog', 'aria-modal': 'true', 'aria-labelledby': titleId, testid },
    h(
      'div',
      { class: 'modal-head' },
      h('h2', { id: titleId }, title),
      h('button', { type: 'button', class: 'icon-btn', 'aria-label': 'Close', testid: 'modal-close', onclick: close }, '×'),
    ),
    h('div', { class: 'modal-body' }, body),
    actions.length ? h('div', { class: 'modal-actions' }, actions) : null,
  );
  const back = h('div', { class: 'modal-back' }, dialog);
  back.addEventListener('mousedown', (e) => {
    if (e.target === back) close();
  });
  document.addEventListener('keydown', onKey, true);
  document.body.appendChild(back);
  const first = dialog.querySelector('input:not([type=hidden]):not([readonly]), textarea, select, .modal-actions .btn-primary');
  setTimeout(() => (first || dialog).focus && (first || dialog).focus(), 0);
  return { el: dialog, close };
}

export function confirmDialog(message, { title = 'Are you sure?', confirm = 'Confirm', danger = true } = {}) {
  return new Promise((resolve) => {
    let answered = false;
    const yes = button(confirm, { kind: danger ? 'danger' : 'primary', testid: 'confirm-yes' });
    const no = button('Cancel', { testid: 'confirm-no' });
    const m = modal({
      title,
      body: h('p', { class: 'confirm-text' }, message),
      actions: [no, yes],
      testid: 'confirm',
      onClose: () => !answered && resolve(false),
    });
    yes.addEventListener('click', () => {
      answered = true;
      m.close();
      resolve(true);
    });
    no.addEventListener('click', () => m.close());
    setTimeout(() => yes.focus(), 0);
  });
}

// Busy state for a button while a promise runs.
export async function busy(btn, fn) {
  const old = btn.disabled;
  btn.disabled = true;
  btn.classList.add('is-busy');
  try {
    return await fn();
  } finally {
    btn.disabled = old;
    btn.classList.remove('is-busy');
  }
}

// ---------------------------------------------------------------- assets

const loaded = new Map();
export function loadScript(src) {
  if (!loaded.has(src)) {
    loaded.set(
      src,
      new Promise((resolve, reject) => {
        const s = document.createElement('script');
        s.src = src;
        s.async = false;
        s.onload = () => resolve();
        s.onerror = () => {
          loaded.delete(src);
          reject(new Error('could not load ' + src));
        };
        document.head.appendChild(s);
      }),
    );
  }
  return loaded.get(src);
}

export function loadCss(href) {
  if (!loaded.has(href)) {
    loaded.set(
      href,
      new Promise((resolve) => {
        const l = document.createElement('link');
        l.rel = 'stylesheet';
        l.href = href;
        l.onload = () => resolve();
        l.onerror = () => resolve();
        document.head.appendChild(l);
      }),
    );
  }
  return loaded.get(href);
}

export function debounce(fn, ms) {
  let t = null;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}

// Page header: title, optional subtitle and actions on the right.
export function pageHeader(title, { subtitle, actions = [], testid } = {}) {
  return h(
    'header',
    { class: 'page-head', testid },
    h('div', null, h('h1', null, title), subtitle ? h('p', { class: 'subtitle' }, subtitle) : null),
    actions.length ? h('div', { class: 'page-actions' }, actions) : null,
  );
}

export function errorView(err, retry) {
  return h(
    'div',
    { class: 'msg msg-error', role: 'alert', testid: 'page-error' },
    err && err.message ? err.message : String(err),
    retry ? h('span', null, ' ', button('Retry', { size: 'sm', onclick: retry })) : null,
  );
}
