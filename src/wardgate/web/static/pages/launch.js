// /web/launch/<fqdn>?state=S&path=/p : where an app sends a browser that has no app session yet.
// The router has already made sure the person is signed in (or sent them to sign in and back).
// We ask the proxy for an app session (with a second factor when the roles want one) and go to
// the address it answers: always the app's own host, chosen by the server, never by this URL.

import { post } from '../api.js';
import { verifyWithExistingFactor } from '../mfa.js';
import { button, h, replace, spinner } from '../ui.js';
import { card } from './login.js';

const STATE_RE = /^[A-Za-z0-9_-]{1,128}$/;

function safeRedirect(url) {
  try {
    const u = new URL(url);
    return u.protocol === 'https:' && u.pathname === '/x-wardgate/auth' ? u.href : '';
  } catch {
    return '';
  }
}

export default async function render(el, ctx) {
  const fqdn = ctx.params[0] || '';
  const state = ctx.query.get('state') || '';
  const path = ctx.query.get('path') || '/';
  ctx.setTitle(`Opening ${fqdn}`);

  const status = h('div', { class: 'launch-status', testid: 'launch-status' });
  const actions = h('div', { class: 'launch-actions' });
  replace(
    el,
    h(
      'div',
      { class: 'public', testid: 'launch' },
      card(
        h('h1', { class: 'card-title' }, 'Opening application'),
        h('p', { class: 'muted card-sub mono', testid: 'launch-app' }, fqdn),
        status,
        actions,
      ),
    ),
  );

  const back = () => h('a', { class: 'btn btn-secondary btn-sm', href: '/web/apps', testid: 'launch-apps' }, 'Your applications');
  const fail = (message, retry) => {
    replace(status, h('div', { class: 'msg msg-error', role: 'alert', testid: 'launch-error' }, message));
    replace(actions, retry ? button('Try again', { kind: 'primary', size: 'sm', testid: 'launch-retry', onclick: retry }) : null, back());
  };

  if (!fqdn || !STATE_RE.test(state) || !path.startsWith('/') || path.startsWith('//')) {
    fail('This link does not come from an application: open the app from your list of applications, or go to its address again.');
    return;
  }

  async function launch(factor = {}) {
    replace(status, spinner('Signing you in to the app…'));
    replace(actions);
    let answer;
    try {
      answer = await post('/webapi/sessions/app', { fqdn, state, path, ...factor });
    } catch (e) {
      if (!ctx.alive()) return;
      if (e.code === 'mfa_required' && !factor.otp && !factor.webauthn) {
        replace(status, h('p', { class: 'muted', testid: 'launch-mfa' }, 'This app asks for a second factor.'));
        let got;
        try {
          got = await verifyWithExistingFactor({ title: 'Verify it is you', reason: e.message });
        } catch (e2) {
          if (ctx.alive()) fail(e2.message, () => launch());
          return;
        }
        if (!ctx.alive()) return;
        if (!got) {
          fail('Cancelled: the app was not opened.', () => launch());
          return;
        }
        launch(got);
        return;
      }
      fail(e.message, e.status === 0 || e.status >= 500 || e.code === 'mfa_required' || e.status === 401 ? () => launch() : null);
      return;
    }
    if (!ctx.alive()) return;
    const target = answer && safeRedirect(answer.redirect);
    if (!target) {
      fail('The proxy answered without a valid address for the app.', () => launch());
      return;
    }
    replace(status, spinner('Opening the app…'));
    location.replace(target);
  }

  await launch();
}
