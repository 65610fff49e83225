// The one way the UI talks to the proxy: JSON over fetch, bearer token on every authenticated
// call (the session cookie rides along by itself), errors turned into ApiError with the message
// the server wrote for a person.

const TOKEN_KEY = 'wardgate.token';

export function getToken() {
  try {
    return localStorage.getItem(TOKEN_KEY) || '';
  } catch {
    return '';
  }
}

export function setToken(token) {
  try {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
  } catch {
    /* storage disabled: the session lasts as long as the page */
  }
}

export function clearToken() {
  setToken('');
}

export const TOKEN_STORAGE_KEY = TOKEN_KEY;

export class ApiError extends Error {
  constructor(status, code, message, detail = {}) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.line = typeof detail.line === 'number' ? detail.line : null;
  }
}

// Time of the last authenticated call that reached the server (it resets the idle timer there).
export const activity = { lastCall: 0 };

let unauthorizedHandler = () => {
  const next = location.pathname + location.search;
  location.assign('/web/login?next=' + encodeURIComponent(next));
};

export function onUnauthorized(fn) {
  unauthorizedHandler = fn;
}

const SESSION_PATH = '/webapi/sessions/web';

async function sessionStillValid() {
  const token = getToken();
  if (!token) return false;
  try {
    const resp = await fetch(SESSION_PATH, {
      headers: { Accept: 'application/json', Authorization: 'Bearer ' + token },
      credentials: 'same-origin',
      cache: 'no-store',
    });
    return resp.ok;
  } catch {
    return true; // network trouble is not a reason to throw the user out
  }
}

/**
 * api(method, path, body?, opts?)
 *   opts.auth = false   open call: no bearer, a 401 is just an error (sign-in forms)
 *   opts.raw = true     return the Response (for non-JSON bodies)
 *   opts.noRedirect     never leave the page on 401
 *   opts.signal         AbortSignal
 */
export async function api(method, path, body, opts = {}) {
  const auth = opts.auth !== false;
  const headers = { Accept: opts.accept || 'application/json' };
  const token = getToken();
  if (auth && token) headers.Authorization = 'Bearer ' + token;
  let payload;
  if (body !== undefined && body !== null) {
    headers['Content-Type'] = 'application/json';
    payload = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, {
      method,
      headers,
      body: payload,
      credentials: 'same-origin',
      cache: 'no-store',
      signal: opts.signal,
    });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'Cannot reach the Wardgate proxy. Check your connection and try again.');
  }
  if (auth) activity.lastCall = Date.now();
  if (!resp.ok) {
    let detail = {};
    try {
      const j = await resp.json();
      if (j && typeof j.error === 'object' && j.error) detail = j.error;
      else if (j && typeof j.error === 'string') detail = { message: j.error };
    } catch {
      /* not JSON */
    }
    const err = new ApiError(
      resp.status,
      detail.code || 'http_' + resp.status,
      detail.message || `${resp.status} ${resp.statusText || 'error'}`,
      detail,
    );
    if (resp.status === 401 && auth && !opts.noRedirect) {
      // A 401 can also mean "wrong second factor" on an authenticated call: only leave the
      // page when the session itself is gone.
      const gone = path === SESSION_PATH || !(await sessionStillValid());
      if (gone) {
        clearToken();
        unauthorizedHandler(err);
      }
    }
    throw err;
  }
  if (opts.raw) return resp;
  if (resp.status === 204) return null;
  const ct = resp.headers.get('Content-Type') || '';
  if (ct.includes('json')) return resp.json();
  const text = await resp.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

export const get = (path, opts) => api('GET', path, undefined, opts);
export const post = (path, body, opts) => api('POST', path, body === undefined ? {} : body, opts);
export const put = (path, body, opts) => api('PUT', path, body, opts);
export const del = (path, body, opts) => api('DELETE', path, body, opts);

// /webapi/ping is open and does not change while the page lives.
let pingPromise = null;
export function ping() {
  if (!pingPromise) {
    pingPromise = get('/webapi/ping', { auth: false }).catch((e) => {
      pingPromise = null;
      throw e;
    });
  }
  return pingPromise;
}

export function qs(params) {
  const u = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v === undefined || v === null || v === '') continue;
    if (Array.isArray(v)) v.forEach((x) => x !== '' && u.append(k, x));
    else u.append(k, String(v));
  }
  const s = u.toString();
  return s ? '?' + s : '';
}

export const enc = encodeURIComponent;
