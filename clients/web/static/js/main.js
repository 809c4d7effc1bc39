// The latent-space explorer: state, loading, and the wiring between the views and the server.
//
// Both models are always on screen, side by side on one shared scale. Data path: inputs.json +
// /api/models + /api/stats/<model> + /api/encode give the input latents and the axes; each model's black line
// goes to the decoder over the WebSocket (channel "main-<kind>" first, then the cross decoding and the
// traversal strip, the latent grids); /api/samples gives judged samples from N(0, I). Everything about a
// model's shape (image size, latent dimension) comes from the served metadata.

import { Link, base64ToBytes, bytesToBase64, getJSON, postJSON } from "./api.js";
import { drawingPad } from "./draw.js";
import { GRID_STEPS, composeGrid, gridLatents, gridValues, nearest, within } from "./grid.js";
import { DIGIT_COLOURS, drawPca, projector, sharedExtent } from "./pca.js";
import { ParCoords } from "./parcoords.js";
import { blank, paint, toImage } from "./pixels.js";
import { INFO_NOTE, infoRows, rangeOf, renderTable } from "./numbers.js";

// Dark and far apart (CIE76 dE >= 50 between any two, >= 35 from every digit colour of the PCA plots)
export const SELECTION_COLOURS = ["#a50971", "#5709a5", "#066b49", "#887207", "#6b1606", "#1dad00"];
const TRAVERSAL_STEPS = 11;
const INTERPOLATION_STEPS = 9;
const SAMPLES = 16;
const SECONDARY_MS = 150;
const VERSION_CHECK_MS = 5000; // how often the page looks for a newer model version
const MAIN_INFLIGHT = 2;
const LINE_WAIT_MS = 100;
const KINDS = ["vae", "ae"];
const NAMES = { vae: "VAE", ae: "AE" };
const $ = (id) => document.getElementById(id);

const state = {
  connected: false,
  services: {},                     // service -> {state, message, target}
  models: { vae: null, ae: null },  // kind -> {info, stats}
  classifier: null,                 // what /api/models says about the sample judge
  inputs: [],                       // {name, label, shape, pixels: Uint8Array, drawn, latents: {kind: number[]}}
  selected: [],                     // input indices, in the order they were selected
  colourOf: {},                     // input index -> its colour (kept after deselection, reused when free)
  axes: null,                       // the shared scale: [{lo, hi, label}] per latent dimension
  z: { vae: null, ae: null },       // the black line per model
  // a black line set without an input's encoding to start from (the encoder down at load): replaced by the
  // selected input's once it is encoded, unless the user has moved it since
  zStandIn: { vae: false, ae: false },
  selectedDim: { vae: 0, ae: 0 },
  traverse: { kind: "vae", dim: 0, range: "prior" }, // the swept model, dimension and range (SPANS)
  grid: { x: 0, y: 1, range: "prior" }, // the latent grids' dimensions, across and up, and their range (SPANS)
  grids: { vae: null, ae: null },   // the last grid decoded per model: {key, images, shape, xs, ys}
  // asked: the seed of a draw in flight per kind (0: none), so that two triggers at once (the listing and the
  // decoder coming up, at load) draw once; tally: the draws of the version shown, reset when it changes
  samples: { seed: 0, shown: { vae: null, ae: null }, failed: { vae: false, ae: false }, asked: { vae: 0, ae: 0 },
             tally: { vae: [0, 0], ae: [0, 0] } },
  decoderError: { vae: "", ae: "" },
  encodeError: { vae: "", ae: "" }, // the encoder refused the inputs for this model (e.g. another image shape)
  shown: { vae: null, ae: null },   // the last decoded main image per model
};

// What a traversal or a grid sweeps, per dimension: the prior's +-3 (where the samples come from: 99.7 % of
// N(0, 1)), the shared axes of the plots, or the middle 98 % of the model's own training latents.
const SPANS = {
  prior: () => ({ lo: -3, hi: 3 }),
  axes: (kind, dim) => axesOf(kind)[dim],
  training: (kind, dim) => {
    const q = state.models[kind]?.stats?.dims?.[dim]?.quantiles;
    return q && Number.isFinite(q["0.01"]) && Number.isFinite(q["0.99"]) ? { lo: q["0.01"], hi: q["0.99"] } : axesOf(kind)[dim];
  },
};

// In-page timing of the drag loop: pointer move -> decoded image for that move (or a later one) painted.
const timing = { seq: 0, moves: new Map(), latencies: [], roundTrips: [] };
const link = new Link({ onStatus: statusChanged, onConnection: connectionChanged });
window.__aevae = { state, timing, link };
const plots = {};
for (const kind of KINDS) {
  plots[kind] = new ParCoords($(`parcoords-${kind}`), $(`top-${kind}`), NAMES[kind], {
    onDrag: (dim, value) => dragTo(kind, dim, value),
    onDragEnd: () => afterEdit(kind),
    onSnap: (index) => snapTo(index, [kind]),
    onSelectDim: (dim) => selectDim(kind, dim),
    onStep: (dim, value) => { state.z[kind][dim] = value; state.selectedDim[kind] = dim; afterEdit(kind); },
  });
}
const pad = drawingPad($("draw-canvas"), $("pen"));

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
      spreads: {},
    }));
    // the default view: a clean 3 (its line under the black line, which starts on it) and a 7 to interpolate to
    for (const digit of [3, 7]) {
      const i = state.inputs.findIndex((item) => item.label === digit);
      if (i >= 0) select(i);
    }
    if (!state.selected.length) select(0);
    renderInputs();
  }
  let listing;
  try {
    listing = await getJSON("/api/models");
  } catch (error) {
    return; // the UI server is not reachable; the WebSocket's reconnection calls refresh again
  }
  state.classifier = listing.classifier || null;
  const served = servedModels(listing);
  for (const kind of KINDS) {
    const info = served && chooseModel(served, kind);
    const known = state.models[kind];
    if (!info) {
      if (served && known) forget(kind); // gone from a service that answered, not just unreachable
      continue;
    }
    if (!known || known.info.name !== info.name || known.info.version !== info.version) {
      state.models[kind] = { info, stats: null };
      state.inputs.forEach((item) => { delete item.latents[kind]; delete item.spreads[kind]; });
      state.encodeError[kind] = "";
      clearSamples(kind); // another model's samples: drawn again below, by this one
      // another version's space: the black line's coordinates meant a point of the old one, and are taken
      // again from the selected input's encoding by this version (below)
      if (known) state.z[kind] = null;
    }
  }
  await Promise.all(KINDS.map(async (kind) => {
    const model = state.models[kind];
    if (!model) return;
    // not asked of an encoder known to be down (a 503 the browser logs): asked again when it is back (refresh)
    if (!model.stats && state.services.encoder?.state !== "down") {
      const pinned = model.info.version ? `?version=${model.info.version}` : "";
      try { model.stats = await getJSON(`/api/stats/${encodeURIComponent(model.info.name)}${pinned}`); } catch (error) { /* status shows it */ }
    }
    await encodeMissing(kind);
  }));
  state.axes = sharedAxes();
  for (const kind of KINDS) {
    const model = state.models[kind];
    const seed = state.inputs[state.selected[0]]?.latents[kind];
    if (!model || (state.z[kind] && !(state.zStandIn[kind] && seed))) continue;
    state.z[kind] = seed ? seed.slice()
      : model.stats ? model.stats.dims.map((d) => d.quantiles?.["0.5"] ?? d.mean)
      : new Array(model.info.latent_dim).fill(0);
    state.zStandIn[kind] = !seed;
  }
  renderAll();
  for (const kind of KINDS) requestMain(kind);
  drawSamples(undrawn());
}

// The models served: the encoder's list, or the decoder's while the encoder is down (the black lines can still
// be decoded); null when neither service answered, so that an outage never reads as "no models".
function servedModels(listing) {
  const answered = ["encoder", "decoder"].map((service) => listing[service]).filter((l) => l && !l.error);
  if (!answered.length) return null;
  return (answered.find((l) => l.models.length) || answered[0]).models;
}

// The model of a kind: the one named like the kind ("vae", "ae"), else the first of that kind; a model none
// of whose versions loads (version 0) serves nothing.
function chooseModel(models, kind) {
  const loadable = models.filter((m) => m.version > 0);
  return loadable.find((m) => m.name === kind) || loadable.find((m) => m.kind === kind) || null;
}

// A model no longer served: nothing of it stays on the page (its label says "not served").
function forget(kind) {
  state.models[kind] = null;
  state.z[kind] = null;
  state.shown[kind] = null;
  state.decoderError[kind] = "";
  state.encodeError[kind] = "";
  state.inputs.forEach((item) => { delete item.latents[kind]; delete item.spreads[kind]; });
  clearSamples(kind);
  blank($(`output-${kind}`));
  $(`output-${kind}`).parentElement.classList.remove("stale");
  $(`note-${kind}`).textContent = "";
  $(`cross-${kind}-${kind}`).removeAttribute("src");
  noImage($(`cross-${kind}-${kind}`), "not served");
  if (state.traverse.kind === kind) $("traversal").replaceChildren();
  state.grids[kind] = null;
  $(`grid-${kind}`).removeAttribute("src");
  $(`grid-${kind}-note`).textContent = `${NAMES[kind]}: not served`;
}

function clearSamples(kind) {
  state.samples.shown[kind] = null;
  state.samples.asked[kind] = 0; // a draw in flight was for the model or version gone
  state.samples.tally[kind] = [0, 0]; // the tally counts draws of one version
  $(`samples-${kind}`).replaceChildren();
  $(`share-${kind}`).textContent = "";
  renderTally();
}

// The served kinds with no samples shown (or whose draw failed), and none being drawn.
function undrawn() {
  return KINDS.filter((k) => state.models[k] && (!state.samples.shown[k] || state.samples.failed[k])
    && !state.samples.asked[k]);
}

async function encodeMissing(kind) {
  const model = state.models[kind];
  const todo = state.inputs.filter((item) => !item.latents[kind]);
  // nothing asked of an encoder known to be down (a 503 is a console error); its return calls refresh
  if (!todo.length || state.services.encoder?.state === "down") return;
  const groups = new Map(); // by shape
  for (const item of todo) {
    const key = item.shape.join("x");
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(item);
  }
  for (const group of groups.values()) {
    try {
      const reply = await postJSON("/api/encode", {
        model: model.info.name, version: model.info.version || null, shape: group[0].shape,
        images: group.map((item) => bytesToBase64(item.pixels)),
      });
      group.forEach((item, j) => {
        item.latents[kind] = reply.mean[j];
        // the VAE's posterior spread, standard deviations (the AE has none)
        item.spreads[kind] = reply.logvar?.[j]?.every(Number.isFinite) ? reply.logvar[j].map((v) => Math.exp(0.5 * v)) : null;
      });
      state.encodeError[kind] = "";
    } catch (error) {
      // The encoder refused them (a `code`: e.g. a model made for another image shape): the label says why.
      // Otherwise it is down: the status says so, and its return triggers refresh.
      if (error.body?.code) state.encodeError[kind] = error.message;
    }
  }
}

// One scale for every axis of both models: the training sets' ranges, widened to hold the built-in inputs'
// latents, plus a margin. The wider model fills the height; the other shows how much narrower it is.
function sharedAxes() {
  let lo = Infinity, hi = -Infinity, dims = 0;
  for (const kind of KINDS) {
    const model = state.models[kind];
    if (!model) continue;
    dims = Math.max(dims, model.info.latent_dim);
    for (const d of model.stats?.dims || []) { lo = Math.min(lo, d.min); hi = Math.max(hi, d.max); }
    for (const item of state.inputs) {
      const z = item.latents[kind];
      if (z && !item.drawn) for (const v of z) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
    }
  }
  if (!dims) return null;
  if (!Number.isFinite(lo)) { lo = -3; hi = 3; }
  const margin = 0.04 * (hi - lo || 1);
  return Array.from({ length: dims }, (_, i) => ({ lo: lo - margin, hi: hi + margin, label: `z${i + 1}` }));
}

function axesOf(kind) {
  const d = state.models[kind]?.info.latent_dim || 0;
  return state.axes ? state.axes.slice(0, d) : null;
}

// -- selection ------------------------------------------------------------------------------------------
const released = {}; // colour -> when it was last given back
let releases = 0;
function colourOf(index) {
  return index in state.colourOf && state.selected.includes(index) ? SELECTION_COLOURS[state.colourOf[index]] : null;
}

function select(index) {
  if (state.selected.includes(index)) return true;
  if (state.selected.length >= SELECTION_COLOURS.length) {
    $("inputs-note").textContent = `At most ${SELECTION_COLOURS.length} inputs at once: deselect one first.`;
    return false;
  }
  // its previous colour when that is free, else the free colour released longest ago (never: first), so that
  // an input deselected a moment ago still finds its own colour when it comes back
  const used = new Set(state.selected.map((i) => state.colourOf[i]));
  if (!(index in state.colourOf) || used.has(state.colourOf[index])) {
    const free = SELECTION_COLOURS.map((_, c) => c).filter((c) => !used.has(c));
    state.colourOf[index] = free.reduce((best, c) => ((released[c] ?? -1) < (released[best] ?? -1) ? c : best), free[0]);
  }
  state.selected.push(index);
  $("inputs-note").textContent = "";
  return true;
}

let beforeClick = null;
function toggleInput(index) { // index -1: no change, just render
  const at = state.selected.indexOf(index);
  if (index < 0) {
    $("inputs-note").textContent = "";
  } else if (at >= 0) {
    state.selected.splice(at, 1);
    released[state.colourOf[index]] = ++releases;
    $("inputs-note").textContent = "";
  } else if (!select(index)) {
    return;
  }
  renderInputs();
  renderPlots();
  renderInterpolation();
  renderNumbers();
}

// -- rendering ------------------------------------------------------------------------------------------
function renderAll() {
  renderInputs();
  renderPlots();
  renderInterpolation();
  renderTraversalControls();
  renderGridControls();
  renderNumbers();
  renderPca();
  renderBadge();
  renderStatus();
}

function displayName(item) { return item.label === null ? item.name : `digit ${item.label} (${item.name})`; }

function renderInputs() {
  const box = $("inputs");
  if (box.children.length !== state.inputs.length) {
    box.replaceChildren();
    state.inputs.forEach((item, i) => {
      const button = document.createElement("button");
      button.type = "button";
      button.dataset.testid = "input-image";
      button.dataset.index = i;
      button.title = displayName(item);
      const img = document.createElement("img");
      img.alt = displayName(item);
      img.draggable = false;
      toImage(img, item.pixels, item.shape[1], item.shape[0]);
      button.appendChild(img);
      // a double-click snaps and leaves the selection as it was: its first click toggled, its second is
      // ignored, and the dblclick puts the selection (and its order) back
      button.addEventListener("click", (event) => {
        if (event.detail > 1) return;
        beforeClick = state.selected.slice();
        toggleInput(i);
      });
      button.addEventListener("dblclick", () => {
        if (beforeClick) { state.selected = beforeClick; beforeClick = null; toggleInput(-1); }
        snapTo(i, KINDS);
      });
      box.appendChild(button);
    });
  }
  [...box.children].forEach((button, i) => {
    const colour = colourOf(i);
    button.setAttribute("aria-pressed", colour ? "true" : "false");
    button.classList.toggle("selected", !!colour);
    button.style.borderColor = colour || "transparent";
  });
  $("selected-list").replaceChildren(...state.selected.map((i) => {
    const item = state.inputs[i];
    const li = document.createElement("li");
    li.dataset.testid = "selected-input";
    li.innerHTML = `<span class="swatch" style="background:${colourOf(i)}"></span><span class="name"></span>`;
    li.querySelector(".name").textContent = item.label === null ? item.name : `${item.label} · ${item.name}`;
    const snap = document.createElement("button");
    snap.type = "button";
    snap.textContent = "Snap";
    snap.dataset.testid = "snap";
    snap.setAttribute("aria-label", `snap both black lines to ${displayName(item)}`);
    snap.addEventListener("click", () => snapTo(i, KINDS));
    li.appendChild(snap);
    return li;
  }));
}

function renderPlots() {
  for (const kind of KINDS) {
    const model = state.models[kind];
    $(`label-${kind}`).textContent = model ? `${model.info.name} v${model.info.version} · ${model.info.latent_dim}-d latent`
      + (state.encodeError[kind] ? ` · cannot encode the inputs: ${state.encodeError[kind]}` : "") : "not served";
    const axes = axesOf(kind);
    if (!model || !axes || !state.z[kind]) { plots[kind].setView({ axes: [], recon: [], lines: [] }); continue; }
    const lines = state.selected
      .filter((i) => state.inputs[i]?.latents[kind])
      .map((i) => ({ values: state.inputs[i].latents[kind], colour: colourOf(i), index: i, name: displayName(state.inputs[i]) }));
    plots[kind].setView({
      axes, violins: model.stats?.dims || [], lines, recon: state.z[kind],
      selectedDim: Math.min(state.selectedDim[kind], axes.length - 1),
    });
  }
}

function renderBadge() {
  const parts = KINDS.filter((k) => state.models[k]).map((k) => {
    const info = state.models[k].info;
    return `${NAMES[k]}: ${info.name} v${info.version}, ${info.image_shape.join(" × ")} images, ${info.latent_dim}-d latent`;
  });
  $("models-badge").textContent = parts.join(" · ");
}

function renderNumbers() {
  const ranges = [["latents", ...KINDS.map((k) => NAMES[k])]];
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
  // the VAE's posterior around each selected input, as standard deviations: against the prior's 1, how precisely
  // an image pins down its code (the AE's code is a point)
  const spreads = (k) => state.selected.map((i) => state.inputs[i]?.spreads[k]).filter(Boolean);
  ranges.push(["posterior sd, selected", ...KINDS.map((k) => (state.models[k]?.info.kind === "ae" ? "none: a point"
    : rangeOf(spreads(k))))]);
  renderTable($("ranges"), ranges);
  const infos = KINDS.map((k) => state.models[k]?.info || null);
  renderTable($("info"), infoRows(infos, KINDS));
  $("info-note").textContent = infos.some(Boolean) ? INFO_NOTE : "";
}

function pcaMarker(kind) {
  const project = projector(state.models[kind]?.stats?.pca);
  return project && state.z[kind] ? project(state.z[kind]) : null;
}

function renderPca() {
  const pcas = KINDS.map((k) => state.models[k]?.stats?.pca);
  const extent = sharedExtent(pcas, KINDS.map(pcaMarker));
  for (const kind of KINDS) {
    const model = state.models[kind];
    const pca = model?.stats?.pca;
    drawPca($(`pca-${kind}`), { pca, marker: pcaMarker(kind), extent,
      empty: model ? "waiting for the encoder's statistics" : `no ${NAMES[kind]} served` });
    const evr = pca?.explained_variance_ratio;
    $(`pca-${kind}-note`).textContent = evr
      ? `${NAMES[kind]} (${model.info.name} v${model.info.version}): ${pca.points.length} training images; `
        + `the two components explain ${(100 * evr.reduce((a, b) => a + b, 0)).toFixed(0)} % of the variance`
      : NAMES[kind];
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
// redrawn at the new size when the plots change width (never a stretched bitmap)
{
  let width = 0;
  new ResizeObserver(() => {
    const w = $("pca-vae").clientWidth;
    if (w && w !== width) { width = w; renderPca(); }
  }).observe($("pca-vae"));
}

function renderTraversalControls() {
  const kind = state.traverse.kind;
  const select = $("traverse-dim");
  const d = axesOf(kind)?.length || 0;
  if (select.options.length !== d) {
    select.replaceChildren(...Array.from({ length: d }, (_, i) => new Option(`z${i + 1}`, i)));
  }
  state.traverse.dim = Math.min(state.traverse.dim, Math.max(0, d - 1));
  select.value = state.traverse.dim;
  $("traverse-model").value = kind;
  $("traverse-range").value = state.traverse.range;
}

// The grids' dimensions: as many choices as the widest model has; across and up always differ.
function renderGridControls() {
  const d = Math.max(0, ...KINDS.map((k) => axesOf(k)?.length || 0));
  for (const [id, axis] of [["grid-x", "x"], ["grid-y", "y"]]) {
    const select = $(id);
    if (select.options.length !== d) {
      select.replaceChildren(...Array.from({ length: d }, (_, i) => new Option(`z${i + 1}`, i)));
    }
    state.grid[axis] = Math.min(state.grid[axis], Math.max(0, d - 1));
  }
  if (state.grid.x === state.grid.y && d > 1) state.grid.y = state.grid.x === 0 ? 1 : 0;
  $("grid-x").value = state.grid.x;
  $("grid-y").value = state.grid.y;
  $("grid-range").value = state.grid.range;
}

// -- interpolation: both models between the first two selected inputs ------------------------------------
// The first two selected inputs, once every model that can encode them has; a model whose encoder refuses the
// inputs is left out, and the other one interpolates on its own.
function interpolationPair() {
  const [a, b] = state.selected;
  if (a === undefined || b === undefined) return null;
  const kinds = KINDS.filter((k) => state.models[k] && !state.encodeError[k]);
  return kinds.length && kinds.every((k) => bothEncoded([a, b], k)) ? [a, b] : null;
}

function bothEncoded(pair, kind) { return pair.every((i) => state.inputs[i].latents[kind]); }

const lerp = (a, b, t) => a.map((v, i) => (1 - t) * v + t * b[i]);
let interpolationKey = "";
function renderInterpolation() {
  const pair = interpolationPair();
  $("interpolate").disabled = !pair;
  $("interp-from").textContent = pair ? shortName(state.inputs[pair[0]]) : "select two inputs";
  $("interp-to").textContent = pair ? shortName(state.inputs[pair[1]]) : "";
  const key = pair ? pair.join(",") + KINDS.map((k) => state.models[k]?.info.version).join(",") : "";
  if (key === interpolationKey) return;
  interpolationKey = key;
  for (const kind of KINDS) {
    const strip = $(`interp-${kind}`);
    if (!pair || !state.models[kind] || !bothEncoded(pair, kind)) { strip.replaceChildren(); continue; }
    const [a, b] = pair.map((i) => state.inputs[i].latents[kind]);
    const latents = Array.from({ length: INTERPOLATION_STEPS }, (_, k) => lerp(a, b, k / (INTERPOLATION_STEPS - 1)));
    link.decode(`interp-${kind}`, modelRef(kind), latents, (reply) => {
      if (reply.op !== "decoded") { interpolationKey = ""; return; }
      if (strip.children.length !== latents.length) {
        strip.replaceChildren(...latents.map((_, k) => {
          const img = document.createElement("img");
          img.alt = `${NAMES[kind]}, ${Math.round(100 * k / (INTERPOLATION_STEPS - 1))} % of the way`;
          return img;
        }));
      }
      reply.images.forEach((image, k) => toImage(strip.children[k], base64ToBytes(image), reply.shape[1], reply.shape[0]));
    });
  }
}

function shortName(item) { return item.label === null ? item.name : `digit ${item.label}`; }

// -- judged samples from N(0, I) ------------------------------------------------------------------------
async function drawSamples(kinds = KINDS.filter((k) => state.models[k])) {
  if (!kinds.length) return;
  const seed = ++state.samples.seed;
  kinds.forEach((kind) => { state.samples.asked[kind] = seed; });
  const current = (kind) => state.samples.asked[kind] === seed; // not superseded, nor its version gone
  await Promise.all(kinds.map(async (kind) => {
    try { await drawOne(kind, seed, current); } finally { if (current(kind)) state.samples.asked[kind] = 0; }
  }));
  renderTally();
}

async function drawOne(kind, seed, current) {
  if (state.services.decoder?.state === "down") {
    // not asked while the decoder is known to be down: the answer would be a 503, which the browser logs as
    // a console error for every draw; the panel is dimmed, and the draw is made when the decoder is back
    $(`share-${kind}`).textContent = "(decoder unavailable)";
    state.samples.failed[kind] = true;
    return;
  }
  let reply;
  try {
    const ref = modelRef(kind);
    // the width of the version shown: the server knows only the newest version's, which may differ
    const latentDim = state.models[kind].info.latent_dim;
    reply = await postJSON("/api/samples", { model: ref.name, version: ref.version, latent_dim: latentDim, count: SAMPLES, seed });
  } catch (error) {
    if (!current(kind)) return;
    $(`share-${kind}`).textContent = `(${error.message})`;
    state.samples.failed[kind] = true; // drawn again when the decoder is back
    return;
  }
  if (!current(kind)) return; // a newer draw was asked for, or the version changed meanwhile
  state.samples.failed[kind] = false;
  state.samples.shown[kind] = reply;
  renderSamples(kind, reply);
}

function renderSamples(kind, reply) {
  const grid = $(`samples-${kind}`);
  const v = reply.verdicts;
  grid.replaceChildren(...reply.images.map((image, i) => {
    const fig = document.createElement("figure");
    fig.setAttribute("role", "listitem");
    fig.dataset.testid = `sample-${kind}`;
    const img = document.createElement("img");
    toImage(img, base64ToBytes(image), reply.shape[1], reply.shape[0]);
    const caption = document.createElement("figcaption");
    if (v) {
      fig.className = `sample ${v.valid[i] ? "valid" : "invalid"}`;
      fig.dataset.valid = v.valid[i];
      caption.textContent = v.valid[i] ? `✓ ${v.digits[i]}` : "✗";
      img.alt = v.valid[i] ? `sample ${i + 1}: valid, digit ${v.digits[i]} (p ${v.confidence[i].toFixed(2)})`
        : `sample ${i + 1}: not a valid digit (best p ${v.confidence[i].toFixed(2)})`;
    } else {
      fig.className = "sample";
      caption.textContent = " ";
      img.alt = `sample ${i + 1}`;
    }
    fig.append(img, caption);
    return fig;
  }));
  if (v) {
    state.samples.tally[kind][0] += v.valid_count;
    state.samples.tally[kind][1] += v.valid.length;
    $(`share-${kind}`).textContent = `${v.valid_count} of ${v.valid.length} valid (${Math.round(100 * v.valid_count / v.valid.length)} %)`;
  } else {
    $(`share-${kind}`).textContent = `(not judged: ${reply.unjudged})`;
  }
}

// Wilson's 95 % interval for k successes in n trials
export function wilson(k, n, z = 1.96) {
  if (!n) return [0, 1];
  const p = k / n, z2 = z * z;
  const centre = (p + z2 / (2 * n)) / (1 + z2 / n);
  const half = (z * Math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))) / (1 + z2 / n);
  return [Math.max(0, centre - half), Math.min(1, centre + half)];
}

function renderTally() {
  const parts = KINDS.filter((k) => state.samples.tally[k][1]).map((k) => {
    const [valid, total] = state.samples.tally[k];
    const [lo, hi] = wilson(valid, total);
    return `${NAMES[k]} ${valid} of ${total} (${Math.round(100 * valid / total)} %, 95 % interval ${Math.round(100 * lo)}–${Math.round(100 * hi)} %)`;
  });
  $("samples-tally").textContent = parts.length ? `All draws on this page: ${parts.join("; ")}.` : "";
}

// -- status ---------------------------------------------------------------------------------------------
function renderStatus() {
  const box = $("service-status");
  const entries = Object.entries(state.services);
  const down = entries.filter(([, s]) => s.state === "down");
  if (!state.connected) {
    box.dataset.state = "degraded";
    box.textContent = "UI server unreachable: reconnecting…";
  } else if (down.length) {
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
  // every panel that needs a service that is down: dimmed, with a message
  const messages = {
    decoder: "decoder unavailable: showing the last images",
    encoder: "encoder unavailable: no new encodings",
  };
  document.querySelectorAll("[data-needs]").forEach((panel) => {
    const service = panel.dataset.needs;
    const isDown = !state.connected || state.services[service]?.state === "down";
    if (isDown) panel.dataset.down = state.connected ? messages[service] : "UI server unreachable";
    else delete panel.dataset.down;
  });
}

// -- decoding -------------------------------------------------------------------------------------------
function modelName(kind) { return state.models[kind]?.info.name; }
// What a decode names: the model and the version the page shows (its labels, statistics and encodings).
function modelRef(kind) {
  const info = state.models[kind]?.info;
  return info ? { name: info.name, version: info.version || null } : null;
}

// Every request carries the newest pointer move it reflects: its painted image resolves that move and all
// earlier ones that were coalesced away.
function requestMain(kind) {
  if (!modelName(kind) || !state.z[kind]) return;
  link.decode(`main-${kind}`, modelRef(kind), [state.z[kind].slice()], paintMain, { seq: timing.seq, kind }, MAIN_INFLIGHT);
}

function paintMain(reply, request) {
  const kind = request.meta.kind;
  moveLine(kind);
  const output = $(`output-${kind}`).parentElement;
  if (reply.op !== "decoded") {
    state.decoderError[kind] = reply.error || "decoding failed";
    output.classList.add("stale");
    $(`note-${kind}`).textContent = `${state.decoderError[kind]}: showing the last image`;
    return;
  }
  state.decoderError[kind] = "";
  output.classList.remove("stale");
  const [h, w] = reply.shape;
  const bytes = base64ToBytes(reply.images[0]);
  paint($(`output-${kind}`), bytes, w, h);
  state.shown[kind] = { z: request.latents[0], bytes, w, h };
  if (!dragging()) describeOutput(kind);
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

function dragging() { return KINDS.some((k) => plots[k].dragging); }

// The cross decoding and the traversal strip follow the black lines too, but while a handle is being
// dragged at most every SECONDARY_MS, so that they never delay the main image.
let secondaryTimer = null, secondaryAt = 0;
function scheduleSecondary() {
  if (!dragging()) { clearTimeout(secondaryTimer); secondaryTimer = null; requestSecondary(); return; }
  if (secondaryTimer) return;
  const wait = Math.max(0, secondaryAt + SECONDARY_MS - performance.now());
  secondaryTimer = setTimeout(() => { secondaryTimer = null; requestSecondary(); }, wait);
}

// Why a cross-decoding cell has no image (empty: it has one): said in a note beside the image, which is
// hidden meanwhile, where Chromium drew a broken image's icon with the alt text squeezed into its box.
function noImage(img, reason) {
  let note = img.nextElementSibling;
  if (!note) {
    note = document.createElement("span");
    note.className = "no-image";
    img.after(note);
  }
  note.textContent = reason;
  note.hidden = !reason;
  img.hidden = Boolean(reason);
}

function describeOutput(kind) {
  const shown = state.shown[kind];
  if (!shown) return;
  toImage($(`cross-${kind}-${kind}`), shown.bytes, shown.w, shown.h);
  noImage($(`cross-${kind}-${kind}`), "");
  $(`note-${kind}`).textContent = `z = [${shown.z.map((v) => v.toFixed(2)).join(", ")}]`;
}

function requestSecondary() {
  secondaryAt = performance.now();
  for (const kind of KINDS) {
    describeOutput(kind);
    const otherKind = kind === "vae" ? "ae" : "vae";
    const z = state.z[kind];
    const target = $(`cross-${kind}-${otherKind}`);
    const other = state.models[otherKind]?.info;
    target.alt = `the ${NAMES[kind]}'s black line, decoded by the ${NAMES[otherKind]}`;
    if (z && other && other.latent_dim === z.length) {
      link.decode(`cross-${kind}`, modelRef(otherKind), [z.slice()], (reply) => {
        if (reply.op !== "decoded") return;
        toImage(target, base64ToBytes(reply.images[0]), reply.shape[1], reply.shape[0]);
        noImage(target, "");
      });
    } else {
      target.removeAttribute("src"); // and a note in its place says why, rather than a broken image's icon
      noImage(target, z && other ? `none: the ${NAMES[otherKind]} takes ${other.latent_dim} values, not ${z.length}`
        : "none yet");
    }
  }
  requestTraversal();
  KINDS.forEach(requestGrid);
}

// A model's latent grid: decoded again when anything but the two swept values of its black line changed (its
// version, the dimensions, the axes, the held values); otherwise only its frame moves. Not while a handle is
// being dragged: 81 images per model at every step of a drag would hold up the main image.
function requestGrid(kind) {
  const z = state.z[kind], axes = axesOf(kind), img = $(`grid-${kind}`), note = $(`grid-${kind}-note`);
  const { x, y } = state.grid;
  if (!z || !axes) return;
  if (!axes[x] || !axes[y] || x === y) {
    state.grids[kind] = null;
    img.removeAttribute("src");
    note.textContent = `${NAMES[kind]}: none, its latent has ${axes.length} dimension${axes.length === 1 ? "" : "s"}`;
    return;
  }
  const span = SPANS[state.grid.range] || SPANS.prior;
  const [rx, ry] = [span(kind, x), span(kind, y)];
  const xs = gridValues(rx.lo, rx.hi), ys = gridValues(ry.lo, ry.hi);
  const held = z.map((v, i) => (i === x || i === y ? null : v));
  const key = JSON.stringify([state.models[kind]?.info.version, x, y, xs[0], xs.at(-1), ys[0], ys.at(-1), held]);
  const shown = state.grids[kind];
  if (shown && shown.key === key) { paintGrid(kind); return; }
  if (dragging()) return;
  const model = modelRef(kind);
  link.decode(`grid-${kind}`, model, gridLatents(z, x, y, xs, ys), (reply) => {
    if (reply.op !== "decoded" || modelRef(kind)?.version !== model.version) return;
    state.grids[kind] = { key, images: reply.images.map(base64ToBytes), shape: reply.shape, xs, ys, x, y };
    paintGrid(kind);
  });
}

function paintGrid(kind) {
  const grid = state.grids[kind], z = state.z[kind];
  if (!grid || !z) return;
  const [height, width] = grid.shape;
  const inside = within(grid.xs, z[grid.x]) && within(grid.ys, z[grid.y]);
  const mark = inside ? [GRID_STEPS - 1 - nearest(grid.ys, z[grid.y]), nearest(grid.xs, z[grid.x])] : null;
  const picture = composeGrid(grid.images, width, height, GRID_STEPS, mark);
  const img = $(`grid-${kind}`);
  toImage(img, picture.bytes, picture.width, picture.height);
  const range = (values) => `${values[0].toFixed(1)} to ${values.at(-1).toFixed(1)}`;
  img.alt = `the ${NAMES[kind]}'s decoder over a ${GRID_STEPS} x ${GRID_STEPS} grid of z${grid.x + 1} (across) and ` +
    `z${grid.y + 1} (up), the other values at its black line; ` +
    (inside ? "the framed image is nearest the black line" : "the black line lies outside the grid");
  $(`grid-${kind}-note`).textContent =
    `${NAMES[kind]}: z${grid.x + 1} across, ${range(grid.xs)}; z${grid.y + 1} up, ${range(grid.ys)}` +
    (inside ? "" : "; the black line lies outside");
}

function requestTraversal() {
  const { kind, dim } = state.traverse;
  const z = state.z[kind], axes = axesOf(kind);
  if (!z || !axes || !axes[dim]) return;
  const { lo, hi } = (SPANS[state.traverse.range] || SPANS.prior)(kind, dim);
  const values = gridValues(lo, hi, TRAVERSAL_STEPS);
  const latents = values.map((v) => { const row = z.slice(); row[dim] = v; return row; });
  link.decode("traverse", modelRef(kind), latents, (reply) => paintTraversal(reply, kind, values, dim));
}

function paintTraversal(reply, kind, values, dim) {
  if (reply.op !== "decoded") return;
  const strip = $("traversal");
  if (strip.children.length !== values.length) {
    strip.replaceChildren(...values.map(() => {
      const button = document.createElement("button");
      button.type = "button";
      const img = document.createElement("img");
      img.dataset.testid = "traversal-image";
      img.alt = "";
      button.appendChild(img);
      button.addEventListener("click", () => {
        const k = button.dataset.kind;
        state.z[k][Number(button.dataset.dim)] = Number(button.dataset.value);
        afterEdit(k);
      });
      return button;
    }));
  }
  const current = state.z[kind]?.[dim];
  const marked = current !== undefined && within(values, current) ? nearest(values, current) : -1;
  reply.images.forEach((image, i) => {
    const button = strip.children[i];
    toImage(button.firstChild, base64ToBytes(image), reply.shape[1], reply.shape[0]);
    Object.assign(button.dataset, { value: values[i], dim, kind });
    button.setAttribute("aria-label", `${NAMES[kind]}: set z${dim + 1} to ${values[i].toFixed(2)}`);
    button.classList.toggle("current", i === marked);
  });
}

// -- interaction ----------------------------------------------------------------------------------------
// While the decoder answers, the dragged black line moves in the same frame as the image decoded from it:
// one frame per move instead of two, and line and image never disagree. When the decoder is down or slow,
// at once.
let lineTimer = null;
function dragTo(kind, dim, value) {
  timing.moves.set(++timing.seq, performance.now());
  state.z[kind][dim] = value;
  state.zStandIn[kind] = false;
  state.selectedDim[kind] = dim;
  if (state.services.decoder?.state !== "up" || state.decoderError[kind]) {
    moveLine(kind);
  } else if (!lineTimer) {
    lineTimer = setTimeout(() => moveLine(kind), LINE_WAIT_MS);
  }
  requestMain(kind);
}

function moveLine(kind) {
  clearTimeout(lineTimer);
  lineTimer = null;
  if (state.z[kind]) plots[kind].moveRecon(state.z[kind], state.selectedDim[kind]);
}

// After an edit that is not a drag move: redraw what depends on the black line, and decode it.
function afterEdit(kind) {
  if (!state.z[kind]) return;
  state.zStandIn[kind] = false;
  moveLine(kind);
  renderNumbers();
  renderPca();
  requestMain(kind);
}

function selectDim(kind, dim) {
  state.selectedDim[kind] = dim;
  state.traverse = { kind, dim };
  renderTraversalControls();
  if (state.z[kind]) plots[kind].moveRecon(state.z[kind], dim);
  requestTraversal();
}

// Snap black lines to an input's latents; the selection is left as it is.
function snapTo(index, kinds) {
  for (const kind of kinds) {
    const z = state.inputs[index]?.latents[kind];
    if (!z) continue;
    state.z[kind] = z.slice();
    afterEdit(kind);
  }
}

function gaussian() {
  let u = 0;
  while (u === 0) u = Math.random();
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * Math.random());
}

for (const kind of KINDS) {
  $(`random-${kind}`).addEventListener("click", () => {
    const axes = axesOf(kind);
    if (!axes || !state.z[kind]) return;
    state.z[kind] = axes.map((axis) => Math.min(axis.hi, Math.max(axis.lo, gaussian())));
    afterEdit(kind);
  });
}

$("redraw-samples").addEventListener("click", () => drawSamples());

$("interpolate").addEventListener("input", (event) => {
  const pair = interpolationPair();
  if (!pair) return;
  const t = Number(event.target.value) / 1000;
  for (const kind of KINDS) {
    const [a, b] = pair.map((i) => state.inputs[i].latents[kind]);
    if (!a || !b) continue;
    state.z[kind] = lerp(a, b, t);
    plots[kind].moveRecon(state.z[kind], state.selectedDim[kind]);
    requestMain(kind);
  }
});
$("interpolate").addEventListener("change", () => KINDS.forEach(afterEdit));

$("traverse-model").addEventListener("change", (event) => {
  state.traverse.kind = event.target.value;
  renderTraversalControls();
  requestTraversal();
});
$("traverse-range").addEventListener("change", (event) => {
  state.traverse.range = event.target.value;
  requestTraversal();
});
$("traverse-dim").addEventListener("change", (event) => {
  state.traverse.dim = Number(event.target.value);
  requestTraversal();
});

for (const axis of ["x", "y"]) {
  $(`grid-${axis}`).addEventListener("change", (event) => {
    const other = axis === "x" ? "y" : "x", value = Number(event.target.value);
    if (state.grid[other] === value) state.grid[other] = state.grid[axis]; // picked the other's: they swap
    state.grid[axis] = value;
    renderGridControls();
    KINDS.forEach(requestGrid);
  });
}

$("grid-range").addEventListener("change", (event) => {
  state.grid.range = event.target.value;
  KINDS.forEach(requestGrid);
});

$("clear-drawing").addEventListener("click", () => pad.clear());
$("encode-drawing").addEventListener("click", async () => {
  const pixels = pad.toMnist();
  if (!pixels) { $("inputs-note").textContent = "Draw something first."; return; }
  const count = state.inputs.filter((item) => item.drawn).length + 1;
  state.inputs.push({ name: `drawing ${count}`, label: null, shape: [28, 28], pixels, drawn: true, latents: {}, spreads: {} });
  const index = state.inputs.length - 1;
  select(index);
  renderInputs();
  await Promise.all(KINDS.filter((k) => state.models[k]).map((k) => encodeMissing(k)));
  if (KINDS.some((k) => state.inputs[index].latents[k])) {
    snapTo(index, KINDS);
  } else {
    $("inputs-note").textContent = "Could not encode the drawing: is the encoder running?";
  }
  renderAll();
});

// -- service status -------------------------------------------------------------------------------------
function statusChanged(services) {
  const before = state.services;
  state.services = services;
  renderStatus();
  const cameBack = (name) => services[name]?.state === "up" && before[name]?.state !== "up";
  if (cameBack("encoder")) refresh();
  if (cameBack("decoder")) {
    interpolationKey = "";
    renderInterpolation();
    KINDS.forEach(requestMain);
    drawSamples(undrawn());
  }
}

// A new version written while the page is open: the page shows (and decodes with) the version it loaded
// until it sees the newer one here, then loads that one's statistics and encodings (refresh).
async function checkVersions() {
  if (!state.connected || loading) return;
  let listing;
  try { listing = await getJSON("/api/models"); } catch (error) { return; }
  const served = servedModels(listing);
  if (!served) return;
  const changed = KINDS.some((kind) => { // a newer version, another model, or none any more
    const info = chooseModel(served, kind), known = state.models[kind]?.info;
    return info ? !known || known.name !== info.name || known.version !== info.version : !!known;
  });
  if (changed) refresh();
}
setInterval(checkVersions, VERSION_CHECK_MS);

function connectionChanged(connected) {
  state.connected = connected;
  renderStatus();
  if (connected) refresh();
}

KINDS.forEach((k) => blank($(`output-${k}`)));
renderStatus();
