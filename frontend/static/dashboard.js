// duet's dashboard: polls /dashboard/stats every second and draws what it says.
//
// The API key (when the server has --api-key): open /dashboard?key=KEY once, or type it
// into the field the page shows after a 401. Either way it is kept in sessionStorage (this
// tab only, gone when the tab closes), removed from the address bar, and sent as
// `Authorization: Bearer KEY`, as the API expects.
"use strict";

const POLL_MS = 1000;
const KEY_ITEM = "duet-api-key";
const COLORS = { in: "#d9822b", out: "#2b7bd9", p50: "#2b7bd9", p90: "#d9822b",
                 itl50: "#5a9e4b", itl90: "#8e44ad" };

function takeKeyFromUrl() {
  const url = new URL(window.location.href);
  const key = url.searchParams.get("key");
  if (key !== null) {
    sessionStorage.setItem(KEY_ITEM, key);
    url.searchParams.delete("key");
    history.replaceState(null, "", url.pathname + url.search);
  }
}

function setStatus(text, kind) {
  const el = document.getElementById("status");
  el.textContent = text;
  el.className = "status " + (kind || "");
}

// Show `value` formatted, and keep the raw number in data-value (for scripts and tests).
function show(id, value, format) {
  const el = document.getElementById(id);
  if (value === null || value === undefined) {
    el.textContent = id === "spec-decode" ? "off" : "–";
    el.dataset.value = "";
    return;
  }
  el.textContent = format ? format(value) : String(value);
  el.dataset.value = String(value);
}

const count = (v) => Math.round(v).toLocaleString("en-US");
const rate = (v) => v.toFixed(1);
const percent = (v) => (100 * v).toFixed(1) + "%";
const seconds = (v) => (v < 1 ? (1000 * v).toFixed(0) + " ms" : v.toFixed(2) + " s");
const bytes = (v) => {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return v.toFixed(1) + " " + units[i] + "/s";
};

function renderWorkers(workers) {
  const body = document.querySelector("#workers tbody");
  body.replaceChildren(...workers.map((w) => {
    const row = document.createElement("tr");
    row.dataset.workerId = w.worker_id;
    const cell = (text, cls) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (cls) td.className = cls;
      return td;
    };
    const kv = cell("", "kv");
    kv.dataset.value = String(w.kv_cache_usage);
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = (100 * w.kv_cache_usage).toFixed(1) + "%";
    bar.append(fill);
    kv.append(bar, percent(w.kv_cache_usage));
    row.append(cell(w.worker_id, "id"), cell(w.role, "role role-" + w.role), kv,
               cell(String(w.num_running), "running"), cell(String(w.num_waiting), "waiting"),
               cell(String(w.num_blocks), "blocks"));
    return row;
  }));
}

// Lines over time on a canvas: series is [{label, color, values}], xs in seconds (<= 0).
function plot(id, xs, series, unit) {
  const canvas = document.getElementById(id);
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, left = 48, bottom = 22, top = 8, right = 8;
  g.fillStyle = "#fff";
  g.fillRect(0, 0, w, h);
  const all = series.flatMap((s) => s.values.filter((v) => v !== null));
  const ymax = Math.max(1e-9, ...all) * 1.1;
  const xmin = Math.min(-60, ...xs);
  const X = (x) => left + ((x - xmin) / (0 - xmin)) * (w - left - right);
  const Y = (y) => h - bottom - (y / ymax) * (h - bottom - top);
  g.strokeStyle = "#d8dce4";
  g.fillStyle = "#687085";
  g.font = "11px sans-serif";
  for (let i = 0; i <= 4; i += 1) {
    const y = (ymax * i) / 4;
    g.beginPath(); g.moveTo(left, Y(y)); g.lineTo(w - right, Y(y)); g.stroke();
    g.fillText(unit === "s" ? seconds(y) : y.toFixed(0), 2, Y(y) + 4);
  }
  g.fillText(`${Math.round(xmin)} s`, left, h - 6);
  g.fillText("now", w - right - 24, h - 6);
  series.forEach((s, i) => {
    g.strokeStyle = s.color;
    g.lineWidth = 2;
    g.beginPath();
    let drawing = false;
    s.values.forEach((v, j) => {
      if (v === null) { drawing = false; return; }
      if (drawing) g.lineTo(X(xs[j]), Y(v)); else g.moveTo(X(xs[j]), Y(v));
      drawing = true;
    });
    g.stroke();
    g.fillStyle = s.color;
    g.fillText(s.label, left + 8 + i * 90, top + 10);
  });
}

function render(doc) {
  document.getElementById("model").textContent = doc.model;
  const r = doc.requests;
  show("running", r.running);
  show("waiting", r.waiting);
  show("swapped", r.swapped);
  show("preemptions", r.preemptions, count);
  show("tokens-in", doc.tokens_per_s.in, rate);
  show("tokens-out", doc.tokens_per_s.out, rate);
  show("total-prompt-tokens", doc.totals.prompt_tokens, count);
  show("total-generation-tokens", doc.totals.generation_tokens, count);
  for (const key of ["ttft", "itl"]) {
    for (const p of ["p50", "p90", "p99"]) show(`${key}-${p}`, doc[key] && doc[key][p], seconds);
  }
  show("prefix-hit-rate", doc.prefix_cache_hit_rate, percent);
  show("spec-decode", doc.spec_decode_acceptance, percent);
  const t = doc.kv_transfers;
  show("transfers-in-flight", t.in_flight);
  show("transfer-bytes-per-s", t.bytes_per_s, bytes);
  show("transfer-failures", doc.totals.kv_transfer_failures, count);
  show("worker-deaths", doc.worker_deaths);
  show("recomputed-prefills", doc.totals.recomputed_prefills, count);
  const advice = doc.pool_advice;
  show("pd-fraction", advice && advice.prefill_fraction, percent);
  show("prefill-demand", advice && advice.prefill_demand, (v) => v.toFixed(2));
  show("decode-demand", advice && advice.decode_demand, (v) => v.toFixed(2));
  renderWorkers(doc.workers);
  const hist = doc.history;
  plot("plot-throughput", hist.t, [
    { label: "in", color: COLORS.in, values: hist.tokens_in },
    { label: "out", color: COLORS.out, values: hist.tokens_out },
  ], "tokens");
  plot("plot-latency", hist.t, [
    { label: "TTFT p50", color: COLORS.p50, values: hist.ttft_p50 },
    { label: "TTFT p90", color: COLORS.p90, values: hist.ttft_p90 },
    { label: "ITL p50", color: COLORS.itl50, values: hist.itl_p50 },
    { label: "ITL p90", color: COLORS.itl90, values: hist.itl_p90 },
  ], "s");
  setStatus(doc.engine_healthy ? "live" : "engine core down", doc.engine_healthy ? "live" : "down");
  document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
}

async function poll() {
  const key = sessionStorage.getItem(KEY_ITEM);
  const headers = key ? { Authorization: "Bearer " + key } : {};
  try {
    const resp = await fetch("/dashboard/stats", { headers, cache: "no-store" });
    if (resp.status === 401) {
      setStatus("API key needed", "down");
      document.getElementById("login").hidden = false;
      return;
    }
    if (!resp.ok) { setStatus(`error ${resp.status}`, "down"); return; }
    document.getElementById("login").hidden = true;
    render(await resp.json());
  } catch (err) {
    setStatus("server unreachable", "down");
  }
}

document.getElementById("login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY_ITEM, document.getElementById("api-key").value);
  poll();
});
takeKeyFromUrl();
poll();
setInterval(poll, POLL_MS);
