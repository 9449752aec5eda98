// The balancer dashboard: totals, charts of the last five minutes (open
// connections per node, stacked, so a join, a drain and a loss show as
// shapes; requests and upgrades; refusals by reason; failed health checks and
// retries), the node table and the numbered list of recent changes, whose
// numbers mark the same moments on the charts. Data comes from /api/history
// (one sample a second, kept by the balancer, so a page opened late is not
// empty) and /api/backends. Everything shown is set as text or as SVG
// attributes, never parsed as HTML; the admin port's CSP allows no inline
// script.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  // The charts span the kept history: at least 30 s, at most five minutes.
  const MIN_WINDOW_MS = 30 * 1000;
  const MAX_WINDOW_MS = 5 * 60 * 1000;
  const TICK_STEPS_MS = [5000, 10000, 15000, 30000, 60000];
  const PALETTE = ["#0969da", "#1a7f37", "#bf3989", "#bc4c00", "#8250df", "#1b7c83", "#9a6700", "#cf222e", "#57606a", "#0550ae"];
  const WHAT = {
    joined: ["joined", "joined"],
    draining: ["is draining", "draining"],
    down: ["failed its health checks", "down"],
    healthy: ["is healthy again", "healthy-again"],
    left: ["left the cluster", "left"],
  };

  const samples = []; // oldest first, as /api/history gives them
  const changes = []; // oldest first, each numbered
  let lastT = null;
  let numbered = 0;
  const colors = new Map();

  function color(key) {
    if (!colors.has(key)) colors.set(key, PALETTE[colors.size % PALETTE.length]);
    return colors.get(key);
  }

  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    return e;
  }

  function el(tag, className, text) {
    const e = document.createElement(tag);
    if (className) e.className = className;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
    return 10 * p;
  }

  function fmt(v) {
    return v >= 1000 ? (v / 1000).toFixed(v >= 10000 ? 0 : 1) + "k" : String(Math.round(v * 10) / 10);
  }

  function clock(t) {
    return new Date(t).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  }

  /**
   * Draws `series` ({key, label, color, values}, values aligned with
   * `samples`) into the figure's SVG, stacked or as lines, with a marker for
   * every change in the window; fills the legend with each series' latest value.
   */
  function draw(figure, series, stacked, labelMarkers) {
    const svg = figure.querySelector("svg");
    const width = Math.max(200, Math.round(svg.getBoundingClientRect().width) || 600);
    const height = Math.max(100, Math.round(svg.getBoundingClientRect().height) || 150);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.replaceChildren();
    const pad = { l: 38, r: 10, t: labelMarkers ? 30 : 6, b: 18 };
    const tEnd = samples.length ? samples[samples.length - 1].t : Date.now();
    const span = samples.length ? tEnd - samples[0].t : 0;
    const windowMs = Math.min(MAX_WINDOW_MS, Math.max(MIN_WINDOW_MS, span));
    const tStart = tEnd - windowMs;
    const x = (t) => pad.l + ((t - tStart) / windowMs) * (width - pad.l - pad.r);
    let max = 0;
    for (let i = 0; i < samples.length; i++) {
      if (stacked) max = Math.max(max, series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
      else for (const s of series) max = Math.max(max, s.values[i] || 0);
    }
    const top = niceMax(max);
    const y = (v) => height - pad.b - (v / top) * (height - pad.t - pad.b);

    for (const frac of [0, 0.5, 1]) {
      const gy = y(top * frac);
      svg.appendChild(svgEl("line", { class: "grid", x1: pad.l, x2: width - pad.r, y1: gy, y2: gy }));
      const label = svgEl("text", { class: "axis", x: pad.l - 5, y: gy + 3.5, "text-anchor": "end" });
      label.textContent = fmt(top * frac);
      svg.appendChild(label);
    }
    const step = TICK_STEPS_MS.find((s) => windowMs / s <= 6) || 60000;
    for (let ago = 0; ago <= windowMs; ago += step) {
      const anchor = ago === 0 ? "end" : "middle";
      const label = svgEl("text", { class: "axis", x: x(tEnd - ago), y: height - 4, "text-anchor": anchor });
      label.textContent = ago === 0 ? "now" : ago % 60000 === 0 ? "−" + ago / 60000 + " min" : "−" + ago / 1000 + " s";
      svg.appendChild(label);
    }

    const base = samples.map(() => 0);
    for (const s of series) {
      const vals = samples.map((_, i) => s.values[i] || 0);
      const pts = samples.map((smp, i) => x(smp.t).toFixed(1) + "," + y(base[i] + vals[i]).toFixed(1));
      let d = "";
      if (pts.length > 0) {
        d = "M" + pts.join("L");
        if (stacked) {
          const under = samples.map((smp, i) => x(smp.t).toFixed(1) + "," + y(base[i]).toFixed(1)).reverse();
          d += "L" + under.join("L") + "Z";
        }
      }
      const path = svgEl("path", {
        class: stacked ? "area" : "line",
        d: d || "M0,0",
        fill: stacked ? s.color : "none",
        stroke: s.color,
        "data-key": s.key,
        "data-last": vals.length ? vals[vals.length - 1] : 0,
        "data-peak": vals.reduce((a, b) => Math.max(a, b), 0),
      });
      const title = svgEl("title");
      title.textContent = s.label;
      path.appendChild(title);
      svg.appendChild(path);
      if (stacked) vals.forEach((v, i) => (base[i] += v));
    }

    // Labels of changes close together are stacked in rows, not overprinted.
    let lastLabelX = -Infinity;
    let row = 0;
    for (const c of changes) {
      if (c.t < tStart || c.t > tEnd) continue;
      const mx = x(c.t);
      const marker = svgEl("line", {
        class: "marker marker-" + c.what,
        x1: mx,
        x2: mx,
        y1: pad.t - (labelMarkers ? 2 : 0),
        y2: height - pad.b,
        "data-what": c.what,
        "data-node": c.node,
        "data-n": c.n,
      });
      const title = svgEl("title");
      title.textContent = "#" + c.n + " " + clock(c.t) + " " + c.name + " " + (WHAT[c.what] || [c.what])[0];
      marker.appendChild(title);
      svg.appendChild(marker);
      if (labelMarkers) {
        row = mx - lastLabelX < 16 ? (row + 1) % 3 : 0;
        lastLabelX = mx;
        const label = svgEl("text", { class: "marker-label", x: mx + 2, y: 9 + row * 9 });
        label.textContent = String(c.n);
        svg.appendChild(label);
      }
    }

    const legend = figure.querySelector(".legend");
    legend.replaceChildren();
    for (const s of series) {
      const li = el("li");
      li.dataset.key = s.key;
      const swatch = svgEl("svg", { viewBox: "0 0 10 10", "aria-hidden": "true" });
      swatch.appendChild(svgEl("rect", { width: 10, height: 10, rx: 2, fill: s.color }));
      li.appendChild(swatch);
      li.appendChild(el("span", "", s.label));
      const last = s.values.length ? s.values[s.values.length - 1] || 0 : 0;
      li.appendChild(el("span", "value", fmt(last)));
      legend.appendChild(li);
    }
  }

  /** A series of one per-second field of the samples. */
  function field(key, label, color) {
    return { key, label, color, values: samples.map((s) => s[key]) };
  }

  function renderCharts() {
    // Nodes in the order they first appear, so colours and stacking stay put.
    const nodes = new Map();
    for (const s of samples) for (const n of s.nodes) if (!nodes.has(n.id)) nodes.set(n.id, n.name);
    const open = [...nodes].map(([id, name]) => ({
      key: id,
      label: name === id || name === "Node " + id ? id : name + " (" + id + ")",
      color: color("node:" + id),
      values: samples.map((s) => {
        const n = s.nodes.find((m) => m.id === id);
        return n ? Math.max(0, n.open) : 0;
      }),
    }));
    draw(document.getElementById("chart-connections"), open, true, true);

    const requests = [field("requests", "requests", "#0969da"), field("upgrades", "WebSocket upgrades", "#1a7f37")];
    draw(document.getElementById("chart-requests"), requests, false, false);

    const reasons = new Set();
    for (const s of samples) for (const r of Object.keys(s.refused || {})) reasons.add(r);
    draw(
      document.getElementById("chart-refusals"),
      [...reasons].sort().map((r) => ({
        key: r,
        label: r.replace(/_/g, " "),
        color: color("reason:" + r),
        values: samples.map((s) => (s.refused || {})[r] || 0),
      })),
      true,
      false,
    );

    const health = [
      field("healthFailures", "failed health checks", "#cf222e"),
      field("retries", "retried on another node", "#9a6700"),
    ];
    draw(document.getElementById("chart-health"), health, false, false);
  }

  function renderChanges() {
    const list = document.getElementById("events");
    list.replaceChildren();
    if (changes.length === 0) {
      list.appendChild(el("li", "none", "none yet"));
      return;
    }
    for (const c of changes.slice(-40).reverse()) {
      const [text, cls] = WHAT[c.what] || [c.what, ""];
      const li = el("li", cls);
      li.dataset.what = c.what;
      li.dataset.node = c.node;
      li.appendChild(el("span", "n", "#" + c.n));
      const who = c.name && c.name !== c.node && c.name !== "Node " + c.node ? c.name + " (" + c.node + ")" : c.node;
      li.appendChild(document.createTextNode(clock(c.t) + " · " + who + " " + text));
      list.appendChild(li);
    }
  }

  function cell(row, text, cls) {
    const td = el("td", cls, text);
    row.appendChild(td);
    return td;
  }

  function pill(td, label, cls) {
    td.replaceChildren(el("span", "pill " + cls, label));
  }

  function renderBackends(data) {
    const totals = document.getElementById("totals");
    totals.replaceChildren();
    const t = data.totals;
    const cards = [
      ["nodes", t.nodes],
      ["healthy", t.healthy],
      ["accepting", t.acceptingNewClients],
      ["open connections", t.openConnections],
      ["registry", data.registry],
    ];
    for (const [label, value] of cards) {
      const div = el("div", "card");
      div.appendChild(el("b", "", String(value)));
      div.appendChild(document.createTextNode(label));
      totals.appendChild(div);
    }
    const body = document.getElementById("nodes");
    body.replaceChildren();
    if (data.nodes.length === 0) {
      const row = el("tr", "empty");
      cell(row, "no nodes registered: start some (docker compose up --scale node=3)").colSpan = 9;
      body.appendChild(row);
    }
    for (const n of data.nodes) {
      const row = el("tr");
      row.dataset.node = n.nodeId;
      cell(row, n.name + " (" + n.nodeId + ")");
      const status = cell(row, "");
      if (!n.healthy) pill(status, "down", "down");
      else if (n.status === "draining") pill(status, "draining", "draining");
      else if (n.degraded) pill(status, "draining", "degraded");
      else pill(status, "healthy", "healthy");
      row.dataset.status = status.textContent;
      cell(row, n.healthy ? "passing" : "failing", "wide");
      cell(row, String(n.openConnections));
      // New connections a second it admits now (lower while it starts
      // slowly), and how many wait for their turn.
      const a = n.admission || {};
      const admission = cell(row, (a.ratePerSec === 0 ? "no limit" : a.ratePerSec + "/s") + (a.slowStart ? " (slow start)" : "") + (a.waiting ? " · " + a.waiting + " waiting" : ""), "wide");
      admission.dataset.admission = JSON.stringify(a);
      cell(row, String(n.nodeConnections), "wide");
      cell(row, n.routed.token + " / " + n.routed.cookie + " / " + n.routed.new, "wide");
      cell(row, n.url, "wide");
      const ago = Math.max(0, (Date.now() - new Date(n.lastSeen).getTime()) / 1000);
      cell(row, isNaN(ago) ? "?" : ago < 60 ? ago.toFixed(1) + " s ago" : new Date(n.lastSeen).toLocaleTimeString());
      body.appendChild(row);
    }
  }

  async function getJson(path) {
    // From the origin, not relative: a page opened as http://user:token@host/…
    // has credentials in its URL, and fetch refuses URLs that carry them (the
    // browser sends the Basic auth it already has on its own).
    const url = window.location.origin + path;
    const resp = await fetch(url, { cache: "no-store" });
    if (!resp.ok) throw new Error("HTTP " + resp.status + " from " + url);
    return resp.json();
  }

  async function refresh() {
    try {
      const [backends, history] = await Promise.all([
        getJson("/api/backends"),
        getJson("/api/history" + (lastT === null ? "" : "?since=" + lastT)),
      ]);
      for (const s of history.samples || []) {
        if (lastT === null || s.t > lastT) samples.push(s);
      }
      for (const c of history.changes || []) {
        if (lastT === null || c.t > lastT) changes.push(Object.assign({ n: ++numbered }, c));
      }
      if (samples.length) lastT = samples[samples.length - 1].t;
      const keep = (history.keptSamples || 300) + 5;
      if (samples.length > keep) samples.splice(0, samples.length - keep);
      if (changes.length > 200) changes.splice(0, changes.length - 200);
      renderBackends(backends);
      renderCharts();
      renderChanges();
      document.getElementById("state").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (e) {
      document.getElementById("state").textContent = "balancer unreachable: " + e.message;
    }
  }

  refresh();
  setInterval(refresh, 1000);
  window.addEventListener("resize", () => samples.length && renderCharts());
})();
