// corral's console: one page over the API everyone uses (an operator's key, from a
// one-time login), its live feed over Server-Sent Events. No framework, no build step.
"use strict";

const KEY = "corral.console.key";
const OPERATOR = "corral.console.operator";
const STATUSES = ["queued", "running", "waiting", "awaiting_customer", "escalated", "replied",
  "refused", "failed", "killed", "closed"];
const view = () => document.getElementById("view");
let refreshTimer = null;
let graphInfo = null;

// --- building the page ----------------------------------------------------------------

function h(tag, attributes, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    // Through the CSSOM: the page's policy refuses style attributes.
    else if (name === "style") element.style.cssText = String(value);
    else element.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    element.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return element;
}

function show(...children) {
  view().replaceChildren(...children);
}

function age(seconds) {
  const s = Math.max(0, Date.now() / 1000 - seconds);
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${Math.round(s / 3600)} h`;
  return `${Math.round(s / 86400)} d`;
}

const usd = (value) => `$${Number(value || 0).toFixed(4)}`;
const statusBadge = (status) => h("span", { class: `status ${status}`, "data-status": status }, status);

// --- talking to the API ---------------------------------------------------------------

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}` };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method: options.method || "GET",
    headers,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    if (response.status === 401) signedOut(data.detail);
    throw new Error(data.detail || `${response.status} ${response.statusText}`);
  }
  return data;
}

async function act(path, body, done) {
  try {
    await api(path, { method: "POST", body: body || {} });
    if (done) done();
  } catch (error) {
    alert(error.message);
  }
  scheduleRefresh(0);
}

// True once the page holds a key: from a one-time login in the URL's fragment (never sent
// to any server but the API's login), or from earlier in this tab.
async function signIn() {
  const match = location.hash.match(/^#login=(.+)$/);
  if (!match) {
    if (!sessionStorage.getItem(KEY)) signedOut();
    return Boolean(sessionStorage.getItem(KEY));
  }
  const response = await fetch("/v1/console/login", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ login: decodeURIComponent(match[1]) }),
  });
  const data = await response.json().catch(() => ({}));
  history.replaceState(null, "", "#/conversations");
  if (!response.ok) {
    signedOut(data.detail || "the login was refused");
    return false;
  }
  sessionStorage.setItem(KEY, data.key);
  sessionStorage.setItem(OPERATOR, data.operator);
  return true;
}

function signedOut(why) {
  sessionStorage.removeItem(KEY);
  show(
    h("h2", {}, "Sign in"),
    h("p", {}, "Open the one-time login link that `corral up` printed, or run `corral console-login` for another."),
    why ? h("p", { class: "muted", "data-testid": "login-problem" }, why) : null,
  );
}

// The live feed: fetch's stream (an EventSource cannot send the key), read as SSE.
async function follow() {
  const live = document.getElementById("live");
  for (;;) {
    try {
      const response = await fetch("/v1/console/events", {
        headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}` },
      });
      if (!response.ok) throw new Error(String(response.status));
      live.className = "on";
      live.textContent = "live";
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n"); // sse-starlette ends lines with CRLF
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          onEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
        }
      }
    } catch (error) {
      // Gone (the API restarted, the network): say so and come back.
    }
    live.className = "off";
    live.textContent = "offline";
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

function onEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  if (event === "conversations") scheduleRefresh(300);
  else if (event === "alert") {
    const alertData = JSON.parse(data.join("\n") || "{}");
    const banner = document.getElementById("alert-banner");
    banner.hidden = false;
    banner.textContent = `alert: ${alertData.kind}: ${alertData.reason}`;
    scheduleRefresh(300);
  }
}

function scheduleRefresh(delay) {
  if (refreshTimer !== null) return;
  refreshTimer = setTimeout(() => {
    refreshTimer = null;
    render(true);
  }, delay);
}

// --- the views ------------------------------------------------------------------------

async function conversationsView() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const status = params.get("status") || "";
  const agent = params.get("agent") || "";
  const query = new URLSearchParams({ limit: "100" });
  if (status) query.set("status", status);
  if (agent) query.set("agent", agent);
  const [{ items }, graph] = await Promise.all([api(`/v1/console/conversations?${query}`), graphOf()]);
  const filter = (name, value, options) =>
    h("label", {}, `${name} `,
      h("select", {
        "data-testid": `filter-${name}`,
        onchange: (e) => {
          const next = new URLSearchParams({ status, agent, [name]: e.target.value });
          for (const [k, v] of [...next]) if (!v) next.delete(k);
          location.hash = `#/conversations?${next}`;
        },
      }, h("option", { value: "" }, "any"),
      options.map((o) => h("option", { value: o, selected: o === value }, o))));
  show(
    h("div", { class: "filters" }, filter("status", status, STATUSES), filter("agent", agent, graph.agents),
      h("span", { class: "muted" }, `${items.length} shown, newest first`)),
    h("table", { id: "conversations" },
      h("thead", {}, h("tr", {}, ["conversation", "status", "agent", "step", "cost", "age", "client"].map((t) => h("th", {}, t)))),
      h("tbody", {}, items.map((c) =>
        h("tr", { "data-conversation": c.id },
          h("td", {}, h("a", { href: `#/c/${c.id}` }, c.id)),
          h("td", {}, statusBadge(c.status)),
          h("td", { "data-testid": "agent" }, c.current_agent),
          h("td", {}, c.step),
          h("td", {}, usd(c.cost_usd)),
          h("td", {}, age(c.created_at)),
          h("td", {}, c.customer ? `${c.client} / ${c.customer}` : c.client))))),
  );
}

function flatten(nodes, out = []) {
  for (const node of nodes) {
    out.push(node);
    flatten(node.children, out);
  }
  return out;
}

function kindOf(name) {
  if (name.startsWith("invoke_workflow")) return "turn";
  if (name.startsWith("supervisor.decide")) return "decide";
  if (name.startsWith("invoke_agent")) return "agent";
  if (name.startsWith("chat ")) return "chat";
  if (name.startsWith("execute_tool transfer_to_")) return "handoff";
  if (name.startsWith("execute_tool")) return "tool";
  return "policy";
}

function summary(span) {
  const a = span.attributes;
  const parts = [span.name, `${span.duration_ms.toFixed(1)} ms`];
  if (a["corral.tier"]) parts.push(`tier ${a["corral.tier"]}`);
  if (a["gen_ai.usage.input_tokens"] !== undefined)
    parts.push(`${a["gen_ai.usage.input_tokens"]} in / ${a["gen_ai.usage.output_tokens"]} out tokens`, usd(a["corral.cost_usd"]));
  if (a["corral.decision"]) parts.push(`decision ${a["corral.decision"]}`);
  if (a["corral.policy_ids"]) parts.push(`policies ${[].concat(a["corral.policy_ids"]).join(", ")}`);
  if (a["corral.confidence"] !== undefined) parts.push(`confidence ${Number(a["corral.confidence"]).toFixed(2)}`);
  if (a["corral.handoff.payload_keys"]) parts.push(`payload ${[].concat(a["corral.handoff.payload_keys"]).join(", ")}`);
  if (a["corral.approval_id"]) parts.push(`approval ${a["corral.approval_id"]}`);
  if (span.status === "error") parts.push(`failed: ${span.status_message}`);
  return parts.join(" · ");
}

async function conversationView(id) {
  const data = await api(`/v1/console/conversations/${encodeURIComponent(id)}`);
  const spans = flatten(data.spans);
  const start = Math.min(...spans.map((s) => Date.parse(s.started_at)));
  const end = Math.max(...spans.map((s) => Date.parse(s.started_at) + s.duration_ms));
  const width = Math.max(end - start, 1);
  const lanes = new Map();
  for (const span of spans) {
    const lane = span.service;
    if (!lanes.has(lane)) lanes.set(lane, []);
    lanes.get(lane).push(span);
  }
  const order = (name) => (name === "api" ? 0 : name === "supervisor" ? 1 : name === "router" ? 3 : 2);
  const detail = h("pre", { class: "detail", "data-testid": "span-detail" }, "Click a span for its attributes.");
  const laneRows = [...lanes.keys()].sort((x, y) => order(x) - order(y) || x.localeCompare(y)).map((lane) =>
    h("div", { class: "lane", "data-lane": lane },
      h("div", { class: "lane-name" }, lane),
      h("div", { class: "track", style: `height: ${1.4 * Math.min(lanes.get(lane).length, 4)}rem` },
        lanes.get(lane).map((span, i) => h("div", {
          class: `bar ${kindOf(span.name)}${span.status === "error" ? " error" : ""}`,
          "data-span": span.name,
          title: summary(span),
          style: `left: ${(100 * (Date.parse(span.started_at) - start)) / width}%; ` +
            `width: ${Math.max((100 * span.duration_ms) / width, 0.4)}%; top: ${1.4 * (i % 4)}rem`,
          onclick: () => { detail.textContent = `${summary(span)}\n\n${JSON.stringify(span.attributes, null, 2)}`; },
        }, span.name)))));
  const transcript = h("div", { class: "transcript", "data-testid": "transcript" },
    h("h2", {}, "Transcript"),
    data.transcript.map((t) => h("div", { class: "turn-line", "data-role": t.role },
      h("b", {}, t.role === "tool" ? `tool ${t.tool}` : t.role), t.agent ? ` (${t.agent})` : "", ": ", t.text)));
  show(
    h("h2", {}, `Conversation ${id} `, h("button", { class: "danger", onclick: () => act(`/v1/conversations/${id}/kill`, { reason: "killed from the console" }) }, "Kill conversation")),
    h("div", { class: "columns" },
      h("div", {},
        h("div", { class: "lanes", "data-testid": "lanes" }, spans.length ? laneRows : h("p", { class: "muted" }, "No spans stored for it.")),
        detail,
        h("h2", {}, "Decisions"),
        h("table", {}, h("tbody", {}, data.steps.map((s) => h("tr", {},
          h("td", {}, s.step), h("td", {}, s.agent), h("td", {}, s.kind),
          h("td", {}, s.target ? `→ ${s.target}` : ""),
          h("td", {}, s.confidence === null ? "" : Number(s.confidence).toFixed(2)), h("td", {}, s.detail))))),
        h("h2", {}, "Tool calls"),
        h("table", {}, h("tbody", {}, data.tools.map((t) => h("tr", {},
          h("td", {}, t.agent), h("td", {}, t.tool), h("td", {}, t.status),
          h("td", {}, t.policy_ids.join(", ")), h("td", {}, t.approval_id || ""), h("td", {}, t.reason)))))),
      transcript),
  );
}

async function queuesView() {
  const [approvals, queue, graph] = await Promise.all([api("/v1/approvals"), api("/v1/queue"), graphOf()]);
  show(
    h("h2", {}, "Approvals"),
    approvals.items.length ? h("table", { id: "approvals" }, h("tbody", {}, approvals.items.map((a) =>
      h("tr", { "data-approval": a.id },
        h("td", {}, h("a", { href: `#/c/${a.conversation}` }, a.conversation)),
        h("td", {}, `${a.agent}: ${a.tool}`), h("td", {}, JSON.stringify(a.arguments)),
        h("td", {}, `approver ${a.approver}`), h("td", {}, (a.policy_ids || []).join(", ")),
        h("td", {},
          h("button", { class: "primary", onclick: () => act(`/v1/approvals/${a.id}/approve`, { reason: "approved in the console" }) }, "Approve"),
          " ",
          h("button", { onclick: () => act(`/v1/approvals/${a.id}/deny`, { reason: prompt("Why deny?") || "denied in the console" }) }, "Deny")))))) :
      h("p", { class: "muted" }, "No approval is pending."),
    h("h2", {}, "Escalated conversations, and those answered that await the customer"),
    queue.items.length ? h("table", { id: "queue" }, h("tbody", {}, queue.items.map((q) => {
      const reply = h("input", { placeholder: "reply to the customer", "data-testid": "reply-text", size: 40 });
      const agent = h("select", { "data-testid": "handback-agent" }, graph.agents.map((a) => h("option", { value: a }, a)));
      const base = `/v1/queue/${q.conversation}`;
      return h("tr", { "data-queued": q.conversation },
        h("td", {}, h("a", { href: `#/c/${q.conversation}` }, q.conversation)),
        h("td", {}, q.reason || ""), h("td", {}, q.last_turn || ""),
        h("td", {}, q.claimed_by ? `claimed by ${q.claimed_by}` : "unclaimed"),
        h("td", {}, q.status === "awaiting_customer" ? statusBadge(q.status) : ""),
        h("td", {},
          h("button", { onclick: () => act(`${base}/claim`) }, "Claim"), " ",
          reply, h("button", { onclick: () => act(`${base}/reply`, { text: reply.value }) }, "Reply"), " ",
          agent, h("button", { onclick: () => act(`${base}/handback`, { agent: agent.value, note: "handed back in the console" }) }, "Hand back")));
    }))) : h("p", { class: "muted" }, "No conversation is escalated."),
  );
}

async function graphOf() {
  graphInfo = await api("/v1/console/graph");
  return graphInfo;
}

async function graphView() {
  const graph = await graphOf();
  // Layers by distance from the entry agent; the rest after them.
  const depth = new Map([[graph.entry, 0]]);
  const queue = [graph.entry];
  while (queue.length) {
    const agent = queue.shift();
    for (const edge of graph.edges.filter((e) => e.from === agent && e.allowed !== false))
      if (!depth.has(edge.to)) { depth.set(edge.to, depth.get(agent) + 1); queue.push(edge.to); }
  }
  const names = [...new Set([...graph.agents, ...graph.edges.flatMap((e) => [e.from, e.to])])];
  for (const n of names) if (!depth.has(n)) depth.set(n, Math.max(0, ...depth.values()) + 1);
  const columns = new Map();
  for (const n of names) columns.set(depth.get(n), [...(columns.get(depth.get(n)) || []), n]);
  const place = new Map();
  for (const [column, members] of columns) members.forEach((n, i) => place.set(n, { x: 90 + column * 220, y: 60 + i * 90 }));
  const svg = (tag, attributes, ...children) => {
    const element = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attributes)) element.setAttribute(k, String(v));
    element.append(...children);
    return element;
  };
  const height = 120 + 90 * Math.max(...[...columns.values()].map((m) => m.length));
  const drawing = svg("svg", { width: 240 * columns.size + 60, height, "data-testid": "graph" },
    ...graph.edges.map((e) => {
      const a = place.get(e.from), b = place.get(e.to);
      const label = `${e.handoffs}${e.refusals ? ` / ${e.refusals} refused` : ""}`;
      return svg("g", { "data-edge": `${e.from}->${e.to}` },
        svg("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, stroke: e.allowed === false ? "#b91c1c" : "#94a3b8", "stroke-width": 1 + Math.min(6, Math.log2(1 + e.handoffs)) }),
        svg("text", { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 - 6, "font-size": 12, "text-anchor": "middle" }, label));
    }),
    ...names.map((n) => svg("g", { "data-node": n },
      svg("rect", { x: place.get(n).x - 70, y: place.get(n).y - 16, width: 140, height: 32, rx: 6, fill: n === graph.entry ? "#dbeafe" : "#fff", stroke: "#334155" }),
      svg("text", { x: place.get(n).x, y: place.get(n).y + 4, "text-anchor": "middle", "font-size": 13 }, n))));
  show(h("h2", {}, "Handoff graph (last 24 h: handoffs taken, and refused)"), h("div", { class: "graph" }, drawing));
}

async function agentsView() {
  const { items } = await api("/v1/console/agents");
  show(
    h("h2", {}, "Agents"),
    h("table", { id: "agents" },
      h("thead", {}, h("tr", {}, ["agent", "state", "replicas", "model calls/min", "spend today", "running", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, items.map((a) => h("tr", { "data-agent": a.agent },
        h("td", {}, a.agent),
        h("td", { "data-testid": "state" }, a.killed ? `killed by ${a.killed_by}: ${a.reason}` : "running"),
        h("td", {}, a.replicas), h("td", {}, a.calls_per_minute), h("td", {}, usd(a.spend_today_usd)), h("td", {}, a.running),
        h("td", {}, a.killed ?
          h("button", { onclick: () => act(`/v1/agents/${a.agent}/revive`, { reason: "revived from the console" }) }, "Revive") :
          h("button", { class: "danger", onclick: () => act(`/v1/agents/${a.agent}/kill`, { reason: "killed from the console" }) }, "Kill")))))),
  );
}

async function alertsView() {
  const { items } = await api("/v1/console/alerts");
  show(h("h2", {}, "Alerts"), items.length ? h("table", { id: "alerts" }, h("tbody", {}, items.map((a) =>
    h("tr", {}, h("td", {}, age(a.at)), h("td", {}, a.kind), h("td", {}, a.agent),
      h("td", {}, a.conversation ? h("a", { href: `#/c/${a.conversation}` }, a.conversation) : ""),
      h("td", {}, a.reason), h("td", {}, a.action))))) : h("p", { class: "muted" }, "No alerts."));
}

async function render(quiet) {
  const route = location.hash.replace(/^#\/?/, "").split("?")[0] || "conversations";
  for (const link of document.querySelectorAll("header nav a"))
    link.classList.toggle("active", link.getAttribute("href") === `#/${route.split("/")[0]}`);
  try {
    if (route.startsWith("c/")) await conversationView(route.slice(2));
    else if (route === "queues") await queuesView();
    else if (route === "graph") await graphView();
    else if (route === "agents") await agentsView();
    else if (route === "alerts") await alertsView();
    else await conversationsView();
  } catch (error) {
    if (!quiet && sessionStorage.getItem(KEY)) show(h("p", { class: "muted" }, error.message));
  }
}

async function start() {
  if (!(await signIn())) return;
  document.getElementById("who").textContent = `operator ${sessionStorage.getItem(OPERATOR) || ""}`;
  window.addEventListener("hashchange", () => render(false));
  await render(false);
  follow();
}

start();
