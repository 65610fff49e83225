// /web/recordings: recorded sessions; each row opens the player.

import { get } from '../api.js';
import { button, emptyState, errorView, fmtDuration, h, input, pageHeader, replace, spinner, table, timeCell } from '../ui.js';

export default async function render(el, ctx) {
  const body = h('div', { class: 'card card-flush' }, spinner());
  const filter = input({ type: 'search', placeholder: 'Filter by user, server or login', 'aria-label': 'Filter recordings', testid: 'recordings-filter' });
  const refresh = button('Refresh', { size: 'sm', testid: 'recordings-refresh' });
  replace(
    el,
    pageHeader('Recordings', { subtitle: 'Interactive sessions recorded by the nodes. Play one back with seek and speed controls.', actions: [refresh] }),
    h('div', { class: 'toolbar' }, h('div', { class: 'toolbar-field grow' }, filter)),
    body,
  );
  let items = [];

  const draw = () => {
    const f = filter.value.trim().toLowerCase();
    const rows = f ? items.filter((r) => [r.user, r.login, r.server_hostname, r.server_id, r.sid].some((v) => String(v || '').toLowerCase().includes(f))) : items;
    replace(
      body,
      table({
        testid: 'recordings-table',
        columns: [
          { title: 'User', key: 'user', render: (r) => h('span', { class: 'strong' }, r.user) },
          { title: 'Server', key: 'server', render: (r) => r.server_hostname || r.server_id || '—' },
          { title: 'Login', key: 'login', render: (r) => h('span', { class: 'mono' }, r.login || '—') },
          { title: 'Started', key: 'time', class: 'nowrap', render: (r) => timeCell(r.time) },
          { title: 'Duration', key: 'duration', class: 'nowrap num', render: (r) => fmtDuration(r.duration) },
          {
            title: '',
            key: 'play',
            class: 'actions',
            render: (r) => h('a', { class: 'btn btn-secondary btn-sm', href: '/web/recordings/' + encodeURIComponent(r.sid), testid: 'play-recording', dataset: { sid: r.sid } }, '▶ Play'),
          },
        ],
        rows,
        rowProps: (r) => ({ testid: 'recording-row', dataset: { sid: r.sid } }),
        empty: f
          ? emptyState('No recordings match', 'Clear the filter to see them all.', 'recordings-empty')
          : emptyState('No recordings yet', 'Interactive sessions appear here once they end, when your roles record them.', 'recordings-empty'),
      }),
    );
  };

  async function load() {
    try {
      const data = await get('/webapi/recordings');
      if (!ctx.alive()) return;
      items = data.items || [];
      draw();
    } catch (e) {
      if (ctx.alive()) replace(body, errorView(e, load));
    }
  }
  filter.addEventListener('input', draw);
  refresh.addEventListener('click', load);
  await load();
}
