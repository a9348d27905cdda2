// leukedge station page: polls the JSON API of the server that served it. Every value from the
// database is put into the page as text (textContent), never as HTML.
"use strict";

const POLL_MS = 2000;
const CELLS_EVERY = 2;          // refresh the cell grid every 2nd poll
const LABELS = [["all", "all"], ["hem", "hem"], ["not_a_cell", "not a cell"]];
let config = { token_required: false };
let polls = 0;
let selectedSample = "";

const $ = (id) => document.getElementById(id);

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  if (props) {
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
  }
  for (const c of children) e.append(c);
  return e;
}

function fmtNum(n) { return n === null || n === undefined ? "–" : Number(n).toLocaleString(); }
function fmtPct(x) { return x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %"; }
function fmtMs(x) { return x === null || x === undefined ? "–" : Math.round(x) + " ms"; }
function fmtAge(s) {
  if (s === null || s === undefined) return "–";
  if (s < 120) return Math.round(s) + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}
function fmtTime(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "–"; }

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  let body = null;
  try { body = await r.json(); } catch (e) { body = { error: "HTTP " + r.status }; }
  if (!r.ok) throw new Error((body && body.error) || ("HTTP " + r.status));
  return body;
}

function banner(text) {
  const b = $("banner");
  b.textContent = text || "";
  b.hidden = !text;
}

function setStat(id, text, down) {
  const v = $(id);
  v.textContent = text;
  v.parentElement.classList.toggle("down", !!down);
}

function renderLive(d) {
  const st = d.station;
  const pill = $("state");
  if (!st) {
    pill.textContent = "no station run yet";
    pill.className = "pill pill-unknown";
  } else if (st.running) {
    pill.textContent = "running";
    pill.className = "pill pill-up";
  } else {
    pill.textContent = st.stopped_at ? "stopped" : "DOWN: not responding";
    pill.className = "pill pill-down";
  }
  const running = st && st.running;
  setStat("queue", running ? fmtNum(st.queue_len) : "–");
  setStat("settling", running ? fmtNum(st.settling) : "–");
  setStat("throughput", d.throughput_1m.toFixed(2) + " cells/s");
  setStat("latency", st ? fmtMs(st.latency_p50_ms) + " / " + fmtMs(st.latency_p95_ms) : "–");
  setStat("backend", st ? (st.backend || "–") : "–");
  setStat("model", st ? (st.model_id || "–") : "–");
  setStat("uptime", running ? fmtAge(st.uptime_s) : "–");
  setStat("heartbeat", st ? fmtAge(st.heartbeat_age_s) + " ago" : "–", st && !running);
  $("footer").textContent = "database " + d.database + (st ? " · watching " + st.watch_dir + " on " + st.host : "")
    + (d.note ? " · " + d.note : "");
}

function renderSamples(samples, counts) {
  const tbody = $("samples").tBodies[0];
  const rows = [];
  for (const s of samples) {
    const ci = s.blast_ci95 ? "95 % CI " + fmtPct(s.blast_ci95[0]) + " – " + fmtPct(s.blast_ci95[1]) : "";
    const tr = el("tr", { class: "clickable" + (s.sample_id === selectedSample ? " selected" : "") },
      el("td", { class: "sample", text: s.sample_id === null ? "(none)" : s.sample_id }),
      el("td", { class: "num", text: fmtNum(s.n_ok) }),
      el("td", { class: "num" + (s.n_rejected ? " rej" : ""), text: fmtNum(s.n_rejected) }),
      el("td", { class: "num" + (s.n_error ? " err" : ""), text: fmtNum(s.n_error) }),
      el("td", { class: "num", text: fmtNum(s.n_blasts) }),
      el("td", { class: "num" }, fmtPct(s.blast_fraction), el("span", { class: "ci", text: ci })),
      el("td", { class: "num", text: fmtTime(s.last_result_at) }));
    tr.dataset.sample = s.sample_id === null ? "" : s.sample_id;
    tr.addEventListener("click", () => selectSample(tr.dataset.sample));
    rows.push(tr);
  }
  tbody.replaceChildren(...rows);
  $("nosamples").hidden = samples.length > 0;
  const parts = Object.entries(counts).map(([k, v]) => fmtNum(v) + " " + k);
  $("totals").textContent = parts.length ? "· " + parts.join(", ") : "";

  const sel = $("sample");
  const have = Array.from(sel.options).map((o) => o.value).join("\u0000");
  const want = [""].concat(samples.map((s) => s.sample_id === null ? "" : s.sample_id)).join("\u0000");
  if (have !== want) {
    const opts = [el("option", { value: "", text: "all samples" })];
    for (const s of samples) if (s.sample_id !== null) opts.push(el("option", { value: s.sample_id, text: s.sample_id }));
    sel.replaceChildren(...opts);
    sel.value = selectedSample;
  }
}

function renderAgreement(a) {
  const t = a.reviewed === 0 ? "No reviews yet."
    : a.reviewed + " reviewed · model and reviewer agree on " + a.agree + " of " + a.compared
      + (a.agreement === null ? "" : " (" + fmtPct(a.agreement) + ")")
      + (a.not_a_cell ? " · " + a.not_a_cell + " not a cell" : "")
      + (Object.keys(a.confusion).length ? " · " + Object.entries(a.confusion).map(([k, v]) => k + ": " + v).join(", ") : "");
  $("agreement").textContent = t;
}

function selectSample(s) {
  selectedSample = s;
  $("sample").value = s;
  for (const tr of $("samples").tBodies[0].rows) tr.classList.toggle("selected", tr.dataset.sample === s);
  refreshCells();
}

function cellCard(c) {
  const flags = [];
  if (c.ood) flags.push(el("span", { class: "badge ood", text: "OOD" }));
  if (c.borderline) flags.push(el("span", { class: "badge borderline", text: "borderline" }));
  if (c.stain_fallback) flags.push(el("span", { class: "badge", text: "stain fallback" }));
  if (c.review) flags.push(el("span", { class: "badge rev", text: "reviewed: " + c.review.label.replace(/_/g, " ") }));
  let img;
  if (c.status === "ok" || c.status === "rejected") {
    img = el("img", { src: "/api/cells/" + encodeURIComponent(c.id) + "/thumbnail.png", alt: c.name, loading: "lazy" });
    img.addEventListener("error", () => img.replaceWith(el("div", { class: "noimg", text: "image not available" })));
  } else {
    img = el("div", { class: "noimg", text: c.error || c.reason || c.status });
  }
  const pred = c.status === "ok"
    ? (c.label || (c.is_blast ? "all" : "hem")) + " · p=" + (c.probability === null ? "–" : c.probability.toFixed(3))
    : c.status + ((c.reason || c.error) ? ": " + (c.reason || c.error) : "");
  const buttons = el("div", { class: "buttons" });
  for (const [value, text] of LABELS) {
    const b = el("button", { type: "button", text: text, "data-label": value,
                            class: c.review && c.review.label === value ? "chosen" : "" });
    b.addEventListener("click", () => review(c, value, card));
    buttons.append(b);
  }
  const card = el("div", { class: "cell" + (c.ood ? " flag-ood" : c.borderline ? " flag-borderline" : ""),
                           "data-id": String(c.id) },
    img, el("div", { class: "pred", text: pred }), el("div", {}, ...flags),
    el("div", { class: "name", text: c.sample_id + " / " + c.name }), buttons);
  return card;
}

async function review(c, label, card) {
  const reviewer = $("reviewer").value.trim();
  if (!reviewer) { banner("Type your name in the reviewer field first."); $("reviewer").focus(); return; }
  localStorage.setItem("leukedge.reviewer", reviewer);
  const headers = { "Content-Type": "application/json" };
  const token = $("token").value;
  if (token) { headers["Authorization"] = "Bearer " + token; sessionStorage.setItem("leukedge.token", token); }
  try {
    const r = await fetch("/api/reviews", { method: "POST", headers,
      body: JSON.stringify({ result_id: c.id, label, reviewer }) });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
    for (const b of card.querySelectorAll("button")) b.classList.toggle("chosen", b.dataset.label === label);
    card.dataset.reviewed = label;
    banner("");
    refreshOverview();
  } catch (e) {
    banner("Review not stored: " + e.message);
  }
}

async function refreshCells() {
  const q = new URLSearchParams({ limit: "60" });
  if (selectedSample) q.set("sample", selectedSample);
  if ($("unreviewed").checked) q.set("unreviewed", "1");
  q.set("order", $("order").value);
  try {
    const d = await getJSON("/api/cells?" + q.toString());
    $("cells").replaceChildren(...d.cells.map(cellCard));
  } catch (e) { /* the overview poll shows the error */ }
}

async function refreshOverview() {
  try {
    const d = await getJSON("/api/overview");
    banner("");
    renderLive(d);
    renderSamples(d.samples, d.status_counts);
    renderAgreement(d.agreement);
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (e) {
    banner("Station database not readable: " + e.message);
    const pill = $("state");
    pill.textContent = "no data";
    pill.className = "pill pill-down";
  }
}

async function tick() {
  await refreshOverview();
  if (polls % CELLS_EVERY === 0) await refreshCells();
  polls += 1;
  setTimeout(tick, POLL_MS);
}

async function start() {
  try { config = await getJSON("/api/config"); } catch (e) { /* keep defaults */ }
  $("tokenlabel").hidden = !config.token_required;
  $("reviewer").value = localStorage.getItem("leukedge.reviewer") || "";
  $("token").value = sessionStorage.getItem("leukedge.token") || "";
  $("sample").addEventListener("change", (e) => selectSample(e.target.value));
  $("unreviewed").addEventListener("change", refreshCells);
  $("order").addEventListener("change", () => {
    $("orderhelp").hidden = $("order").value !== "priority";
    refreshCells();
  });
  $("filters").addEventListener("submit", (e) => e.preventDefault());
  tick();
}

document.addEventListener("DOMContentLoaded", start);
