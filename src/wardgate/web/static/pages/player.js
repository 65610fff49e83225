// /web/recordings/<sid>: play an asciicast v2 recording with asciinema-player.
// The cast is fetched with the bearer token and handed to the player as inline data.

import { api, enc } from '../api.js';
import { errorView, fmtDuration, fmtTime, h, loadCss, loadScript, pageHeader, replace, spinner } from '../ui.js';

const SPEEDS = [0.5, 1, 2, 4];
const IDLE_LIMIT = 2;

function parseCast(text) {
  const lines = text.split('\n').filter((l) => l.trim());
  let header = {};
  try {
    header = JSON.parse(lines[0] || '{}');
  } catch {
    header = {};
  }
  let last = 0;
  for (let i = lines.length - 1; i > 0; i--) {
    try {
      const ev = JSON.parse(lines[i]);
      if (Array.isArray(ev) && typeof ev[0] === 'number') {
        last = ev[0];
        break;
      }
    } catch {
      /* keep looking */
    }
  }
  // v3 casts use relative times; v2 absolute: either way the last line tells the length well enough for v2.
  return { header, duration: header.duration || last };
}

const fmtClock = (s) => {
  s = Math.max(0, Math.floor(s || 0));
  const m = Math.floor(s / 60);
  const ss = String(s % 60).padStart(2, '0');
  return m >= 60 ? `${Math.floor(m / 60)}:${String(m % 60).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
};

export default async function render(el, ctx) {
  const sid = ctx.params[0];
  const back = h('a', { href: '/web/recordings', class: 'btn btn-ghost btn-sm', testid: 'player-back' }, '← Recordings');
  const meta = h('div', { class: 'player-meta', testid: 'player-meta' });
  const mount = h('div', { class: 'player-mount', testid: 'player' }, spinner('Loading recording…'));
  replace(el, pageHeader('Recording', { subtitle: `Session ${sid}`, actions: [back] }), meta, mount);

  let text;
  try {
    await Promise.all([loadCss('/web/vendor/asciinema-player/asciinema-player.css'), loadScript('/web/vendor/asciinema-player/asciinema-player.min.js')]);
    const resp = await api('GET', '/webapi/recordings/' + enc(sid), undefined, { raw: true, accept: 'application/x-asciicast, text/plain, */*' });
    text = await resp.text();
  } catch (e) {
    if (ctx.alive()) replace(mount, errorView(e));
    return;
  }
  if (!ctx.alive()) return;
  const { header, duration } = parseCast(text);

  const env = header.env || {};
  replace(
    meta,
    [
      ['Started', header.timestamp ? fmtTime(new Date(header.timestamp * 1000).toISOString()) : '—'],
      ['Length', fmtDuration(duration)],
      ['Size', header.width && header.height ? `${header.width}×${header.height}` : '—'],
      ['Shell', env.SHELL || '—'],
      header.title && header.title !== sid ? ['Title', header.title] : null,
    ]
      .filter(Boolean)
      .map(([k, v]) => h('div', { class: 'meta-item' }, h('span', { class: 'meta-key' }, k), h('span', { class: 'meta-val' }, v))),
  );

  let speed = 1;
  let skipIdle = true;
  let player = null;
  let box = null;

  const speedBtns = SPEEDS.map((s) =>
    h('button', { type: 'button', class: 'seg-btn', testid: `speed-${s}`, dataset: { speed: String(s) }, 'aria-pressed': String(s === speed), onclick: () => setSpeed(s) }, `${s}×`),
  );
  const timeEl = h('span', { class: 'player-time mono', testid: 'player-time' }, '0:00');
  const playBtn = h('button', { type: 'button', class: 'btn btn-primary btn-sm', testid: 'player-play' }, 'Play');
  const idleBox = h('input', { type: 'checkbox', checked: true, testid: 'player-skip-idle' });
  const controls = h(
    'div',
    { class: 'player-controls', testid: 'player-controls' },
    playBtn,
    h('button', { type: 'button', class: 'btn btn-secondary btn-sm', testid: 'seek-back', onclick: () => seekBy(-10) }, '⟲ 10s'),
    h('button', { type: 'button', class: 'btn btn-secondary btn-sm', testid: 'seek-forward', onclick: () => seekBy(10) }, '10s ⟳'),
    h('div', { class: 'segmented segmented-sm', role: 'group', 'aria-label': 'Playback speed' }, speedBtns),
    h('label', { class: 'check' }, idleBox, 'Skip idle time'),
    h('div', { class: 'spacer' }),
    timeEl,
  );
  box = h('div', { class: 'player-box' });
  replace(mount, box, controls);
  // fit: 'width' scales the terminal to the box: cap the width so the whole screen fits the window.
  const sizeBox = () => {
    const cols = header.width || 80;
    const rows = header.height || 24;
    const maxH = Math.max(300, window.innerHeight - 370);
    box.style.maxWidth = `${Math.max(520, Math.round((maxH * (cols * 0.6)) / (rows * 1.333)))}px`;
  };
  sizeBox();
  window.addEventListener('resize', sizeBox);

  let playing = false;
  const setPlaying = (p) => {
    playing = p;
    playBtn.textContent = p ? 'Pause' : 'Play';
    mount.dataset.playing = String(p);
  };

  let atEnd = false;

  // startAt: where Play starts; showAt: the frame shown until then (when not playing at once), so
  // recreating the player (speed, idle time) keeps the screen as it was.
  function create(startAt, autoPlay, showAt = startAt) {
    if (player) {
      try {
        player.dispose();
      } catch {
        /* already gone */
      }
    }
    replace(box);
    const opts = { speed, fit: 'width', controls: true, autoPlay, preload: true, terminalFontSize: '14px', theme: 'asciinema' };
    if (skipIdle) opts.idleTimeLimit = IDLE_LIMIT;
    if (startAt) opts.startAt = startAt;
    if (!autoPlay && showAt) opts.poster = `npt:${showAt}`;
    atEnd = false;
    player = window.AsciinemaPlayer.create({ data: text }, box, opts);
    window.wardPlayer = player;
    player.addEventListener('play', () => ((atEnd = false), setPlaying(true)));
    player.addEventListener('playing', () => ((atEnd = false), setPlaying(true)));
    player.addEventListener('pause', () => setPlaying(false));
    player.addEventListener('ended', () => ((atEnd = true), setPlaying(false)));
    setPlaying(!!autoPlay);
    mount.dataset.speed = String(speed);
  }

  async function current() {
    try {
      return (await player.getCurrentTime()) || 0;
    } catch {
      return 0;
    }
  }

  async function setSpeed(s) {
    if (s === speed) return;
    const t = await current();
    speed = s;
    for (const b of speedBtns) b.setAttribute('aria-pressed', String(Number(b.dataset.speed) === s));
    // The player takes its speed at creation: recreate it at the same point (after the end, Play
    // starts over, as it does in the player, while the last screen stays in view).
    create(atEnd ? 0 : t, playing, t);
  }

  async function seekBy(d) {
    const t = await current();
    let total = 0;
    try {
      total = (await player.getDuration()) || 0;
    } catch {
      total = 0;
    }
    const to = Math.max(0, total ? Math.min(total, t + d) : t + d);
    await player.seek(to);
    tick();
  }

  playBtn.addEventListener('click', () => (playing ? player.pause() : player.play()));
  idleBox.addEventListener('change', async () => {
    skipIdle = idleBox.checked;
    create(0, false); // the timeline changes with the idle limit: start over
  });

  async function tick() {
    if (!player) return;
    try {
      const [t, d] = await Promise.all([player.getCurrentTime(), player.getDuration()]);
      timeEl.textContent = `${fmtClock(t)} / ${fmtClock(d)}`;
      mount.dataset.time = String(Math.round((t || 0) * 10) / 10);
    } catch {
      /* not loaded yet */
    }
  }

  create(0, true);
  const timer = setInterval(tick, 250);
  return () => {
    clearInterval(timer);
    window.removeEventListener('resize', sizeBox);
    if (player) {
      try {
        player.dispose();
      } catch {
        /* ignore */
      }
    }
    window.wardPlayer = null;
  };
}
