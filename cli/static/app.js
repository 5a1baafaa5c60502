// vmha web: polls /api/state every second and redraws; fetches /api/graph.svg when the
// graph changes.  Read-only: only GET requests.  Text goes in with textContent only.
"use strict";

const POLL_MS = 1000;
let graphKey = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function fillTable(id, rows) {
  const body = document.querySelector(`#${id} tbody`);
  const fresh = document.createElement("tbody");
  for (const cells of rows) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      if (c instanceof Node) td.appendChild(c); else td.textContent = c ?? "-";
      tr.appendChild(td);
    }
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
}

function stateTag(s) { return s ? el("span", s, `state state-${s}`) : "-"; }

function ago(t, now) {
  if (!t) return "-";
  const s = Math.max(0, Math.round(now - t));
  return s < 120 ? `${s}s ago` : s < 7200 ? `${Math.round(s / 60)}m ago`
    : `${Math.round(s / 3600)}h ago`;
}

async function render(st) {
  const now = st.at;
  document.getElementById("leader").textContent = st.leader
    ? `leader: ${st.leader.id} (epoch ${st.leader.epoch})` : "leader: none";
  document.getElementById("updated").textContent =
    `revision ${st.revision}, updated ${new Date(st.at * 1000).toLocaleTimeString()}`;
  const vmsOn = {};
  for (const v of st.vms) {
    if (v.node && ["running", "paused", "migrating"].includes(v.state)) {
      (vmsOn[v.node] = vmsOn[v.node] || []).push(v.name);
    }
  }
  fillTable("nodes", st.nodes.map(n => [
    n.name, stateTag(n.state), n.lease_id, n.lease_ttl_s === null ? "-" : `${n.lease_ttl_s} s`,
    n.registered ? `${n.free_memory_mib} / ${n.memory_mib} MiB` : "-", n.vcpus,
    (vmsOn[n.name] || []).join(", ") || "-"]));
  fillTable("vms", st.vms.map(v => [
    v.name, v.desired, v.node, stateTag(v.state),
    v.placement === "migrate" ? `migrate ${v.from_node} → ${v.placed_on}`
      : v.placement ? `${v.placement} ${v.placed_on || ""}` : "-",
    `${v.memory_mib} MiB`]));
  fillTable("events", st.recent.map(e => [
    ago(e.at, now), e.kind, e.vm,
    e.from_node ? `${e.from_node} → ${e.node}` : e.node, e.reason]));
  fillTable("ranking", st.graph.ranking.map(r => [
    r.position, r.node, r.score.toFixed(4), r.moves_in, r.moves_out]));
  document.getElementById("moves").textContent =
    `(${st.graph.moves} move${st.graph.moves === 1 ? "" : "s"}, ${st.graph.edges.length} arrows)`;
  const key = st.graph.version + "|" + st.nodes.map(n => `${n.name}=${n.state}`).join(",");
  if (key !== graphKey) await loadGraph(key);
}

async function loadGraph(key) {
  const r = await fetch("/api/graph.svg", { cache: "no-store" });
  if (!r.ok) throw new Error(`graph: HTTP ${r.status}`);
  const doc = new DOMParser().parseFromString(await r.text(), "image/svg+xml");
  const svg = doc.documentElement;
  if (svg.nodeName !== "svg") throw new Error("graph: not an SVG document");
  document.getElementById("graph").replaceChildren(document.importNode(svg, true));
  graphKey = key;
}

function showError(msg) {
  const e = document.getElementById("error");
  e.hidden = !msg;
  e.textContent = msg || "";
}

async function poll() {
  try {
    const r = await fetch("/api/state", { cache: "no-store" });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error || `HTTP ${r.status}`);
    await render(body);
    showError(null);
  } catch (err) {
    showError(`cannot read the cluster state: ${err.message} (retrying)`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
