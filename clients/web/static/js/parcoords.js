// Parallel coordinates in SVG for one model: one vertical axis per latent dimension with the training set's
// violin behind it, one coloured line per selected input, and the black line (what the decoder gets) whose
// points are ARIA sliders: drag them, or focus one and use the keyboard.
// The drag path only moves the black line (`moveRecon`); everything else is redrawn by `render`.

const NS = "http://www.w3.org/2000/svg";
const MARGIN = { top: 30, bottom: 16, left: 46, right: 22 };

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

export function formatTick(t) {
  const a = Math.abs(t);
  return a >= 10 ? t.toFixed(0) : Number(t.toFixed(2)).toString();
}

export class ParCoords {
  // name: "VAE" or "AE", for labels; callbacks: onDrag(dim, value), onDragEnd(), onSnap(inputIndex),
  // onSelectDim(dim), onStep(dim, value) (a keyboard change of one point)
  constructor(svg, top, name, callbacks) {
    this.svg = svg;
    this.top = top;
    this.name = name;
    this.callbacks = callbacks;
    this.view = null;
    this.dragging = null;
    svg.addEventListener("pointermove", (event) => this.pointerMove(event));
    svg.addEventListener("pointerup", (event) => this.pointerUp(event));
    svg.addEventListener("pointercancel", (event) => this.pointerUp(event));
    top.addEventListener("keydown", (event) => this.key(event));
    let width = 0;
    new ResizeObserver(() => {
      const w = svg.getBoundingClientRect().width;
      if (w !== width) { width = w; this.render(); }
    }).observe(svg);
  }

  // view: {axes: [{lo, hi, label}], violins, lines: [{values, colour, index, name}], recon: [..], selectedDim}
  setView(view) { this.view = view; this.render(); }

  geometry() {
    const rect = this.svg.getBoundingClientRect();
    const width = Math.max(rect.width, 160), height = Math.max(rect.height, 160);
    const d = this.view.axes.length;
    const inner = width - MARGIN.left - MARGIN.right;
    // The violins' half width, at most 0.4 of the spacing of the axes, which are inset by it so that the first
    // and the last violin stay inside the plot (they covered the tick labels and ran past the right edge).
    const halfWidth = Math.min(60, d > 1 ? (0.4 * inner) / (d - 1 + 0.8) : 0.4 * inner);
    const span = inner - 2 * halfWidth;
    const xs = this.view.axes.map((_, i) => MARGIN.left + halfWidth + (d === 1 ? span / 2 : (i * span) / (d - 1)));
    const y0 = MARGIN.top, y1 = height - MARGIN.bottom;
    return { width, height, xs, y0, y1, halfWidth };
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
    const focusedDim = top.contains(document.activeElement) ? Number(document.activeElement.dataset.dim) : null;
    svg.replaceChildren();
    top.replaceChildren();
    this.reconPath = null;
    this.handles = [];
    if (!this.view || !this.view.axes.length) return;
    const v = this.view;
    this.geo = this.geometry();
    for (const node of [svg, top]) node.setAttribute("viewBox", `0 0 ${this.geo.width} ${this.geo.height}`);
    const shared = v.axes.every((a) => a.lo === v.axes[0].lo && a.hi === v.axes[0].hi);
    svg.setAttribute("aria-label", `${this.name}: parallel coordinates of its ${v.axes.length} latent dimensions`
      + (shared ? `, all on one scale from ${formatTick(v.axes[0].lo)} to ${formatTick(v.axes[0].hi)}` : "")
      + `; grey shapes: the training set's distribution; ${v.lines.length} coloured lines: the selected inputs;`
      + " black line: what the decoder gets");

    const back = el("g", {}, svg);
    if (shared) { // one scale: gridlines across, tick labels once on the left
      for (const t of niceTicks(v.axes[0].lo, v.axes[0].hi, 8)) {
        const y = this.y(0, t);
        el("line", { class: t === 0 ? "grid zero" : "grid", x1: MARGIN.left - 6, x2: this.geo.width - MARGIN.right + 8, y1: y, y2: y }, back);
        const label = el("text", { class: "tick", x: MARGIN.left - 9, y: y + 3.5, "text-anchor": "end" }, back);
        label.textContent = formatTick(t);
      }
    }
    (v.violins || []).forEach((violin, i) => {
      if (i < v.axes.length) el("path", { class: "violin", d: this.violinPath(i, violin) }, back);
    });
    v.axes.forEach((axis, i) => {
      const x = this.geo.xs[i];
      el("line", { class: "axis", x1: x, x2: x, y1: this.geo.y0, y2: this.geo.y1, "data-testid": "latent-axis",
                   "data-dim": i, "data-lo": axis.lo, "data-hi": axis.hi }, back);
      if (!shared) {
        for (const t of niceTicks(axis.lo, axis.hi, 6)) {
          const y = this.y(i, t);
          el("line", { class: "axis", x1: x - 4, x2: x, y1: y, y2: y }, back);
          const label = el("text", { class: "tick", x: x - 7, y: y + 3.5, "text-anchor": "end" }, back);
          label.textContent = formatTick(t);
        }
      }
      const name = el("text", { class: "axis-label", x, y: 14, "text-anchor": "middle" }, back);
      name.textContent = axis.label || `z${i + 1}`;
    });

    const lines = el("g", {}, svg);
    for (const line of v.lines || []) {
      el("path", { class: "input-line", d: this.linePath(line.values), stroke: line.colour,
                   "data-testid": "latent-line", "data-input": line.index }, lines);
      const hit = el("path", { class: "hit", d: this.linePath(line.values), "data-testid": "latent-line-hit",
                               "data-input": line.index }, lines);
      el("title", {}, hit).textContent = `${line.name}: double-click to snap the black line here`;
      hit.addEventListener("dblclick", (event) => { event.preventDefault(); this.callbacks.onSnap(line.index); });
    }

    this.reconPath = el("path", { class: "recon", d: this.linePath(v.recon) }, top);
    this.labels = [];
    v.recon.forEach((value, i) => {
      if (i >= v.axes.length) return;
      const last = i === v.axes.length - 1;
      const label = el("text", { class: "value", x: this.geo.xs[i] + (last ? -11 : 11), y: this.y(i, value) - 9,
                                 "text-anchor": last ? "end" : "start", "aria-hidden": "true" }, top);
      label.textContent = value.toFixed(2);
      const axis = v.axes[i];
      const handle = el("circle", {
        class: `handle${i === v.selectedDim ? " selected" : ""}`, cx: this.geo.xs[i], cy: this.y(i, value), r: 8,
        "data-testid": "recon-handle", "data-dim": i, "data-value": value, tabindex: 0, role: "slider",
        "aria-orientation": "vertical", "aria-label": `${this.name} black line, ${axis.label || `z${i + 1}`}`,
        "aria-valuemin": axis.lo.toFixed(2), "aria-valuemax": axis.hi.toFixed(2), "aria-valuenow": value.toFixed(2),
        "aria-valuetext": `${axis.label || `z${i + 1}`} = ${value.toFixed(2)}`,
      }, top);
      handle.addEventListener("pointerdown", (event) => this.pointerDown(event, i));
      handle.addEventListener("focus", () => this.callbacks.onSelectDim(i));
      this.handles.push(handle);
      this.labels.push(label);
    });
    if (focusedDim !== null && this.handles[focusedDim]) this.handles[focusedDim].focus({ preventScroll: true });
  }

  // The fast path while dragging: move the black line and its points, nothing else.
  moveRecon(values, selectedDim) {
    if (!this.reconPath) return;
    this.view.recon = values;
    this.view.selectedDim = selectedDim;
    this.reconPath.setAttribute("d", this.linePath(values));
    this.handles.forEach((handle, i) => {
      const selected = i === selectedDim;
      if (handle.dataset.value === String(values[i])) { // unchanged: only the selection mark may move
        if (handle.classList.contains("selected") !== selected) handle.classList.toggle("selected", selected);
        return;
      }
      const y = this.y(i, values[i]);
      handle.setAttribute("cy", y);
      handle.setAttribute("data-value", values[i]);
      handle.setAttribute("aria-valuenow", values[i].toFixed(2));
      handle.setAttribute("aria-valuetext", `${this.view.axes[i].label || `z${i + 1}`} = ${values[i].toFixed(2)}`);
      handle.classList.toggle("selected", selected);
      this.labels[i].setAttribute("y", y - 9);
      this.labels[i].textContent = values[i].toFixed(2);
    });
  }

  // Keyboard on a focused point: up/down move it (Shift, PageUp/PageDown: bigger steps), Home/End go to the
  // ends of its axis, left/right move the focus to the neighbouring point.
  key(event) {
    const handle = event.target.closest?.(".handle");
    if (!handle || !this.view) return;
    const dim = Number(handle.dataset.dim);
    const { lo, hi } = this.view.axes[dim];
    const span = hi - lo, value = this.view.recon[dim];
    let next = null;
    switch (event.key) {
      case "ArrowUp": next = value + span * (event.shiftKey ? 0.05 : 0.01); break;
      case "ArrowDown": next = value - span * (event.shiftKey ? 0.05 : 0.01); break;
      case "PageUp": next = value + span * 0.1; break;
      case "PageDown": next = value - span * 0.1; break;
      case "Home": next = lo; break; // the slider pattern: Home the minimum, End the maximum
      case "End": next = hi; break;
      case "ArrowLeft": case "ArrowRight": {
        const to = this.handles[(dim + (event.key === "ArrowRight" ? 1 : this.handles.length - 1)) % this.handles.length];
        to.focus();
        event.preventDefault();
        return;
      }
      default: return;
    }
    event.preventDefault();
    this.callbacks.onStep(dim, Math.min(hi, Math.max(lo, next)));
  }

  svgY(event) {
    const rect = this.svg.getBoundingClientRect();
    return (event.clientY - rect.top) * (this.geo.height / rect.height);
  }

  pointerDown(event, dim) {
    event.preventDefault();
    this.svg.setPointerCapture(event.pointerId);
    this.handles[dim].focus({ preventScroll: true });
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
