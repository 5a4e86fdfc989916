// The Weft dashboard: polls /api/overview every two seconds and draws it. No framework, no
// build step, nothing from the network but the control service.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const POLL_MS = 2000;

// The bearer token: from the URL's #token= (then dropped from the address bar), else kept
// for this tab.
function token() {
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    sessionStorage.setItem("weft-token", decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem("weft-token") || "";
}

function el(tag, attrs, ...children) {
  const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const pct = (r) => (r * 100).toFixed(2) + "%";
const ms = (v) => (v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(2)) + " ms";
const rps = (v) => v.toFixed(1);
const health = (r) => (r >= 0.99 ? "ok" : r >= 0.95 ? "warn" : "bad");
const colour = (r) => getComputedStyle(document.documentElement).getPropertyValue("--" + health(r)).trim();
const ago = (t, now) => (t ? Math.max(0, Math.round((now - t) / 1000)) + " s ago" : "never");

function table(id, head, rows) {
  const t = document.getElementById(id);
  t.replaceChildren(
    el("thead", {}, el("tr", {}, head.map(([h, num]) => el("th", { class: num ? "num" : "" }, h)))),
    el("tbody", {}, rows.length ? rows : [el("tr", {}, el("td", { class: "muted", colspan: head.length }, "no traffic in the window"))]),
  );
}

function spark(points, field) {
  if (!points || points.length < 2) return el("span", { class: "muted" }, "–");
  const vals = points.map((p) => p[field]);
  const max = Math.max(...vals, 1e-9);
  const step = 120 / (points.length - 1);
  const line = vals.map((v, i) => `${(i * step).toFixed(1)},${(22 - (v / max) * 20).toFixed(1)}`).join(" ");
  return el("svg:svg", { class: "spark", viewBox: "0 0 120 24" }, el("svg:polyline", { points: line }));
}

function drawGraph(data) {
  const svg = document.getElementById("graph");
  const names = new Set();
  data.services.forEach((s) => names.add(s.service));
  data.edges.forEach((e) => { names.add(e.source); names.add(e.service); });
  const list = [...names].sort();
  const byService = Object.fromEntries(data.services.map((s) => [s.service, s]));
  const pos = {};
  const [cx, cy, r] = [450, 210, list.length > 1 ? 160 : 0];
  list.forEach((n, i) => {
    const a = (2 * Math.PI * i) / list.length - Math.PI / 2;
    pos[n] = [cx + r * Math.cos(a), cy + r * Math.sin(a)];
  });
  const edges = data.edges.map((e) => {
    const [x1, y1] = pos[e.source], [x2, y2] = pos[e.service];
    // Stop short of the target's circle, and mark the direction.
    const len = Math.hypot(x2 - x1, y2 - y1) || 1;
    const tx = x2 - ((x2 - x1) / len) * 30, ty = y2 - ((y2 - y1) / len) * 30;
    return el("svg:g", {
      class: "edge", "data-edge": `${e.source}->${e.service}`, "data-rps": e.rps.toFixed(3),
      "data-success": e.success_rate.toFixed(4), "data-requests": e.requests, "data-p99": e.p99_ms.toFixed(3),
    },
      el("svg:line", { x1, y1, x2: tx, y2: ty, stroke: colour(e.success_rate), "marker-end": "url(#arrow)" }),
      el("svg:text", { x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 6, "paint-order": "stroke", stroke: "#fff", "stroke-width": 5 }, `${rps(e.rps)} rps · p99 ${ms(e.p99_ms)} · ${pct(e.success_rate)}`),
    );
  });
  const nodes = list.map((n) => {
    const s = byService[n];
    const [x, y] = pos[n];
    return el("svg:g", { class: "node", "data-node": n, "data-success": s ? s.success_rate.toFixed(4) : "" },
      el("svg:circle", { cx: x, cy: y, r: 26, fill: s ? colour(s.success_rate) : "#9aa3b5" }),
      // The name outside the circle, away from the centre (where the edges are).
      el("svg:text", { x, y: y < cy ? y - 34 : y + 44, "paint-order": "stroke", stroke: "#fff", "stroke-width": 4 }, n),
      s ? el("svg:text", { x, y: y + 5, fill: "#fff" }, pct(s.success_rate)) : null,
    );
  });
  const defs = el("svg:defs", {}, el("svg:marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" },
    el("svg:path", { d: "M0,0 L10,5 L0,10 z", fill: "#6b7385" })));
  svg.replaceChildren(defs, ...edges, ...nodes);
  if (!list.length) svg.append(el("svg:text", { x: 450, y: 210, "text-anchor": "middle", class: "muted" }, "no traffic in the window"));
}

function drawServices(data) {
  table("services",
    [["service"], ["success", 1], ["rps", 1], ["p50", 1], ["p95", 1], ["p99", 1], ["requests", 1], ["rps, last 5 min"], ["p99, last 5 min"]],
    data.services.map((s) => el("tr", { "data-service": s.service, "data-requests": s.requests, "data-failures": s.failures, "data-success": s.success_rate.toFixed(4) },
      el("td", {}, s.service),
      el("td", { class: "num " + health(s.success_rate) }, pct(s.success_rate)),
      el("td", { class: "num" }, rps(s.rps)),
      el("td", { class: "num" }, ms(s.p50_ms)), el("td", { class: "num" }, ms(s.p95_ms)), el("td", { class: "num" }, ms(s.p99_ms)),
      el("td", { class: "num" }, s.requests),
      el("td", {}, spark(data.series[s.service], "rps")),
      el("td", {}, spark(data.series[s.service], "p99_ms")),
    )));
}

function drawRoutes(data) {
  table("routes",
    [["service"], ["route"], ["success", 1], ["rps", 1], ["p50", 1], ["p95", 1], ["p99", 1], ["requests", 1]],
    data.routes.map((r) => el("tr", { "data-route": `${r.service}/${r.route}`, "data-requests": r.requests, "data-failures": r.failures },
      el("td", {}, r.service), el("td", {}, r.route),
      el("td", { class: "num " + health(r.success_rate) }, pct(r.success_rate)),
      el("td", { class: "num" }, rps(r.rps)),
      el("td", { class: "num" }, ms(r.p50_ms)), el("td", { class: "num" }, ms(r.p95_ms)), el("td", { class: "num" }, ms(r.p99_ms)),
      el("td", { class: "num" }, r.requests),
    )));
}

function drawProxies(data) {
  table("proxies",
    [["proxy"], ["labels"], ["connected"], ["config", 1], ["state"], ["filters (module)"], ["failures"], ["identity"], ["last report"]],
    data.proxies.map((p) => {
      const labels = Object.entries(p.labels).map(([k, v]) => `${k}=${v}`).join(", ");
      const behind = p.synced_version < p.latest_version;
      const state = p.nack_error ? el("span", { class: "bad" }, "NACK: " + p.nack_error) : behind ? el("span", { class: "warn" }, "syncing") : el("span", { class: "ok" }, "ACK");
      const filters = p.filters.map((f) => el("div", {}, `${f.listener}/${f.filter} `, el("code", { title: f.digest }, f.digest.slice(0, 19)), f.failure_policy === "fail_open" ? " (fail open)" : ""));
      // A fail-open filter's failures were skipped (the request went on without it); a
      // fail-closed one's were answered with an error.
      const policy = Object.fromEntries(p.filters.map((f) => [f.filter, f.failure_policy]));
      const failures = p.failures.length ? p.failures.map((f) => el("div", { class: "bad", "data-failures": f.filter },
        `${f.filter}: ${f.count} ${f.kind}${policy[f.filter] === "fail_open" ? " (fail open: skipped)" : ""}`)) : "none";
      const cert = p.spiffe_id ? `${p.spiffe_id} (expires in ${Math.round((p.cert_not_after_unix * 1000 - data.now_ms) / 60000)} min)` : "–";
      return el("tr", { "data-proxy": p.id, "data-connected": p.connected },
        el("td", {}, p.id), el("td", {}, labels),
        el("td", { class: p.connected ? "ok" : "bad" }, p.connected ? "yes" : "no"),
        el("td", { class: "num" }, `${p.synced_version} / ${p.latest_version}`),
        el("td", {}, state), el("td", {}, filters), el("td", {}, failures), el("td", {}, cert),
        el("td", {}, ago(p.last_report_ms, data.now_ms)),
      );
    }));
}

function sample(s) {
  return s ? `${s.requests} requests, ${s.failures} failed (${pct(s.error_rate)}), p99 ${ms(s.p99_ms)}` : "";
}

function drawRollouts(data) {
  const box = document.getElementById("rollouts");
  if (!data.rollouts.length) {
    box.replaceChildren(el("p", { class: "muted" }, "no rollout yet (weftctl rollout start)"));
    return;
  }
  box.replaceChildren(...data.rollouts.slice(0, 5).map((r) => el("div", { class: "rollout " + r.state, "data-rollout": r.id, "data-state": r.state },
    el("strong", {}, `${r.id} · ${r.state.replace("_", " ")}`),
    el("div", {}, r.module ? `module ${r.module}` : r.resources.join(", ")),
    el("div", { class: "muted" }, `steps ${r.steps.map((s) => s + "%").join(" → ")}; at ${r.steps[r.step]}% (${r.share.length} of ${r.proxies} proxies); gates: +${pct(r.max_error_rate)} errors${r.max_p99_ms ? `, p99 ≤ ${r.max_p99_ms} ms` : ""}, every ${r.interval_ms / 1000} s`),
    el("div", {}, r.reason),
    el("ol", {}, r.decisions.map((d) => el("li", {}, `${d.action} at ${d.step_percent}%: ${d.reason}`,
      d.canary ? el("div", { class: "muted" }, `new: ${sample(d.canary)} · old: ${sample(d.baseline)}`) : null))),
  )));
}

async function poll() {
  const status = document.getElementById("status");
  const win = document.getElementById("window").value;
  try {
    const resp = await fetch(`/api/overview?window=${win}`, { headers: token() ? { authorization: "Bearer " + token() } : {} });
    if (resp.status === 401) {
      document.getElementById("main").hidden = true;
      document.getElementById("login").hidden = false;
      status.textContent = "token needed";
      return;
    }
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    const data = await resp.json();
    drawGraph(data); drawServices(data); drawRoutes(data); drawRollouts(data); drawProxies(data);
    status.textContent = `config version ${data.version} · ${data.proxies.filter((p) => p.connected).length} proxies connected · updated ${new Date(data.now_ms).toLocaleTimeString()}`;
    document.body.dataset.loaded = data.now_ms;
  } catch (e) {
    status.textContent = "cannot reach the control service: " + e.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("weft-token", document.getElementById("token").value);
    document.getElementById("login").hidden = true;
    document.getElementById("main").hidden = false;
    poll();
  });
  document.getElementById("window").addEventListener("change", poll);
  poll();
  setInterval(poll, POLL_MS);
});
