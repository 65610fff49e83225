// /web/account: second-factor devices (list, add, remove) and the password.

import { del, enc, get, post, put } from '../api.js';
import { verifyWithExistingFactor } from '../mfa.js';
import { createCredential, describeWebAuthnError, webauthnSupported } from '../webauthn.js';
import { badge, busy, button, confirmDialog, emptyState, errorView, field, fmtAgo, h, input, messageBox, modal, pageHeader, replace, spinner, table, timeCell, toast } from '../ui.js';
import { formatSecret, qrImage } from './invite.js';

export default async function render(el, ctx) {
  const s = ctx.session || {};
  const devicesBody = h('div', null, spinner());
  const addBtn = button('Add device', { kind: 'primary', size: 'sm', testid: 'mfa-add' });

  const info = h(
    'dl',
    { class: 'facts', testid: 'account-info' },
    h('dt', null, 'User'),
    h('dd', { class: 'strong' }, s.user || ''),
    h('dt', null, 'Roles'),
    h('dd', null, h('div', { class: 'chips' }, (s.roles || []).map((r) => h('span', { class: 'chip' }, r)))),
    h('dt', null, 'Cluster'),
    h('dd', null, s.cluster_name || ''),
    h('dt', null, 'Session ends'),
    h('dd', null, s.expires ? h('span', { title: s.expires }, timeCell(s.expires), ' ', h('span', { class: 'muted' }, `(${fmtAgo(s.expires)})`)) : '—'),
  );

  const pwErr = messageBox('password-error');
  const pwOk = messageBox('password-ok', 'ok');
  const oldPw = input({ type: 'password', autocomplete: 'current-password', testid: 'password-old' });
  const newPw = input({ type: 'password', autocomplete: 'new-password', testid: 'password-new' });
  const confirmPw = input({ type: 'password', autocomplete: 'new-password', testid: 'password-confirm' });
  const pwSubmit = button('Change password', { kind: 'primary', type: 'submit', testid: 'password-submit' });
  const pwForm = h(
    'form',
    { class: 'form form-narrow', testid: 'password-form', novalidate: true },
    // for password managers: which account this password belongs to
    h('input', { type: 'text', name: 'username', autocomplete: 'username', value: s.user || '', hidden: true, readonly: true, tabindex: '-1', 'aria-hidden': 'true' }),
    field('Current password', oldPw), field('New password', newPw, 'The cluster sets the minimum length (12 characters by default).'), field('Confirm new password', confirmPw), pwErr, pwOk, h('div', null, pwSubmit));

  replace(
    el,
    pageHeader('Account', { subtitle: 'Your sign-in methods and password.' }),
    h('section', { class: 'card' }, h('h2', { class: 'card-h' }, 'Profile'), info),
    h('section', { class: 'card card-flush' }, h('div', { class: 'card-head' }, h('h2', { class: 'card-h' }, 'Second factors'), addBtn), devicesBody),
    h('section', { class: 'card' }, h('h2', { class: 'card-h' }, 'Password'), pwForm),
  );

  let devices = [];
  async function load() {
    try {
      devices = (await get('/webapi/mfa/devices')).items || [];
    } catch (e) {
      if (ctx.alive()) replace(devicesBody, errorView(e, load));
      return;
    }
    if (!ctx.alive()) return;
    replace(
      devicesBody,
      table({
        testid: 'mfa-table',
        columns: [
          { title: 'Name', key: 'name', render: (d) => h('span', { class: 'strong' }, d.name) },
          { title: 'Type', key: 'type', render: (d) => badge(d.type === 'totp' ? 'Authenticator app' : d.type === 'webauthn' ? 'Passkey / security key' : d.type, 'neutral') },
          { title: 'Added', key: 'added', class: 'nowrap', render: (d) => timeCell(d.added) },
          { title: 'Last used', key: 'last_used', class: 'nowrap', render: (d) => (d.last_used ? timeCell(d.last_used) : h('span', { class: 'muted' }, 'never')) },
          { title: '', key: 'remove', class: 'actions', render: (d) => button('Remove', { size: 'sm', kind: 'danger-ghost', testid: 'mfa-remove', onclick: () => removeDevice(d) }) },
        ],
        rows: devices,
        rowProps: (d) => ({ testid: 'mfa-row', dataset: { name: d.name } }),
        empty: emptyState('No second factors yet', 'Add an authenticator app or a passkey to protect your account.', 'mfa-empty'),
      }),
    );
  }

  async function removeDevice(d) {
    if (!(await confirmDialog(`Remove ${d.name}? You will no longer be able to sign in with it.`, { title: 'Remove device', confirm: 'Remove' }))) return;
    try {
      const factor = await verifyWithExistingFactor({ title: 'Confirm removal', reason: `Prove it is you before removing ${d.name}.` });
      if (factor === null) return;
      await del('/webapi/mfa/devices/' + enc(d.name), factor);
      toast(`Removed ${d.name}`);
      load();
    } catch (e) {
      toast(e.message, 'error');
    }
  }

  function addDevice() {
    const err = messageBox('mfa-add-error');
    let type = webauthnSupported() ? 'webauthn' : 'totp';
    const name = input({ value: '', placeholder: 'e.g. laptop, phone, yubikey', maxlength: '64', testid: 'mfa-add-name' });
    const seg = h(
      'div',
      { class: 'segmented', role: 'tablist', testid: 'mfa-add-type' },
      [
        ['webauthn', 'Passkey or security key'],
        ['totp', 'Authenticator app'],
      ].map(([k, label]) =>
        h(
          'button',
          {
            type: 'button',
            role: 'tab',
            dataset: { type: k },
            testid: `mfa-type-${k}`,
            'aria-selected': String(type === k),
            onclick: () => {
              type = k;
              for (const b of seg.children) b.setAttribute('aria-selected', String(b.dataset.type === k));
            },
          },
          label,
        ),
      ),
    );
    const next = button('Continue', { kind: 'primary', type: 'submit', testid: 'mfa-add-continue' });
    const cancel = button('Cancel', { testid: 'mfa-add-cancel' });
    const form = h('form', { class: 'form', testid: 'mfa-add-form', novalidate: true }, h('div', { class: 'field' }, h('span', { class: 'label' }, 'Type'), seg), field('Device name', name), err);
    const m = modal({ title: 'Add a second factor', body: form, actions: [cancel, next], testid: 'mfa-add-modal' });
    cancel.addEventListener('click', () => m.close());
    next.addEventListener('click', () => form.requestSubmit());
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      err.clear();
      busy(next, async () => {
        try {
          const n = name.value.trim() || (type === 'totp' ? 'authenticator' : 'passkey');
          if (devices.some((d) => d.name === n)) throw new Error(`You already have a device called ${n}. Choose another name.`);
          const factor = await verifyWithExistingFactor({ title: 'Verify with an existing device', reason: 'Before adding a new device, prove it is you with one you already have.' });
          if (factor === null) return;
          const begin = await post('/webapi/mfa/devices/begin', { type, name: n, ...factor });
          if (type === 'webauthn') {
            let att;
            try {
              att = await createCredential(begin.webauthn || begin);
            } catch (e2) {
              throw new Error(describeWebAuthnError(e2));
            }
            await post('/webapi/mfa/devices', { name: n, webauthn: att });
            m.close();
            toast(`Added ${n}`);
            load();
          } else {
            showTotp(m, n, begin);
          }
        } catch (e2) {
          err.set(e2.message);
        }
      });
    });
  }

  function showTotp(m, n, begin) {
    const err = messageBox('mfa-add-error');
    const code = input({ class: 'input mono otp', inputmode: 'numeric', autocomplete: 'one-time-code', maxlength: '10', placeholder: '123456', testid: 'mfa-add-otp' });
    const done = button('Add device', { kind: 'primary', type: 'submit', testid: 'mfa-add-submit' });
    const cancel = button('Cancel', { testid: 'mfa-add-cancel', onclick: () => m.close() });
    const form = h(
      'form',
      { class: 'form', testid: 'mfa-totp-form', novalidate: true },
      h('ol', { class: 'steps' }, h('li', null, 'Scan the code with your authenticator app.'), h('li', null, 'Enter the 6-digit code it shows.')),
      h('div', { class: 'qr-row' }, begin.totp_qr_svg ? qrImage(begin.totp_qr_svg) : null, h('div', { class: 'secret-box' }, h('div', { class: 'hint' }, "Can't scan? Enter this key:"), h('code', { class: 'secret', testid: 'totp-secret' }, formatSecret(begin.totp_secret)))),
      field('Code from the app', code),
      err,
    );
    replace(m.el.querySelector('.modal-body'), form);
    replace(m.el.querySelector('.modal-actions'), cancel, done);
    done.addEventListener('click', () => form.requestSubmit());
    code.focus();
    form.addEventListener('submit', (e) => {
      e.preventDefault();
      err.clear();
      busy(done, async () => {
        try {
          const c = code.value.replace(/\s+/g, '');
          if (!c) throw new Error('Enter the code your authenticator app shows.');
          await post('/webapi/mfa/devices', { name: n, otp: c });
          m.close();
          toast(`Added ${n}`);
          load();
        } catch (e2) {
          err.set(e2.message);
        }
      });
    });
  }

  pwForm.addEventListener('submit', (e) => {
    e.preventDefault();
    pwErr.clear();
    pwOk.clear();
    busy(pwSubmit, async () => {
      try {
        if (!oldPw.value) throw new Error('Enter your current password.');
        if (!newPw.value) throw new Error('Enter a new password.');
        if (newPw.value !== confirmPw.value) throw new Error('The new passwords do not match.');
        const factor = await verifyWithExistingFactor({ title: 'Confirm password change', reason: 'Prove it is you with your second factor.' });
        if (factor === null) return;
        await put('/webapi/password', { old_password: oldPw.value, new_password: newPw.value, ...factor });
        oldPw.value = newPw.value = confirmPw.value = '';
        pwOk.set('Password changed.');
      } catch (e2) {
        pwErr.set(e2.message);
      }
    });
  });

  addBtn.addEventListener('click', addDevice);
  await load();
}
