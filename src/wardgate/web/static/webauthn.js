// WebAuthn: the server speaks the Level 3 JSON forms (binary fields as base64url without
// padding); the browser API wants ArrayBuffers. Convert both ways here, by hand, so nothing
// depends on PublicKeyCredential.parseCreationOptionsFromJSON being present.

export function b64urlToBuf(s) {
  if (s instanceof ArrayBuffer) return s;
  if (ArrayBuffer.isView(s)) return s.buffer.slice(s.byteOffset, s.byteOffset + s.byteLength);
  const b64 = String(s).replace(/-/g, '+').replace(/_/g, '/');
  const padded = b64 + '='.repeat((4 - (b64.length % 4)) % 4);
  const bin = atob(padded);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out.buffer;
}

export function bufToB64url(buf) {
  if (buf === null || buf === undefined) return null;
  const bytes = buf instanceof ArrayBuffer ? new Uint8Array(buf) : new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
  let bin = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function unwrap(j) {
  // Accept both the bare options and {publicKey: options}.
  if (j && typeof j === 'object' && j.publicKey && typeof j.publicKey === 'object') return j.publicKey;
  return j;
}

function descriptors(list) {
  if (!Array.isArray(list)) return list;
  return list.map((c) => {
    const d = { type: c.type || 'public-key', id: b64urlToBuf(c.id) };
    if (Array.isArray(c.transports) && c.transports.length) d.transports = c.transports;
    return d;
  });
}

export function creationOptionsFromJSON(json) {
  const j = unwrap(json);
  const o = { ...j };
  o.challenge = b64urlToBuf(j.challenge);
  o.user = { ...j.user, id: b64urlToBuf(j.user.id) };
  if (j.excludeCredentials) o.excludeCredentials = descriptors(j.excludeCredentials);
  if (!Array.isArray(o.hints)) delete o.hints;
  return o;
}

export function requestOptionsFromJSON(json) {
  const j = unwrap(json);
  const o = { ...j };
  o.challenge = b64urlToBuf(j.challenge);
  if (j.allowCredentials) o.allowCredentials = descriptors(j.allowCredentials);
  if (!Array.isArray(o.hints)) delete o.hints;
  return o;
}

function extensionResults(cred) {
  let r = {};
  try {
    r = cred.getClientExtensionResults ? cred.getClientExtensionResults() : {};
  } catch {
    r = {};
  }
  // Make it JSON-safe (some extensions return ArrayBuffers).
  const fix = (v) => {
    if (v instanceof ArrayBuffer || ArrayBuffer.isView(v)) return bufToB64url(v);
    if (Array.isArray(v)) return v.map(fix);
    if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, fix(x)]));
    return v;
  };
  return fix(r);
}

// PublicKeyCredential -> RegistrationResponseJSON / AuthenticationResponseJSON
export function credentialToJSON(cred) {
  const r = cred.response;
  const out = {
    id: cred.id,
    rawId: bufToB64url(cred.rawId),
    type: cred.type,
    response: { clientDataJSON: bufToB64url(r.clientDataJSON) },
    clientExtensionResults: extensionResults(cred),
  };
  if (cred.authenticatorAttachment) out.authenticatorAttachment = cred.authenticatorAttachment;
  if (r.attestationObject) {
    out.response.attestationObject = bufToB64url(r.attestationObject);
    if (typeof r.getTransports === 'function') out.response.transports = r.getTransports();
    try {
      if (typeof r.getAuthenticatorData === 'function') out.response.authenticatorData = bufToB64url(r.getAuthenticatorData());
      if (typeof r.getPublicKeyAlgorithm === 'function') out.response.publicKeyAlgorithm = r.getPublicKeyAlgorithm();
      if (typeof r.getPublicKey === 'function') {
        const pk = r.getPublicKey();
        if (pk) out.response.publicKey = bufToB64url(pk);
      }
    } catch {
      /* optional fields */
    }
  } else {
    out.response.authenticatorData = bufToB64url(r.authenticatorData);
    out.response.signature = bufToB64url(r.signature);
    if (r.userHandle && r.userHandle.byteLength) out.response.userHandle = bufToB64url(r.userHandle);
  }
  return out;
}

export function webauthnSupported() {
  return typeof window.PublicKeyCredential !== 'undefined' && !!(navigator.credentials && navigator.credentials.get);
}

function unsupported() {
  const e = new Error(
    window.isSecureContext
      ? 'This browser does not support passkeys or security keys.'
      : 'Passkeys and security keys only work over HTTPS. Open Wardgate through its https:// address.',
  );
  e.name = 'NotSupportedError';
  return e;
}

// Run a registration ceremony: creation options JSON -> attestation JSON.
export async function createCredential(optionsJSON) {
  if (!webauthnSupported()) throw unsupported();
  const cred = await navigator.credentials.create({ publicKey: creationOptionsFromJSON(optionsJSON) });
  if (!cred) throw new Error('The authenticator returned nothing.');
  return credentialToJSON(cred);
}

// Run an authentication ceremony: request options JSON -> assertion JSON.
export async function getAssertion(optionsJSON) {
  if (!webauthnSupported()) throw unsupported();
  const cred = await navigator.credentials.get({ publicKey: requestOptionsFromJSON(optionsJSON) });
  if (!cred) throw new Error('The authenticator returned nothing.');
  return credentialToJSON(cred);
}

// Browser exceptions -> sentences for people.
export function describeWebAuthnError(e) {
  if (!e) return 'The security key request failed.';
  switch (e.name) {
    case 'NotAllowedError':
      return 'The passkey or security key request was cancelled or timed out. Try again.';
    case 'InvalidStateError':
      return 'This authenticator is already registered for your account.';
    case 'SecurityError':
      return "The browser refused: this site's address does not match the cluster's WebAuthn relying party ID.";
    case 'NotSupportedError':
      return e.message || 'This browser or authenticator does not support the requested options.';
    case 'AbortError':
      return 'The request was cancelled.';
    default:
      return e.message || String(e);
  }
}
