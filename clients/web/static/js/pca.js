// The seed's Figure 4: each model's training latents projected on their first two principal components,
// coloured by digit, both models on the same axes (equal units on x and y) so that their spreads compare.
// A cross marks where the model's black line falls in that plane.
//
// Drawn at the element's displayed size (times the device pixel ratio) into an <img>, and drawn again when
// that size changes: never a stretched bitmap, and a static picture costs Chromium nothing per frame.

import { formatTick, niceTicks } from "./parcoords.js";

// tab10, lightened by 30 %: categorical, and far (CIE76 dE >= 35) from the dark selection colours in main.js
export const DIGIT_COLOURS = [
  "#62a0ca", "#ffa556", "#6bbc6b", "#e26868", "#b495d1",
  "#ae8981", "#eba0d4", "#a5a5a5", "#d0d164", "#5dd2dd",
];

export function projector(pca) {
  if (!pca || !pca.mean || !pca.components || !pca.components.length) return null;
  return (z) => pca.components.map((row) => row.reduce((s, c, i) => s + c * (z[i] - pca.mean[i]), 0));
}

// One square extent holding every model's points and markers: [lo, hi] for both axes.
export function sharedExtent(pcas, markers = []) {
  let lo = Infinity, hi = -Infinity;
  for (const pca of pcas) {
    for (const p of pca?.points || []) { lo = Math.min(lo, p[0], p[1] ?? 0); hi = Math.max(hi, p[0], p[1] ?? 0); }
  }
  for (const m of markers) if (m) { lo = Math.min(lo, ...m.slice(0, 2)); hi = Math.max(hi, ...m.slice(0, 2)); }
  if (!Number.isFinite(lo)) return null;
  const pad = 0.04 * (hi - lo || 1);
  return [lo - pad, hi + pad];
}

const scratch = document.createElement("canvas");

export function drawPca(img, { pca, marker, extent, empty }) {
  const cssW = Math.round(img.clientWidth || 300);
  const cssH = Math.round(img.clientHeight || cssW);
  draw(scratch, cssW, cssH, pca, marker, extent, empty);
  img.src = scratch.toDataURL("image/png");
  img.dataset.drawnWidth = cssW;
}

function draw(canvas, cssW, cssH, pca, marker, extent, empty) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(cssW * ratio);
  canvas.height = Math.round(cssH * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, cssW, cssH);
  if (!pca || !pca.points || !pca.points.length || !extent) {
    ctx.fillStyle = "#5b616b"; ctx.font = "13px system-ui, sans-serif"; ctx.textAlign = "center";
    ctx.fillText(empty, cssW / 2, cssH / 2);
    return;
  }
  const left = 40, bottom = 34, top = 8, right = 10;
  const size = Math.max(40, Math.min(cssW - left - right, cssH - top - bottom)); // square: equal aspect
  const x0 = left, y0 = top;
  const [lo, hi] = extent;
  const sx = (v) => x0 + (v - lo) / (hi - lo) * size;
  const sy = (v) => y0 + size - (v - lo) / (hi - lo) * size;

  ctx.font = "11px system-ui, sans-serif";
  ctx.lineWidth = 1;
  for (const t of niceTicks(lo, hi, 6)) {
    ctx.strokeStyle = t === 0 ? "#c4c8cf" : "#eceef1";
    ctx.beginPath(); ctx.moveTo(sx(t), y0); ctx.lineTo(sx(t), y0 + size); ctx.stroke();
    ctx.beginPath(); ctx.moveTo(x0, sy(t)); ctx.lineTo(x0 + size, sy(t)); ctx.stroke();
    ctx.fillStyle = "#4b5563";
    ctx.textAlign = "center"; ctx.fillText(formatTick(t), sx(t), y0 + size + 13);
    ctx.textAlign = "right"; ctx.fillText(formatTick(t), x0 - 5, sy(t) + 4);
  }
  ctx.strokeStyle = "#9aa1ab";
  ctx.strokeRect(x0, y0, size, size);
  ctx.save();
  ctx.beginPath(); ctx.rect(x0, y0, size, size); ctx.clip();
  ctx.globalAlpha = 0.75;
  pca.points.forEach((p, i) => {
    ctx.fillStyle = DIGIT_COLOURS[pca.labels[i] % 10];
    ctx.beginPath(); ctx.arc(sx(p[0]), sy(p[1] ?? 0), 1.9, 0, 2 * Math.PI); ctx.fill();
  });
  ctx.globalAlpha = 1;
  if (marker) {
    const [mx, my] = [sx(marker[0]), sy(marker[1] ?? 0)];
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 5; cross(ctx, mx, my);
    ctx.strokeStyle = "#111"; ctx.lineWidth = 2.2; cross(ctx, mx, my);
  }
  ctx.restore();
  const evr = pca.explained_variance_ratio || [];
  ctx.fillStyle = "#374151"; ctx.textAlign = "center";
  ctx.fillText(`PC1${fmtPct(evr[0])}`, x0 + size / 2, y0 + size + 28);
  ctx.save(); ctx.translate(11, y0 + size / 2); ctx.rotate(-Math.PI / 2); ctx.fillText(`PC2${fmtPct(evr[1])}`, 0, 0); ctx.restore();
}

function cross(ctx, x, y) {
  ctx.beginPath(); ctx.moveTo(x - 7, y - 7); ctx.lineTo(x + 7, y + 7); ctx.moveTo(x + 7, y - 7); ctx.lineTo(x - 7, y + 7); ctx.stroke();
}

function fmtPct(v) { return v === undefined ? "" : ` (${(100 * v).toFixed(0)} % of the variance)`; }
