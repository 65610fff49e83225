// /web/users (editors): invite, reset, lock and delete users.

import { del, enc, get, post } from '../api.js';
import { badge, busy, button, confirmDialog, copyField, emptyState, errorView, field, fmtTime, h, input, messageBox, modal, pageHeader, replace, spinner, table, timeCell, toast } from '../ui.js';

const STATUS_KIND = { active: 'ok', invited: 'warn', locked: 'danger' };

function mfaCell(v) {
  if (Array.isArray(v)) {
    if (!v.length) return h('span', { class: 'muted' }, 'none');
    return v.map((d) => (typeof d === 'object' ? d.name || d.type : d)).join(', ');
  }
  if (typeof v === 'number') return v ? (v === 1 ? '1 device' : `${v} devices`) : h('span', { class: 'muted' }, 'none');
  if (v === true) return 'yes';
  return h('span', { class: 'muted' }, 'none');
}

function splitList(s) {
  return s
    .split(/[,\s]+/)
    .map((x) => x.trim())
    .filter(Boolean);
}

function inviteResult(title, who, r) {
  return h(
    'div',
    { class: 'stack', testid: 'invite-result' },
    h('p', null, title, ' ', h('strong', null, who), '. Send them this link; it works once', r.invite_expires ? ` and expires ${fmtTime(r.invite_expires)}` : '', '.'),
    copyField(r.invite_url || '', 'invite-url'),
  );
}

export default async function render(el, ctx) {
  const me = ctx.session && ctx.session.user;
  const body = h('div', { class: 'card card-flush' }, spinner());
  const inviteBtn = button('Invite user', { kind: 'primary', testid: 'invite-user' });
  replace(el, pageHeader('Users', { subtitle: 'People who can sign in to this cluster.', actions: [inviteBtn] }), body);

  let roles = [];
  async function loadRoles() {
    try {
      roles = ((await get('/webapi/roles')).items || []).map((r) => r.name).sort();
    } catch {
      roles = [];
    }
  }

  async function load() {
    let data;
    try {
      data = await get('/webapi/users');
    } catch (e) {
      if (ctx.alive()) replace(body, errorView(e, load));
      return;
    }
    if (!ctx.alive()) return;
    const items = (data.items || []).slice().sort((a, b) => a.name.localeCompare(b.name));
    replace(
      body,
      table({
        testid: 'users-table',
        columns: [
          { title: 'Name', key: 'name', render: (u) => h('span', { class: 'strong' }, u.name, u.name === me ? h('span', { class: 'muted small' }, ' (you)') : null) },
          { title: 'Roles', key: 'roles', render: (u) => h('div', { class: 'chips' }, (u.roles || []).map((r) => h('span', { class: 'chip' }, r))) },
          { title: 'Status', key: 'status', class: 'nowrap', render: (u) => badge(u.status || 'unknown', STATUS_KIND[u.status] || 'neutral', 'user-status') },
          { title: 'MFA', key: 'mfa', class: 'nowrap', render: (u) => mfaCell(u.mfa_devices) },
          { title: 'Created', key: 'created', class: 'nowrap', render: (u) => timeCell(u.created) },
          {
            title: '',
            key: 'actions',
            class: 'actions',
            render: (u) =>
              h(
                'div',
                { class: 'btn-row' },
                button('Reset', { size: 'sm', testid: 'user-reset', title: 'New invitation link: sets a new password and second factor', onclick: () => reset(u) }),
                button('Lock', { size: 'sm', testid: 'user-lock', disabled: u.name === me, title: u.name === me ? 'You cannot lock yourself' : 'Stop this user from signing in or connecting', onclick: () => lock(u) }),
                button('Delete', { size: 'sm', kind: 'danger-ghost', testid: 'user-delete', disabled: u.name === me, title: u.name === me ? 'You cannot delete yourself' : 'Delete this user', onclick: () => remove(u) }),
              ),
          },
        ],
        rows: items,
        rowProps: (u) => ({ testid: 'user-row', dataset: { name: u.name } }),
        empty: emptyState('No users yet', 'Invite someone to get started.', 'users-empty'),
      }),
    );
  }

  function openInvite() {
    const err = messageBox('invite-form-error');
    const name = input({ required: true, autocomplete: 'off', autocapitalize: 'none', spellcheck: 'false', testid: 'invite-name', placeholder: 'alice' });
    const roleBox = h(
      'div',
      { class: 'checklist', role: 'group', 'aria-label': 'Roles', testid: 'invite-roles' },
      roles.length
        ? roles.map((r) => h('label', { class: 'check' }, h('input', { type: 'checkbox', value: r, testid: 'invite-role', dataset: { role: r } }), h('span', { class: 'mono' }, r)))
        : h('span', { class: 'muted' }, 'No roles defined yet.'),
    );
    const logins = input({ class: 'input mono', placeholder: 'alice, ubuntu', testid: 'invite-logins', autocomplete: 'off' });
    const submit = button('Create invitation', { kind: 'primary', type: 'submit', testid: 'invite-create' });
    const cancel = button('Cancel', { testid: 'invite-cancel' });
    const form = h(
      'form',
      { class: 'form', testid: 'invite-form', novalidate: true },
      field('Username', name),
      h('div', { class: 'field' }, h('span', { class: 'label' }, 'Roles'), roleBox),
      field('Logins (trait internal.logins)', logins, 'Comma-separated OS logins the roles may expand to.'),
      err,
    );
    const m = modal({ title: 'Invite user', body: form, actions: [cancel, submit], testid: 'invite-modal' });
    cancel.addEventListener('click', () => m.close());
    submit.addEventListener('click', () => form.requestSubmit());
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      err.clear();
      busy(submit, async () => {
        try {
          const n = name.value.trim();
          if (!n) throw new Error('Enter a username.');
          const chosen = [...roleBox.querySelectorAll('input:checked')].map((i) => i.value);
          if (!chosen.length) throw new Error('Choose at least one role.');
          const body = { name: n, roles: chosen, traits: {} };
          const l = splitList(logins.value);
          if (l.length) body.traits.logins = l;
          const r = await post('/webapi/users', body);
          replace(m.el.querySelector('.modal-body'), inviteResult('Invitation created for', r.name || n, r));
          replace(m.el.querySelector('.modal-actions'), button('Done', { kind: 'primary', testid: 'invite-done', onclick: () => m.close() }));
          load();
        } catch (e2) {
          err.set(e2.message);
        }
      });
    });
  }

  async function reset(u) {
    const ok = await confirmDialog(`Reset ${u.name}? Their password and second factors stop working and they get a new invitation link.`, { title: 'Reset user', confirm: 'Reset', danger: true });
    if (!ok) return;
    try {
      const r = await post(`/webapi/users/${enc(u.name)}/reset`, {});
      const m = modal({ title: 'User reset', body: inviteResult('New invitation for', u.name, r), testid: 'reset-modal', actions: [button('Done', { kind: 'primary', testid: 'reset-done', onclick: () => m.close() })] });
      load();
    } catch (e) {
      toast(e.message, 'error');
    }
  }

  function lock(u) {
    const err = messageBox('lock-error');
    const message = input({ placeholder: 'Why (shown to the user)', testid: 'lock-message', maxlength: '200' });
    const ttl = input({ class: 'input mono', placeholder: 'e.g. 1h, 12h, 7d — empty: until removed', list: 'lock-ttls', testid: 'lock-ttl' });
    const ttls = h('datalist', { id: 'lock-ttls' }, ['15m', '1h', '12h', '24h', '7d'].map((v) => h('option', { value: v })));
    const submit = button('Lock user', { kind: 'danger', type: 'submit', testid: 'lock-submit' });
    const cancel = button('Cancel', { testid: 'lock-cancel' });
    const form = h(
      'form',
      { class: 'form', testid: 'lock-form', novalidate: true },
      h('p', { class: 'muted' }, `${u.name} cannot sign in or open new connections while the lock holds; live sessions are closed.`),
      field('Message', message),
      field('Duration', ttl),
      ttls,
      err,
    );
    const m = modal({ title: `Lock ${u.name}`, body: form, actions: [cancel, submit], testid: 'lock-modal' });
    cancel.addEventListener('click', () => m.close());
    submit.addEventListener('click', () => form.requestSubmit());
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      err.clear();
      busy(submit, async () => {
        try {
          const body = { message: message.value.trim() };
          if (ttl.value.trim()) body.ttl = ttl.value.trim();
          await post(`/webapi/users/${enc(u.name)}/lock`, body);
          m.close();
          toast(`${u.name} is locked`);
          load();
        } catch (e2) {
          err.set(e2.message);
        }
      });
    });
  }

  async function remove(u) {
    const ok = await confirmDialog(`Delete the user ${u.name}? This cannot be undone; their certificates stop working when they expire, or at once if you lock them first.`, { title: 'Delete user', confirm: 'Delete' });
    if (!ok) return;
    try {
      await del(`/webapi/users/${enc(u.name)}`);
      toast(`Deleted ${u.name}`);
      load();
    } catch (e) {
      toast(e.message, 'error');
    }
  }

  inviteBtn.addEventListener('click', async () => {
    await busy(inviteBtn, loadRoles);
    openInvite();
  });
  await Promise.all([load(), loadRoles()]);
}
