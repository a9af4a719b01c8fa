// meshpipe console: the mesh and its figures from /api/events (SSE), a chat playground on
// /v1/chat/completions, and the models from /api/models. Plain JS, no dependencies.

const WINDOW_SECONDS = 300; // charts show the last five minutes
const LOST_KEEP_SECONDS = 300; // a lost worker stays on the graph this long
const STAGE_COLORS = ["#4cc2ff", "#a371f7", "#3fb950", "#f0883e", "#ff7b72", "#e3b341", "#56d4dd", "#db61a2"];
const SVG_NS = "http://www.w3.org/2000/svg";

const feed = {
  latest: null, // the last body from /api/events
  samples: [], // one per update, for the charts
  workers: new Map(), // model -> worker_id -> {info, status: "stage" | "standby" | "lost", reason, lostAt}
  selected: null, // the model whose pipeline the topology shows
};

// -- small DOM and format helpers --------------------------------------------------------

const byId = (id) => document.getElementById(id);

function html(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function svg(tag, attributes = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== undefined && value !== null) node.setAttribute(name, value);
  }
  node.append(...children);
  return node;
}

function rate(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return "–";
  return value >= 100 ? value.toFixed(0) : value >= 10 ? value.toFixed(1) : value.toFixed(2);
}

function bytes(value) {
  if (!value) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let index = 0;
  while (value >= 1024 && index < units.length - 1) {
    value /= 1024;
    index += 1;
  }
  return `${value.toFixed(value >= 100 || index === 0 ? 0 : 1)} ${units[index]}`;
}

function milliseconds(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  return seconds < 1 ? `${(seconds * 1000).toFixed(0)} ms` : `${seconds.toFixed(2)} s`;
}

function latency(milliseconds) {
  if (milliseconds === null || milliseconds === undefined) return null;
  return `${milliseconds.toFixed(milliseconds < 10 ? 2 : 1)} ms`;
}

function duration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const h = Math.floor(seconds / 3600);
  const m = Math.floor((seconds % 3600) / 60);
  const s = seconds % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${s}s` : `${s}s`;
}

function clock(unixSeconds) {
  return new Date(unixSeconds * 1000).toLocaleTimeString([], { hour12: false });
}

function layerRange(layers) {
  return layers ? `[${layers[0]}, ${layers[1]})` : "–";
}

function stageColor(index) {
  return STAGE_COLORS[index % STAGE_COLORS.length];
}

function cssVariable(name) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
}

// -- the live feed -----------------------------------------------------------------------

function connectFeed() {
  const source = new EventSource("api/events");
  const state = byId("feed-state");
  source.onopen = () => {
    state.dataset.state = "live";
    state.textContent = "live";
  };
  source.onerror = () => {
    // EventSource reconnects by itself; say so until it does.
    state.dataset.state = source.readyState === EventSource.CLOSED ? "offline" : "connecting";
    state.textContent = source.readyState === EventSource.CLOSED ? "offline" : "reconnecting";
  };
  source.addEventListener("snapshot", onFeed);
  source.addEventListener("update", onFeed);
}

function onFeed(event) {
  const body = JSON.parse(event.data);
  feed.latest = body;
  if (!body.models.some((model) => model.name === feed.selected)) feed.selected = body.models[0]?.name ?? null;
  for (const model of body.models) trackWorkers(model, body.time);
  recordSample(body);
  render(body);
}

function selectedModel(body) {
  return body.models.find((model) => model.name === feed.selected) || body.models[0];
}

function trackWorkers(model, now) {
  if (!feed.workers.has(model.name)) feed.workers.set(model.name, new Map());
  const workers = feed.workers.get(model.name);
  const pipeline = model.pipeline;
  const present = new Set();
  for (const worker of pipeline.workers) {
    present.add(worker.worker_id);
    workers.set(worker.worker_id, { info: worker, status: worker.layers ? "stage" : "standby" });
  }
  // The gateway records why a worker left; it also tells us of losses from before we loaded.
  for (const event of pipeline.events || []) {
    if (event.event !== "left" || present.has(event.worker)) continue;
    if (now - event.time > LOST_KEEP_SECONDS) continue;
    const known = workers.get(event.worker);
    if (known && known.status === "lost" && known.lostAt >= event.time) continue;
    workers.set(event.worker, {
      info: known ? known.info : { worker_id: event.worker },
      status: "lost",
      reason: event.reason,
      lostAt: event.time,
    });
  }
  for (const [id, worker] of workers) {
    if (present.has(id)) continue;
    if (worker.status !== "lost") {
      Object.assign(worker, { status: "lost", reason: "disconnected", lostAt: now });
    } else if (now - worker.lostAt > LOST_KEEP_SECONDS) {
      workers.delete(id);
    }
  }
}

function recordSample(body) {
  const stages = {}; // model -> stage index -> tokens/s
  for (const model of body.models) {
    stages[model.name] = {};
    for (const stage of model.rates.stages) stages[model.name][stage.stage] = stage.tokens_per_second;
  }
  const figures = body.gateway;
  feed.samples.push({
    time: body.time,
    generated: figures.generated_tokens_per_second,
    prompt: figures.prompt_tokens_per_second,
    stages,
    waiting: figures.waiting,
    running: figures.running,
    slots: figures.slots_used,
  });
  const oldest = body.time - WINDOW_SECONDS - 5;
  while (feed.samples.length && feed.samples[0].time < oldest) feed.samples.shift();
}

// -- rendering ---------------------------------------------------------------------------

function render(body) {
  const model = selectedModel(body);
  renderHeader(body);
  renderFigures(body);
  renderTabs(body);
  if (model) {
    renderTopology(model, body.time);
    renderLayerMap(model);
  }
  renderCharts();
  renderRequests(body);
  renderEvents(body);
}

function pipelineState(pipeline) {
  if (pipeline.ready) return ["ready", "ready"];
  if (pipeline.stages.length) return ["rebuilding", "loading"];
  return ["down", "no route"];
}

function renderHeader(body) {
  byId("served-model").textContent = body.models.map((model) => model.name).join(", ");
  const states = body.models.map((model) => pipelineState(model.pipeline)[0]);
  const state = states.includes("down") ? "down" : states.includes("rebuilding") ? "rebuilding" : "ready";
  const labels = { ready: "pipeline ready", rebuilding: "pipeline loading", down: "no pipeline" };
  const pill = byId("pipeline-state");
  pill.dataset.state = state;
  pill.textContent = labels[state] + (body.models.length > 1 ? ` (${states.filter((s) => s === "ready").length}/${states.length})` : "");
  byId("uptime").textContent = `up ${duration(body.uptime)}`;
}

function renderFigures(body) {
  const figures = body.gateway;
  byId("kpi-tps").textContent = rate(figures.generated_tokens_per_second);
  byId("kpi-prompt").textContent = rate(figures.prompt_tokens_per_second);
  byId("kpi-running").textContent = figures.running;
  byId("kpi-waiting").textContent = figures.waiting;
  byId("kpi-slots").textContent = `${figures.slots_used}/${figures.slots}`;
  byId("kpi-batches").textContent = figures.batches_in_flight;
}

function renderTabs(body) {
  // One tab per served model; a single model needs none.
  const tabs = byId("model-tabs");
  tabs.hidden = body.models.length < 2;
  const key = body.models.map((model) => model.name).join("\n") + "\n" + feed.selected;
  if (tabs.dataset.key === key) return;
  tabs.dataset.key = key;
  tabs.replaceChildren(
    ...body.models.map((model) => {
      const tab = html("button", { type: "button", role: "tab", "aria-selected": String(model.name === feed.selected) }, model.name);
      tab.addEventListener("click", () => {
        feed.selected = model.name;
        render(feed.latest);
      });
      return tab;
    }),
  );
}

// -- topology ----------------------------------------------------------------------------

const NODE = { width: 232, height: 132, gap: 124 };
const GATEWAY = { width: 176, height: 112 };
const MARGIN = 24;

function renderTopology(model, now) {
  const pipeline = model.pipeline;
  const stages = pipeline.stages;
  const routeIds = new Set(stages.map((stage) => stage.worker_id));
  const others = [...(feed.workers.get(model.name) || new Map()).values()]
    .filter((worker) => !routeIds.has(worker.info.worker_id))
    .sort((a, b) => (a.status === b.status ? 0 : a.status === "lost" ? 1 : -1));
  const relay = relayOf(pipeline);
  const flowing = model.rates.generated_tokens_per_second > 0 || model.engine.batches_in_flight > 0;

  const columns = Math.max(stages.length, others.length, 1);
  const stagesX = MARGIN + GATEWAY.width + NODE.gap;
  const width = stagesX + columns * (NODE.width + NODE.gap) - NODE.gap + MARGIN;
  const rowY = MARGIN + (relay ? 110 : 0);
  const returnY = rowY + NODE.height + 42;
  const othersY = returnY + 44;
  const height = (others.length ? othersY + NODE.height : returnY + 22) + MARGIN;

  const root = byId("topology");
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.style.maxWidth = `${width * 1.15}px`;
  const edges = svg("g", { class: "edges" });
  const nodes = svg("g", { class: "nodes" });
  root.replaceChildren(markers(), edges, nodes);

  const gatewayBox = { x: MARGIN, y: rowY + (NODE.height - GATEWAY.height) / 2, ...GATEWAY };
  nodes.append(gatewayNode(gatewayBox, model));

  const boxes = stages.map((stage, index) => ({
    x: stagesX + index * (NODE.width + NODE.gap),
    y: rowY,
    ...NODE,
  }));
  stages.forEach((stage, index) => {
    const stageRate = model.rates.stages.find((entry) => entry.stage === stage.index);
    nodes.append(stageNode(boxes[index], stage, stageRate, pipeline.num_layers));
  });

  const flow = flowing ? " flowing" : "";
  if (stages.length) {
    const first = boxes[0];
    edges.append(
      edge(
        `M${gatewayBox.x + gatewayBox.width},${first.y + first.height / 2} H${first.x}`,
        linkClass(stages[0].link) + flow,
        linkLabel(stages[0].link, stages[0].rtt_ms, "batches"),
      ),
    );
    for (let index = 1; index < stages.length; index += 1) {
      const from = boxes[index - 1];
      const to = boxes[index];
      edges.append(
        edge(
          `M${from.x + from.width},${from.y + from.height / 2} H${to.x}`,
          linkClass(stages[index].link) + flow,
          linkLabel(stages[index].link, nextRtt(stages[index - 1]), "hidden states"),
        ),
      );
    }
    const last = boxes[boxes.length - 1];
    const lastX = last.x + last.width / 2;
    const gatewayX = gatewayBox.x + gatewayBox.width / 2;
    const gatewayBottom = gatewayBox.y + gatewayBox.height;
    edges.append(
      edge(
        `M${lastX},${last.y + last.height} V${returnY - 14} Q${lastX},${returnY} ${lastX - 14},${returnY}` +
          ` H${gatewayX + 14} Q${gatewayX},${returnY} ${gatewayX},${returnY - 14} V${gatewayBottom}`,
        linkClass(returnLink(stages[stages.length - 1])) + flow,
        linkLabel(returnLink(stages[stages.length - 1]), stages[stages.length - 1].rtt_ms, "tokens"),
        { x: (lastX + gatewayX) / 2, y: returnY },
      ),
    );
  }

  others.forEach((worker, index) => {
    const box = { x: stagesX + index * (NODE.width + NODE.gap), y: othersY, ...NODE };
    nodes.append(workerNode(box, worker, now));
    if (worker.status === "standby") {
      const path = `M${gatewayBox.x + 30},${gatewayBox.y + gatewayBox.height} V${box.y + box.height / 2} H${box.x}`;
      edges.append(edge(path, "edge control", { pill: "standby" }, { x: gatewayBox.x + 90, y: box.y + box.height / 2 }));
    }
  });

  if (relay) {
    const box = { x: stagesX, y: MARGIN, width: NODE.width, height: 80 };
    nodes.append(relayNode(box, relay));
    stages.forEach((stage, index) => {
      if (stage.link !== "relayed" && stage.gateway_link !== "relayed") return;
      const x = boxes[index].x + boxes[index].width / 2;
      edges.append(edge(`M${box.x + box.width / 2},${box.y + box.height} L${x},${boxes[index].y}`, "edge relayed"));
    });
  }

  const summary = stages.length
    ? `${stages.length} stage${stages.length > 1 ? "s" : ""} over ${pipeline.num_layers} layers, plan #${pipeline.plan_id}`
    : "no route";
  const standby = others.filter((worker) => worker.status === "standby").length;
  const lost = others.filter((worker) => worker.status === "lost").length;
  byId("topology-summary").textContent =
    summary + (standby ? ` · ${standby} standby` : "") + (lost ? ` · ${lost} lost` : "");
}

function markers() {
  const arrow = (id, extra) =>
    svg(
      "marker",
      { id, class: extra, viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto-start-reverse" },
      svg("path", { d: "M0,0 L10,5 L0,10 z" }),
    );
  return svg("defs", {}, arrow("arrow"), arrow("arrow-accent", "accent"));
}

function linkClass(kind) {
  return `edge ${kind === "relayed" ? "relayed" : "direct"}`;
}

// The last stage sends tokens back over its own connection to the gateway.
function returnLink(stage) {
  return stage.gateway_link || stage.link || "direct";
}

// The RTT a stage measures to the next one (seconds in the feed), in ms.
function nextRtt(stage) {
  return stage.next_rtt === null || stage.next_rtt === undefined ? null : stage.next_rtt * 1000;
}

// Relays carrying links of this pipeline: the mesh's own, or those its workers joined through.
function relayOf(pipeline) {
  if (pipeline.relay) return pipeline.relay;
  const addresses = [...new Set(pipeline.workers.map((worker) => worker.relay).filter(Boolean))];
  return addresses.length ? { address: addresses.join(", ") } : null;
}

// A link's label: its kind and its RTT where one is measured, in a pill above the line; what
// travels on it in a caption below.
function linkLabel(kind, rttMs, what) {
  const rtt = latency(rttMs);
  return { pill: `${kind || "direct"}${rtt ? ` · ${rtt}` : ""}`, caption: what };
}

function edge(path, className, label, at) {
  const group = svg("g", { class: "link" });
  const flowing = className.includes("flowing");
  group.append(svg("path", { d: path, class: className, "marker-end": `url(#${flowing ? "arrow-accent" : "arrow"})` }));
  const middle = at || pathMiddle(path);
  if (label && label.pill) group.append(edgeLabel(label.pill, middle));
  if (label && label.caption) {
    group.append(svg("text", { class: "caption", x: middle.x, y: middle.y + 17, "text-anchor": "middle" }, label.caption));
  }
  return group;
}

function pathMiddle(path) {
  // Straight horizontal paths only: "Mx,y Hx2".
  const match = /M([\d.]+),([\d.]+) H([\d.]+)/.exec(path);
  return match ? { x: (Number(match[1]) + Number(match[3])) / 2, y: Number(match[2]) } : { x: 0, y: 0 };
}

function edgeLabel(text, at) {
  const width = text.length * 6.1 + 12;
  return svg(
    "g",
    { class: "edge-label", transform: `translate(${at.x - width / 2},${at.y - 25})` },
    svg("rect", { width, height: 18, rx: 9 }),
    svg("text", { x: width / 2, y: 13, "text-anchor": "middle" }, text),
  );
}

function card(box, className, attributes, lines) {
  const group = svg("g", { class: `node ${className}`, transform: `translate(${box.x},${box.y})`, ...attributes });
  group.append(svg("rect", { class: "box", width: box.width, height: box.height, rx: 9 }));
  let y = 22;
  for (const line of lines) {
    if (!line) continue;
    group.append(svg("text", { x: 14, y, class: line.class || "" }, line.text));
    y += line.class === "title" ? 21 : 17;
  }
  return group;
}

function gatewayNode(box, model) {
  const engine = model.engine;
  const [state] = pipelineState(model.pipeline);
  const group = card(box, "gateway", { "data-state": state }, [
    { text: "gateway", class: "title" },
    { text: model.name, class: "sub mono" },
    { text: `${engine.running.length} running · ${engine.waiting} queued`, class: "sub" },
    { text: `slots ${engine.slots_used}/${engine.slots} · ${engine.batches_in_flight} in flight`, class: "sub" },
    { text: `${rate(model.rates.generated_tokens_per_second)} tok/s`, class: "figure" },
  ]);
  group.append(svg("circle", { class: `dot ${state === "ready" ? "ready" : state === "down" ? "lost" : "loading"}`, cx: box.width - 16, cy: 17, r: 5 }));
  return group;
}

function stageNode(box, stage, stageRate, totalLayers) {
  const state = stage.ready ? "ready" : "loading";
  const layers = stage.layers ? stage.layers[1] - stage.layers[0] : 0;
  const busy = stageRate ? ` · busy ${Math.round(Math.min(stageRate.busy, 1) * 100)}%` : "";
  const group = card(
    box,
    "stage",
    { "data-worker": stage.worker_id, "data-state": state, "data-stage": stage.index, "data-layers": stage.layers ? stage.layers.join("-") : "" },
    [
      { text: `stage ${stage.index}`, class: "title" },
      { text: `layers ${layerRange(stage.layers)} · ${layers}/${totalLayers}`, class: "layers" },
      { text: `${stage.worker_id} · pid ${stage.pid}`, class: "sub mono" },
      { text: `${stage.device} · ${stage.dtype} · ${bytes(stage.memory)}`, class: "sub" },
      { text: `${stageRate ? rate(stageRate.tokens_per_second) : "–"} tok/s${busy}`, class: "figure" },
      { text: `${stage.address} · RTT ${latency(stage.rtt_ms) || "–"}`, class: "sub mono" },
    ],
  );
  group.append(svg("rect", { class: "stripe", x: 0, y: 0, width: 5, height: box.height, rx: 2, fill: stageColor(stage.index) }));
  group.append(svg("circle", { class: `dot ${state}`, cx: box.width - 16, cy: 17, r: 5 }));
  return group;
}

function workerNode(box, worker, now) {
  const info = worker.info;
  const lost = worker.status === "lost";
  const lines = [
    { text: info.worker_id, class: "title" },
    lost
      ? { text: `lost ${duration(now - worker.lostAt)} ago`, class: "bad" }
      : { text: "standby: no layers", class: "sub" },
    lost ? { text: worker.reason || "", class: "sub bad" } : null,
    info.pid ? { text: `pid ${info.pid} · ${info.address || ""}`, class: "sub mono" } : null,
    info.device ? { text: `${info.device} · ${info.dtype} · ${bytes(info.memory)}`, class: "sub" } : null,
  ];
  const group = card(box, "worker", { "data-worker": info.worker_id, "data-state": worker.status }, lines);
  group.append(svg("circle", { class: `dot ${worker.status}`, cx: box.width - 16, cy: 17, r: 5 }));
  return group;
}

function relayNode(box, relay) {
  return card(box, "relay", { "data-state": "relay" }, [
    { text: "relay", class: "title" },
    { text: relay.address || "", class: "sub mono" },
    { text: relay.peers !== undefined ? `${relay.peers} peers relayed` : "carries links between NATed peers", class: "sub" },
  ]);
}

function renderLayerMap(model) {
  const pipeline = model.pipeline;
  const map = byId("layer-map");
  const total = pipeline.num_layers || 1;
  if (!pipeline.stages.length) {
    map.replaceChildren(html("div", { class: "segment empty", style: "flex: 1" }, `${total} layers, not assigned`));
    return;
  }
  map.replaceChildren(
    ...pipeline.stages.map((stage) => {
      const count = stage.layers[1] - stage.layers[0];
      const style = `flex: ${count}; background-color: ${stageColor(stage.index)}; --cell: ${100 / count}%`;
      return html(
        "div",
        { class: "segment", style, title: `stage ${stage.index}: layers ${layerRange(stage.layers)} on ${stage.worker_id}` },
        `stage ${stage.index} · ${layerRange(stage.layers)}`,
      );
    }),
  );
}

// -- charts ------------------------------------------------------------------------------

const CHARTS = {
  tokens: {
    series: () => [
      { key: (s) => s.generated, label: "generated", color: STAGE_COLORS[0] },
      { key: (s) => s.prompt, label: "prompt", color: STAGE_COLORS[1] },
    ],
    format: rate,
  },
  stages: {
    series: () => {
      const indexes = new Set();
      const stagesOf = (sample) => sample.stages[feed.selected] || {};
      for (const sample of feed.samples) for (const index of Object.keys(stagesOf(sample))) indexes.add(Number(index));
      return [...indexes].sort((a, b) => a - b).map((index) => ({
        key: (s) => (index in stagesOf(s) ? stagesOf(s)[index] : null),
        label: `stage ${index}`,
        color: stageColor(index),
      }));
    },
    format: rate,
  },
  queue: {
    series: () => [{ key: (s) => s.waiting, label: "queued", color: "#f0883e" }],
    format: String,
    integer: true,
  },
  running: {
    series: () => [
      { key: (s) => s.running, label: "running", color: "#3fb950" },
      { key: (s) => s.slots, label: "KV slots used", color: "#8b949e" },
    ],
    format: String,
    integer: true,
  },
};

function renderCharts() {
  for (const [name, chart] of Object.entries(CHARTS)) {
    const series = chart.series();
    drawChart(byId(`chart-${name}`), series, chart);
    const last = feed.samples[feed.samples.length - 1];
    byId(`legend-${name}`).replaceChildren(
      ...series.map((entry) => {
        const value = last ? entry.key(last) : null;
        return html("span", {}, html("i", { style: `background: ${entry.color}` }), `${entry.label} `, html("b", {}, value === null ? "–" : chart.format(value)));
      }),
    );
  }
}

function niceCeiling(value, integer) {
  if (value <= 0) return integer ? 4 : 1;
  const exponent = 10 ** Math.floor(Math.log10(value));
  const step = [1, 2, 2.5, 5, 10].find((factor) => factor * exponent >= value) * exponent;
  return integer ? Math.max(4, Math.ceil(step / 4) * 4) : step; // whole-number grid lines
}

function drawChart(canvas, series, options) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);

  const pad = { left: 38, right: 8, top: 10, bottom: 20 };
  const plotWidth = width - pad.left - pad.right;
  const plotHeight = height - pad.top - pad.bottom;
  const samples = feed.samples;
  const now = samples.length ? samples[samples.length - 1].time : Date.now() / 1000;
  const start = now - WINDOW_SECONDS;
  let highest = 0;
  for (const sample of samples) {
    for (const entry of series) highest = Math.max(highest, entry.key(sample) || 0);
  }
  const top = niceCeiling(highest * 1.08, options.integer);
  const x = (time) => pad.left + ((time - start) / WINDOW_SECONDS) * plotWidth;
  const y = (value) => pad.top + plotHeight - (value / top) * plotHeight;

  context.font = "11px system-ui, sans-serif";
  context.lineWidth = 1;
  context.strokeStyle = cssVariable("--grid");
  context.fillStyle = cssVariable("--muted");
  context.textAlign = "right";
  context.textBaseline = "middle";
  for (let step = 0; step <= 4; step += 1) {
    const value = (top * step) / 4;
    const lineY = Math.round(y(value)) + 0.5;
    context.beginPath();
    context.moveTo(pad.left, lineY);
    context.lineTo(width - pad.right, lineY);
    context.stroke();
    context.fillText(options.integer ? String(Math.round(value)) : rate(value).replace(/\.0+$/, ""), pad.left - 5, lineY);
  }
  context.textAlign = "center";
  context.textBaseline = "alphabetic";
  for (let minute = 0; minute <= WINDOW_SECONDS / 60; minute += 1) {
    const lineX = Math.round(x(now - minute * 60)) + 0.5;
    context.fillText(minute === 0 ? "now" : `-${minute}m`, Math.min(lineX, width - pad.right - 10), height - 5);
  }

  series.forEach((entry, index) => {
    const points = samples
      .filter((sample) => sample.time >= start && entry.key(sample) !== null && entry.key(sample) !== undefined)
      .map((sample) => [x(sample.time), y(entry.key(sample))]);
    if (!points.length) return;
    context.beginPath();
    points.forEach(([px, py], at) => (at ? context.lineTo(px, py) : context.moveTo(px, py)));
    context.strokeStyle = entry.color;
    context.lineWidth = 1.6;
    context.lineJoin = "round";
    context.stroke();
    if (index === 0) {
      context.lineTo(points[points.length - 1][0], y(0));
      context.lineTo(points[0][0], y(0));
      context.closePath();
      context.globalAlpha = 0.14;
      context.fillStyle = entry.color;
      context.fill();
      context.globalAlpha = 1;
    }
  });
}

// -- requests and events -----------------------------------------------------------------

function renderRequests(body) {
  const several = body.models.length > 1;
  const running = body.models.flatMap((model) => model.engine.running.map((request) => ({ model: model.name, ...request })));
  const rows = running.map((request) =>
    html(
      "tr",
      {},
      html(
        "td",
        { class: "mono", title: `${request.id} (${request.model})` },
        (several ? `${request.model} · ` : "") + request.id.replace(/^chatcmpl-/, "").slice(0, 10),
      ),
      html("td", { class: "num" }, String(request.prompt_tokens)),
      html("td", { class: "num" }, String(request.generated_tokens)),
      html("td", { class: "num" }, milliseconds(request.ttft)),
    ),
  );
  if (body.gateway.waiting) {
    rows.push(html("tr", {}, html("td", { colspan: 4, class: "empty" }, `${body.gateway.waiting} more waiting for a KV slot`)));
  }
  if (!rows.length) rows.push(html("tr", {}, html("td", { colspan: 4, class: "empty" }, "No requests running.")));
  byId("requests").tBodies[0].replaceChildren(...rows);
}

function describeEvent(event) {
  switch (event.event) {
    case "joined":
      return `${event.worker} joined`;
    case "left":
      return `${event.worker} left: ${event.reason}`;
    case "planned":
      return `plan #${event.plan_id}: ${event.route}`;
    case "route_ready":
      return `route ready: ${event.route}`;
    default: {
      const { time, event: kind, model, ...details } = event;
      return `${kind} ${Object.entries(details).map(([k, v]) => `${k}=${v}`).join(" ")}`;
    }
  }
}

function renderEvents(body) {
  const several = body.models.length > 1;
  const events = body.models
    .flatMap((model) => (model.pipeline.events || []).map((event) => ({ ...event, model: several ? model.name : null })))
    .sort((a, b) => b.time - a.time);
  const list = byId("events");
  const key = events.length ? `${events.length}:${events[0].time}` : "none";
  if (list.dataset.key === key) return;
  list.dataset.key = key;
  list.replaceChildren(
    ...events.map((event) =>
      html(
        "li",
        {},
        html("time", {}, clock(event.time)),
        html("span", { class: event.event }, (event.model ? `${event.model}: ` : "") + describeEvent(event)),
      ),
    ),
  );
  if (!events.length) list.replaceChildren(html("li", { class: "muted" }, "No events yet."));
}

// -- models ------------------------------------------------------------------------------

async function loadModels() {
  const response = await fetch("api/models");
  if (!response.ok) return;
  const body = await response.json();
  byId("served-details").replaceChildren(
    ...body.served.map((served) =>
      html(
        "div",
        {},
        "serving ",
        html("b", {}, served.name),
        ` · ${served.model_type}, ${served.num_layers} layers, hidden ${served.hidden_size}, vocab ${served.vocab_size}, context ${served.max_seq_len}`,
      ),
    ),
  );
  const rows = body.installed.map((model) => {
    const badge = model.served
      ? html("span", { class: "badge served" }, "served")
      : model.complete
        ? html("span", { class: "badge" }, "installed")
        : html("span", { class: "badge partial" }, "incomplete");
    return html("tr", {}, html("td", { class: "mono", title: model.path }, model.name), html("td", { class: "num" }, bytes(model.size)), html("td", {}, badge));
  });
  // A model served from a directory outside the catalog is not "installed", but is served.
  const listed = (served) => body.installed.some((model) => model.path === served.path || (model.served && model.name === served.name));
  for (const served of body.served.filter((model) => !listed(model))) {
    rows.push(
      html(
        "tr",
        {},
        html("td", { class: "mono", title: served.path }, served.name),
        html("td", { class: "num" }, "–"),
        html("td", {}, html("span", { class: "badge served", title: served.path }, "served"), " local path"),
      ),
    );
  }
  if (!rows.length) rows.push(html("tr", {}, html("td", { colspan: 3, class: "empty" }, "No models installed.")));
  byId("models").tBodies[0].replaceChildren(...rows);
}

async function loadChatModels() {
  const response = await fetch("v1/models");
  if (!response.ok) return;
  const body = await response.json();
  const select = byId("chat-model");
  const chosen = select.value;
  select.replaceChildren(...body.data.map((model) => html("option", { value: model.id }, model.id)));
  if (chosen && body.data.some((model) => model.id === chosen)) select.value = chosen;
}

// -- chat playground ---------------------------------------------------------------------

const chat = { history: [], controller: null };

async function* serverSentData(stream) {
  // OpenAI-style SSE: blocks separated by a blank line, payload on "data:" lines.
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let match;
    while ((match = /\r\n\r\n|\n\n|\r\r/.exec(buffer))) {
      const block = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      const data = block
        .split(/\r\n|\n|\r/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function appendMessage(role, text) {
  const transcript = byId("chat-transcript");
  transcript.querySelector(".placeholder")?.remove();
  const message = html("div", { class: `message ${role}` }, text);
  transcript.append(message);
  transcript.scrollTop = transcript.scrollHeight;
  return message;
}

function chatFigures(run, now) {
  const parts = [];
  if (run.firstAt !== null) parts.push(`TTFT ${milliseconds((run.firstAt - run.startedAt) / 1000)}`);
  parts.push(`${run.tokens} token${run.tokens === 1 ? "" : "s"}`);
  const decodeSeconds = (now - (run.firstAt ?? now)) / 1000;
  if (run.tokens > 1 && decodeSeconds > 0) parts.push(`${rate((run.tokens - 1) / decodeSeconds)} tok/s`);
  return parts.join(" · ");
}

function setBusy(busy) {
  byId("chat-send").disabled = busy;
  byId("chat-stop").hidden = !busy;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

async function sendChat(event) {
  event.preventDefault();
  const input = byId("chat-input");
  const text = input.value.trim();
  if (!text || chat.controller) return;
  input.value = "";
  chat.history.push({ role: "user", content: text });
  appendMessage("user", text);
  const bubble = appendMessage("assistant streaming", "");
  const stats = byId("chat-stats");
  const run = { startedAt: performance.now(), firstAt: null, tokens: 0, answer: "", finish: null, usage: null };
  chat.controller = new AbortController();
  setBusy(true);
  stats.textContent = "waiting for the first token…";
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      signal: chat.controller.signal,
      body: JSON.stringify({
        model: byId("chat-model").value,
        messages: chat.history,
        stream: true,
        stream_options: { include_usage: true },
        max_tokens: Number(byId("chat-max-tokens").value) || 128,
        temperature: Number(byId("chat-temperature").value),
      }),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of serverSentData(response.body)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) run.usage = chunk.usage;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) run.finish = choice.finish_reason;
      const content = choice.delta && choice.delta.content;
      if (!content) continue;
      run.firstAt ??= performance.now();
      run.tokens += 1;
      run.answer += content;
      bubble.textContent = run.answer;
      byId("chat-transcript").scrollTop = byId("chat-transcript").scrollHeight;
      stats.textContent = chatFigures(run, performance.now());
    }
    if (run.usage) run.tokens = run.usage.completion_tokens;
    chat.history.push({ role: "assistant", content: run.answer });
    const summary = `${chatFigures(run, performance.now())} · finished: ${run.finish || "?"}`;
    stats.textContent = summary;
    bubble.append(html("span", { class: "meta" }, summary));
  } catch (error) {
    chat.history.pop();
    if (error.name === "AbortError") {
      stats.textContent = `stopped · ${chatFigures(run, performance.now())}`;
    } else {
      appendMessage("error", error.message);
      stats.textContent = "";
    }
    if (!run.answer) bubble.remove();
  } finally {
    bubble.classList.remove("streaming");
    chat.controller = null;
    setBusy(false);
  }
}

function setupChat() {
  byId("chat-form").addEventListener("submit", sendChat);
  byId("chat-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      byId("chat-form").requestSubmit();
    }
  });
  byId("chat-stop").addEventListener("click", () => chat.controller && chat.controller.abort());
  byId("chat-clear").addEventListener("click", () => {
    if (chat.controller) chat.controller.abort();
    chat.history = [];
    byId("chat-transcript").replaceChildren(html("p", { class: "placeholder muted" }, "Conversation cleared."));
    byId("chat-stats").textContent = "";
  });
}

// -- start -------------------------------------------------------------------------------

function start() {
  setupChat();
  const refresh = () => {
    loadModels().catch((error) => console.warn("models:", error));
    loadChatModels().catch((error) => console.warn("models:", error));
  };
  byId("models-refresh").addEventListener("click", refresh);
  refresh();
  connectFeed();
  // Charts follow the window size; redraw when it changes.
  new ResizeObserver(() => renderCharts()).observe(byId("charts-panel"));
}

start();
