// Asking for a second factor: the modal used by the terminal (per-session MFA), the account page
// (adding/removing devices) and the password change.

import { post } from './api.js';
import { describeWebAuthnError, getAssertion } from './webauthn.js';
import { busy, button, field, h, messageBox, modal } from './ui.js';

/**
 * challenge: {otp: bool, webauthn: <request options JSON> | null}
 * Resolves to {otp: "123456"} or {webauthn: <assertion JSON>}, {} when no factor is needed,
 * or null when the person cancels.
 */
export function promptFactor(challenge, { title = 'Verify it is you', reason } = {}) {
  const wantOtp = !!(challenge && challenge.otp);
  const wa = challenge && challenge.webauthn ? challenge.webauthn : null;
  if (!wantOtp && !wa) return Promise.resolve({});

  return new Promise((resolve) => {
    let done = false;
    const finish = (v) => {
      if (done) return;
      done = true;
      m.close();
      resolve(v);
    };
    const err = messageBox('mfa-error');
    const parts = [];
    parts.push(
      h(
        'p',
        { class: 'muted' },
        reason ||
          (wantOtp && wa
            ? 'Use your passkey or security key, or enter a code from your authenticator app.'
            : wa
              ? 'Use your passkey or security key to continue.'
              : 'Enter the 6-digit code from your authenticator app.'),
      ),
    );
    let waBtn = null;
    if (wa) {
      waBtn = button('Use passkey or security key', { kind: wantOtp ? 'secondary' : 'primary', testid: 'mfa-webauthn', class: 'btn-block' });
      waBtn.addEventListener('click', () =>
        busy(waBtn, async () => {
          err.clear();
          try {
            const assertion = await getAssertion(wa);
            finish({ webauthn: assertion });
          } catch (e) {
            err.set(describeWebAuthnError(e));
          }
        }),
      );
      parts.push(waBtn);
    }
    let form = null;
    if (wantOtp) {
      const code = h('input', {
        class: 'input mono otp',
        name: 'otp',
        inputmode: 'numeric',
        autocomplete: 'one-time-code',
        pattern: '[0-9 ]*',
        maxlength: '10',
        required: true,
        placeholder: '123456',
        testid: 'mfa-otp',
      });
      form = h(
        'form',
        { class: 'form', testid: 'mfa-form' },
        wa ? h('div', { class: 'or' }, h('span', null, 'or')) : null,
        field('Authenticator code', code),
        button('Verify', { kind: 'primary', type: 'submit', testid: 'mfa-submit', class: 'btn-block' }),
      );
      form.addEventListener('submit', (e) => {
        e.preventDefault();
        const v = code.value.replace(/\s+/g, '');
        if (!v) {
          err.set('Enter the code from your authenticator app.');
          return;
        }
        finish({ otp: v });
      });
      parts.push(form);
    }
    parts.push(err);
    const cancel = button('Cancel', { testid: 'mfa-cancel' });
    const m = modal({
      title,
      body: h('div', { class: 'stack' }, parts),
      actions: [cancel],
      testid: 'mfa-modal',
      onClose: () => {
        if (!done) {
          done = true;
          resolve(null);
        }
      },
    });
    cancel.addEventListener('click', () => m.close());
  });
}

// Ask the server what the user's existing devices can answer, then ask the person.
export async function verifyWithExistingFactor(opts) {
  const ch = await post('/webapi/mfa/challenge', {});
  return promptFactor(ch || {}, opts);
}
