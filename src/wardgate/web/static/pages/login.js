// /web/login: password + the cluster's second factor, or a passkey alone.

import { get, getToken, ping, post } from '../api.js';
import { safeNext, signedIn } from '../app.js';
import { describeWebAuthnError, getAssertion, webauthnSupported } from '../webauthn.js';
import { busy, button, field, h, input, messageBox, replace } from '../ui.js';

export default async function render(el, ctx) {
  const next = ctx.query.get('next') || '';
  const reason = ctx.query.get('reason') || '';

  // Already signed in (a valid token in this browser)? Go straight on.
  if (getToken()) {
    try {
      await get('/webapi/sessions/web', { noRedirect: true });
      if (ctx.alive()) ctx.navigate(safeNext(next), { replace: true });
      return;
    } catch {
      /* not valid: sign in */
    }
  }

  let info;
  try {
    info = await ping();
  } catch (e) {
    replace(el, card(h('div', { class: 'msg msg-error', role: 'alert', testid: 'login-error' }, e.message)));
    return;
  }
  if (!ctx.alive()) return;
  const auth = info.auth || {};
  const sf = String(auth.second_factor || 'off');
  const wantOtp = sf === 'otp' || sf === 'on' || sf === 'optional';
  const wantWebauthn = sf === 'webauthn' || sf === 'on' || sf === 'optional';
  const otpRequired = sf === 'otp';

  const err = messageBox('login-error');
  const notice = messageBox('login-notice', 'info');
  if (reason === 'expired') notice.set('Your session ended. Sign in again to continue.');

  const user = input({ name: 'username', autocomplete: 'username', required: true, autocapitalize: 'none', spellcheck: 'false', testid: 'login-username' });
  const password = input({ name: 'password', type: 'password', autocomplete: 'current-password', required: true, testid: 'login-password' });
  const otp = wantOtp
    ? input({
        name: 'otp',
        class: 'input mono otp',
        inputmode: 'numeric',
        autocomplete: 'one-time-code',
        maxlength: '10',
        placeholder: '123456',
        required: otpRequired,
        testid: 'login-otp',
      })
    : null;

  const submit = button(sf === 'webauthn' ? 'Continue with security key' : 'Sign in', { kind: 'primary', type: 'submit', testid: 'login-submit', class: 'btn-block' });
  const keyBtn =
    sf === 'on' || sf === 'optional'
      ? button('Sign in with a security key instead', { testid: 'login-webauthn', class: 'btn-block' })
      : null;

  const form = h(
    'form',
    { class: 'form', testid: 'login-form', novalidate: true },
    field('Username', user),
    field('Password', password),
    otp ? field(sf === 'otp' ? 'Authenticator code' : 'Authenticator code (or use a security key)', otp, sf === 'otp' ? 'The 6-digit code from your authenticator app.' : null) : null,
    submit,
    keyBtn,
  );

  const credentials = () => {
    const u = user.value.trim();
    if (!u) throw new Error('Enter your username.');
    if (!password.value) throw new Error('Enter your password.');
    return { user: u, password: password.value };
  };

  const finish = (answer) => signedIn(answer, next);

  async function withWebauthn() {
    const body = credentials();
    const begin = await post('/webapi/mfa/login/begin', body, { auth: false });
    let assertion;
    try {
      assertion = await getAssertion(begin.webauthn || begin);
    } catch (e) {
      throw new Error(describeWebAuthnError(e));
    }
    return post('/webapi/sessions/web', { ...body, webauthn: assertion }, { auth: false });
  }

  form.addEventListener('submit', (e) => {
    e.preventDefault();
    err.clear();
    busy(submit, async () => {
      try {
        let answer;
        if (sf === 'webauthn') {
          answer = await withWebauthn();
        } else {
          const body = credentials();
          if (otp) {
            const code = otp.value.replace(/\s+/g, '');
            if (!code && otpRequired) throw new Error('Enter the code from your authenticator app.');
            if (!code && sf === 'on') throw new Error('Enter the code from your authenticator app, or sign in with a security key.');
            if (code) body.otp = code;
          }
          answer = await post('/webapi/sessions/web', body, { auth: false });
        }
        finish(answer);
      } catch (e2) {
        err.set(e2.message);
        if (otp) otp.value = '';
      }
    });
  });

  if (keyBtn) {
    keyBtn.addEventListener('click', () => {
      err.clear();
      busy(keyBtn, async () => {
        try {
          finish(await withWebauthn());
        } catch (e2) {
          err.set(e2.message);
        }
      });
    });
  }

  let passwordless = null;
  if (auth.passwordless) {
    const pl = button('Sign in with a passkey', { testid: 'login-passkey', class: 'btn-block btn-passkey' });
    pl.addEventListener('click', () => {
      err.clear();
      busy(pl, async () => {
        try {
          const begin = await post('/webapi/mfa/login/begin', { passwordless: true }, { auth: false });
          let assertion;
          try {
            assertion = await getAssertion(begin.webauthn || begin);
          } catch (e2) {
            throw new Error(describeWebAuthnError(e2));
          }
          finish(await post('/webapi/sessions/web', { webauthn: assertion }, { auth: false }));
        } catch (e2) {
          err.set(e2.message);
        }
      });
    });
    passwordless = h('div', { class: 'stack passwordless' }, h('div', { class: 'or' }, h('span', null, 'or')), pl, webauthnSupported() ? null : h('div', { class: 'hint' }, 'This browser cannot use passkeys.'));
  }

  replace(
    el,
    card(
      h('h1', { class: 'card-title' }, 'Sign in'),
      h('p', { class: 'muted card-sub', testid: 'login-cluster' }, `to ${info.cluster_name || 'Wardgate'}`),
      notice,
      err,
      form,
      passwordless,
    ),
    h('p', { class: 'public-foot muted' }, 'Command line: ', h('code', null, `ward login --proxy=${info.proxy_public_addr || location.host}`)),
  );
  user.focus();
}

export function card(...children) {
  return h(
    'div',
    { class: 'public-wrap' },
    h('div', { class: 'public-brand' }, h('img', { src: '/web/static/favicon.svg', alt: '', width: '32', height: '32' }), h('span', null, 'Wardgate')),
    h('div', { class: 'card narrow', testid: 'public-card' }, children),
  );
}
