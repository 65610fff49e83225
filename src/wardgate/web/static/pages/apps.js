// /web/apps: the applications this user may open. Web apps open in a new tab at their own
// address (the app sends the browser back through /web/launch to start a session); TCP apps
// are reached through `ward proxy app`, so the page shows that command instead.

import { enc, get } from '../api.js';
import { badge, button, copyButton, debounce, emptyState, errorView, h, input, labelChips, pageHeader, replace, spinner, table } from '../ui.js';

export function tcpCommand(app) {
  return `ward proxy app ${app.name} --port 8080`;
}

// Only https:// addresses go into a link: the API builds them, but a link is not the place to
// find out it did not.
function safeLaunchUrl(url) {
  try {
    const u = new URL(url);
    return u.protocol === 'https:' ? u.href : '';
  } catch {
    return '';
  }
}

function openCell(app) {
  if (app.kind === 'tcp') {
    const cmd = tcpCommand(app);
    return h(
      'div',
      { class: 'inline app-tcp', testid: 'app-tcp-hint' },
      h('code', { class: 'mono', title: 'Run this, then point your client at 127.0.0.1:8080' }, cmd),
      copyButton(cmd, { testid: 'app-tcp-copy', title: 'Copy the command' }),
    );
  }
  const url = safeLaunchUrl(app.launch_url);
  if (!url) return h('span', { class: 'muted' }, '—');
  return h(
    'a',
    {
      class: 'btn btn-primary btn-sm',
      href: url,
      target: '_blank',
      rel: 'noopener noreferrer',
      testid: 'app-launch',
      dataset: { app: app.name },
      title: `Open ${app.name} in a new tab`,
    },
    'Launch',
  );
}

function matches(app, words, labels) {
  const own = app.labels || {};
  if (Object.entries(labels).some(([k, v]) => own[k] !== v)) return false;
  const haystack = [app.name, app.description, app.public_addr, ...Object.entries(own).map(([k, v]) => `${k}=${v}`)].join(' ').toLowerCase();
  return words.every((w) => haystack.includes(w));
}

export default async function render(el, ctx) {
  const cluster = (ctx.session && ctx.session.cluster_name) || '';
  const search = input({ type: 'search', placeholder: 'Search name, description, address or label=value', 'aria-label': 'Search applications', testid: 'apps-search', value: ctx.query.get('search') || '' });
  const count = h('span', { class: 'count', testid: 'apps-count' });
  const body = h('div', { class: 'card card-flush' }, spinner());
  const refresh = button('Refresh', { size: 'sm', testid: 'apps-refresh' });

  replace(
    el,
    pageHeader('Applications', { subtitle: 'Web apps and TCP services your roles let you open. Launch signs you in to the app in a new tab.', actions: [refresh] }),
    h('div', { class: 'toolbar', testid: 'apps-filters' }, h('div', { class: 'toolbar-field grow' }, search), count),
    body,
  );

  let items = null;
  let seq = 0;

  function show() {
    if (!items) return;
    const text = search.value.trim();
    history.replaceState(null, '', location.pathname + (text ? '?search=' + enc(text) : ''));
    // `key=value` words filter by label (exactly as typed); other words search the text.
    const labels = {};
    const words = [];
    for (const w of text.split(/\s+/).filter(Boolean)) {
      const i = w.indexOf('=');
      if (i > 0) labels[w.slice(0, i)] = w.slice(i + 1);
      else words.push(w.toLowerCase());
    }
    const rows = items.filter((a) => matches(a, words, labels));
    count.textContent = rows.length === 1 ? '1 application' : `${rows.length} applications`;
    replace(
      body,
      table({
        testid: 'apps-table',
        columns: [
          {
            title: 'Name',
            key: 'name',
            render: (a) =>
              h(
                'div',
                null,
                h('span', { class: 'inline' }, h('span', { class: 'strong' }, a.name), a.require_session_mfa ? h('span', { title: 'Asks for a second factor when you open it' }, badge('MFA', 'warn')) : null),
                a.description ? h('div', { class: 'muted app-desc', testid: 'app-description' }, a.description) : null,
              ),
          },
          { title: 'Type', key: 'kind', class: 'nowrap', render: (a) => badge(a.kind === 'tcp' ? 'TCP' : 'Web', a.kind === 'tcp' ? 'neutral' : 'info') },
          { title: 'Address', key: 'public_addr', class: 'nowrap', render: (a) => h('span', { class: 'mono', testid: 'app-addr' }, a.public_addr || '—') },
          {
            title: 'Labels',
            key: 'labels',
            render: (a) =>
              labelChips(a.labels, (k, v) => {
                const kv = `${k}=${v}`;
                if (!search.value.split(/\s+/).includes(kv)) search.value = (search.value.trim() + ' ' + kv).trim();
                show();
              }),
          },
          { title: '', key: 'open', class: 'actions', render: openCell },
        ],
        rows,
        rowProps: (a) => ({ testid: 'app-row', dataset: { name: a.name, kind: a.kind } }),
        empty: items.length
          ? emptyState('No applications match this search', 'Try fewer words or remove a label.', 'apps-empty')
          : emptyState('No applications you can open yet', 'Apps appear here once an app service publishes them and one of your roles allows them (app_labels).', 'apps-empty'),
      }),
    );
  }

  async function load() {
    const my = ++seq;
    let data;
    try {
      data = await get(`/webapi/sites/${enc(cluster)}/apps`);
    } catch (e) {
      if (my === seq && ctx.alive()) replace(body, errorView(e, load));
      return;
    }
    if (my !== seq || !ctx.alive()) return;
    items = Array.isArray(data.items) ? data.items : [];
    show();
  }

  const later = debounce(show, 150);
  search.addEventListener('input', later);
  search.addEventListener('keydown', (e) => {
    if (e.key === 'Enter') {
      e.preventDefault();
      show();
    }
  });
  refresh.addEventListener('click', load);
  await load();
  search.focus();
}
