// /web/invite/<token>: choose a password, enrol a second factor, and you are signed in.

import { enc, get, post } from '../api.js';
import { signedIn } from '../app.js';
import { createCredential, describeWebAuthnError, webauthnSupported } from '../webauthn.js';
import { busy, button, field, h, input, messageBox, replace } from '../ui.js';
import { card } from './login.js';

export function qrImage(svg, testid = 'totp-qr') {
  // The server's SVG goes into an <img> as a data: URL, never into the DOM as markup.
  const bytes = new TextEncoder().encode(String(svg));
  let bin = '';
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  const b64 = btoa(bin);
  return h('img', { class: 'qr', src: 'data:image/svg+xml;base64,' + b64, alt: 'QR code for your authenticator app', width: '184', height: '184', testid });
}

export function formatSecret(secret) {
  return String(secret || '').replace(/(.{4})/g, '$1 ').trim();
}

export default async function render(el, ctx) {
  const token = ctx.params[0];
  let inv;
  try {
    inv = await get('/webapi/invites/' + enc(token), { auth: false });
  } catch (e) {
    replace(
      el,
      card(
        h('h1', { class: 'card-title' }, 'This invitation cannot be used'),
        h('div', { class: 'msg msg-error', role: 'alert', testid: 'invite-error' }, e.message),
        h('p', { class: 'muted' }, 'Invitations expire and work once. Ask an administrator for a new link.'),
      ),
    );
    return;
  }
  if (!ctx.alive()) return;

  const sf = String(inv.second_factor || 'off');
  const hasTotp = !!inv.totp_secret;
  const hasWebauthn = !!inv.webauthn;
  const optional = sf === 'off' || sf === 'optional';

  const methods = [];
  if (hasWebauthn) methods.push(['webauthn', 'Passkey or security key']);
  if (hasTotp) methods.push(['otp', 'Authenticator app']);
  if (optional && methods.length) methods.push(['none', 'Skip for now']);
  let method = methods.length ? (hasTotp && sf !== 'webauthn' ? 'otp' : methods[0][0]) : 'none';

  const err = messageBox('invite-error');
  const password = input({ type: 'password', autocomplete: 'new-password', required: true, testid: 'invite-password' });
  const confirm = input({ type: 'password', autocomplete: 'new-password', required: true, testid: 'invite-password-confirm' });
  const otp = input({ class: 'input mono otp', inputmode: 'numeric', autocomplete: 'one-time-code', maxlength: '10', placeholder: '123456', testid: 'invite-otp' });
  const deviceName = input({ value: 'passkey', maxlength: '64', testid: 'invite-device-name' });

  const totpPanel = hasTotp
    ? h(
        'div',
        { class: 'enrol', testid: 'invite-totp' },
        h('ol', { class: 'steps' }, h('li', null, 'Scan this code with an authenticator app (Google Authenticator, 1Password, Aegis…).'), h('li', null, 'Enter the 6-digit code it shows.')),
        h(
          'div',
          { class: 'qr-row' },
          inv.totp_qr_svg ? qrImage(inv.totp_qr_svg) : null,
          h('div', { class: 'secret-box' }, h('div', { class: 'hint' }, "Can't scan? Enter this key:"), h('code', { class: 'secret', testid: 'totp-secret' }, formatSecret(inv.totp_secret))),
        ),
        field('Code from the app', otp),
      )
    : null;
  const waPanel = hasWebauthn
    ? h(
        'div',
        { class: 'enrol', testid: 'invite-webauthn' },
        h('p', { class: 'muted' }, 'When you continue, your browser asks you to create a passkey or touch your security key.'),
        field('Name for this device', deviceName),
        webauthnSupported() ? null : h('div', { class: 'msg msg-warn' }, 'This browser cannot register passkeys. Use another browser or an authenticator app.'),
      )
    : null;

  const tabs = h('div', { class: 'segmented', role: 'tablist', testid: 'invite-methods' });
  const showMethod = () => {
    if (totpPanel) totpPanel.hidden = method !== 'otp';
    if (waPanel) waPanel.hidden = method !== 'webauthn';
    for (const b of tabs.children) b.setAttribute('aria-selected', String(b.dataset.method === method));
  };
  if (methods.length > 1) {
    for (const [k, label] of methods) {
      tabs.appendChild(
        h('button', { type: 'button', role: 'tab', dataset: { method: k }, testid: `invite-method-${k}`, onclick: () => ((method = k), showMethod()) }, label),
      );
    }
  }

  const submit = button('Create account and sign in', { kind: 'primary', type: 'submit', testid: 'invite-submit', class: 'btn-block' });
  const form = h(
    'form',
    { class: 'form', testid: 'invite-form', novalidate: true },
    field('Username', input({ value: inv.user, readonly: true, testid: 'invite-user', autocomplete: 'username' })),
    field('Password', password, 'A long passphrase is best. The cluster sets the minimum length (12 characters by default).'),
    field('Confirm password', confirm),
    methods.length ? h('h2', { class: 'section-title' }, 'Second factor') : null,
    methods.length > 1 ? tabs : null,
    totpPanel,
    waPanel,
    err,
    submit,
  );
  showMethod();

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    err.clear();
    busy(submit, async () => {
      try {
        if (!password.value) throw new Error('Choose a password.');
        if (password.value !== confirm.value) throw new Error('The two passwords do not match.');
        const body = { password: password.value };
        if (method === 'otp') {
          const code = otp.value.replace(/\s+/g, '');
          if (!code) throw new Error('Enter the code your authenticator app shows.');
          body.otp = code;
        } else if (method === 'webauthn') {
          try {
            body.webauthn = await createCredential(inv.webauthn);
          } catch (e2) {
            throw new Error(describeWebAuthnError(e2));
          }
          body.device_name = deviceName.value.trim() || 'passkey';
        }
        const answer = await post('/webapi/invites/' + enc(token), body, { auth: false });
        signedIn(answer, '/web/nodes');
      } catch (e2) {
        err.set(e2.message);
      }
    });
  });

  replace(
    el,
    card(
      h('h1', { class: 'card-title' }, 'Welcome to Wardgate'),
      h('p', { class: 'muted card-sub' }, 'Set up the account ', h('strong', { testid: 'invite-username' }, inv.user), '.'),
      form,
    ),
  );
  password.focus();
}
