// The operators' page: plain JavaScript over the JSON API, no framework, no
// build step, nothing loaded from elsewhere. The token lives in this tab's
// sessionStorage and goes out as `Authorization: Bearer` on every call.
// Everything the API returns is put in the page as text (textContent),
// never as HTML.
"use strict";

const TOKEN_KEY = "ecommerce.operator-token";
const REFRESH_MS = 5000;
const FOLLOW_MS = 1000;
const $ = (id) => document.getElementById(id);

const state = {
  definition: null, // GET /sagas/definition, once
  detailId: null, // the saga shown
  detail: null, // its last instance
  after: null, // the next page of the saga list
  lastFinished: null, // {count, at}: for the throughput
  timer: null,
  follow: null, // polling after an action
};

// ---------------------------------------------------------------- helpers

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("data-") || k.startsWith("aria-") || k === "title" || k === "type") e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

function duration(ms) {
  if (ms === undefined || ms === null || Number.isNaN(ms)) return "–";
  const s = ms / 1000;
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 60) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m - h * 60} min`;
  return `${Math.floor(h / 24)} d ${h % 24} h`;
}

function when(ms) {
  if (typeof ms !== "number") return String(ms ?? "");
  return new Date(ms).toLocaleString();
}

function showError(message) {
  $("error").textContent = message || "";
}

// ---------------------------------------------------------------- the API

class Unauthorized extends Error {}

// Calls the API; returns {status, ok, body}. A 401 signs the operator out.
async function api(method, path, body, token) {
  const headers = { Authorization: `Bearer ${token || sessionStorage.getItem(TOKEN_KEY) || ""}` };
  const init = { method, headers, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const text = await res.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch (_) {
    json = { error: text };
  }
  if (res.status === 401 && !token) {
    signOut("The API no longer takes this token (401): enter it again.");
    throw new Unauthorized("401");
  }
  return { status: res.status, ok: res.ok, body: json };
}

function why(r) {
  return (r.body && r.body.error) || `HTTP ${r.status}`;
}

// ---------------------------------------------------------------- sign in

function showLogin(message) {
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("whoami").textContent = "";
  $("token").focus();
}

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  stopTimer();
  showLogin(message);
}

async function signIn(token) {
  let r;
  try {
    r = await api("GET", "/sagas?limit=1", undefined, token);
  } catch (e) {
    showLogin(`Cannot reach the API: ${e.message}`);
    return;
  }
  if (r.status === 401) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("The API did not take this token (401): check it and try again.");
    return;
  }
  if (r.status === 403) {
    sessionStorage.removeItem(TOKEN_KEY);
    showLogin("This token is not an operator's (403).");
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  $("login").hidden = true;
  $("login-error").textContent = "";
  $("app").hidden = false;
  $("sign-out").hidden = false;
  $("whoami").textContent = "signed in with an operator token";
  await refreshAll();
  startTimer();
  document.body.dataset.ready = "true";
}

// ---------------------------------------------------------------- numbers

// Prometheus text: [{name, labels, value}]
function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const l of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    }
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

function setStat(id, value) {
  $(id).textContent = value;
}

async function refreshNumbers() {
  const [orders, dlq, metrics] = await Promise.all([
    api("GET", "/orders"),
    api("GET", "/dlq"),
    fetch("/metrics", { cache: "no-store", credentials: "omit" }).then((r) => (r.ok ? r.text() : "")),
  ]);
  if (orders.ok) {
    const n = { PENDING: 0, CONFIRMED: 0, CANCELLED: 0, parked: 0 };
    for (const o of orders.body.orders || []) {
      const s = String(o.status || "").toUpperCase();
      if (s in n) n[s] += 1;
      if (o.saga_status === "parked") n.parked += 1;
    }
    setStat("stat-pending", n.PENDING);
    setStat("stat-confirmed", n.CONFIRMED);
    setStat("stat-cancelled", n.CANCELLED);
    setStat("stat-parked", n.parked);
  } else {
    for (const id of ["stat-pending", "stat-confirmed", "stat-cancelled", "stat-parked"]) setStat(id, "n/a");
  }
  setStat("stat-dlq", dlq.ok ? dlq.body.open : "n/a");

  const samples = parseMetrics(metrics);
  const finished = samples
    .filter((s) => s.name === "saga_duration_seconds_count" && ["completed", "compensated"].includes(s.labels.status))
    .reduce((sum, s) => sum + s.value, 0);
  const now = Date.now();
  if (state.lastFinished && now > state.lastFinished.at) {
    const rate = Math.max(0, finished - state.lastFinished.count) / ((now - state.lastFinished.at) / 1000);
    setStat("stat-throughput", rate.toFixed(2));
  }
  state.lastFinished = { count: finished, at: now };
  const p99 = samples
    .filter((s) => s.name === "saga_duration_seconds" && s.labels.quantile === "0.99" && Number.isFinite(s.value))
    .reduce((max, s) => Math.max(max, s.value), -1);
  setStat("stat-p99", p99 >= 0 ? duration(p99 * 1000) : "–");
}

// ---------------------------------------------------------------- the saga list

function sagaQuery(after) {
  const q = new URLSearchParams({ limit: "50" });
  const status = $("filter-status").value;
  const older = $("filter-older-than").value.trim();
  if (status) q.set("status", status);
  if (older) q.set("older_than", older);
  if (after) q.set("after", after);
  return `/sagas?${q}`;
}

function sagaRow(s) {
  const open = el("button", { type: "button", class: "link", "data-open-saga": s.id, text: s.id });
  open.addEventListener("click", () => openSaga(s.id));
  return el(
    "tr",
    { "data-saga-id": s.id, "data-status": s.status },
    el("td", {}, open),
    el("td", {}, el("span", { class: `status ${s.status}`, text: s.status })),
    el("td", { text: s.step || "" }),
    el("td", { text: duration(s.age_ms) }),
    el("td", { text: duration(s.idle_ms) }),
    el("td", { class: "reason", text: s.reason || "" }),
  );
}

async function refreshSagas(more) {
  const r = await api("GET", sagaQuery(more ? state.after : null));
  const body = $("sagas-body");
  if (!r.ok) {
    if (!more) clear(body);
    $("sagas-empty").hidden = true;
    showError(`Sagas: ${why(r)}`);
    return;
  }
  if (!more) clear(body);
  for (const s of r.body.sagas) body.append(sagaRow(s));
  state.after = r.body.next || null;
  $("sagas-more").hidden = !state.after;
  $("sagas-empty").hidden = body.children.length > 0;
}

// ---------------------------------------------------------------- one saga

async function definition() {
  if (!state.definition) {
    const r = await api("GET", "/sagas/definition");
    if (r.ok) state.definition = r.body;
  }
  return state.definition;
}

function currentStep(inst) {
  const status = inst.status && inst.status.status;
  if (status === "completed" || status === "compensated" || !inst.steps.length) return null;
  return inst.steps[Math.min(inst.cursor, inst.steps.length - 1)].name;
}

function renderFlow(inst, def) {
  const flow = $("flow");
  clear(flow);
  const current = currentStep(inst);
  const steps = def ? def.steps : inst.steps.map((s) => ({ name: s.name }));
  for (const step of steps) {
    const rec = inst.steps.find((s) => s.name === step.name) || { state: "pending", attempts: 0 };
    const isCurrent = step.name === current;
    const where = step.channel ? `command → ${step.channel}` : "local";
    flow.append(
      el(
        "li",
        {
          class: `step ${rec.state}${isCurrent ? " current" : ""}`,
          "data-step": step.name,
          "data-state": rec.state,
          "aria-current": isCurrent ? "step" : null,
        },
        el("strong", { text: step.name }),
        el("small", { text: [step.kind, where].filter(Boolean).join(", ") }),
        el("span", { class: "state", text: `${rec.state}${rec.attempts ? ` · ${rec.attempts} attempt${rec.attempts > 1 ? "s" : ""}` : ""}` }),
        rec.last_error && rec.state !== "succeeded" ? el("span", { class: "error", text: rec.last_error }) : null,
      ),
    );
  }
  $("mermaid").textContent = def ? def.mermaid : "(the definition is not available here)";
}

function renderDetail(inst, def) {
  const status = (inst.status && inst.status.status) || "unknown";
  $("saga-detail").hidden = false;
  $("saga-detail").dataset.sagaId = inst.id;
  $("detail-id").textContent = inst.id;
  const badge = $("detail-status");
  badge.textContent = status;
  badge.className = `status ${status}`;
  badge.dataset.status = status;
  $("detail-reason").textContent = (inst.status && inst.status.reason) || inst.failure || "";
  renderFlow(inst, def);
  // Parked sagas take every action; running or compensating ones (stuck
  // on a reply or a backoff) a retry now or an abort, which the server
  // refuses with a reason when they do not apply.
  const parked = status === "parked";
  const active = parked || status === "running" || status === "compensating";
  $("saga-actions").hidden = !active;
  $("actions-title").textContent = parked ? "Act on the parked saga" : "Act on the stuck saga";
  const skip = document.querySelector('#saga-actions [data-action="skip"]');
  if (skip) skip.disabled = !parked;
  const abort = document.querySelector('#saga-actions [data-action="abort"]');
  if (abort) abort.disabled = status === "compensating";
  const history = $("history");
  clear(history);
  for (const h of inst.history || []) {
    history.append(
      el(
        "li",
        { "data-status": h.status, "data-operator": h.operator, "data-note": h.note },
        el("time", { text: when(h.at) }),
        " ",
        el("span", { class: `status ${h.status}`, text: h.status }),
        " ",
        h.what,
        h.operator ? el("span", { class: "who", text: ` by ${h.operator}` }) : null,
        h.note ? el("q", { text: h.note }) : null,
      ),
    );
  }
  $("detail-data").textContent = JSON.stringify(inst.data, null, 2);
}

async function openSaga(id) {
  if (state.detailId !== id) $("action-result").textContent = "";
  state.detailId = id;
  const [r, def] = await Promise.all([api("GET", `/sagas/${encodeURIComponent(id)}`), definition()]);
  if (state.detailId !== id) return; // another was opened meanwhile
  if (!r.ok) {
    showError(`Saga ${id}: ${why(r)}`);
    return;
  }
  state.detail = r.body;
  renderDetail(r.body, def);
}

function closeSaga() {
  state.detailId = null;
  state.detail = null;
  stopFollowing();
  $("saga-detail").hidden = true;
}

async function act(action) {
  const inst = state.detail;
  if (!inst) return;
  const note = $("action-note").value.trim();
  // The version shown: a second press (or a request sent again) after
  // the saga moved on is refused instead of acting twice.
  const body = { step: currentStep(inst) || undefined, version: inst.version };
  if (note) body.note = note;
  const r = await api("POST", `/sagas/${encodeURIComponent(inst.id)}/${action}`, body);
  const out = $("action-result");
  if (r.ok) {
    out.textContent = `${action}: accepted, following the saga…`;
    out.dataset.result = "accepted";
    $("action-note").value = "";
    follow(inst.id, (inst.history || []).length);
  } else {
    out.textContent = `${action}: refused, ${why(r)}`;
    out.dataset.result = "refused";
  }
}

// After an action: re-read the saga every second until the runtime has
// applied it (its history grew past `seen` entries) and it is settled
// again (for at most a minute), then the list and the numbers.
function follow(id, seen) {
  stopFollowing();
  const until = Date.now() + 60000;
  state.follow = setInterval(async () => {
    if (state.detailId !== id || Date.now() > until) return stopFollowing();
    try {
      await openSaga(id);
      const inst = state.detail;
      const s = inst && inst.status && inst.status.status;
      const applied = inst && (inst.history || []).length > seen;
      if (applied && (s === "completed" || s === "compensated" || s === "parked")) {
        stopFollowing();
        $("action-result").textContent += ` now ${s}.`;
        await Promise.all([refreshSagas(false), refreshNumbers()]);
      }
    } catch (e) {
      if (!(e instanceof Unauthorized)) showError(e.message);
      stopFollowing();
    }
  }, FOLLOW_MS);
}

function stopFollowing() {
  if (state.follow) clearInterval(state.follow);
  state.follow = null;
}

// ---------------------------------------------------------------- the DLQ

function dlqRow(e) {
  const open = e.status === "open" || e.status === "alerted";
  const cell = el("td", { class: "actions" });
  if (open) {
    const note = el("input", { size: 16, placeholder: "note", "aria-label": `note for ${e.dlq_id}`, "data-note-for": e.dlq_id });
    cell.append(note);
    for (const action of ["retry", "discard", "alert", "sms"]) {
      const b = el("button", { type: "button", "data-action": action, "data-dlq-id": e.dlq_id, text: action });
      b.addEventListener("click", () => actOnDeadLetter(e.dlq_id, action, note.value.trim()));
      cell.append(b);
    }
  } else {
    const actions = e.actions || [];
    const last = actions[actions.length - 1];
    if (last) cell.append(`${last.action} by ${last.by} at ${last.at}${last.note ? `: ${last.note}` : ""}`);
  }
  const dl = e.dead_letter || {};
  return el(
    "tr",
    { "data-dlq-id": e.dlq_id, "data-status": e.status },
    el("td", { text: e.dlq_id }),
    el("td", {}, el("span", { class: `status ${e.status}`, text: e.status })),
    el("td", { text: e.order_id }),
    el("td", { text: e.failure_time }),
    el("td", { text: dl.retry_count ?? "" }),
    el("td", { class: "reason", text: dl.last_error || dl.reason || "" }),
    cell,
  );
}

async function refreshDlq() {
  const r = await api("GET", "/dlq");
  const body = $("dlq-body");
  clear(body);
  if (!r.ok) {
    $("dlq-empty").hidden = false;
    $("dlq-empty").textContent = `Not available here: ${why(r)}`;
    return;
  }
  for (const e of r.body.entries) body.append(dlqRow(e));
  $("dlq-empty").textContent = "No dead letter.";
  $("dlq-empty").hidden = r.body.entries.length > 0;
}

async function actOnDeadLetter(id, action, note) {
  const r = await api("POST", `/dlq/${encodeURIComponent(id)}/${action}`, note ? { note } : {});
  const out = $("dlq-result");
  out.textContent = r.ok ? `${id}: ${action} done.` : `${id}: ${action} refused, ${why(r)}`;
  out.dataset.result = r.ok ? "done" : "refused";
  await Promise.all([refreshDlq(), refreshNumbers()]);
}

// ---------------------------------------------------------------- refresh

async function refreshAll() {
  try {
    showError("");
    const jobs = [refreshNumbers(), refreshSagas(false), refreshDlq()];
    if (state.detailId && !state.follow) jobs.push(openSaga(state.detailId));
    await Promise.all(jobs);
    $("refreshed-at").textContent = `as of ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    if (!(e instanceof Unauthorized)) showError(`Cannot reach the API: ${e.message}`);
  }
}

function startTimer() {
  stopTimer();
  state.timer = setInterval(() => {
    if ($("auto-refresh").checked && !$("app").hidden) refreshAll();
  }, REFRESH_MS);
}

function stopTimer() {
  if (state.timer) clearInterval(state.timer);
  state.timer = null;
  stopFollowing();
}

// ---------------------------------------------------------------- wiring

function guard(f) {
  return (...args) =>
    Promise.resolve(f(...args)).catch((e) => {
      if (!(e instanceof Unauthorized)) showError(e.message);
    });
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    if (token) guard(signIn)(token);
  });
  $("sign-out").addEventListener("click", () => signOut(""));
  $("refresh").addEventListener("click", guard(refreshAll));
  $("filters").addEventListener("submit", (ev) => {
    ev.preventDefault();
    guard(refreshSagas)(false);
  });
  $("sagas-more").addEventListener("click", () => guard(refreshSagas)(true));
  $("detail-close").addEventListener("click", closeSaga);
  for (const b of document.querySelectorAll("#saga-actions [data-action]")) {
    b.addEventListener("click", () => guard(act)(b.dataset.action));
  }
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) guard(signIn)(token);
  else showLogin("");
});
