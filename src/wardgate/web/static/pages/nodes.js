// /web/nodes: the servers this user may reach, with the logins allowed on each.

import { get, qs } from '../api.js';
import { badge, button, debounce, emptyState, errorView, h, input, labelChips, pageHeader, replace, spinner, table } from '../ui.js';

export function terminalUrl(params) {
  return '/web/terminal' + qs(params);
}

function connectMenu(node) {
  const logins = Array.isArray(node.logins) ? node.logins : [];
  if (!logins.length) {
    return h('button', { type: 'button', class: 'btn btn-secondary btn-sm', disabled: true, title: 'Your roles allow no login on this server', testid: 'connect' }, 'No logins');
  }
  const menu = h(
    'div',
    { class: 'menu menu-right', role: 'menu', testid: 'connect-menu' },
    h('div', { class: 'menu-label' }, 'Connect as'),
    logins.map((l) =>
      h(
        'a',
        {
          class: 'menu-item mono',
          role: 'menuitem',
          href: terminalUrl({ node: node.name, login: l }),
          target: '_blank',
          rel: 'noopener',
          testid: 'connect-login',
          dataset: { login: l, node: node.name },
        },
        l,
      ),
    ),
  );
  const det = h('details', { class: 'dropdown' }, h('summary', { class: 'btn btn-primary btn-sm', testid: 'connect', 'aria-haspopup': 'menu' }, 'Connect', h('span', { class: 'caret', 'aria-hidden': 'true' }, '▾')), menu);
  menu.addEventListener('click', (e) => {
    if (e.target.closest('a')) det.open = false;
  });
  // The table scrolls sideways and clips overflow: float the open menu above everything.
  det.addEventListener('toggle', () => {
    if (!det.open) return;
    const r = det.querySelector('summary').getBoundingClientRect();
    menu.style.position = 'fixed';
    menu.style.right = `${Math.max(8, window.innerWidth - r.right)}px`;
    menu.style.top = `${r.bottom + 6}px`;
    const mh = menu.getBoundingClientRect().height;
    if (r.bottom + 6 + mh > window.innerHeight - 8 && r.top - 6 - mh > 8) menu.style.top = `${r.top - 6 - mh}px`;
    const first = menu.querySelector('a');
    if (first) first.focus();
  });
  det.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && det.open) {
      det.open = false;
      det.querySelector('summary').focus();
    }
  });
  return det;
}

export default async function render(el, ctx) {
  const search = input({ type: 'search', placeholder: 'Search name, hostname or label', 'aria-label': 'Search servers', testid: 'nodes-search', value: ctx.query.get('search') || '' });
  const labels = input({ type: 'search', class: 'input mono', placeholder: 'env=prod,team=db', 'aria-label': 'Label filter (key=value, comma separated)', testid: 'nodes-labels', value: ctx.query.get('labels') || '' });
  const clearBtn = button('Clear', { size: 'sm', kind: 'ghost', testid: 'nodes-clear' });
  const count = h('span', { class: 'count', testid: 'nodes-count' });
  const body = h('div', { class: 'card card-flush' }, spinner());
  const refresh = button('Refresh', { size: 'sm', testid: 'nodes-refresh' });

  replace(
    el,
    pageHeader('Servers', { subtitle: 'SSH servers your roles let you reach. Connect opens a terminal in a new tab.', actions: [refresh] }),
    h(
      'div',
      { class: 'toolbar', testid: 'nodes-filters' },
      h('div', { class: 'toolbar-field grow' }, search),
      h('div', { class: 'toolbar-field' }, h('label', { class: 'toolbar-label', for: 'labels-filter' }, 'Labels'), Object.assign(labels, { id: 'labels-filter' })),
      clearBtn,
      count,
    ),
    body,
  );

  let seq = 0;
  const closeMenus = (e) => {
    for (const d of el.querySelectorAll('details.dropdown[open]')) if (!d.contains(e.target)) d.open = false;
  };
  document.addEventListener('click', closeMenus);
  const closeAll = () => {
    for (const d of el.querySelectorAll('details.dropdown[open]')) d.open = false;
  };
  window.addEventListener('resize', closeAll);
  document.addEventListener('scroll', closeAll, true);

  const addLabel = (k, v) => {
    const parts = labels.value
      .split(',')
      .map((s) => s.trim())
      .filter(Boolean);
    const kv = `${k}=${v}`;
    if (!parts.includes(kv)) parts.push(kv);
    labels.value = parts.join(',');
    load();
  };

  async function load() {
    const my = ++seq;
    const params = { search: search.value.trim(), labels: labels.value.replace(/\s+/g, '') };
    history.replaceState(null, '', location.pathname + qs(params));
    clearBtn.hidden = !params.search && !params.labels;
    let data;
    try {
      data = await get('/webapi/nodes' + qs(params));
    } catch (e) {
      if (my === seq) replace(body, errorView(e, load));
      return;
    }
    if (my !== seq || !ctx.alive()) return;
    const items = (data.items || []).slice().sort((a, b) => String(a.hostname || a.name).localeCompare(String(b.hostname || b.name)));
    const filtered = !!(params.search || params.labels);
    count.textContent = items.length === 1 ? '1 server' : `${items.length} servers`;
    replace(
      body,
      table({
        testid: 'nodes-table',
        columns: [
          { title: 'Name', key: 'name', render: (n) => h('span', { class: 'strong' }, n.name) },
          { title: 'Hostname', key: 'hostname', render: (n) => n.hostname || '—' },
          {
            title: 'Address',
            key: 'addr',
            class: 'nowrap',
            render: (n) =>
              h(
                'span',
                { class: 'inline' },
                n.addr ? h('span', { class: 'mono' }, n.addr) : n.tunnel ? null : h('span', { class: 'muted' }, '—'),
                n.tunnel ? h('span', { title: 'Reached through its reverse tunnel' }, badge(n.addr ? 'tunnel' : 'via tunnel', 'info')) : null,
                n.agentless ? h('span', { title: 'OpenSSH server without a Wardgate agent' }, badge('OpenSSH', 'neutral')) : null,
              ),
          },
          { title: 'Labels', key: 'labels', render: (n) => labelChips(n.labels, addLabel) },
          { title: '', key: 'connect', class: 'actions', render: connectMenu },
        ],
        rows: items,
        rowProps: (n) => ({ testid: 'node-row', dataset: { name: n.name } }),
        empty: filtered
          ? emptyState('No servers match these filters', 'Try a shorter search or remove a label.', 'nodes-empty')
          : emptyState('No servers you can reach yet', 'Servers appear here once they join the cluster and one of your roles allows a login on them.', 'nodes-empty'),
      }),
    );
  }

  const later = debounce(load, 250);
  search.addEventListener('input', later);
  labels.addEventListener('input', later);
  for (const inp of [search, labels]) {
    inp.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') {
        e.preventDefault();
        load();
      }
    });
  }
  clearBtn.addEventListener('click', () => {
    search.value = '';
    labels.value = '';
    load();
  });
  refresh.addEventListener('click', load);
  await load();
  search.focus();
  return () => {
    document.removeEventListener('click', closeMenus);
    window.removeEventListener('resize', closeAll);
    document.removeEventListener('scroll', closeAll, true);
  };
}
