// The single-page app: History API router, the shell (top bar + left nav) and the web session's
// upkeep (renewal near expiry while the person is active, sign-out).

import { activity, api, clearToken, del, get, getToken, onUnauthorized, post, setToken, TOKEN_STORAGE_KEY } from './api.js';
import { h, parseDurationMs, replace, errorView, spinner } from './ui.js';

const ROUTES = [
  { re: /^\/web\/login\/?$/, page: 'login', public: true, title: 'Sign in' },
  { re: /^\/web\/invite\/([^/]+)\/?$/, page: 'invite', public: true, title: 'Set up your account' },
  { re: /^\/web\/terminal\/?$/, page: 'terminal', bare: true, title: 'Terminal' },
  { re: /^\/web\/nodes\/?$/, page: 'nodes', cap: 'nodes', nav: 'nodes', title: 'Servers' },
  { re: /^\/web\/apps\/?$/, page: 'apps', cap: 'apps', nav: 'apps', title: 'Applications' },
  { re: /^\/web\/launch\/([^/]+)\/?$/, page: 'launch', bare: true, title: 'Opening application' },
  { re: /^\/web\/sessions\/?$/, page: 'sessions', cap: 'sessions', nav: 'sessions', title: 'Active sessions' },
  { re: /^\/web\/recordings\/?$/, page: 'recordings', cap: 'recordings', nav: 'recordings', title: 'Recordings' },
  { re: /^\/web\/recordings\/([^/]+)\/?$/, page: 'player', cap: 'recordings', nav: 'recordings', title: 'Recording' },
  { re: /^\/web\/audit\/?$/, page: 'audit', cap: 'audit', nav: 'audit', title: 'Audit log' },
  { re: /^\/web\/users\/?$/, page: 'users', cap: 'users', nav: 'users', title: 'Users' },
  { re: /^\/web\/roles\/?$/, page: 'roles', cap: 'roles', nav: 'roles', title: 'Roles' },
  { re: /^\/web\/account\/?$/, page: 'account', nav: 'account', title: 'Account' },
];

const PAGES = {
  login: () => import('./pages/login.js'),
  invite: () => import('./pages/invite.js'),
  terminal: () => import('./terminal.js'),
  nodes: () => import('./pages/nodes.js'),
  apps: () => import('./pages/apps.js'),
  launch: () => import('./pages/launch.js'),
  sessions: () => import('./pages/sessions.js'),
  recordings: () => import('./pages/recordings.js'),
  player: () => import('./pages/player.js'),
  audit: () => import('./pages/audit.js'),
  users: () => import('./pages/users.js'),
  roles: () => import('./pages/roles.js'),
  account: () => import('./pages/account.js'),
};

const NAV = [
  { key: 'nodes', path: '/web/nodes', label: 'Servers', icon: 'server' },
  { key: 'apps', path: '/web/apps', label: 'Applications', icon: 'apps' },
  { key: 'sessions', path: '/web/sessions', label: 'Active sessions', icon: 'activity' },
  { key: 'recordings', path: '/web/recordings', label: 'Recordings', icon: 'play' },
  { key: 'audit', path: '/web/audit', label: 'Audit log', icon: 'list' },
  { key: 'users', path: '/web/users', label: 'Users', icon: 'users', section: 'Administration' },
  { key: 'roles', path: '/web/roles', label: 'Roles', icon: 'shield' },
];

const ICONS = {
  server: 'M4 5h16v5H4zM4 14h16v5H4zM7 7.5h.01M7 16.5h.01',
  apps: 'M4 4h6v6H4zM14 4h6v6h-6zM4 14h6v6H4zM14 14h6v6h-6z',
  activity: 'M3 12h4l3 7 4-14 3 7h4',
  play: 'M5 4h14v16H5zM10 9l5 3-5 3z',
  list: 'M8 6h12M8 12h12M8 18h12M4 6h.01M4 12h.01M4 18h.01',
  users: 'M16 19v-1a4 4 0 0 0-4-4H7a4 4 0 0 0-4 4v1M9.5 10a3 3 0 1 0 0-6 3 3 0 0 0 0 6M21 19v-1a4 4 0 0 0-3-3.9M15.5 4.1a3 3 0 0 1 0 5.8',
  shield: 'M12 3 4 6v6c0 5 3.5 8 8 9 4.5-1 8-4 8-9V6z',
  user: 'M12 12a4 4 0 1 0 0-8 4 4 0 0 0 0 8M4 20a8 8 0 0 1 16 0',
  logout: 'M15 4h4v16h-4M10 8l-4 4 4 4M6 12h10',
};

export function icon(name, size = 18) {
  const NS = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('width', String(size));
  svg.setAttribute('height', String(size));
  svg.setAttribute('fill', 'none');
  svg.setAttribute('stroke', 'currentColor');
  svg.setAttribute('stroke-width', '1.8');
  svg.setAttribute('stroke-linecap', 'round');
  svg.setAttribute('stroke-linejoin', 'round');
  svg.setAttribute('aria-hidden', 'true');
  svg.classList.add('icon');
  const p = document.createElementNS(NS, 'path');
  p.setAttribute('d', ICONS[name] || '');
  svg.appendChild(p);
  return svg;
}

// ---------------------------------------------------------------- state

const state = {
  session: null, // GET /webapi/sessions/web
  shell: null, // {root, content, nav: Map(key -> a), clusterEl, userEl}
  cleanup: null,
  seq: 0,
  lastActivity: Date.now(),
  renewedFor: null,
  keepalive: null,
};

const appRoot = () => document.getElementById('app');

export function navigate(url, { replace: rep = false } = {}) {
  if (rep) history.replaceState(null, '', url);
  else history.pushState(null, '', url);
  route();
}

function loginUrl(reason) {
  const next = location.pathname + location.search;
  const q = new URLSearchParams();
  if (next && !next.startsWith('/web/login')) q.set('next', next);
  if (reason) q.set('reason', reason);
  const s = q.toString();
  return '/web/login' + (s ? '?' + s : '');
}

function toLogin(reason) {
  state.session = null;
  stopKeepalive();
  navigate(loginUrl(reason), { replace: true });
}

onUnauthorized(() => toLogin('expired'));

export function capabilities() {
  return (state.session && state.session.capabilities) || {};
}

function defaultPath() {
  const caps = capabilities();
  const first = NAV.find((n) => caps[n.key]);
  return first ? first.path : '/web/account';
}

// Where to go after signing in: only our own pages.
export function safeNext(next) {
  if (
    typeof next === 'string' &&
    next.startsWith('/web/') &&
    !next.startsWith('/web/login') &&
    !/[\\\s]|\/\.\.?(\/|$)/.test(next) // no backslashes, whitespace or dot segments
  )
    return next;
  return '/web'; // the first page the user's roles allow
}

// Called by the sign-in and invite pages once the server answered with a token.
export function signedIn(answer, next) {
  setToken(answer.token);
  state.session = null;
  state.renewedFor = null;
  navigate(safeNext(next), { replace: true });
}

async function loadSession() {
  const s = await get('/webapi/sessions/web');
  state.session = s;
  startKeepalive();
  return s;
}

export async function signOut() {
  try {
    await del('/webapi/sessions/web', undefined, { noRedirect: true });
  } catch {
    /* signed out either way */
  }
  clearToken();
  state.session = null;
  stopKeepalive();
  navigate('/web/login', { replace: true });
}

// ---------------------------------------------------------------- keep the session alive

const RENEW_WINDOW_MS = 5 * 60 * 1000;

function noteActivity() {
  state.lastActivity = Date.now();
}
export { noteActivity };

function startKeepalive() {
  if (state.keepalive) return;
  state.keepalive = setInterval(checkSession, 20 * 1000);
}

function stopKeepalive() {
  clearInterval(state.keepalive);
  state.keepalive = null;
}

async function checkSession() {
  const s = state.session;
  if (!s || !getToken()) return;
  const now = Date.now();
  const expires = Date.parse(s.expires);
  const idleMs = parseDurationMs(s.idle_timeout) || 30 * 60 * 1000;
  const active = now - state.lastActivity < Math.min(idleMs, RENEW_WINDOW_MS);
  if (!Number.isNaN(expires) && expires <= now) {
    toLogin('expired');
    return;
  }
  try {
    if (active && !Number.isNaN(expires) && expires - now < RENEW_WINDOW_MS && state.renewedFor !== s.expires) {
      state.renewedFor = s.expires; // one attempt per expiry: the absolute expiry may not move
      const r = await post('/webapi/sessions/web/renew', {});
      if (r && r.token) setToken(r.token);
      if (r && r.expires) s.expires = r.expires;
      if (r && r.idle_timeout !== undefined) s.idle_timeout = r.idle_timeout;
    } else if (active && now - activity.lastCall > idleMs / 2) {
      // An authenticated call resets the server's idle timer; refresh what we know too.
      const fresh = await get('/webapi/sessions/web');
      Object.assign(s, fresh);
      updateNav();
    }
  } catch {
    /* a 401 already sent us to the sign-in page */
  }
}

for (const ev of ['keydown', 'mousedown', 'pointermove', 'wheel', 'touchstart']) {
  window.addEventListener(ev, noteActivity, { passive: true, capture: true });
}

window.addEventListener('storage', (e) => {
  // Signed out in another tab.
  if (e.key === TOKEN_STORAGE_KEY && !e.newValue && state.session && !location.pathname.startsWith('/web/terminal')) {
    toLogin();
  }
});

// ---------------------------------------------------------------- shell

function buildShell() {
  const s = state.session;
  const nav = new Map();
  const navEl = h('nav', { class: 'sidenav', 'aria-label': 'Main', testid: 'nav' });
  const menu = h(
    'div',
    { class: 'menu', hidden: true, role: 'menu', testid: 'user-menu' },
    h('div', { class: 'menu-head' }, h('div', { class: 'menu-user' }, s.user), h('div', { class: 'menu-roles' }, (s.roles || []).join(', ') || 'no roles')),
    h('a', { href: '/web/account', class: 'menu-item', role: 'menuitem', testid: 'menu-account' }, icon('user', 16), 'Account'),
    h('button', { type: 'button', class: 'menu-item', role: 'menuitem', testid: 'signout', onclick: () => signOut() }, icon('logout', 16), 'Sign out'),
  );
  const userBtn = h(
    'button',
    { type: 'button', class: 'user-btn', 'aria-haspopup': 'menu', 'aria-expanded': 'false', testid: 'user-menu-button' },
    h('span', { class: 'avatar', 'aria-hidden': 'true' }, (s.user || '?').slice(0, 1).toUpperCase()),
    h('span', { class: 'user-name', testid: 'current-user' }, s.user),
    h('span', { class: 'caret', 'aria-hidden': 'true' }, '▾'),
  );
  const toggleMenu = (open) => {
    menu.hidden = !open;
    userBtn.setAttribute('aria-expanded', String(open));
  };
  userBtn.addEventListener('click', (e) => {
    e.stopPropagation();
    toggleMenu(menu.hidden);
  });
  document.addEventListener('click', (e) => {
    if (!menu.hidden && !menu.contains(e.target)) toggleMenu(false);
  });
  menu.addEventListener('click', (e) => {
    if (e.target.closest('.menu-item')) toggleMenu(false);
  });
  document.addEventListener('keydown', (e) => e.key === 'Escape' && toggleMenu(false));

  const clusterEl = h('span', { class: 'cluster', testid: 'cluster-name', title: 'Cluster' }, s.cluster_name || '');
  const top = h(
    'header',
    { class: 'topbar', testid: 'topbar' },
    h(
      'a',
      { href: '/web/nodes', class: 'brand', 'aria-label': 'Wardgate home' },
      h('img', { src: '/web/static/favicon.svg', alt: '', width: '22', height: '22' }),
      h('span', { class: 'brand-name' }, 'Wardgate'),
    ),
    clusterEl,
    h('div', { class: 'spacer' }),
    h('div', { class: 'user-wrap' }, userBtn, menu),
  );
  const content = h('main', { class: 'content', id: 'content', testid: 'content', tabindex: '-1' });
  const root = h('div', { class: 'shell' }, top, h('div', { class: 'shell-body' }, navEl, content));
  state.shell = { root, content, nav, navEl, clusterEl };
  updateNav();
  replace(appRoot(), root);
}

function updateNav() {
  const sh = state.shell;
  if (!sh) return;
  const caps = capabilities();
  const cur = sh.active;
  replace(sh.navEl);
  sh.nav.clear();
  let section = null;
  for (const n of NAV) {
    if (!caps[n.key]) continue;
    if (n.section && n.section !== section) {
      section = n.section;
      sh.navEl.appendChild(h('div', { class: 'nav-section' }, section));
    }
    const a = h('a', { href: n.path, class: 'nav-link', title: n.label, testid: `nav-${n.key}` }, icon(n.icon), h('span', null, n.label));
    sh.nav.set(n.key, a);
    sh.navEl.appendChild(a);
  }
  sh.clusterEl.textContent = state.session.cluster_name || '';
  setActiveNav(cur);
}

function setActiveNav(key) {
  const sh = state.shell;
  sh.active = key;
  for (const [k, a] of sh.nav) {
    if (k === key) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

function setTitle(t) {
  const cluster = state.session && state.session.cluster_name;
  document.title = [t, cluster, 'Wardgate'].filter(Boolean).join(' · ');
}

// ---------------------------------------------------------------- router

async function route() {
  const seq = ++state.seq;
  if (state.cleanup) {
    try {
      state.cleanup();
    } catch {
      /* ignore */
    }
    state.cleanup = null;
  }
  const path = location.pathname.replace(/\/+$/, '') || '/';
  const query = new URLSearchParams(location.search);

  if (path === '/' || path === '/web') {
    if (!getToken()) return navigate('/web/login', { replace: true });
    try {
      if (!state.session) await loadSession();
    } catch {
      return;
    }
    return navigate(defaultPath(), { replace: true });
  }

  let match = null;
  let r = null;
  for (const cand of ROUTES) {
    match = cand.re.exec(location.pathname);
    if (match) {
      r = cand;
      break;
    }
  }

  const ctx = {
    params: match ? match.slice(1).map(decodeURIComponent) : [],
    query,
    navigate,
    setTitle,
    alive: () => seq === state.seq,
    get session() {
      return state.session;
    },
  };

  if (r && r.public) {
    state.shell = null;
    const el = h('div', { class: 'public' });
    replace(appRoot(), el);
    setTitle(r.title);
    return renderPage(r, el, ctx, seq);
  }

  if (!getToken()) return navigate(loginUrl(), { replace: true });
  if (!state.session) {
    try {
      await loadSession();
    } catch (e) {
      if (seq !== state.seq) return;
      if (e.status === 401) return; // handled: on the way to the sign-in page
      replace(appRoot(), h('div', { class: 'public' }, h('div', { class: 'card narrow' }, errorView(e, () => route()))));
      return;
    }
    if (seq !== state.seq) return;
  }

  if (r && r.bare) {
    state.shell = null;
    const el = h('div', { class: 'bare' });
    replace(appRoot(), el);
    setTitle(r.title);
    return renderPage(r, el, ctx, seq);
  }

  if (!state.shell || !state.shell.root.isConnected) buildShell();
  const content = state.shell.content;
  if (!r) {
    setActiveNav(null);
    setTitle('Not found');
    replace(content, h('div', { class: 'empty', testid: 'not-found' }, h('div', { class: 'empty-title' }, 'Page not found'), h('div', { class: 'empty-hint' }, h('a', { href: defaultPath() }, 'Go to the start page'))));
    return;
  }
  setActiveNav(r.nav);
  setTitle(r.title);
  if (r.cap && !capabilities()[r.cap]) {
    replace(
      content,
      h('div', { class: 'empty', testid: 'forbidden' }, h('div', { class: 'empty-title' }, 'Your roles do not give you access to this page'), h('div', { class: 'empty-hint' }, 'Ask an administrator if you need it.')),
    );
    return;
  }
  const page = h('div', { class: 'page', testid: `page-${r.page}` });
  replace(content, page);
  return renderPage(r, page, ctx, seq);
}

async function renderPage(r, el, ctx, seq) {
  replace(el, spinner());
  let mod;
  try {
    mod = await PAGES[r.page]();
  } catch (e) {
    if (seq === state.seq) replace(el, errorView(new Error('Could not load this page: ' + e.message), () => route()));
    return;
  }
  if (seq !== state.seq) return;
  try {
    const cleanup = await mod.default(el, ctx);
    if (typeof cleanup === 'function') {
      if (seq === state.seq) state.cleanup = cleanup;
      else cleanup();
    }
  } catch (e) {
    if (seq !== state.seq) return;
    if (e && e.status === 401) return;
    console.error(e);
    replace(el, errorView(e, () => route()));
  }
}

// Same-origin links to /web/... pages stay in the app.
document.addEventListener('click', (e) => {
  if (e.defaultPrevented || e.button !== 0 || e.metaKey || e.ctrlKey || e.shiftKey || e.altKey) return;
  const a = e.target.closest && e.target.closest('a[href]');
  if (!a || a.target || a.hasAttribute('download') || a.dataset.native !== undefined) return;
  const url = new URL(a.href, location.href);
  if (url.origin !== location.origin) return;
  if (!url.pathname.startsWith('/web/') || url.pathname.startsWith('/web/static/') || url.pathname.startsWith('/web/vendor/')) return;
  e.preventDefault();
  if (url.pathname + url.search === location.pathname + location.search) return;
  navigate(url.pathname + url.search + url.hash);
});

window.addEventListener('popstate', () => route());

export const app = { navigate, signOut, signedIn, state, api };
route();
