// /web/terminal?node=N&login=L  or  ?sid=S&mode=observer|peer
// A full-window xterm.js terminal over the proxy's WebSocket. Every message is one type byte and
// a payload: a (token), d (data), r (resize), s (session info), m (MFA), x (exit), e (error),
// p (keep-alive).

import { getToken, ping } from './api.js';
import { noteActivity } from './app.js';
import { promptFactor } from './mfa.js';
import { copyButton, copyText, h, loadCss, loadScript, replace } from './ui.js';

const enc = new TextEncoder();
const dec = new TextDecoder();
const KEEPALIVE_MS = 30 * 1000;

const THEME = {
  background: '#0d1117',
  foreground: '#d6dde6',
  cursor: '#8fb4ff',
  cursorAccent: '#0d1117',
  selectionBackground: '#33466b',
  black: '#484f58',
  red: '#ff6b6b',
  green: '#5fd38d',
  yellow: '#f5c15c',
  blue: '#6ea8ff',
  magenta: '#c792ea',
  cyan: '#56c8d8',
  white: '#d6dde6',
  brightBlack: '#5c6773',
  brightRed: '#ff8787',
  brightGreen: '#80e0a7',
  brightYellow: '#ffd479',
  brightBlue: '#91bdff',
  brightMagenta: '#dab0f5',
  brightCyan: '#7fd8e4',
  brightWhite: '#ffffff',
};

function frame(type, payload) {
  const body = payload === undefined || payload === null ? new Uint8Array(0) : typeof payload === 'string' ? enc.encode(payload) : payload;
  const buf = new Uint8Array(1 + body.length);
  buf[0] = type.charCodeAt(0);
  buf.set(body, 1);
  return buf;
}

export default async function render(el, ctx) {
  const q = ctx.query;
  const node = q.get('node') || '';
  const login = q.get('login') || '';
  const sid = q.get('sid') || '';
  const mode = sid ? (q.get('mode') === 'peer' ? 'peer' : 'observer') : 'session';
  let cluster = (ctx.session && ctx.session.cluster_name) || '';
  if (!cluster) {
    try {
      cluster = (await ping()).cluster_name || '';
    } catch {
      /* the socket's error says what went wrong */
    }
  }
  document.body.classList.add('term-body');

  const title = sid ? `${mode === 'peer' ? 'Joining' : 'Observing'} session ${sid.slice(0, 8)}` : `${login}@${node}`;
  ctx.setTitle(title);

  const status = h('span', { class: 'term-status', testid: 'terminal-status' }, 'Connecting…');
  const share = h('div', { class: 'term-share', testid: 'terminal-share', hidden: true });
  const banner = h('div', { class: 'term-banner', role: 'alert', testid: 'terminal-banner', hidden: true });
  const restart = h('button', { type: 'button', class: 'btn btn-secondary btn-sm term-btn', testid: 'terminal-restart', hidden: true }, 'New session');
  const screen = h('div', { class: 'term-screen', testid: 'terminal' });
  const head = h(
    'header',
    { class: 'term-head' },
    h('img', { src: '/web/static/favicon.svg', alt: '', width: '18', height: '18' }),
    h('span', { class: 'term-title', testid: 'terminal-title' }, title),
    mode !== 'session' ? h('span', { class: `term-mode term-mode-${mode}`, testid: 'terminal-mode' }, mode) : null,
    status,
    restart,
    h('div', { class: 'spacer' }),
    share,
  );
  replace(el, h('div', { class: 'term-page' }, head, banner, h('div', { class: 'term-wrap' }, screen)));

  if (!sid && (!node || !login)) {
    banner.hidden = false;
    banner.textContent = 'Open a terminal from the Servers page: this address names no server and login.';
    status.textContent = '';
    return () => document.body.classList.remove('term-body');
  }

  await Promise.all([loadCss('/web/vendor/xterm/xterm.css'), loadScript('/web/vendor/xterm/xterm.js')]);
  await loadScript('/web/vendor/xterm/addon-fit.js');
  if (!ctx.alive()) return;

  const term = new window.Terminal({
    cursorBlink: true,
    fontFamily: 'ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, "Liberation Mono", monospace',
    fontSize: 14,
    lineHeight: 1.15,
    scrollback: 5000,
    theme: THEME,
    allowProposedApi: false,
    rightClickSelectsWord: false, // right-click keeps the selection: the context menu offers Copy and Paste
    macOptionIsMeta: true,
    disableStdin: mode === 'observer',
  });
  const fit = new window.FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(screen);
  window.wardTerm = term;
  try {
    fit.fit();
  } catch {
    /* zero-size during layout */
  }

  // Ctrl+Shift+C copies the selection; Ctrl+Shift+V is left to the browser, which fires a paste
  // event that xterm turns into input.
  term.attachCustomKeyEventHandler((e) => {
    if (e.type !== 'keydown') return true;
    const k = e.key.toLowerCase();
    if (e.ctrlKey && e.shiftKey && k === 'c') {
      const sel = term.getSelection();
      if (sel) copyText(sel);
      e.preventDefault();
      return false;
    }
    if (e.ctrlKey && e.shiftKey && k === 'v') return false;
    return true;
  });

  let ws = null;
  let running = false;
  let ended = false;
  let failed = false;
  let keepalive = null;
  let info = null;
  let disposed = false;

  const setState = (s, text) => {
    screen.dataset.state = s;
    status.textContent = text;
    status.className = `term-status term-status-${s}`;
  };

  const send = (type, payload) => {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(frame(type, payload));
  };

  const sendSize = () => send('r', JSON.stringify({ cols: term.cols, rows: term.rows }));

  term.onData((d) => {
    noteActivity();
    if (mode !== 'observer') send('d', enc.encode(d));
  });
  term.onBinary((d) => {
    if (mode === 'observer') return;
    const b = new Uint8Array(d.length);
    for (let i = 0; i < d.length; i++) b[i] = d.charCodeAt(i) & 0xff;
    send('d', b);
  });
  term.onResize(() => running && sendSize());

  const doFit = () => {
    try {
      fit.fit();
    } catch {
      /* ignore */
    }
  };
  const ro = new ResizeObserver(() => requestAnimationFrame(doFit));
  ro.observe(screen);
  window.addEventListener('resize', doFit);

  function showShare(s) {
    info = s;
    screen.dataset.sid = s.sid || '';
    if (!s.sid) return;
    const link = `${location.origin}/web/terminal?sid=${encodeURIComponent(s.sid)}&mode=observer`;
    replace(
      share,
      h('span', { class: 'term-share-text' }, 'Session ', h('code', { testid: 'terminal-sid' }, s.sid), mode === 'session' ? ' — share to let others join' : ''),
      h('a', { href: link, target: '_blank', rel: 'noopener', class: 'term-link', testid: 'terminal-join-link' }, 'Join link'),
      copyButton(link, { label: 'Copy link', testid: 'terminal-copy-link' }),
    );
    share.hidden = false;
    if (s.login && s.node) {
      const t = `${s.login}@${s.node}`;
      head.querySelector('.term-title').textContent = t;
      document.title = `${t} · ${s.cluster || cluster} · Wardgate`;
    }
  }

  async function onMfa(payload) {
    let ch = {};
    try {
      ch = JSON.parse(dec.decode(payload) || '{}');
    } catch {
      ch = {};
    }
    setState('mfa', 'Waiting for second factor…');
    const answer = await promptFactor(ch, {
      title: 'Verify it is you',
      reason: 'Your roles require a second factor for each session.',
    });
    if (answer === null) {
      term.write('\r\n\x1b[33m[second factor cancelled]\x1b[0m\r\n');
      failed = true;
      if (ws) ws.close(1000);
      return;
    }
    send('m', JSON.stringify(answer));
    setState('connecting', 'Connecting…');
    term.focus();
  }

  function onMessage(ev) {
    const data = typeof ev.data === 'string' ? enc.encode(ev.data) : new Uint8Array(ev.data);
    if (!data.length) return;
    const type = String.fromCharCode(data[0]);
    const payload = data.subarray(1);
    switch (type) {
      case 'd':
        if (!running) {
          running = true;
          setState('running', 'Connected');
        }
        term.write(payload.slice());
        break;
      case 's': {
        let s = {};
        try {
          s = JSON.parse(dec.decode(payload));
        } catch {
          s = {};
        }
        running = true;
        setState('running', 'Connected');
        showShare(s);
        doFit();
        sendSize();
        break;
      }
      case 'm':
        onMfa(payload);
        break;
      case 'x': {
        let x = {};
        try {
          x = JSON.parse(dec.decode(payload));
        } catch {
          x = {};
        }
        ended = true;
        running = false;
        const how = x.signal ? `by signal ${x.signal}` : `with code ${x.code === null || x.code === undefined ? '?' : x.code}`;
        term.write(`\r\n\x1b[2m[session ended ${how}]\x1b[0m\r\n`);
        screen.dataset.exitCode = x.code === null || x.code === undefined ? '' : String(x.code);
        setState('ended', 'Session ended');
        if (!sid) restart.hidden = false;
        break;
      }
      case 'e':
        failed = true;
        term.write(`\r\n\x1b[31m${dec.decode(payload)}\x1b[0m\r\n`);
        setState('error', 'Error');
        break;
      case 'p':
        break;
      default:
        break;
    }
  }

  function showBanner(text) {
    replace(
      banner,
      h('span', null, text),
      h('button', { type: 'button', class: 'btn btn-primary btn-sm', testid: 'terminal-reconnect', onclick: () => connect(true) }, sid ? 'Rejoin' : 'Reconnect'),
    );
    banner.hidden = false;
  }

  restart.addEventListener('click', () => connect(true, 'new session'));

  function connect(again, why = 'reconnecting') {
    banner.hidden = true;
    restart.hidden = true;
    running = false;
    ended = false;
    failed = false;
    if (again) {
      term.write(`\r\n\x1b[2m--- ${why} ---\x1b[0m\r\n`);
      share.hidden = true;
    }
    doFit();
    const params = new URLSearchParams();
    if (sid) {
      params.set('sid', sid);
      params.set('mode', mode);
    } else {
      params.set('node', node);
      params.set('login', login);
    }
    params.set('cols', String(term.cols));
    params.set('rows', String(term.rows));
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    const url = `${scheme}://${location.host}/webapi/sites/${encodeURIComponent(cluster)}/connect/ws?${params}`;
    setState('connecting', 'Connecting…');
    const sock = new WebSocket(url);
    ws = sock;
    sock.binaryType = 'arraybuffer';
    if (again) term.focus();
    sock.onopen = () => {
      sock.send(frame('a', getToken()));
      clearInterval(keepalive);
      keepalive = setInterval(() => send('p'), KEEPALIVE_MS);
    };
    sock.onmessage = (ev) => sock === ws && onMessage(ev);
    sock.onclose = (ev) => {
      if (sock !== ws || disposed) return;
      clearInterval(keepalive);
      running = false;
      if (ended) return;
      let why = 'Connection lost';
      if (ev.code === 4001) {
        why = 'Not signed in';
        term.write('\r\n\x1b[31m[your web session is not valid: sign in again]\x1b[0m\r\n');
      } else if (ev.code === 4003) {
        why = 'Access denied';
        // The reason came as an error message already (shown above): say it once.
        if (!failed) term.write(`\r\n\x1b[31m[access denied${ev.reason ? ': ' + ev.reason : ''}]\x1b[0m\r\n`);
      } else if (ev.code === 4008) {
        why = 'Connection timed out';
      } else if (!failed) {
        term.write(`\r\n\x1b[33m[connection closed${ev.code && ev.code !== 1005 ? ' (' + ev.code + ')' : ''}]\x1b[0m\r\n`);
      }
      setState('lost', failed ? 'Disconnected' : why);
      showBanner(failed ? 'The session could not continue —' : `${why} —`);
    };
  }

  connect(false);
  term.focus();

  return () => {
    disposed = true;
    clearInterval(keepalive);
    ro.disconnect();
    window.removeEventListener('resize', doFit);
    if (ws) ws.close(1000);
    term.dispose();
    if (window.wardTerm === term) window.wardTerm = null;
    document.body.classList.remove('term-body');
  };
}
