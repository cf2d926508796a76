// flor_ray's page: hash routes over the JSON endpoints of flor_ray/ui/server.py.
// Every value from the store is put in the page as text (never as HTML).
"use strict";

const TOKEN = document.querySelector('meta[name="flor-token"]').content;
const POLL_MS = 3000;
const PALETTE = ["#2f6fde", "#d9480f", "#2b8a3e", "#7048e8", "#c2255c", "#0b7285", "#e67700", "#5c940d",
                 "#862e9c", "#364fc7", "#a61e4d", "#087f5b"];
let poll = null;       // the current view's refresh, called every POLL_MS
let chart = null;      // the uPlot instance on the page

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "cls") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat(Infinity)) if (k !== null && k !== undefined) el.append(k instanceof Node ? k : String(k));
  return el;
}

async function get(path, params) {
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(params || {})) if (v !== undefined && v !== null && v !== "") qs.set(k, v);
  const res = await fetch(path + (qs.toString() ? "?" + qs : ""), {headers: {"X-Flor-Token": TOKEN}});
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

async function post(path, body) {
  const res = await fetch(path, {method: "POST", body: JSON.stringify(body || {}),
                                 headers: {"X-Flor-Token": TOKEN, "Content-Type": "application/json"}});
  const out = await res.json();
  if (!res.ok) throw new Error(out.error || res.statusText);
  return out;
}

const fmtS = s => s === null || s === undefined ? "" : s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
const short = v => typeof v === "string" && v.length > 12 ? v.slice(0, 8) : v;
const when = iso => iso ? iso.replace("T", " ").slice(0, 19) : "";
const fmtV = v => typeof v === "number" ? (Number.isInteger(v) ? String(v) : String(Number(v.toPrecision(6)))) : v === null || v === undefined ? "" : String(v);
const errorBox = msg => h("div", {cls: "error", role: "alert"}, msg);

function route() {
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  return {parts: (path || "/").split("/").filter(Boolean).map(decodeURIComponent),
          q: new URLSearchParams(query || "")};
}

function go(path, q) {
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(q || {})) if (v !== undefined && v !== null && v !== "" && v !== false) qs.set(k, v);
  location.hash = path + (qs.toString() ? "?" + qs : "");
}

function show(...kids) {
  if (chart) { chart.destroy(); chart = null; }
  const view = document.getElementById("view");
  view.replaceChildren(...kids);
}

function chips(names, cls, title) {
  return names.map(n => h("span", {cls: "chip " + cls, title: title + ": chart " + n,
                                   onclick: e => { e.stopPropagation(); go("/chart", {name: n}); }}, n));
}

// ------------------------------------------------------------------ runs table
async function viewRuns(q) {
  const where = q.get("where") || "";
  let sortKey = q.get("sort") || "started_at", desc = q.get("desc") === "1";
  const input = h("input", {type: "text", id: "where", value: where, placeholder: "where, e.g. lr > 0.05"});
  const apply = () => go("/", {where: input.value, sort: sortKey, desc: desc ? "1" : ""});
  input.addEventListener("keydown", e => { if (e.key === "Enter") apply(); });
  const holder = h("div", {id: "runs-holder"});
  show(h("h2", {}, "Runs"), h("div", {cls: "bar"}, h("label", {for: "where"}, "where"), input,
       h("button", {id: "apply-where", onclick: apply}, "Filter")), holder);
  let last = "";
  async function load() {
    let data;
    try { data = await get("/api/runs", {where}); }
    catch (e) { holder.replaceChildren(errorBox(e.message)); return; }
    const text = JSON.stringify(data);
    if (text === last) return;
    last = text;
    holder.replaceChildren(runsTable(data, sortKey, desc, (k) => {
      desc = k === sortKey ? !desc : false; sortKey = k;
      go("/", {where, sort: sortKey, desc: desc ? "1" : ""});
    }));
  }
  poll = load;
  await load();
}

function runsTable(data, sortKey, desc, onSort) {
  const cols = [["run_id", "run"], ["status", "status"], ["version", "version"], ["script", "script"],
                ["started_at", "started"], ["duration_s", "duration"], ["iterations", "iters"],
                ...data.args.map(a => ["arg:" + a, a]), ["recorded", "recorded"], ["replayed", "back-filled"]];
  const val = (r, k) => k.startsWith("arg:") ? r.args[k.slice(4)] : Array.isArray(r[k]) ? r[k].length : r[k];
  const rows = [...data.runs].sort((a, b) => {
    const x = val(a, sortKey), y = val(b, sortKey);
    const c = x === y ? 0 : x === null || x === undefined ? -1 : y === null || y === undefined ? 1 : x < y ? -1 : 1;
    return desc ? -c : c;
  });
  const head = h("tr", {}, cols.map(([k, label]) => h("th", {cls: "sortable", "data-col": k, onclick: () => onSort(k)},
                                                      label + (k === sortKey ? (desc ? " ▾" : " ▴") : ""))));
  const body = rows.map(r => h("tr", {"data-run": r.run_id},
    h("td", {}, h("a", {href: "#/run/" + encodeURIComponent(r.run_id), cls: "mono run-link"}, r.run_id)),
    h("td", {cls: "status-" + r.status}, r.status),
    h("td", {cls: "mono", title: r.version}, short(r.version)),
    h("td", {}, r.script),
    h("td", {}, when(r.started_at)),
    h("td", {cls: "num"}, fmtS(r.duration_s)),
    h("td", {cls: "num"}, r.iterations),
    data.args.map(a => h("td", {cls: typeof r.args[a] === "number" ? "num" : ""}, fmtV(r.args[a]))),
    h("td", {cls: "names-rec"}, chips(r.recorded, "rec", "recorded"), r.recomputed.length ?
      h("span", {cls: "muted", title: "recomputed by a replay: " + r.recomputed.join(", ")}, " ↺" + r.recomputed.length) : ""),
    h("td", {cls: "names-rep"}, chips(r.replayed, "rep", "back-filled"))));
  return h("div", {}, h("p", {cls: "muted", id: "runs-count"}, `${data.total} runs`),
           h("table", {id: "runs"}, h("thead", {}, head), h("tbody", {}, body)));
}

// ---------------------------------------------------------------------- charts
function align(series) {
  // uPlot wants one x array: the union of the series' x, each y null where it has none
  const xs = [...new Set(series.flatMap(s => s.x))].sort((a, b) => a - b);
  const at = new Map(xs.map((x, i) => [x, i]));
  return [xs, ...series.map(s => { const y = new Array(xs.length).fill(null); s.x.forEach((x, i) => { y[at.get(x)] = s.y[i]; }); return y; })];
}

function colorOf(keys) {
  const groups = [...new Set(keys.map(k => k.replace(/:(record|replay)$/, "")))];
  return k => PALETTE[groups.indexOf(k.replace(/:(record|replay)$/, "")) % PALETTE.length];
}

function drawChart(el, data, logY) {
  const color = colorOf(data.series.map(s => s.key));
  const opts = {
    width: Math.max(480, el.clientWidth || 900), height: 420,
    scales: {x: {time: false}, y: logY ? {distr: 3} : {}},
    axes: [{label: data.raw ? "outer iteration (steps within it)" : "outer iteration",
            incrs: data.raw ? undefined : [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]},
           {label: data.name, size: 60, values: (u, vs) => vs.map(v => v === null ? "" : v !== 0 && Math.abs(v) < 1e-3 ? v.toExponential(0) : String(Number(v.toPrecision(4))))}],
    cursor: {drag: {x: true, y: false}},
    series: [{label: "x"}, ...data.series.map(s => ({
      label: s.label, stroke: color(s.key), width: s.source === "replay" ? 2 : 1.8,
      dash: s.source === "replay" ? [7, 4] : undefined, spanGaps: true,
      points: {show: !data.raw, size: s.source === "replay" ? 7 : 5, fill: s.source === "replay" ? "#fff" : color(s.key)},
    }))],
  };
  const plotted = logY ? data.series.map(s => ({...s, y: s.y.map(v => v !== null && v > 0 ? v : null)})) : data.series;
  el.replaceChildren();
  chart = new uPlot(opts, align(plotted), el);
  el.dataset.series = data.series.length;
  el.dataset.recorded = data.series.filter(s => s.source === "record").length;
  el.dataset.replayed = data.series.filter(s => s.source === "replay").length;
}

async function viewChart(q) {
  const names = (await get("/api/runs")).names;
  const st = {name: q.get("name") || names[0] || "", by: q.get("by") || "run", raw: q.get("raw") === "1",
              log: q.get("log") === "1", where: q.get("where") || ""};
  const sel = h("select", {id: "chart-name"}, names.map(n => h("option", {value: n, selected: n === st.name}, n)));
  const by = h("select", {id: "chart-by"}, ["run", "version"].map(b => h("option", {value: b, selected: b === st.by}, "per " + b)));
  const raw = h("input", {type: "checkbox", id: "chart-raw", checked: st.raw});
  const log = h("input", {type: "checkbox", id: "chart-log", checked: st.log});
  const where = h("input", {type: "text", id: "chart-where", value: st.where, placeholder: "where, e.g. lr > 0.05"});
  const update = () => go("/chart", {name: sel.value, by: by.value, raw: raw.checked ? "1" : "", log: log.checked ? "1" : "", where: where.value});
  for (const el of [sel, by, raw, log]) el.addEventListener("change", update);
  where.addEventListener("keydown", e => { if (e.key === "Enter") update(); });
  const box = h("div", {id: "chart"}), msg = h("div", {});
  show(h("h2", {}, "Charts"),
       h("div", {cls: "bar"}, h("label", {for: "chart-name"}, "name"), sel, by,
         h("label", {}, raw, " raw steps"), h("label", {}, log, " log y"), where),
       h("p", {cls: "legend-note"}, "solid: recorded by the run; dashed, hollow points: computed by a replay (back-filled, or recomputed to check a recorded name). ",
         "Drag to zoom, double-click to reset."), msg, box);
  if (!st.name) { msg.replaceChildren(h("p", {cls: "muted"}, "no values logged yet")); return; }
  let last = "";
  async function load() {
    let data;
    try { data = await get("/api/series", {name: st.name, by: st.by, raw: st.raw ? "1" : "", where: st.where}); }
    catch (e) { msg.replaceChildren(errorBox(e.message)); return; }
    const text = JSON.stringify(data);
    if (text === last) return;
    const keys = JSON.stringify(data.series.map(s => s.key));
    if (chart && last && JSON.stringify(JSON.parse(last).series.map(s => s.key)) === keys) {
      chart.setData(align(data.series), false);  // new points of running runs; the zoom stays
    } else {
      if (chart) { chart.destroy(); chart = null; }
      drawChart(box, data, st.log);
    }
    last = text;
    msg.replaceChildren(data.left_out ? h("p", {cls: "muted"}, `${data.left_out} more series not drawn; narrow the runs with where`) : "");
  }
  poll = load;
  await load();
}

// -------------------------------------------------------- parallel coordinates
async function viewParallel(q) {
  const names = (await get("/api/runs")).names;
  const metric = q.get("metric") || names[0] || "", agg = q.get("agg") || "last", where = q.get("where") || "";
  const sel = h("select", {id: "pc-metric"}, names.map(n => h("option", {value: n, selected: n === metric}, n)));
  const ag = h("select", {id: "pc-agg"}, ["last", "min", "max"].map(a => h("option", {value: a, selected: a === agg}, a)));
  const wh = h("input", {type: "text", value: where, placeholder: "where"});
  const update = () => go("/parallel", {metric: sel.value, agg: ag.value, where: wh.value});
  sel.addEventListener("change", update); ag.addEventListener("change", update);
  wh.addEventListener("keydown", e => { if (e.key === "Enter") update(); });
  const box = h("div", {id: "pc"});
  show(h("h2", {}, "Args against a metric"), h("div", {cls: "bar"}, h("label", {}, "metric"), sel, ag, wh), box);
  if (!metric) return;
  try { box.replaceChildren(parallelSvg(await get("/api/parallel", {metric, agg, where}))); }
  catch (e) { box.replaceChildren(errorBox(e.message)); }
}

function parallelSvg(data) {
  const NS = "http://www.w3.org/2000/svg";
  const s = (tag, attrs, text) => { const el = document.createElementNS(NS, tag); for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v); if (text !== undefined) el.textContent = text; return el; };
  const axes = [...data.args.map(a => ({label: a, of: r => r.args[a]})), {label: `${data.metric} (${data.agg})`, of: r => r.value}];
  const W = Math.max(600, 140 * axes.length), H = 380, top = 30, bottom = 40;
  const svg = s("svg", {width: W, height: H, class: "pc"});
  const scale = axes.map(ax => {
    const vals = data.runs.map(ax.of).filter(v => v !== null && v !== undefined);
    if (vals.every(v => typeof v === "number")) {
      const lo = Math.min(...vals), hi = Math.max(...vals);
      return {f: v => typeof v === "number" ? (hi === lo ? 0.5 : (v - lo) / (hi - lo)) : null, ticks: hi === lo ? [lo] : [lo, hi]};
    }
    const cats = [...new Set(vals.map(String))].sort();
    return {f: v => v === null || v === undefined ? null : cats.length === 1 ? 0.5 : cats.indexOf(String(v)) / (cats.length - 1), ticks: cats};
  });
  const xOf = i => 60 + i * (W - 120) / Math.max(1, axes.length - 1);
  const yOf = t => H - bottom - t * (H - top - bottom);
  const mScale = scale[axes.length - 1];
  data.runs.forEach(r => {
    const pts = axes.map((ax, i) => { const t = scale[i].f(ax.of(r)); return t === null ? null : [xOf(i), yOf(t)]; }).filter(Boolean);
    const t = mScale.f(r.value);
    const col = t === null ? "#aaa" : `hsl(${220 - 200 * t}, 70%, 45%)`;
    const p = s("path", {d: "M" + pts.map(p => p.join(",")).join("L"), stroke: col, class: "line"});
    p.append(s("title", {}, `${r.run_id}: ${fmtV(r.value)}`));
    p.addEventListener("click", () => go("/run/" + encodeURIComponent(r.run_id)));
    svg.append(p);
  });
  axes.forEach((ax, i) => {
    svg.append(s("line", {x1: xOf(i), x2: xOf(i), y1: top, y2: H - bottom, stroke: "#888"}));
    svg.append(s("text", {x: xOf(i), y: H - 14, "text-anchor": "middle"}, ax.label));
    const tk = scale[i].ticks;
    tk.forEach((v, j) => svg.append(s("text", {x: xOf(i) + 5, y: yOf(tk.length === 1 ? 0.5 : j / (tk.length - 1)) - 3}, fmtV(v))));
  });
  return svg;
}

// -------------------------------------------------------------------- run page
function kv(obj, id) {
  return h("table", {cls: "kv", id}, Object.entries(obj || {}).map(([k, v]) =>
    h("tr", {}, h("td", {}, k), h("td", {cls: "mono"}, typeof v === "object" && v !== null ? JSON.stringify(v) : fmtV(v)))));
}

async function viewRun(runId, q) {
  let d;
  try { d = await get("/api/run/" + encodeURIComponent(runId)); }
  catch (e) { show(h("h2", {}, "Run " + runId), errorBox(e.message)); return; }
  const m = d.meta, t = m.timings || {};
  const outer = (t.outer_s || []).reduce((a, b) => a + b, 0), inner = (t.inner_s || []).reduce((a, b) => a + b, 0);
  const others = (await get("/api/runs")).runs.filter(r => r.run_id !== runId && r.version !== m.version);
  const against = h("select", {id: "diff-against"}, h("option", {value: ""}, "diff against another run's version…"),
    others.map(r => h("option", {value: r.run_id, selected: r.run_id === q.get("diff")}, `${r.run_id} (${short(r.version)})`)));
  against.addEventListener("change", () => go("/run/" + encodeURIComponent(runId), {diff: against.value}));
  const code = h("div", {id: "code"});
  const ck = m.checkpoints || [];
  show(
    h("h2", {}, "Run ", h("span", {cls: "mono", id: "run-id"}, m.run_id), " ", h("span", {cls: "status-" + m.status}, m.status)),
    h("div", {cls: "grid"},
      h("div", {}, h("h3", {}, "Run"), kv({script: m.script, version: m.version, commit: m.commit, started: when(m.started_at),
        ended: when(m.ended_at), iterations: m.iterations, argv: (m.argv || []).join(" "), host: m.host, project: m.project})),
      h("div", {}, h("h3", {}, "Args"), Object.keys(m.args || {}).length ? kv(m.args, "run-args") : h("p", {cls: "muted", id: "run-args"}, "no flor.arg values"),
        h("h3", {}, "Environment"), kv(m.env, "run-env")),
      h("div", {}, h("h3", {}, "Timings"), kv({"start (imports)": fmtS(t.start_s), setup: fmtS(t.setup_s),
        "outer iterations": fmtS(outer), "inner loops": fmtS(inner), checkpoints: fmtS((t.checkpoint_s || []).reduce((a, b) => a + b, 0)),
        teardown: fmtS(t.teardown_s)}),
        h("h3", {}, "Logged names"), h("div", {id: "run-names"}, d.names.map(n => h("div", {},
          chips([n.name], n.source === "record" ? "rec" : "rep", n.source), ` ${n.rows} rows, ${n.source === "record" ? "recorded" :
            d.names.some(o => o.source === "record" && o.name === n.name) ? "recomputed by replays" : "back-filled"}`))))),
    h("h3", {}, `Checkpoints (${ck.length})`),
    ck.length ? h("table", {id: "run-checkpoints"}, h("tr", {}, Object.keys(ck[0]).map(k => h("th", {}, k))),
      ck.map(c => h("tr", {}, Object.values(c).map(v => h("td", {cls: "mono"}, typeof v === "object" ? JSON.stringify(v) : fmtV(v))))))
      : h("p", {cls: "muted"}, "none"),
    h("h3", {}, "Replays that wrote into this run"),
    d.replays.length ? h("ul", {id: "run-replays"}, d.replays.map(r => h("li", {},
      h("a", {href: "#/replay/" + encodeURIComponent(r.id)}, r.id), ` ${r.tasks} task(s)`, r.names.length ? ": " + r.names.join(", ") : "")))
      : h("p", {cls: "muted"}, d.replay_tasks.length ? `${d.replay_tasks.length} replay task(s), no history file` : "none"),
    h("h3", {}, "Captured output"), d.output ? h("pre", {id: "run-output"}, d.output) : h("p", {cls: "muted"}, "this run has no captured output"),
    h("h3", {}, "Code"), h("div", {cls: "bar"}, h("select", {id: "code-file", onchange: e => showFile(runId, e.target.value, code)},
      d.files.map(f => h("option", {value: f, selected: f === m.script}, f))), against), code);
  if (q.get("diff")) showDiff(runId, q.get("diff"), code);
  else if (m.script) showFile(runId, m.script, code);
}

async function showFile(runId, path, box) {
  try { const f = await get(`/api/run/${encodeURIComponent(runId)}/file`, {path}); box.replaceChildren(h("pre", {id: "code-text"}, f.text)); }
  catch (e) { box.replaceChildren(errorBox(e.message)); }
}

async function showDiff(runId, other, box) {
  let d;
  try { d = await get(`/api/run/${encodeURIComponent(runId)}/diff`, {against: other}); }
  catch (e) { box.replaceChildren(errorBox(e.message)); return; }
  const line = l => h("span", {cls: l.startsWith("@@") ? "hunk" : l.startsWith("+") ? "add" : l.startsWith("-") ? "del" : ""}, l + "\n");
  box.replaceChildren(h("p", {cls: "muted"}, `${short(d.from_version)} (${d.from}) → ${short(d.to_version)} (${d.to}): ${d.files.length} file(s) differ`),
    ...d.files.map(f => h("div", {}, h("h4", {}, `${f.path} (${f.status})`), h("pre", {cls: "diff"}, f.diff.split("\n").map(line)))));
}

// ----------------------------------------------------------------- replay pages
async function viewReplays() {
  const names = h("input", {type: "text", id: "replay-names", placeholder: "names (default: every new name of today's script)"});
  const where = h("input", {type: "text", id: "replay-where", placeholder: "where, e.g. lr > 0.05"});
  const its = h("input", {type: "text", id: "replay-iterations", placeholder: "iterations: all, last, 0:5"});
  const script = h("input", {type: "text", id: "replay-script", placeholder: "today's script (default: the latest run's)"});
  const out = h("div", {});
  const plan = async () => {
    out.replaceChildren(h("p", {cls: "muted"}, "planning…"));
    try { const j = await post("/api/jobs", {names: names.value, where: where.value, iterations: its.value, script: script.value}); go("/job/" + j.id); }
    catch (e) { out.replaceChildren(errorBox(e.message)); }
  };
  const list = h("div", {});
  show(h("h2", {}, "Replays"), h("h3", {}, "Plan a replay"),
       h("div", {cls: "bar"}, names, where, its, script, h("button", {cls: "primary", id: "replay-plan", onclick: plan}, "Plan (dry run)")), out,
       h("h3", {}, "History"), list);
  async function load() {
    const d = await get("/api/replays");
    list.replaceChildren(
      d.jobs.length ? h("ul", {}, d.jobs.map(j => h("li", {}, h("a", {href: "#/job/" + j.id}, "from this page: " + j.id), ` ${j.state}, ${j.names.join(", ")}`))) : "",
      d.replays.length ? h("table", {id: "replays"}, h("tr", {}, ["replay", "at", "tasks", "runs", "modes", "estimate", "actual"].map(c => h("th", {}, c))),
        d.replays.map(r => h("tr", {}, h("td", {}, h("a", {href: "#/replay/" + encodeURIComponent(r.id), cls: "mono"}, r.id)), h("td", {}, when(r.at)),
          h("td", {cls: "num"}, r.tasks), h("td", {}, r.runs.length), h("td", {}, r.modes.join(", ")),
          h("td", {cls: "num"}, fmtS(r.estimate_s)), h("td", {cls: "num"}, fmtS(r.actual_s))))) : h("p", {cls: "muted"}, "no replay has run on this store"));
  }
  poll = load;
  await load();
}

async function viewReplay(id) {
  let d;
  try { d = await get("/api/replays/" + encodeURIComponent(id)); }
  catch (e) { show(h("h2", {}, "Replay " + id), errorBox(e.message)); return; }
  show(h("h2", {}, "Replay ", h("span", {cls: "mono"}, d.id)),
    h("p", {}, `${when(d.at)}: ${d.tasks} finished task(s) over ${d.runs.length} run(s); estimate ${fmtS(d.estimate_s)} from the recorded timings, actual ${fmtS(d.actual_s)}`),
    h("table", {id: "replay-tasks"}, h("tr", {}, ["task", "run", "mode", "tasks per node", "estimate", "actual", "actual / estimate"].map(c => h("th", {}, c))),
      d.task_list.map(t => h("tr", {}, h("td", {cls: "mono"}, short(t.task)),
        h("td", {}, h("a", {href: "#/run/" + encodeURIComponent(t.run_id), cls: "mono"}, t.run_id)), h("td", {}, t.mode),
        h("td", {cls: "num"}, t.per_node), h("td", {cls: "num"}, fmtS(t.base_s)), h("td", {cls: "num"}, fmtS(t.actual_s)),
        h("td", {cls: "num"}, t.base_s ? (t.actual_s / t.base_s).toFixed(2) : "")))),
    h("p", {cls: "muted"}, "Fidelity results are shown for replays started from this page; the store's history keeps timings only."));
}

async function viewJob(id) {
  const box = h("div", {});
  show(h("h2", {}, "Replay job ", h("span", {cls: "mono"}, id)), box);
  let last = "";
  async function load() {
    let j;
    try { j = await get("/api/jobs/" + encodeURIComponent(id)); }
    catch (e) { box.replaceChildren(errorBox(e.message)); poll = null; return; }
    const text = JSON.stringify(j);
    if (text === last) return;  // a planned job stays as it is: its button stays put
    last = text;
    const written = j.tasks_written ?? (j.state === "finished" ? j.tasks_pending : 0);
    const start = h("button", {cls: "primary", id: "replay-start", onclick: async () => {
      try { await post(`/api/jobs/${id}/start`); load(); } catch (e) { box.prepend(errorBox(e.message)); } }}, "Start the replay");
    const rep = j.report;
    box.replaceChildren(
      h("p", {id: "job-state"}, `state: ${j.state}`, j.elapsed_s !== null ? `, ${fmtS(j.elapsed_s)} elapsed` : "", `; estimate ${fmtS(j.estimate_s)}`),
      j.state === "planned" ? start : "",
      j.state !== "planned" ? h("p", {}, h("span", {cls: "progress"}, h("div", {style: `width:${j.tasks_pending ? 100 * written / j.tasks_pending : 100}%`})),
        ` ${written}/${j.tasks_pending} tasks written`) : "",
      j.error ? errorBox(j.error) : "",
      h("h3", {}, "Plan"), h("pre", {id: "job-explain"}, j.explain),
      rep ? h("div", {id: "job-report"}, h("h3", {}, "Tasks"), h("table", {id: "job-results"}, h("tr", {}, ["task", "run", "status", "rows", "time", "estimate", "error"].map(c => h("th", {}, c))),
               rep.results.map(r => h("tr", {}, h("td", {cls: "mono"}, short(r.key)), h("td", {cls: "mono"}, r.run_id), h("td", {cls: "status-" + r.status}, r.status),
                 h("td", {cls: "num"}, r.rows), h("td", {cls: "num"}, fmtS(r.wall_s)), h("td", {cls: "num"}, fmtS(r.estimate_s)), h("td", {}, r.error || "")))),
             h("h3", {}, "Fidelity"), h("p", {id: "job-fidelity"}, `${rep.fidelity.compared} recorded values recomputed, ${rep.fidelity.mismatched} mismatched`),
             rep.fidelity.by_name.map(b => h("div", {}, `${b.name}: ${b.compared} compared, ${b.mismatched} mismatched`)),
             rep.fidelity.examples.map(e => h("div", {cls: "mono"}, e))) : "");
    if (j.state === "finished" || j.state === "failed") poll = null;
  }
  poll = load;
  await load();
}

// ---------------------------------------------------------------------- router
async function render() {
  poll = null;
  const {parts, q} = route();
  const page = parts[0] || "runs";
  document.querySelectorAll("nav a").forEach(a => a.classList.toggle("on", a.dataset.nav === page ||
    (page === "run" && a.dataset.nav === "runs") || ((page === "replay" || page === "job") && a.dataset.nav === "replays")));
  try {
    if (page === "runs") await viewRuns(q);
    else if (page === "chart") await viewChart(q);
    else if (page === "parallel") await viewParallel(q);
    else if (page === "run") await viewRun(parts[1], q);
    else if (page === "replays") await viewReplays();
    else if (page === "replay") await viewReplay(parts[1]);
    else if (page === "job") await viewJob(parts[1]);
    else show(errorBox("no page " + location.hash));
  } catch (e) { show(errorBox(e.message)); }
  document.body.dataset.ready = page;
}

window.addEventListener("hashchange", render);
let polling = false;  // a slow store: the next poll waits for this one instead of piling up
setInterval(async () => {
  if (!poll || document.hidden || polling) return;
  polling = true;
  try { await poll(); document.getElementById("live").textContent = "updated " + new Date().toLocaleTimeString(); }
  catch (e) { document.getElementById("live").textContent = "polling failed: " + e.message; }
  finally { polling = false; }
}, POLL_MS);
render();
