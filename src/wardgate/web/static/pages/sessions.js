// /web/sessions: live sessions this user may see, with links to join them.

import { get } from '../api.js';
import { button, emptyState, errorView, fmtDuration, h, pageHeader, replace, spinner, table, timeCell } from '../ui.js';
import { terminalUrl } from './nodes.js';

export default async function render(el, ctx) {
  const body = h('div', { class: 'card card-flush' }, spinner());
  const refresh = button('Refresh', { size: 'sm', testid: 'sessions-refresh' });
  replace(el, pageHeader('Active sessions', { subtitle: 'Sessions running now. Join one to watch it live, or to work alongside when your roles allow.', actions: [refresh] }), body);

  const joinLink = (s, mode) =>
    h(
      'a',
      { class: `btn btn-sm ${mode === 'peer' ? 'btn-secondary' : 'btn-primary'}`, href: terminalUrl({ sid: s.sid, mode }), target: '_blank', rel: 'noopener', testid: `join-${mode}` },
      mode === 'peer' ? 'Join as peer' : 'Join as observer',
    );

  async function load() {
    let data;
    try {
      data = await get('/webapi/sessions/active');
    } catch (e) {
      if (ctx.alive()) replace(body, errorView(e, load));
      return;
    }
    if (!ctx.alive()) return;
    const items = data.items || [];
    replace(
      body,
      table({
        testid: 'sessions-table',
        columns: [
          { title: 'User', key: 'user', render: (s) => h('span', { class: 'strong' }, s.user) },
          { title: 'Login', key: 'login', render: (s) => h('span', { class: 'mono' }, s.login) },
          { title: 'Server', key: 'server', render: (s) => s.server_hostname || s.server_id || '—' },
          { title: 'Started', key: 'started', class: 'nowrap', render: (s) => timeCell(s.started) },
          { title: 'Running for', key: 'age', class: 'nowrap', render: (s) => fmtDuration((Date.now() - Date.parse(s.started)) / 1000) },
          { title: 'Session', key: 'sid', render: (s) => h('code', { class: 'sid', title: s.sid }, String(s.sid).slice(0, 8)) },
          { title: '', key: 'join', class: 'actions', render: (s) => h('div', { class: 'btn-row' }, joinLink(s, 'observer'), s.can_join ? joinLink(s, 'peer') : null) },
        ],
        rows: items,
        rowProps: (s) => ({ testid: 'session-row', dataset: { sid: s.sid } }),
        empty: emptyState('No active sessions', 'Sessions started from the web or with ward ssh show up here while they run.', 'sessions-empty'),
      }),
    );
  }

  refresh.addEventListener('click', load);
  await load();
  const timer = setInterval(() => document.visibilityState === 'visible' && load(), 10000);
  return () => clearInterval(timer);
}
