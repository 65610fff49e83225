// /web/roles: list roles, edit one as YAML, create and delete. A 400 with `line` highlights the
// offending line.

import { del, enc, get, post, put } from '../api.js';
import { busy, button, confirmDialog, emptyState, errorView, h, messageBox, pageHeader, replace, spinner, toast } from '../ui.js';

const TEMPLATE = `kind: role
version: v1
metadata:
  name: new-role
spec:
  allow:
    logins: ['{{internal.logins}}']
    node_labels:
      '*': '*'
  deny: {}
  options:
    max_session_ttl: 8h
`;

const LINE_PX = 20; // must match .code-editor line-height
const PAD_PX = 10; // and its padding-top

export default async function render(el, ctx) {
  const list = h('div', { class: 'role-list', testid: 'roles-list', role: 'listbox', 'aria-label': 'Roles' });
  const editorPane = h('div', { class: 'role-editor card' });
  const newBtn = button('New role', { kind: 'primary', testid: 'role-new' });
  replace(el, pageHeader('Roles', { subtitle: 'What users may reach and do. Roles are YAML documents, as with wardctl.', actions: [newBtn] }), h('div', { class: 'split' }, h('div', { class: 'card card-flush role-list-card' }, list), editorPane));

  let roles = [];
  let current = null; // {name, yaml} or {isNew: true}
  let dirty = false;

  // ------------------------------------------------------------------ editor
  const ta = h('textarea', { class: 'code-editor', spellcheck: 'false', autocapitalize: 'off', autocomplete: 'off', wrap: 'off', testid: 'role-yaml', 'aria-label': 'Role YAML' });
  const gutter = h('div', { class: 'gutter', 'aria-hidden': 'true' });
  const hl = h('div', { class: 'line-hl', hidden: true, testid: 'role-error-line' });
  const codeBox = h('div', { class: 'code-box' }, gutter, h('div', { class: 'code-area' }, hl, ta));
  const err = messageBox('role-error');
  const title = h('h2', { class: 'editor-title', testid: 'role-title' });
  const save = button('Save', { kind: 'primary', testid: 'role-save' });
  const revert = button('Revert', { testid: 'role-revert' });
  const remove = button('Delete', { kind: 'danger-ghost', testid: 'role-delete' });
  const status = h('span', { class: 'muted small', testid: 'role-status' });
  const editorUi = h('div', { class: 'editor' }, h('div', { class: 'editor-head' }, title, h('div', { class: 'spacer' }), status), codeBox, err, h('div', { class: 'editor-actions' }, save, revert, h('div', { class: 'spacer' }), remove));
  let errorLine = null;

  function drawGutter() {
    const n = ta.value.split('\n').length;
    if (gutter.childElementCount !== n || errorLine !== Number(gutter.dataset.err || 0)) {
      replace(gutter);
      for (let i = 1; i <= n; i++) gutter.appendChild(h('div', { class: i === errorLine ? 'ln err' : 'ln' }, String(i)));
      gutter.dataset.err = String(errorLine || 0);
    }
    gutter.scrollTop = ta.scrollTop;
    positionHl();
  }

  function positionHl() {
    if (!errorLine) {
      hl.hidden = true;
      return;
    }
    hl.hidden = false;
    hl.dataset.line = String(errorLine);
    hl.style.top = `${PAD_PX + (errorLine - 1) * LINE_PX - ta.scrollTop}px`;
  }

  function setError(e) {
    errorLine = e && e.line ? e.line : null;
    if (!e) {
      err.clear();
    } else {
      // The server may name the line itself ("role:7: ..."): say it once.
      const msg = errorLine ? String(e.message).replace(new RegExp(`^[\\w.-]+:${errorLine}:\\s*`), '') : e.message;
      err.set(errorLine ? `Line ${errorLine}: ${msg}` : msg);
      if (errorLine) {
        // Put the caret on the line and scroll to it.
        const lines = ta.value.split('\n');
        const start = lines.slice(0, errorLine - 1).reduce((a, l) => a + l.length + 1, 0);
        const line = lines[errorLine - 1] || '';
        ta.focus();
        ta.setSelectionRange(start, start + line.length);
        const want = (errorLine - 3) * LINE_PX;
        if (ta.scrollTop > want || ta.scrollTop + ta.clientHeight < want + 4 * LINE_PX) ta.scrollTop = Math.max(0, want);
      }
    }
    drawGutter();
  }

  function setDirty(d) {
    dirty = d;
    save.disabled = !d && !current.isNew;
    revert.disabled = !d;
    status.textContent = current.isNew ? 'New role — not saved yet' : d ? 'Unsaved changes' : '';
  }

  ta.addEventListener('input', () => {
    if (errorLine) {
      errorLine = null;
    }
    setDirty(true);
    drawGutter();
  });
  ta.addEventListener('scroll', () => {
    gutter.scrollTop = ta.scrollTop;
    positionHl();
  });
  ta.addEventListener('keydown', (e) => {
    if (e.key === 'Tab' && !e.shiftKey && !e.ctrlKey && !e.altKey && !e.metaKey) {
      // Two spaces instead of leaving the editor (YAML has no tabs).
      e.preventDefault();
      ta.setRangeText('  ', ta.selectionStart, ta.selectionEnd, 'end');
      ta.dispatchEvent(new Event('input'));
    }
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === 's') {
      e.preventDefault();
      save.click();
    }
  });

  function open(role) {
    current = role;
    ta.value = role.yaml;
    ta.scrollTop = 0;
    replace(title, role.isNew ? 'New role' : h('span', { class: 'mono' }, role.name));
    remove.hidden = !!role.isNew;
    setError(null);
    setDirty(false);
    replace(editorPane, editorUi);
    for (const b of list.querySelectorAll('.role-item')) b.setAttribute('aria-selected', String(!role.isNew && b.dataset.name === role.name));
    const q = new URLSearchParams(location.search);
    if (role.isNew) q.delete('role');
    else q.set('role', role.name);
    const s = q.toString();
    history.replaceState(null, '', location.pathname + (s ? '?' + s : ''));
  }

  async function guard() {
    if (!dirty) return true;
    return confirmDialog('Discard your unsaved changes to this role?', { title: 'Unsaved changes', confirm: 'Discard' });
  }

  save.addEventListener('click', () =>
    busy(save, async () => {
      setError(null);
      try {
        let r;
        if (current.isNew) r = await post('/webapi/roles', { yaml: ta.value });
        else r = await put('/webapi/roles/' + enc(current.name), { yaml: ta.value });
        toast(current.isNew ? `Created role ${r.name}` : `Saved role ${r.name}`);
        await loadList();
        const fresh = roles.find((x) => x.name === r.name) || r;
        open(fresh);
      } catch (e) {
        setError(e);
      }
    }),
  );
  revert.addEventListener('click', () => open(current));
  remove.addEventListener('click', async () => {
    if (!(await confirmDialog(`Delete the role ${current.name}? Users holding it lose what it grants.`, { title: 'Delete role', confirm: 'Delete' }))) return;
    try {
      await del('/webapi/roles/' + enc(current.name));
      toast(`Deleted role ${current.name}`);
      current = null;
      dirty = false;
      await loadList();
      if (roles.length) open(roles[0]);
      else replace(editorPane, emptyState('No roles', 'Create one with New role.', 'role-none'));
    } catch (e) {
      setError(e);
    }
  });
  newBtn.addEventListener('click', async () => {
    if (!(await guard())) return;
    open({ isNew: true, yaml: TEMPLATE });
    ta.focus();
  });

  // ------------------------------------------------------------------ list
  async function loadList() {
    const data = await get('/webapi/roles');
    roles = (data.items || []).slice().sort((a, b) => a.name.localeCompare(b.name));
    replace(
      list,
      roles.length
        ? roles.map((r) =>
            h(
              'button',
              {
                type: 'button',
                class: 'role-item',
                role: 'option',
                testid: 'role-item',
                dataset: { name: r.name },
                'aria-selected': String(!!current && !current.isNew && current.name === r.name),
                onclick: async () => {
                  if (current && !current.isNew && current.name === r.name) return;
                  if (await guard()) open(r);
                },
              },
              r.name,
            ),
          )
        : h('div', { class: 'muted pad' }, 'No roles yet.'),
    );
  }

  replace(editorPane, spinner());
  try {
    await loadList();
  } catch (e) {
    replace(editorPane, errorView(e));
    return;
  }
  if (!ctx.alive()) return;
  const want = ctx.query.get('role');
  const first = roles.find((r) => r.name === want) || roles[0];
  if (first) open(first);
  else replace(editorPane, emptyState('No roles yet', 'Create one with New role.', 'role-none'));

  const beforeUnload = (e) => {
    if (dirty) {
      e.preventDefault();
      e.returnValue = '';
    }
  };
  window.addEventListener('beforeunload', beforeUnload);
  return () => window.removeEventListener('beforeunload', beforeUnload);
}
