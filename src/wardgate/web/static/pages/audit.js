// /web/audit: search the audit log (newest first), page with the cursor, inspect one event.

import { get, qs } from '../api.js';
import { button, emptyState, errorView, field, h, input, pageHeader, replace, spinner, table, timeCell } from '../ui.js';

const EVENT_TYPES = [
  'session.*',
  'session.start',
  'session.end',
  'session.join',
  'session.leave',
  'session.upload',
  'exec',
  'scp',
  'sftp',
  'port',
  'user.*',
  'user.login',
  'user.create',
  'user.update',
  'user.delete',
  'user.password_change',
  'user.invite',
  'user.register',
  'user.locked',
  'mfa.add',
  'mfa.delete',
  'role.create',
  'role.update',
  'role.delete',
  'token.create',
  'token.delete',
  'join',
  'cert.create',
  'lock.create',
  'lock.delete',
  'resource.create',
  'resource.update',
  'resource.delete',
  'auth',
  'access.denied',
];

const RANGES = [
  ['1h', 'Last hour', 3600],
  ['24h', 'Last 24 hours', 86400],
  ['7d', 'Last 7 days', 7 * 86400],
  ['30d', 'Last 30 days', 30 * 86400],
  ['custom', 'Custom range…', 0],
];

const PAGE = 50;

function where(e) {
  const host = e.server_hostname || e.server_id || e.server_addr;
  if (e.login && host) return `${e.login}@${host}`;
  return host || '';
}

// One line a person can scan.
export function summary(e) {
  const t = String(e.event || '');
  const parts = [];
  const w = where(e);
  switch (t) {
    case 'user.login':
      parts.push(e.success === false ? `sign-in failed${e.error ? ': ' + e.error : ''}` : `signed in${e.method ? ' (' + e.method + ')' : ''}`);
      if (e.remote_addr) parts.push(`from ${e.remote_addr}`);
      break;
    case 'exec':
      parts.push(w ? w + ':' : '', e.command || '');
      break;
    case 'session.start':
    case 'session.end':
    case 'session.join':
    case 'session.leave':
      parts.push(w);
      if (e.session_type && e.session_type !== 'shell') parts.push(`(${e.session_type})`);
      if (e.participants) parts.push(`participants: ${[].concat(e.participants).join(', ')}`);
      if (e.mode) parts.push(`as ${e.mode}`);
      if (e.web || e.via === 'web' || e.origin === 'web') parts.push('from the web');
      break;
    default: {
      if (w) parts.push(w);
      for (const k of ['name', 'target', 'device', 'path', 'command', 'message', 'error']) {
        if (e[k] !== undefined && e[k] !== null && e[k] !== '' && typeof e[k] !== 'object') parts.push(k === 'error' ? `error: ${e[k]}` : String(e[k]));
      }
      if (!parts.length && e.remote_addr) parts.push(`from ${e.remote_addr}`);
    }
  }
  return parts.filter(Boolean).join(' ');
}

function codeBadge(code) {
  const c = String(code || '');
  const kind = c.endsWith('E') ? 'danger' : c.endsWith('W') ? 'warn' : 'ok';
  return h('span', { class: `badge badge-${kind} mono` }, c || '—');
}

function toLocalInput(d) {
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}T${p(d.getHours())}:${p(d.getMinutes())}`;
}

export default async function render(el, ctx) {
  const q = ctx.query;
  const range = h('select', { class: 'input', testid: 'audit-range' }, RANGES.map(([k, label]) => h('option', { value: k }, label)));
  range.value = q.get('range') || '24h';
  const from = input({ type: 'datetime-local', testid: 'audit-from' });
  const until = input({ type: 'datetime-local', testid: 'audit-until' });
  const now = new Date();
  from.value = toLocalInput(new Date(now.getTime() - 86400000));
  until.value = toLocalInput(now);
  const listId = 'audit-types';
  const type = input({ placeholder: 'e.g. session.*', list: listId, testid: 'audit-type', value: q.get('type') || '', autocomplete: 'off', spellcheck: 'false' });
  const types = h('datalist', { id: listId }, EVENT_TYPES.map((t) => h('option', { value: t })));
  const user = input({ placeholder: 'any user', testid: 'audit-user', value: q.get('user') || '', autocomplete: 'off', autocapitalize: 'none' });
  const apply = button('Search', { kind: 'primary', type: 'submit', testid: 'audit-search' });
  const custom = h('div', { class: 'filter-custom' }, field('From', from), field('Until', until));

  const form = h(
    'form',
    { class: 'filters', testid: 'audit-filters' },
    field('Time', range),
    custom,
    field('Event type', type),
    types,
    field('User', user),
    h('div', { class: 'field field-end' }, apply),
  );
  const body = h('div', { class: 'card card-flush' });
  const more = button('Load more', { testid: 'audit-more' });
  const footer = h('div', { class: 'load-more' }, more);
  const panel = h('aside', { class: 'drawer', testid: 'audit-detail', hidden: true, 'aria-label': 'Event details' });

  replace(el, pageHeader('Audit log', { subtitle: 'Everything that happened in the cluster, newest first.' }), form, body, footer, panel);

  const showCustom = () => (custom.hidden = range.value !== 'custom');
  showCustom();
  range.addEventListener('change', () => {
    showCustom();
    if (range.value !== 'custom') search();
  });

  let items = [];
  let cursor = '';
  let selected = null;
  let seq = 0;

  function params() {
    const p = { limit: PAGE };
    if (range.value === 'custom') {
      if (from.value) p.since = new Date(from.value).toISOString();
      if (until.value) p.until = new Date(until.value).toISOString();
    } else {
      const secs = RANGES.find(([k]) => k === range.value)[2];
      p.since = new Date(Date.now() - secs * 1000).toISOString();
    }
    const t = type.value
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean);
    if (t.length) p.type = t;
    if (user.value.trim()) p.user = user.value.trim();
    return p;
  }

  function openDetail(e, tr) {
    selected = e;
    for (const r of body.querySelectorAll('tr.selected')) r.classList.remove('selected');
    if (tr) tr.classList.add('selected');
    replace(
      panel,
      h(
        'div',
        { class: 'drawer-head' },
        h('div', null, h('div', { class: 'drawer-title' }, e.event || 'event'), h('div', { class: 'muted small' }, e.time || '')),
        h('button', { type: 'button', class: 'icon-btn', 'aria-label': 'Close', testid: 'audit-detail-close', onclick: closeDetail }, '×'),
      ),
      h('pre', { class: 'json', testid: 'audit-json' }, JSON.stringify(e, null, 2)),
    );
    panel.hidden = false;
  }
  function closeDetail() {
    panel.hidden = true;
    selected = null;
    for (const r of body.querySelectorAll('tr.selected')) r.classList.remove('selected');
  }
  const onKey = (e) => e.key === 'Escape' && !panel.hidden && closeDetail();
  document.addEventListener('keydown', onKey);

  function draw() {
    replace(
      body,
      table({
        testid: 'audit-table',
        columns: [
          { title: 'Time', key: 'time', class: 'nowrap', render: (e) => timeCell(e.time) },
          { title: 'Type', key: 'type', class: 'nowrap', render: (e) => h('span', { class: 'mono' }, e.event || '') },
          { title: 'Code', key: 'code', class: 'nowrap', render: (e) => codeBadge(e.code) },
          { title: 'User', key: 'user', render: (e) => e.user || h('span', { class: 'muted' }, '—') },
          { title: 'Summary', key: 'summary', class: 'summary', render: (e) => summary(e) },
        ],
        rows: items,
        rowProps: (e) => ({
          class: ['clickable', selected && selected.uid === e.uid && 'selected'],
          tabindex: '0',
          testid: 'audit-row',
          dataset: { event: e.event || '', uid: e.uid || '' },
          onclick: (ev) => openDetail(e, ev.currentTarget),
          onkeydown: (ev) => {
            if (ev.key === 'Enter' || ev.key === ' ') {
              ev.preventDefault();
              openDetail(e, ev.currentTarget);
            }
          },
        }),
        empty: emptyState('No events in this range', 'Widen the time range or clear the filters.', 'audit-empty'),
      }),
    );
    footer.hidden = !cursor;
  }

  async function search() {
    const my = ++seq;
    closeDetail();
    replace(body, spinner());
    footer.hidden = true;
    const p = params();
    history.replaceState(null, '', location.pathname + qs({ range: range.value, type: type.value.trim(), user: user.value.trim() }));
    try {
      const data = await get('/webapi/events' + qs(p));
      if (my !== seq || !ctx.alive()) return;
      items = data.items || [];
      cursor = data.cursor || '';
      draw();
    } catch (e) {
      if (my === seq && ctx.alive()) replace(body, errorView(e, search));
    }
  }

  async function loadMore() {
    const my = seq;
    more.disabled = true;
    try {
      const data = await get('/webapi/events' + qs({ ...params(), cursor }));
      if (my !== seq || !ctx.alive()) return;
      items = items.concat(data.items || []);
      cursor = data.cursor || '';
      draw();
    } catch (e) {
      footer.hidden = false;
      replace(footer, errorView(e), more);
    } finally {
      more.disabled = false;
    }
  }

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    search();
  });
  more.addEventListener('click', loadMore);
  await search();
  return () => document.removeEventListener('keydown', onKey);
}
