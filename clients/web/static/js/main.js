// The latent-space explorer: state, loading, and the wiring between the views and the server.
//
// Data path: inputs.json + /api/models + /api/stats/<model> + /api/encode give the input latents and the
// axes; the black line's values go to the decoder over the WebSocket (channel "main" first, then the side
// by side decoder and the traversal strip); replies are painted onto canvases.

import { Link, base64ToBytes, bytesToBase64, getJSON, postJSON } from "./api.js";
import { drawingPad } from "./draw.js";
import { DIGIT_COLOURS, drawPca, projector } from "./pca.js";
import { ParCoords } from "./parcoords.js";
import { blank, paint, toImage } from "./pixels.js";
import { infoRows, rangeOf, renderTable } from "./numbers.js";

const LINE_COLOURS = ["#e6194b", "#2f9e44", "#1c7ed6", "#f08c00", "#ae3ec9", "#0c8599", "#d6336c", "#8d6e4a"];
const TRAVERSAL_STEPS = 11;
const INTERPOLATION_STEPS = 9;
const SECONDARY_MS = 150;
const MAIN_INFLIGHT = 2;
const LINE_WAIT_MS = 100;
const KINDS = ["vae", "ae"];
const $ = (id) => document.getElementById(id);

const state = {
  connected: false,
  services: {},                 // service -> {state, message, target}
  models: { vae: null, ae: null }, // kind -> {info, stats, axes}
  inputs: [],                   // {name, label, shape, pixels: Uint8Array, drawn, latents: {kind: number[]}}
  selected: [],                 // input indices, in the order they were selected
  showAE: false,
  z: { vae: null, ae: null },   // the black line per model
  selectedDim: 0,
  traverseDim: 0,
  decoderError: "",
};
const active = () => (state.showAE ? "ae" : "vae");
const other = () => (state.showAE ? "vae" : "ae");

// In-page timing of the drag loop: pointer move -> decoded image for that move (or a later one) painted.
const timing = { seq: 0, moves: new Map(), latencies: [], roundTrips: [] };
window.__aevae = { state, timing };

const link = new Link({ onStatus: statusChanged, onConnection: connectionChanged });
const parcoords = new ParCoords($("parcoords"), $("parcoords-top"), {
  onDrag: dragTo, onDragEnd: afterEdit, onSnap: snapTo, onSelectDim: selectDim,
});
const pad = drawingPad($("draw-canvas"));

// -- loading --------------------------------------------------------------------------------------------
let loading = null, again = false;
function refresh() {
  if (loading) { again = true; return loading; } // e.g. the encoder came back while a load was failing
  loading = load().finally(() => {
    loading = null;
    if (again) { again = false; refresh(); }
  });
  return loading;
}

async function load() {
  if (!state.inputs.length) {
    const data = await getJSON("/static/inputs.json");
    state.inputs = data.items.map((item) => ({
      name: item.name, label: item.label, shape: item.shape, pixels: base64ToBytes(item.pixels), drawn: false, latents: {},
    }));
    const first = state.inputs.findIndex((item) => item.label === 3);
    state.selected = [first >= 0 ? first : 0];
    renderInputs();
  }
  let listing;
  try {
    listing = await getJSON("/api/models");
  } catch (error) {
    return; // the UI server is not reachable; the WebSocket's reconnection calls refresh again
  }
  // the encoder's list, or the decoder's while the encoder is down: the black line can still be decoded
  const served = listing.encoder?.models?.length ? listing.encoder.models : (listing.decoder?.models || []);
  for (const kind of KINDS) {
    const info = chooseModel(served, kind);
    if (!info) continue;
    const known = state.models[kind];
    if (!known || known.info.name !== info.name || known.info.version !== info.version) {
      state.models[kind] = { info, stats: null, axes: null };
      state.inputs.forEach((item) => { delete item.latents[kind]; });
      if (known && known.info.latent_dim !== info.latent_dim) state.z[kind] = null;
    }
  }
  await Promise.all(KINDS.map(async (kind) => {
    const model = state.models[kind];
    if (!model) return;
    if (!model.stats) {
      try { model.stats = await getJSON(`/api/stats/${encodeURIComponent(model.info.name)}`); } catch (error) { /* status shows it */ }
    }
    await encodeMissing(kind);
    model.axes = axesFor(kind);
    if (!state.z[kind]) {
      const seed = state.inputs[state.selected[0]]?.latents[kind];
      state.z[kind] = seed ? seed.slice()
        : model.stats ? model.stats.dims.map((d) => d.quantiles?.["0.5"] ?? d.mean)
        : new Array(model.info.latent_dim).fill(0);
    }
  }));
  renderAll();
  requestDecodes();
}

// The model of a kind: the one named like the kind ("vae", "ae"), else the first of that kind.
function chooseModel(models, kind) {
  return models.find((m) => m.name === kind) || models.find((m) => m.kind === kind) || null;
}

async function encodeMissing(kind) {
  const model = state.models[kind];
  const todo = state.inputs.map((item, i) => [item, i]).filter(([item]) => !item.latents[kind]);
  if (!todo.length) return;
  const groups = new Map(); // by shape
  for (const [item, i] of todo) {
    const key = item.shape.join("x");
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push([item, i]);
  }
  for (const group of groups.values()) {
    try {
      const reply = await postJSON("/api/encode", {
        model: model.info.name, shape: group[0][0].shape, images: group.map(([item]) => bytesToBase64(item.pixels)),
      });
      group.forEach(([item], j) => { item.latents[kind] = reply.mean[j]; });
    } catch (error) { /* the encoder is down: the status says so, and its return triggers refresh */ }
  }
}

// Axis ranges: the training set's range, widened to hold the built-in inputs' latents, plus a margin.
function axesFor(kind) {
  const model = state.models[kind];
  const d = model.info.latent_dim;
  const axes = [];
  for (let i = 0; i < d; i++) {
    const dim = model.stats?.dims?.[i];
    let lo = dim ? dim.min : Infinity, hi = dim ? dim.max : -Infinity;
    for (const item of state.inputs) {
      const z = item.latents[kind];
      if (z && !item.drawn) { lo = Math.min(lo, z[i]); hi = Math.max(hi, z[i]); }
    }
    if (!Number.isFinite(lo)) { lo = -3; hi = 3; }
    const margin = 0.04 * (hi - lo || 1);
    axes.push({ lo: lo - margin, hi: hi + margin, label: `z${i + 1}` });
  }
  return axes;
}

// The axes on screen: the active model's; with "Show AE", widened to hold the greyed-out VAE as well, so
// that the two models' ranges are compared on one scale.
function visibleAxes() {
  const axes = state.models[active()]?.axes;
  const vae = state.models.vae?.axes;
  if (!axes || !state.showAE || !vae) return axes || null;
  return axes.map((axis, i) => (vae[i] ? { ...axis, lo: Math.min(axis.lo, vae[i].lo), hi: Math.max(axis.hi, vae[i].hi) } : axis));
}

// -- rendering ------------------------------------------------------------------------------------------
function renderAll() {
  renderInputs();
  renderParcoords();
  renderTraversalControls();
  renderNumbers();
  renderPca();
  renderBadge();
}

function lineColour(index) {
  const position = state.selected.indexOf(index);
  return position < 0 ? null : LINE_COLOURS[position % LINE_COLOURS.length];
}

function renderInputs() {
  const box = $("inputs");
  if (box.children.length !== state.inputs.length) {
    box.replaceChildren();
    state.inputs.forEach((item, i) => {
      const img = document.createElement("img");
      img.dataset.testid = "input-image";
      img.dataset.index = i;
      img.alt = img.title = item.label === null ? item.name : `${item.name} (digit ${item.label})`;
      toImage(img, item.pixels, item.shape[1], item.shape[0]);
      img.draggable = false;
      img.addEventListener("click", () => toggleInput(i));
      img.addEventListener("dblclick", () => { if (!state.selected.includes(i)) toggleInput(i); snapTo(i); });
      box.appendChild(img);
    });
  }
  [...box.children].forEach((img, i) => {
    const colour = lineColour(i);
    img.classList.toggle("selected", !!colour);
    img.style.borderColor = colour || "transparent";
  });
}

function renderParcoords() {
  const kind = active();
  const model = state.models[kind];
  $("model-label").textContent = kind.toUpperCase() + (model ? ` · ${model.info.name} v${model.info.version}` : " · not served");
  if (!model || !model.axes || !state.z[kind]) { parcoords.setView({ axes: [], recon: [] }); return; }
  const lines = state.selected
    .filter((i) => state.inputs[i]?.latents[kind])
    .map((i) => ({ values: state.inputs[i].latents[kind], colour: lineColour(i), index: i, name: state.inputs[i].name }));
  const view = {
    axes: visibleAxes(),
    violins: model.stats?.dims || [],
    lines,
    recon: state.z[kind],
    selectedDim: Math.min(state.selectedDim, model.axes.length - 1),
  };
  if (state.showAE && state.models.vae) {
    // the seed's "Show AE": the VAE greyed out behind the AE, on axes that hold both
    view.ghostViolins = state.models.vae.stats?.dims || [];
    view.ghostLines = state.selected.filter((i) => state.inputs[i]?.latents.vae).map((i) => ({ values: state.inputs[i].latents.vae }));
    view.ghostRecon = state.z.vae;
  }
  parcoords.setView(view);
}

function renderBadge() {
  const parts = KINDS.filter((k) => state.models[k]).map((k) => {
    const info = state.models[k].info;
    return `${k.toUpperCase()}: ${info.name} v${info.version}, ${info.latent_dim}-d latent`;
  });
  $("models-badge").textContent = parts.join(" · ");
}

function renderNumbers() {
  const ranges = [["", ...KINDS.map((k) => k.toUpperCase())]];
  const selectedLatents = (k) => state.selected.map((i) => state.inputs[i]?.latents[k]).filter(Boolean);
  const allLatents = (k) => state.inputs.map((item) => item.latents[k]).filter(Boolean);
  const training = (k) => {
    const dims = state.models[k]?.stats?.dims;
    return dims ? [Math.min(...dims.map((d) => d.min)), Math.max(...dims.map((d) => d.max))] : null;
  };
  ranges.push(["selected inputs", ...KINDS.map((k) => rangeOf(selectedLatents(k)))]);
  ranges.push(["all inputs", ...KINDS.map((k) => rangeOf(allLatents(k)))]);
  ranges.push(["training set", ...KINDS.map((k) => rangeOf(training(k) ? [training(k)] : []))]);
  ranges.push(["black line", ...KINDS.map((k) => rangeOf(state.z[k] ? [state.z[k]] : []))]);
  renderTable($("ranges"), ranges);
  const infos = KINDS.map((k) => state.models[k]?.info || null);
  renderTable($("info"), infoRows(infos, KINDS));
  const info = infos.find(Boolean);
  $("info-note").textContent = info
    ? "From the served models' metadata: image shape at 8 bits per pixel, latent dimension at float32. "
      + `An ideal code in ${info.latent_dim * 32} bits could reproduce one image in `
      + `${(info.image_shape.reduce((x, y) => x * y, 1) * 8 / (info.latent_dim * 32)).toFixed(0)} exactly; `
      + "real networks get nowhere near that, but MNIST digits are very alike."
    : "";
}

function renderPca() {
  for (const kind of KINDS) {
    const model = state.models[kind];
    const project = projector(model?.stats?.pca);
    const marker = project && state.z[kind] ? project(state.z[kind]) : null;
    drawPca($(`pca-${kind}`), model?.stats?.pca, marker, model ? "waiting for the encoder's statistics" : `no ${kind} model served`);
    const evr = model?.stats?.pca?.explained_variance_ratio;
    $(`pca-${kind}-note`).textContent = evr
      ? `${model.info.name} v${model.info.version}: ${model.stats.pca.points.length} training images, `
        + `the two components explain ${(100 * evr.reduce((a, b) => a + b, 0)).toFixed(0)} % of the variance`
      : "";
  }
  const legend = $("legend");
  if (!legend.children.length) {
    DIGIT_COLOURS.forEach((colour, digit) => {
      const item = document.createElement("div");
      item.innerHTML = `<span style="background:${colour}"></span>${digit}`;
      legend.appendChild(item);
    });
  }
}

function renderTraversalControls() {
  const model = state.models[active()];
  const select = $("traverse-dim");
  const d = model?.axes?.length || 0;
  if (select.options.length !== d) {
    select.replaceChildren(...Array.from({ length: d }, (_, i) => new Option(`z${i + 1}`, i)));
  }
  state.traverseDim = Math.min(state.traverseDim, Math.max(0, d - 1));
  select.value = state.traverseDim;
  const [a, b] = state.selected;
  const ready = a !== undefined && b !== undefined && state.inputs[a]?.latents[active()] && state.inputs[b]?.latents[active()];
  $("interpolate").disabled = !ready;
  $("interp-from").textContent = ready ? displayName(state.inputs[a]) : "select two inputs";
  $("interp-to").textContent = ready ? displayName(state.inputs[b]) : "";
  requestInterpolationStrip(ready ? [a, b] : null);
}

function displayName(item) { return item.label === null ? item.name : `digit ${item.label}`; }

// Frames from the first to the second selected input, decoded once per pair (and again after an outage).
let interpolationKey = "";
function requestInterpolationStrip(pair) {
  const kind = active();
  const key = pair ? `${kind}:${pair.join(",")}` : "";
  if (key === interpolationKey) return;
  interpolationKey = key;
  const strip = $("interp-strip");
  if (!pair) { strip.replaceChildren(); return; }
  const [a, b] = pair.map((i) => state.inputs[i].latents[kind]);
  const latents = Array.from({ length: INTERPOLATION_STEPS }, (_, k) => {
    const t = k / (INTERPOLATION_STEPS - 1);
    return a.map((v, i) => (1 - t) * v + t * b[i]);
  });
  link.decode("interp", modelName(kind), latents, (reply) => {
    if (reply.op !== "decoded") { interpolationKey = ""; return; }
    if (strip.children.length !== latents.length) {
      strip.replaceChildren(...latents.map(() => document.createElement("img")));
    }
    reply.images.forEach((image, k) => toImage(strip.children[k], base64ToBytes(image), reply.shape[1], reply.shape[0]));
  });
}

function renderStatus() {
  const box = $("service-status");
  if (!state.connected) {
    box.dataset.state = "degraded";
    box.textContent = "UI server unreachable: reconnecting…";
    return;
  }
  const entries = Object.entries(state.services);
  const down = entries.filter(([, s]) => s.state === "down");
  if (down.length) {
    box.dataset.state = "degraded";
    box.textContent = down.map(([name, s]) => `${name[0].toUpperCase()}${name.slice(1)} unavailable at ${s.target}`
      + (s.message ? ` (${s.message})` : "")).join("; ") + ". The page keeps working and reconnects by itself.";
  } else if (entries.length && entries.every(([, s]) => s.state === "up")) {
    box.dataset.state = "ok";
    box.textContent = "● encoder and decoder connected";
  } else {
    box.dataset.state = "unknown";
    box.textContent = "checking services…";
  }
}

// -- decoding -------------------------------------------------------------------------------------------
function modelName(kind) { return state.models[kind]?.info.name; }

// Every request carries the newest pointer move it reflects: its painted image resolves that move and all
// earlier ones that were coalesced away.
function requestMain() {
  const kind = active();
  if (!modelName(kind) || !state.z[kind]) return;
  link.decode("main", modelName(kind), [state.z[kind].slice()], paintMain, { seq: timing.seq, kind }, MAIN_INFLIGHT);
}

function paintMain(reply, request) {
  moveLine();
  const output = document.querySelector(".output");
  if (reply.op !== "decoded") {
    state.decoderError = reply.error || "decoding failed";
    output.classList.add("stale");
    $("output-note").textContent = `${state.decoderError}: showing the last image`;
    return;
  }
  state.decoderError = "";
  output.classList.remove("stale");
  const [h, w] = reply.shape;
  const bytes = base64ToBytes(reply.images[0]);
  paint($("output-image"), bytes, w, h);
  state.shown = { kind: request.meta.kind, z: request.latents[0], bytes, w, h };
  if (!parcoords.dragging) describeOutput();
  const seq = request.meta.seq;
  if (timing.moves.size) {
    timing.roundTrips.push(request.roundTrip);
    requestAnimationFrame(() => {
      const now = performance.now();
      for (const [s, t] of timing.moves) {
        if (s <= seq) { timing.latencies.push(now - t); timing.moves.delete(s); }
      }
    });
  }
  scheduleSecondary();
}

// The side-by-side decoder and the traversal strip follow the black line too, but while a handle is being
// dragged at most every SECONDARY_MS, so that they never delay the main image.
let secondaryTimer = null, secondaryAt = 0;
function scheduleSecondary() {
  if (!parcoords.dragging) { clearTimeout(secondaryTimer); secondaryTimer = null; requestSecondary(); return; }
  if (secondaryTimer) return;
  const wait = Math.max(0, secondaryAt + SECONDARY_MS - performance.now());
  secondaryTimer = setTimeout(() => { secondaryTimer = null; requestSecondary(); }, wait);
}

function describeOutput() {
  if (!state.shown) return;
  toImage($(`side-${state.shown.kind}`), state.shown.bytes, state.shown.w, state.shown.h);
  $("output-note").textContent = `${state.shown.kind.toUpperCase()} decoder · z = [${state.shown.z.map((v) => v.toFixed(2)).join(", ")}]`;
}

function requestSecondary() {
  secondaryAt = performance.now();
  describeOutput();
  const kind = active(), z = state.z[kind];
  if (!z) return;
  document.querySelectorAll(".side-by-side figure").forEach((f) => f.classList.toggle("active", f.contains($(`side-${kind}`))));
  const otherKind = other();
  if (modelName(otherKind) && state.models[otherKind].info.latent_dim === z.length) {
    link.decode("other", modelName(otherKind), [z], (reply) => {
      if (reply.op === "decoded") toImage($(`side-${otherKind}`), base64ToBytes(reply.images[0]), reply.shape[1], reply.shape[0]);
    });
  } else if (!modelName(otherKind)) {
    $(`side-${otherKind}`).removeAttribute("src");
  }
  const axes = visibleAxes();
  const dim = state.traverseDim;
  if (!axes || !axes[dim]) return;
  const values = Array.from({ length: TRAVERSAL_STEPS }, (_, i) => axes[dim].lo + (i / (TRAVERSAL_STEPS - 1)) * (axes[dim].hi - axes[dim].lo));
  const latents = values.map((v) => { const row = z.slice(); row[dim] = v; return row; });
  link.decode("traverse", modelName(kind), latents, (reply) => paintTraversal(reply, values, dim));
}

function paintTraversal(reply, values, dim) {
  if (reply.op !== "decoded") return;
  const strip = $("traversal");
  if (strip.children.length !== values.length) {
    strip.replaceChildren(...values.map(() => {
      const img = document.createElement("img");
      img.dataset.testid = "traversal-image";
      img.addEventListener("click", () => {
        const z = state.z[active()];
        z[Number(img.dataset.dim)] = Number(img.dataset.value);
        afterEdit();
      });
      return img;
    }));
  }
  const current = state.z[active()]?.[dim];
  const nearest = values.reduce((best, v, i) => (Math.abs(v - current) < Math.abs(values[best] - current) ? i : best), 0);
  reply.images.forEach((image, i) => {
    const img = strip.children[i];
    toImage(img, base64ToBytes(image), reply.shape[1], reply.shape[0]);
    img.dataset.value = values[i];
    img.dataset.dim = dim;
    img.title = `z${dim + 1} = ${values[i].toFixed(2)}`;
    img.classList.toggle("current", i === nearest);
  });
}

function requestDecodes() { requestMain(); }

// -- interaction ----------------------------------------------------------------------------------------
// While the decoder answers, the black line moves in the same frame as the image decoded from it: one frame
// per move instead of two, and line and image never disagree. When the decoder is down or slow, at once.
let lineTimer = null;
function dragTo(dim, value) {
  timing.moves.set(++timing.seq, performance.now());
  const z = state.z[active()];
  z[dim] = value;
  state.selectedDim = dim;
  if (state.services.decoder?.state !== "up" || state.decoderError) {
    moveLine();
  } else if (!lineTimer) {
    lineTimer = setTimeout(moveLine, LINE_WAIT_MS);
  }
  requestMain();
}

function moveLine() {
  clearTimeout(lineTimer);
  lineTimer = null;
  const z = state.z[active()];
  if (z) parcoords.moveRecon(z, state.selectedDim);
}

// After an edit that is not a drag move: redraw what depends on the black line, and decode it.
function afterEdit() {
  const z = state.z[active()];
  if (!z) return;
  moveLine();
  renderNumbers();
  renderPca();
  requestMain();
}

function selectDim(dim) {
  state.selectedDim = dim;
  state.traverseDim = dim;
  renderTraversalControls();
  const z = state.z[active()];
  if (z) parcoords.moveRecon(z, dim);
}

function snapTo(index) {
  const z = state.inputs[index]?.latents[active()];
  if (!z) return;
  state.z[active()] = z.slice();
  renderParcoords();
  afterEdit();
}

function toggleInput(index) {
  const at = state.selected.indexOf(index);
  if (at >= 0) state.selected.splice(at, 1); else state.selected.push(index);
  renderInputs();
  renderParcoords();
  renderTraversalControls();
  renderNumbers();
}

function gaussian() {
  let u = 0;
  while (u === 0) u = Math.random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * Math.random());
}

$("random").addEventListener("click", () => {
  const kind = active();
  const axes = visibleAxes();
  if (!axes) return;
  state.z[kind] = axes.map((axis) => Math.min(axis.hi, Math.max(axis.lo, gaussian())));
  renderParcoords();
  afterEdit();
});

$("show-ae").addEventListener("change", (event) => {
  state.showAE = event.target.checked;
  state.selectedDim = Math.min(state.selectedDim, (state.models[active()]?.axes?.length || 1) - 1);
  renderAll();
  requestMain();
});

$("interpolate").addEventListener("input", (event) => {
  const kind = active();
  const [a, b] = state.selected.map((i) => state.inputs[i]?.latents[kind]);
  if (!a || !b) return;
  const t = Number(event.target.value) / 1000;
  state.z[kind] = a.map((v, i) => (1 - t) * v + t * b[i]);
  parcoords.moveRecon(state.z[kind], state.selectedDim);
  requestMain();
});
$("interpolate").addEventListener("change", () => afterEdit());

$("traverse-dim").addEventListener("change", (event) => {
  state.traverseDim = Number(event.target.value);
  requestSecondary();
});

$("clear-drawing").addEventListener("click", () => pad.clear());
$("encode-drawing").addEventListener("click", async () => {
  const pixels = pad.toMnist();
  if (!pixels) { $("output-note").textContent = "draw something first"; return; }
  const count = state.inputs.filter((item) => item.drawn).length + 1;
  state.inputs.push({ name: `drawing ${count}`, label: null, shape: [28, 28], pixels, drawn: true, latents: {} });
  const index = state.inputs.length - 1;
  state.selected.push(index);
  renderInputs();
  await Promise.all(KINDS.filter((k) => state.models[k]).map((k) => encodeMissing(k)));
  if (state.inputs[index].latents[active()]) {
    snapTo(index);
  } else {
    $("output-note").textContent = "could not encode the drawing: is the encoder running?";
  }
  renderAll();
});

document.addEventListener("keydown", (event) => {
  const target = event.target;
  // arrows belong to the slider and the menu when they have the focus; everywhere else they move the line
  if (target.tagName === "SELECT" || target.tagName === "TEXTAREA"
      || (target.tagName === "INPUT" && target.type !== "checkbox")) return;
  const kind = active();
  const z = state.z[kind], axes = visibleAxes();
  if (!z || !axes) return;
  const dim = state.selectedDim;
  if (event.key === "ArrowLeft" || event.key === "ArrowRight") {
    selectDim((dim + (event.key === "ArrowRight" ? 1 : axes.length - 1)) % axes.length);
  } else if (event.key === "ArrowUp" || event.key === "ArrowDown") {
    const step = (axes[dim].hi - axes[dim].lo) * (event.shiftKey ? 0.05 : 0.01);
    z[dim] = Math.min(axes[dim].hi, Math.max(axes[dim].lo, z[dim] + (event.key === "ArrowUp" ? step : -step)));
    afterEdit();
  } else {
    return;
  }
  event.preventDefault();
});

// -- service status -------------------------------------------------------------------------------------
function statusChanged(services) {
  const before = state.services;
  state.services = services;
  renderStatus();
  const cameBack = (name) => services[name]?.state === "up" && before[name]?.state !== "up";
  if (cameBack("encoder")) refresh();
  if (cameBack("decoder")) { interpolationKey = ""; renderTraversalControls(); requestDecodes(); }
}

function connectionChanged(connected) {
  state.connected = connected;
  renderStatus();
  if (connected) refresh();
}

blank($("output-image"));
renderStatus();
