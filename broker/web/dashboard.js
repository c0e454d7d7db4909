// cancel-broker dashboard: polls the broker's JSON endpoints and renders them.
// No framework and no inner HTML: every value (event data comes from any publisher) is
// inserted as text, so nothing in it can run as script.
"use strict";

const RUNS_EVERY_MS = 1000;
const SLOW_EVERY_MS = 3000;
const body = document.body;
const cancelOn = body.dataset.cancel === "on";
const tokenNeeded = body.dataset.tokenNeeded === "yes";
const $ = (id) => document.getElementById(id);

// Results of Cancel clicks, shown on the run's row until it finishes.
const cancelResults = new Map();

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "onclick") node.addEventListener("click", value);
    else if (key in node && key !== "title") node[key] = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function json(value, max) {
  const text = JSON.stringify(value);
  if (text === undefined) return "";
  return max && text.length > max ? text.slice(0, max - 1) + "…" : text;
}

function shortId(id) {
  return id && id.length > 14 ? id.slice(0, 12) + "…" : id || "";
}

function ago(ms) {
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function duration(ms) {
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${ms.toFixed(1)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.floor(ms / 60000)} min ${Math.round((ms % 60000) / 1000)} s`;
}

function when(iso) {
  const ms = typeof iso === "number" ? iso : Date.parse(iso);
  return el("time", { datetime: new Date(ms).toISOString(), title: new Date(ms).toLocaleString() }, ago(ms));
}

function chip(text, kind) {
  return el("span", { class: `chip chip-${kind || text}` }, text);
}

async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function setLive(ok, text) {
  const live = $("live");
  live.textContent = text;
  live.className = ok ? "live ok" : "live down";
}

function toast(text, kind) {
  const box = $("toast");
  box.textContent = text;
  box.className = `toast ${kind}`;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), 6000);
}

// -- runs ---------------------------------------------------------------------------------

function runsQuery() {
  const params = new URLSearchParams();
  for (const name of ["app", "function", "status"]) {
    const value = $(`filter-${name}`).value;
    if (value) params.set(name, value);
  }
  return params.toString();
}

function cancelledBy(run) {
  const by = run.cancelled_by || "";
  if (by === "api") return "by id (" + (run.cancel_reason || "api") + ")";
  if (by.startsWith("parent:")) return `with its parent ${shortId(by.slice(7))}`;
  const name = (run.cancel_reason || "").replace(/^cancel event /, "");
  return `event ${name} ${by}`;
}

function endedCell(run) {
  const parts = [];
  if (run.status === "cancelled" || run.status === "cancelling") {
    parts.push(el("div", { class: "by" }, cancelledBy(run)));
    if (run.cancel_latency_ms !== null && run.cancel_latency_ms !== undefined) {
      parts.push(el("div", { class: "muted" }, `stopped ${duration(run.cancel_latency_ms)} after the cancel`));
    } else if (run.status === "cancelling") {
      parts.push(el("div", { class: "muted" }, "its worker is stopping it"));
    }
  }
  if (run.error) parts.push(el("div", { class: "error" }, run.error));
  if (run.on_cancel_error) parts.push(el("div", { class: "error" }, `on_cancel: ${run.on_cancel_error}`));
  if (run.finished_at) {
    const took = Date.parse(run.finished_at) - Date.parse(run.started_at);
    parts.push(el("div", { class: "muted" }, "ended ", when(run.finished_at), ` · ran ${duration(took)}`));
  }
  return el("td", {}, parts);
}

async function cancelRun(run, button) {
  button.disabled = true;
  button.textContent = "Cancelling…";
  const headers = { Accept: "application/json", [body.dataset.requestHeader]: "dashboard" };
  if (tokenNeeded) headers[body.dataset.tokenHeader] = $("token").value;
  try {
    const response = await fetch(`/v1/runs/${encodeURIComponent(run.run_id)}/cancel`, {
      method: "POST",
      headers,
      cache: "no-store",
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
    const result = data.result;
    const text = `${result.outcome}: ${result.previous_status || "-"} → ${result.status || "-"}`;
    cancelResults.set(run.run_id, text);
    toast(`Run ${shortId(run.run_id)}: ${text}`, result.outcome === "signalled" ? "ok" : "warn");
  } catch (error) {
    cancelResults.set(run.run_id, `refused: ${error.message}`);
    toast(`Cancel of ${shortId(run.run_id)} failed: ${error.message}`, "bad");
  }
  refreshRuns();
}

function runRow(run) {
  const actions = el("td", { class: "actions" });
  if (run.status === "running" && cancelOn) {
    const button = el("button", { type: "button", class: "cancel", "data-run": run.run_id }, "Cancel");
    button.addEventListener("click", () => cancelRun(run, button));
    actions.append(button);
  }
  const result = cancelResults.get(run.run_id);
  if (result) actions.append(el("div", { class: "result" }, result));
  const trigger = run.event || {};
  return el(
    "tr",
    { "data-run": run.run_id, "data-status": run.status },
    el("td", {}, chip(run.status)),
    el("td", {}, el("div", {}, `${run.app_id} / ${run.function_id}`), el("div", { class: "muted mono", title: run.run_id }, shortId(run.run_id))),
    el("td", {}, el("div", {}, trigger.name || ""), el("div", { class: "mono data", title: json(trigger.data) }, json(trigger.data, 120))),
    el("td", { class: "mono", title: run.worker_id }, run.worker_id),
    el("td", {}, when(run.started_at)),
    endedCell(run),
    actions,
  );
}

async function refreshRuns() {
  clearTimeout(refreshRuns.timer);
  try {
    const page = await getJSON(`/v1/runs?${runsQuery()}`);
    const rows = page.runs.map(runRow);
    $("runs-body").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 7, class: "empty" }, "No run matches."))]));
    for (const id of [...cancelResults.keys()]) {
      if (!page.runs.some((run) => run.run_id === id)) cancelResults.delete(id);
    }
    $("runs-summary").textContent = `${page.active_total} unfinished · latest ${page.finished_total} finished kept`;
    setLive(true, `live · ${new Date().toLocaleTimeString()}`);
  } catch (error) {
    setLive(false, `offline: ${error.message}`);
  }
  refreshRuns.timer = setTimeout(refreshRuns, RUNS_EVERY_MS);
}

// -- functions and sync -------------------------------------------------------------------

function ruleText(rule) {
  const parts = [rule.event];
  if (rule.all_runs) parts.push("all runs");
  if (rule.match) parts.push(`match ${rule.match}`);
  if (rule.if) parts.push(`if ${rule.if}`);
  if (rule.timeout_s) parts.push(`timeout ${rule.timeout_s} s`);
  if (rule.until_ms) parts.push(`until ${new Date(rule.until_ms).toISOString()}`);
  return parts.join(" · ");
}

function findingItem(finding) {
  return el("li", { class: "finding" }, chip(finding.kind.replace(/_/g, " "), "stale"), " ", finding.message);
}

function configBlock(config) {
  const head = el(
    "div",
    { class: "config-head" },
    el("span", { class: "mono", title: config.config_hash }, shortId(config.config_hash)),
    config.synced ? chip("latest sync", "synced") : chip("not in the latest sync", "stale"),
    config.workers.length ? "" : chip("no live worker", "stale"),
  );
  if (!config.known) return el("div", { class: "config" }, head, el("div", { class: "muted" }, "configuration record expired"));
  const rules = config.cancel_on.length
    ? el("ul", { class: "rules" }, config.cancel_on.map((rule) => el("li", { class: "mono" }, ruleText(rule))))
    : el("div", { class: "warn-text" }, "no cancel_on rule: cancel events cannot stop these runs");
  return el(
    "div",
    { class: "config" },
    head,
    el("div", { class: "muted" }, `trigger ${config.trigger}`, config.trigger_if ? ` if ${config.trigger_if}` : "", ` · ${config.cancel_mode}`, config.interrupt_after_s != null ? ` · interrupt after ${config.interrupt_after_s} s` : "", config.owner ? ` · owner ${config.owner}` : ""),
    rules,
    el("div", { class: "muted" }, `${config.active_runs} running · workers: ${config.workers.join(", ") || "none"}`),
  );
}

function functionCard(fn) {
  const stale = fn.findings.length > 0;
  return el(
    "article",
    { class: stale ? "card stale" : "card", "data-function": `${fn.app_id}/${fn.function_id}` },
    el("h3", {}, `${fn.app_id} / ${fn.function_id}`, stale ? chip("stale", "stale") : chip("in sync", "synced")),
    fn.findings.length ? el("ul", { class: "findings" }, fn.findings.map(findingItem)) : "",
    fn.configs.map(configBlock),
  );
}

function fillSelect(select, values) {
  const current = select.value;
  const options = [el("option", { value: "" }, "all"), ...values.map((v) => el("option", { value: v }, v))];
  select.replaceChildren(...options);
  if (values.includes(current)) select.value = current;
}

async function refreshFunctions() {
  try {
    const page = await getJSON("/v1/functions");
    const banner = $("redis-warning");
    banner.textContent = (page.warnings || []).join(" ");
    banner.hidden = !(page.warnings || []).length;
    const cards = page.functions.map(functionCard);
    $("functions-body").replaceChildren(...(cards.length ? cards : [el("p", { class: "empty" }, "No app has synced yet.")]));
    const global = page.findings.filter((f) => !f.function_id);
    $("findings").replaceChildren(...global.map(findingItem));
    $("sync-summary").textContent = page.findings.length
      ? `${page.findings.length} stale finding(s)`
      : "every configuration in sync";
    $("sync-summary").className = page.findings.length ? "warn-text" : "muted";
    $("workers-body").replaceChildren(
      ...page.workers.map((w) =>
        el("tr", {}, el("td", { class: "mono" }, w.worker_id), el("td", {}, w.app_id), el("td", {}, w.app_version || "-"), el("td", {}, `${w.host} / ${w.pid}`), el("td", {}, when(w.heartbeat_at))),
      ),
    );
    fillSelect($("filter-app"), [...new Set(page.functions.map((f) => f.app_id))].sort());
    fillSelect($("filter-function"), [...new Set(page.functions.map((f) => f.function_id))].sort());
  } catch (error) {
    setLive(false, `offline: ${error.message}`);
  }
}

// -- cancel events ------------------------------------------------------------------------

function decisionChip(d) {
  if (d.decision === "matched") return chip(`matched ${d.runs_matched} run${d.runs_matched === 1 ? "" : "s"}`, "matched");
  if (d.decision === "dead_lettered") return chip("dead-lettered", "bad");
  return chip(d.decision, d.decision);
}

function decisionDetails(d) {
  if (d.decision === "dead_lettered") return el("td", {}, el("b", {}, d.reason || ""), ": ", d.detail || "");
  const outcomes = Object.entries(d.outcomes || {}).map(([k, v]) => `${k} ${v}`).join(", ");
  return el(
    "td",
    {},
    outcomes ? el("div", {}, outcomes) : "",
    d.run_ids && d.run_ids.length ? el("div", { class: "mono muted" }, d.run_ids.map(shortId).join(" ")) : "",
    d.decision === "tombstoned" ? el("div", { class: "muted" }, "no run yet: a run that registers later is cancelled") : "",
    d.detail ? el("div", { class: "warn-text" }, d.detail) : "",
    el("div", { class: "muted" }, `rules ${(d.rules || []).join(", ") || "-"}`, d.latency_ms != null ? ` · ${duration(d.latency_ms)}` : ""),
  );
}

async function refreshDecisions() {
  try {
    const page = await getJSON("/v1/decisions?limit=50");
    const rows = page.decisions.map((d) =>
      el(
        "tr",
        { "data-event": d.event_id, "data-decision": d.decision },
        el("td", {}, when(d.at)),
        el("td", {}, el("div", {}, d.event_name || "(unreadable)"), el("div", { class: "mono muted" }, d.event_id)),
        el("td", { class: "mono data", title: json(d.data) }, json(d.data, 80)),
        el("td", {}, decisionChip(d)),
        decisionDetails(d),
      ),
    );
    $("decisions-body").replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colspan: 5, class: "empty" }, "No cancel event yet."))]));
  } catch (error) {
    setLive(false, `offline: ${error.message}`);
  }
}

// -- activity charts ------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";
const CHART = { width: 600, height: 140, left: 44, right: 8, top: 10, bottom: 22 };

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

// The frame of a chart: the y axis up to `top`, labelled with `label(top)`, and the first
// and last minute under the x axis. Returns the functions that place a minute and a value.
function frame(chart, minutes, top, label) {
  const plotWidth = CHART.width - CHART.left - CHART.right;
  const plotHeight = CHART.height - CHART.top - CHART.bottom;
  const slot = plotWidth / minutes.length;
  const x = (i) => CHART.left + i * slot;
  const y = (value) => CHART.top + plotHeight * (1 - value / top);
  const bottom = CHART.top + plotHeight;
  const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  chart.replaceChildren(
    svg("line", { class: "axis", x1: CHART.left, x2: CHART.width - CHART.right, y1: bottom, y2: bottom }),
    svg("line", { class: "axis", x1: CHART.left, x2: CHART.width - CHART.right, y1: CHART.top, y2: CHART.top }),
    svg("text", { x: CHART.left - 6, y: CHART.top + 4, "text-anchor": "end" }, label(top)),
    svg("text", { x: CHART.left - 6, y: bottom, "text-anchor": "end" }, label(0)),
    svg("text", { x: CHART.left, y: CHART.height - 6 }, clock(minutes[0].at)),
    svg("text", { x: CHART.width - CHART.right, y: CHART.height - 6, "text-anchor": "end" }, "now"),
  );
  return { x, y, slot, bottom };
}

function niceTop(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function drawRuns(minutes) {
  const chart = $("chart-runs");
  const top = niceTop(Math.max(...minutes.map((m) => m.ended)));
  const { x, y, slot, bottom } = frame(chart, minutes, top, (v) => String(v));
  minutes.forEach((m, i) => {
    const width = Math.max(1, slot - 2);
    const title = `${new Date(m.at).toLocaleTimeString()}: ${m.ended} ended, ${m.cancelled} cancelled, ${m.failed} failed`;
    if (m.ended) {
      const bar = svg("rect", { class: "bar-ended", x: x(i) + 1, y: y(m.ended), width, height: bottom - y(m.ended) });
      bar.append(svg("title", {}, title));
      chart.append(bar);
    }
    if (m.cancelled) {
      const bar = svg("rect", { class: "bar-cancelled", x: x(i) + 1, y: y(m.cancelled), width, height: bottom - y(m.cancelled) });
      bar.append(svg("title", {}, title));
      chart.append(bar);
    }
  });
}

function drawLatency(minutes) {
  const chart = $("chart-latency");
  const values = minutes.flatMap((m) => [m.p50_ms, m.p99_ms]).filter((v) => v !== null && v !== undefined);
  const top = niceTop(values.length ? Math.max(...values) : 1);
  const { x, y, slot } = frame(chart, minutes, top, (v) => duration(v));
  for (const [field, kind] of [["p50_ms", "p50"], ["p99_ms", "p99"]]) {
    const points = minutes.map((m, i) => [m[field], i]).filter(([v]) => v !== null && v !== undefined);
    if (points.length > 1) {
      const d = points.map(([v, i], n) => `${n ? "L" : "M"}${(x(i) + slot / 2).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      chart.append(svg("path", { class: `line-${kind}`, d }));
    }
    for (const [v, i] of points) {
      const dot = svg("circle", { class: `dot-${kind}`, cx: x(i) + slot / 2, cy: y(v), r: 2.5 });
      dot.append(svg("title", {}, `${new Date(minutes[i].at).toLocaleTimeString()}: ${kind} ${duration(v)}`));
      chart.append(dot);
    }
  }
}

async function refreshActivity() {
  try {
    const page = await getJSON("/v1/activity");
    drawRuns(page.minutes);
    drawLatency(page.minutes);
    const ended = page.minutes.reduce((n, m) => n + m.ended, 0);
    const cancelled = page.minutes.reduce((n, m) => n + m.cancelled, 0);
    $("activity-summary").textContent =
      `last 30 min: ${ended} runs ended, ${cancelled} cancelled` +
      (page.oldest && page.oldest > page.minutes[0].at ? ` (from the latest finished runs kept, since ${new Date(page.oldest).toLocaleTimeString()})` : "");
  } catch (error) {
    setLive(false, `offline: ${error.message}`);
  }
}

async function refreshSlow() {
  clearTimeout(refreshSlow.timer);
  await Promise.all([refreshFunctions(), refreshDecisions(), refreshActivity()]);
  refreshSlow.timer = setTimeout(refreshSlow, SLOW_EVERY_MS);
}

// -- start --------------------------------------------------------------------------------

if (!cancelOn) $("cancel-off").hidden = false;
if (tokenNeeded) {
  $("token-form").hidden = false;
  $("token").value = sessionStorage.getItem("cancel-broker-token") || "";
  $("token").addEventListener("input", (e) => sessionStorage.setItem("cancel-broker-token", e.target.value));
  $("token-form").addEventListener("submit", (e) => e.preventDefault());
}
$("toast").addEventListener("click", () => ($("toast").hidden = true));
$("filters").addEventListener("change", refreshRuns);
$("filters").addEventListener("submit", (e) => e.preventDefault());
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) {
    refreshRuns();
    refreshSlow();
  }
});
refreshRuns();
refreshSlow();
