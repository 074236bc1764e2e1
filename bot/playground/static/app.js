// gesal-bot playground: a small client for the JSON API in bot/playground/server.py.
// No framework and no build step, so it runs from the Python package as it is.
"use strict";

const $ = (sel) => document.querySelector(sel);
// drafts: open correction boxes (message id -> text so far). The log is re-rendered on
// every vote and message, so a half-written correction must live here, not in the DOM.
const state = { channel: "general", members: [], selectedReply: null, messages: [],
                drafts: new Map(), resetConfirm: null };
const SVG = "http://www.w3.org/2000/svg";
// The server refuses every change that lacks this token or is not JSON, so that pages on
// other sites cannot drive the playground (bot/playground/guard.py).
const TOKEN = document.querySelector('meta[name="gesal-token"]').content;

// api(path) GETs; api(path, { json }) POSTs an object; api(path, { jsonText }) POSTs
// text that already is JSON (an export file). Changes carry the token.
async function api(path, options = {}) {
  const opts = { method: "GET", headers: {} };
  if (options.json !== undefined || options.jsonText !== undefined) {
    opts.method = "POST";
    opts.body = options.jsonText !== undefined ? options.jsonText : JSON.stringify(options.json);
    opts.headers["Content-Type"] = "application/json";
    opts.headers["X-Gesal-Token"] = TOKEN;
  }
  const resp = await fetch(path, opts);
  const type = resp.headers.get("Content-Type") || "";
  const body = type.includes("json") ? await resp.json() : await resp.text();
  if (!resp.ok) {
    const msg = (body && body.error) || (typeof body === "string" ? body : resp.statusText);
    throw new Error(msg);
  }
  return body;
}

function toast(text, isError = false) {
  const t = $("#toast");
  t.textContent = text;
  t.className = isError ? "error" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.hidden = true), isError ? 6000 : 2500);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

const chan = () => `/api/channels/${encodeURIComponent(state.channel)}`;
const member = () => $("#member").value;

// -- start-up progress ---------------------------------------------------------------
const ICON = { pending: "·", running: "⏳", done: "✓", failed: "✗" };

async function pollBoot() {
  let status;
  try {
    status = await api("/api/status");
  } catch (e) {
    setTimeout(pollBoot, 1000);
    return;
  }
  const list = $("#boot-steps");
  list.replaceChildren(
    ...status.boot.steps.map((s) =>
      el("li", { class: s.state, "data-state": s.state },
        el("span", { class: "state" }, ICON[s.state] || "?"),
        `${s.name}${s.seconds != null ? ` (${s.seconds.toFixed(1)} s)` : ""}`,
        el("span", { class: "detail" }, s.detail || ""))));
  if (status.boot.error) {
    $("#boot-error").textContent = status.boot.error;
    $("#boot-error").hidden = false;
    return;
  }
  if (!status.boot.ready) {
    setTimeout(pollBoot, 500);
    return;
  }
  state.members = status.members;
  $("#member").replaceChildren(...state.members.map((m) => el("option", { value: m }, m)));
  $("#engine-info").textContent = `model ${status.model || "?"} · store: ${status.store || "?"}`;
  $("#boot").hidden = true;
  $("#main").hidden = false;
  await loadChannels();
  await selectChannel(state.channel);
  setInterval(refreshSchedule, 5000);
}

// -- channels ------------------------------------------------------------------------
async function loadChannels() {
  const { channels } = await api("/api/channels");
  $("#channels").replaceChildren(
    ...channels.map((c) =>
      el("li", { "data-channel": c, class: c === state.channel ? "active" : "",
                 onclick: () => selectChannel(c) }, `#${c}`)));
}

async function selectChannel(name) {
  state.channel = name;
  state.selectedReply = null;
  $("#channel-title").textContent = `#${name}`;
  $("#export").href = `${chan()}/export`;
  document.querySelectorAll("#channels li").forEach((li) =>
    li.classList.toggle("active", li.dataset.channel === name));
  const { messages } = await api(`${chan()}/messages`);
  state.messages = messages;
  renderLog();
  await Promise.all([refreshGraph(), refreshSchedule(), loadThreshold()]);
}

$("#channel-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  try {
    const { channel } = await api("/api/channels", { json: { name: $("#new-channel").value } });
    $("#new-channel").value = "";
    await loadChannels();
    await selectChannel(channel);
  } catch (e) { toast(e.message, true); }
});

// -- messages ------------------------------------------------------------------------
function renderMessage(m) {
  const box = el("div", { class: `msg${m.is_bot ? " bot" : ""}${m.id === state.selectedReply ? " selected" : ""}`,
                          "data-id": m.id, "data-kind": m.kind });
  const head = el("div", {}, el("span", { class: "who" }, m.is_bot ? "🤖 gesal" : m.author),
                  el("span", { class: "meta" }, new Date(m.ts * 1000).toLocaleTimeString()));
  if (m.node_id) {
    head.append(el("span", { class: "node", "data-node": m.node_id, title: "the node that answered",
                             onclick: () => selectReply(m.id) },
                   `node ${m.node_id.slice(0, 6)}${m.new_node ? " (new)" : ""} · z v${m.z_version}`));
  }
  box.append(head, el("div", { class: "text" }, m.text));
  if (m.is_bot && m.reply_id) box.append(renderActions(m));
  return box;
}

function renderActions(m) {
  const mine = m.reactions[member()];
  const count = (v) => Object.values(m.reactions).filter((x) => x === v).length;
  const btn = (v, emoji) =>
    el("button", { type: "button", class: `vote ${v}${mine === v ? " active" : ""}`,
                   "aria-pressed": mine === v ? "true" : "false",
                   title: mine === v ? "click again to take your vote back" : `vote ${v}`,
                   onclick: () => vote(m, mine === v ? null : v) }, `${emoji} ${count(v)}`);
  const voters = Object.entries(m.reactions).map(([who, v]) => `${who} ${v === "up" ? "👍" : "👎"}`);
  const actions = el("div", { class: "actions" }, btn("up", "👍"), btn("down", "👎"),
    el("button", { type: "button", class: "suggest", onclick: () => openCorrection(m) },
       "✏️ suggest a better answer"),
    el("span", { class: "voters" }, voters.join(", ")));
  const wrap = el("div", {}, actions);
  if (m.corrections.length) {
    wrap.append(el("div", { class: "corrections" },
      ...m.corrections.map((c) => el("div", {}, `✏️ ${c.member}: ${c.text}`))));
  }
  if (state.drafts.has(m.id)) wrap.append(correctionBox(m));
  return wrap;
}

function renderLog() {
  const log = $("#log");
  log.replaceChildren(...state.messages.map(renderMessage));
  log.scrollTop = log.scrollHeight;
}

function replaceMessage(updated) {
  const i = state.messages.findIndex((m) => m.id === updated.id);
  if (i >= 0) state.messages[i] = updated;
  renderLog();
}

$("#member").addEventListener("change", renderLog);

$("#send-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("#text").value.trim();
  if (!text) return;
  $("#send").disabled = true;
  try {
    const { messages } = await api(`${chan()}/messages`, { json: { member: member(), text } });
    $("#text").value = "";
    state.messages.push(...messages);
    const answer = messages.find((m) => m.is_bot && m.node_id);
    if (answer) state.selectedReply = answer.id;
    renderLog();
    if (!messages.some((m) => m.is_bot)) toast("mention @gesal to get an answer");
    await refreshGraph();
  } catch (e) { toast(e.message, true); }
  finally { $("#send").disabled = false; $("#text").focus(); }
});

async function vote(m, value) {
  try {
    const res = await api(`${chan()}/messages/${m.id}/vote`, { json: { member: member(), vote: value } });
    replaceMessage(res.message);
    await Promise.all([refreshSchedule(), refreshGraph()]);
  } catch (e) { toast(e.message, true); }
}

function openCorrection(m) {
  if (!state.drafts.has(m.id)) state.drafts.set(m.id, "");
  renderLog();
  const area = document.querySelector(`.msg[data-id="${m.id}"] .correct-text`);
  if (area) area.focus();
}

function correctionBox(m) {
  const area = el("textarea", { class: "correct-text", placeholder: "a better answer…",
                                oninput: () => state.drafts.set(m.id, area.value) });
  area.value = state.drafts.get(m.id);
  const send = el("button", { type: "button", class: "correct-send", onclick: async () => {
    send.disabled = true;
    try {
      const res = await api(`${chan()}/messages/${m.id}/correct`,
                            { json: { member: member(), text: area.value } });
      state.drafts.delete(m.id);  // only once the server has it: a failed send keeps the text
      replaceMessage(res.message);
      toast("thanks: the bot will learn from that at the next training");
      await refreshSchedule();
    } catch (e) { toast(e.message, true); send.disabled = false; }
  } }, "Send correction");
  const cancel = el("button", { type: "button", class: "correct-cancel",
                                onclick: () => { state.drafts.delete(m.id); renderLog(); } },
                    "Cancel");
  return el("div", { class: "correct-box" }, area, send, cancel);
}

function selectReply(id) {
  state.selectedReply = id;
  renderLog();
  refreshGraph();
}

// -- training and admin ----------------------------------------------------------------
async function refreshSchedule() {
  try {
    const { schedule } = await api("/api/status");
    if (!schedule) return;
    const last = schedule.last_train ? new Date(schedule.last_train * 1000).toLocaleTimeString() : "never";
    const next = schedule.next_run ? new Date(schedule.next_run * 1000).toLocaleTimeString() : null;
    $("#schedule").textContent =
      `${schedule.pending} vote(s)/correction(s) waiting · last training: ${last}` +
      (schedule.running ? ` · trains once ${schedule.round} replies have feedback (checked every ${schedule.interval}s)` +
        (next ? ` · next ${next}` : "") : " · automatic training is off: press Train now");
  } catch (e) { /* status is best effort */ }
}

function showAdmin(text) { $("#admin-out").textContent = text; }

$("#train").addEventListener("click", async () => {
  $("#train").disabled = true;
  try {
    const res = await api(`${chan()}/train`, { json: {} });
    showAdmin(res.text);
    await Promise.all([refreshGraph(), refreshSchedule()]);
  } catch (e) { toast(e.message, true); }
  finally { $("#train").disabled = false; }
});

$("#stats").addEventListener("click", async () => {
  try { showAdmin((await api(`${chan()}/stats`)).text.replaceAll("**", "")); }
  catch (e) { toast(e.message, true); }
});

async function loadThreshold() {
  try {
    const res = await api(`${chan()}/config`, { json: {} });
    $("#threshold").value = res.data.threshold;
  } catch (e) { /* shown on use */ }
}

$("#set-threshold").addEventListener("click", async () => {
  try {
    const res = await api(`${chan()}/config`, { json: { threshold: $("#threshold").value } });
    showAdmin(res.text);
  } catch (e) { toast(e.message, true); }
});

$("#import-file").addEventListener("change", async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  try {
    const res = await api(`${chan()}/import`, { jsonText: await file.text() });
    showAdmin(res.text);
    await refreshGraph();
  } catch (e) { toast(e.message, true); }
  ev.target.value = "";
});

// Reset is two requests: the preview answers what would be lost and a one-time
// `confirm` value; only that value, sent back, resets (the server checks it).
$("#reset").addEventListener("click", async () => {
  try {
    const res = await api(`${chan()}/reset`, { json: {} });
    state.resetConfirm = { channel: state.channel, confirm: res.confirm };
    $("#reset-text").textContent = res.text;
    $("#reset-confirm").hidden = false;
  } catch (e) { toast(e.message, true); }
});
$("#reset-no").addEventListener("click", () => {
  state.resetConfirm = null;
  $("#reset-confirm").hidden = true;
});
$("#reset-yes").addEventListener("click", async () => {
  const pending = state.resetConfirm;
  state.resetConfirm = null;
  if (!pending || pending.channel !== state.channel) {
    $("#reset-confirm").hidden = true;
    toast("the channel changed: press Reset channel… again", true);
    return;
  }
  try {
    const res = await api(`${chan()}/reset`, { json: { confirm: pending.confirm } });
    $("#reset-confirm").hidden = true;
    showAdmin(res.text);
    await selectChannel(state.channel);
  } catch (e) { toast(e.message, true); }
});

// -- graph -----------------------------------------------------------------------------
function rewardColour(node) {
  if (!node.rated) return "#d1d5db";
  const r = Math.max(-1, Math.min(1, node.mean_reward));
  const mix = (a, b, t) => Math.round(a + (b - a) * t);
  const [from, to] = r >= 0 ? [[209, 213, 219], [22, 163, 74]] : [[209, 213, 219], [220, 38, 38]];
  const t = Math.abs(r);
  return `rgb(${mix(from[0], to[0], t)},${mix(from[1], to[1], t)},${mix(from[2], to[2], t)})`;
}

async function refreshGraph() {
  let g;
  try { g = await api(`${chan()}/graph`); } catch (e) { return; }
  const svg = $("#graph");
  const pos = Object.fromEntries(g.nodes.map((n) => [n.id, [n.x, -n.y]]));
  const answered = state.selectedReply ? g.answers[state.selectedReply] : null;
  const items = [];
  for (const e of g.edges) {
    const [a, b] = [pos[e.source], pos[e.target]];
    const line = document.createElementNS(SVG, "line");
    Object.entries({ x1: a[0], y1: a[1], x2: b[0], y2: b[1], class: "edge" })
      .forEach(([k, v]) => line.setAttribute(k, v));
    const title = document.createElementNS(SVG, "title");
    title.textContent = `similarity ${e.similarity}`;
    line.append(title);
    items.push(line);
  }
  for (const n of g.nodes) {
    const [x, y] = pos[n.id];
    const c = document.createElementNS(SVG, "circle");
    const r = 0.05 + 0.035 * Math.sqrt(n.count);
    Object.entries({ cx: x, cy: y, r: Math.min(r, 0.3), fill: rewardColour(n),
                     class: `node${n.id === answered ? " answered" : ""}`, "data-node": n.id,
                     "data-count": n.count, "data-version": n.version })
      .forEach(([k, v]) => c.setAttribute(k, v));
    const title = document.createElementNS(SVG, "title");
    title.textContent = `node ${n.id}\n${n.count} prompts · ${n.votes_up}👍 ${n.votes_down}👎\n` +
      `mean trained reward ${n.mean_reward} over ${n.rated} replies\n` +
      `z version ${n.version}, ‖z−1‖ = ${n.drift}`;
    c.append(title);
    const label = document.createElementNS(SVG, "text");
    label.setAttribute("x", x + Math.min(r, 0.3) + 0.02);
    label.setAttribute("y", y + 0.02);
    label.textContent = `${n.id.slice(0, 6)} ×${n.count} v${n.version}`;
    items.push(c, label);
  }
  svg.replaceChildren(...items);
  $("#graph-summary").textContent = `${g.nodes.length} node(s), ${g.edges.length} edge(s).`;
}

pollBoot();
