// Parallel coordinates in SVG: one vertical axis per latent dimension with the training set's violin behind
// it, one coloured line per selected input, and the black reconstruction line whose points can be dragged.
// The drag path only moves the black line (`moveRecon`); everything else is redrawn by `render`.

const NS = "http://www.w3.org/2000/svg";
const MARGIN = { top: 34, bottom: 24, left: 74, right: 74 };

function el(name, attrs = {}, parent = null) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (parent) parent.appendChild(node);
  return node;
}

export function niceTicks(lo, hi, count = 5) {
  const span = hi - lo;
  if (!(span > 0)) return [lo];
  const raw = span / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= count) || raw;
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + 1e-9; t += step) ticks.push(Math.abs(t) < step * 1e-6 ? 0 : t);
  return ticks;
}

export class ParCoords {
  constructor(svg, top, { onDrag, onDragEnd, onSnap, onSelectDim }) {
    this.svg = svg;
    this.top = top;
    this.callbacks = { onDrag, onDragEnd, onSnap, onSelectDim };
    this.view = null;
    this.dragging = null;
    svg.addEventListener("pointermove", (event) => this.pointerMove(event));
    svg.addEventListener("pointerup", (event) => this.pointerUp(event));
    svg.addEventListener("pointercancel", (event) => this.pointerUp(event));
    new ResizeObserver(() => this.render()).observe(svg);
  }

  // view: {axes: [{lo, hi, label}], violins, ghostViolins, lines: [{values, colour, index}], ghostLines,
  //        recon: [..], ghostRecon: [..] | null, selectedDim}
  setView(view) { this.view = view; this.render(); }

  geometry() {
    const rect = this.svg.getBoundingClientRect();
    const width = Math.max(rect.width, 200), height = Math.max(rect.height, 200);
    const d = this.view.axes.length;
    const inner = width - MARGIN.left - MARGIN.right;
    const xs = this.view.axes.map((_, i) => (d === 1 ? MARGIN.left + inner / 2 : MARGIN.left + (i * inner) / (d - 1)));
    const y0 = MARGIN.top, y1 = height - MARGIN.bottom;
    const spacing = d > 1 ? inner / (d - 1) : inner;
    return { width, height, xs, y0, y1, halfWidth: Math.min(0.36 * spacing, 64) };
  }

  y(dim, value) {
    const { lo, hi } = this.view.axes[dim];
    const g = this.geo;
    const t = (hi - value) / (hi - lo || 1);
    return g.y0 + Math.min(1, Math.max(0, t)) * (g.y1 - g.y0);
  }

  value(dim, y) {
    const { lo, hi } = this.view.axes[dim];
    const g = this.geo;
    const t = Math.min(1, Math.max(0, (y - g.y0) / (g.y1 - g.y0)));
    return hi - t * (hi - lo);
  }

  linePath(values) {
    const n = Math.min(values.length, this.view.axes.length);
    let d = "";
    for (let i = 0; i < n; i++) d += `${i ? "L" : "M"}${this.geo.xs[i].toFixed(1)},${this.y(i, values[i]).toFixed(1)}`;
    return d;
  }

  violinPath(dim, violin) {
    if (!violin || !violin.grid || !violin.grid.length) return "";
    const { lo, hi } = this.view.axes[dim];
    const peak = Math.max(...violin.density) || 1;
    const x = this.geo.xs[dim], w = this.geo.halfWidth;
    const pts = [];
    violin.grid.forEach((g, i) => {
      if (g >= lo && g <= hi) pts.push([this.y(dim, g), (violin.density[i] / peak) * w]);
    });
    if (pts.length < 2) return "";
    const right = pts.map(([y, h]) => `${(x + h).toFixed(1)},${y.toFixed(1)}`);
    const left = pts.slice().reverse().map(([y, h]) => `${(x - h).toFixed(1)},${y.toFixed(1)}`);
    return `M${right.join("L")}L${left.join("L")}Z`;
  }

  render() {
    const svg = this.svg, top = this.top;
    svg.replaceChildren();
    top.replaceChildren();
    this.reconPath = null;
    if (!this.view || !this.view.axes.length) return;
    const v = this.view;
    this.geo = this.geometry();
    svg.setAttribute("viewBox", `0 0 ${this.geo.width} ${this.geo.height}`);
    top.setAttribute("viewBox", `0 0 ${this.geo.width} ${this.geo.height}`);

    const back = el("g", {}, svg);
    (v.ghostViolins || []).forEach((violin, i) => {
      if (i < v.axes.length) el("path", { class: "violin ghost", d: this.violinPath(i, violin) }, back);
    });
    (v.violins || []).forEach((violin, i) => el("path", { class: "violin", d: this.violinPath(i, violin) }, back));

    v.axes.forEach((axis, i) => {
      const x = this.geo.xs[i];
      el("line", { class: "axis", x1: x, x2: x, y1: this.geo.y0, y2: this.geo.y1, "data-testid": "latent-axis",
                   "data-dim": i, "data-lo": axis.lo, "data-hi": axis.hi }, back);
      for (const t of niceTicks(axis.lo, axis.hi, 6)) {
        const y = this.y(i, t);
        el("line", { class: "axis", x1: x - 4, x2: x, y1: y, y2: y }, back);
        const label = el("text", { class: "tick", x: x - 7, y: y + 3.5, "text-anchor": "end" }, back);
        label.textContent = formatTick(t);
      }
      const name = el("text", { class: "axis-label", x, y: 16, "text-anchor": "middle" }, back);
      name.textContent = axis.label || `z${i + 1}`;
    });

    const lines = el("g", {}, svg);
    for (const line of v.ghostLines || []) el("path", { class: "input-line ghost", d: this.linePath(line.values) }, lines);
    if (v.ghostRecon) el("path", { class: "recon ghost", d: this.linePath(v.ghostRecon) }, lines);
    for (const line of v.lines || []) {
      el("path", { class: "input-line", d: this.linePath(line.values), stroke: line.colour,
                   "data-testid": "latent-line", "data-input": line.index }, lines);
      const hit = el("path", { class: "hit", d: this.linePath(line.values), "data-testid": "latent-line-hit",
                               "data-input": line.index }, lines);
      const title = el("title", {}, hit);
      title.textContent = `${line.name}: double-click to snap the black line here`;
      hit.addEventListener("dblclick", (event) => { event.preventDefault(); this.callbacks.onSnap(line.index); });
    }

    this.reconPath = el("path", { class: "recon", d: this.linePath(v.recon) }, top);
    this.handles = [];
    this.labels = [];
    v.recon.forEach((value, i) => {
      if (i >= v.axes.length) return;
      const label = el("text", { class: "value", x: this.geo.xs[i] + 10, y: this.y(i, value) - 9 }, top);
      label.textContent = value.toFixed(2);
      const handle = el("circle", {
        class: `handle${i === v.selectedDim ? " selected" : ""}`, cx: this.geo.xs[i], cy: this.y(i, value), r: 7.5,
        "data-testid": "recon-handle", "data-dim": i, "data-value": value,
      }, top);
      handle.addEventListener("pointerdown", (event) => this.pointerDown(event, i));
      this.handles.push(handle);
      this.labels.push(label);
    });
  }

  // The fast path while dragging: move the black line and its points, nothing else.
  moveRecon(values, selectedDim) {
    if (!this.reconPath) return;
    this.view.recon = values;
    this.view.selectedDim = selectedDim;
    this.reconPath.setAttribute("d", this.linePath(values));
    this.handles.forEach((handle, i) => {
      const y = this.y(i, values[i]);
      handle.setAttribute("cy", y);
      handle.setAttribute("data-value", values[i]);
      handle.classList.toggle("selected", i === selectedDim);
      this.labels[i].setAttribute("y", y - 9);
      this.labels[i].textContent = values[i].toFixed(2);
    });
  }

  svgY(event) {
    const rect = this.svg.getBoundingClientRect();
    return (event.clientY - rect.top) * (this.geo.height / rect.height);
  }

  pointerDown(event, dim) {
    event.preventDefault();
    this.svg.setPointerCapture(event.pointerId);
    this.svg.focus({ preventScroll: true });
    this.dragging = { dim, pointerId: event.pointerId };
    this.callbacks.onSelectDim(dim);
  }

  pointerMove(event) {
    if (!this.dragging || event.pointerId !== this.dragging.pointerId) return;
    this.callbacks.onDrag(this.dragging.dim, this.value(this.dragging.dim, this.svgY(event)), event);
  }

  pointerUp(event) {
    if (!this.dragging || event.pointerId !== this.dragging.pointerId) return;
    this.dragging = null;
    this.callbacks.onDragEnd();
  }
}

function formatTick(t) {
  const a = Math.abs(t);
  return a >= 100 ? t.toFixed(0) : a >= 10 ? t.toFixed(0) : Number(t.toFixed(2)).toString();
}
