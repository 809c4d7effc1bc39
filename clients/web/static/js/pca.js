// The seed's Figure 4: the training latents of a model projected on their first two principal components,
// coloured by digit. A cross marks where the black line's latents fall in that plane.

export const DIGIT_COLOURS = [
  "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
  "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
];

export function projector(pca) {
  if (!pca || !pca.mean || !pca.components) return null;
  return (z) => pca.components.map((row) => row.reduce((s, c, i) => s + c * (z[i] - pca.mean[i]), 0));
}

// Drawn on a scratch canvas and shown as an <img>: a static picture costs Chromium nothing per frame.
const scratch = document.createElement("canvas");

export function drawPca(img, pca, marker, empty = "no statistics") {
  draw(scratch, img.clientWidth || 360, img.clientHeight || 300, pca, marker, empty);
  img.src = scratch.toDataURL("image/png");
}

function draw(canvas, cssW, cssH, pca, marker, empty) {
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(cssW * ratio);
  canvas.height = Math.round(cssH * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, cssW, cssH);
  if (!pca || !pca.points || !pca.points.length) {
    ctx.fillStyle = "#9aa1ab"; ctx.font = "13px system-ui"; ctx.textAlign = "center";
    ctx.fillText(empty, cssW / 2, cssH / 2);
    return;
  }
  const pad = 26;
  const xs = pca.points.map((p) => p[0]), ys = pca.points.map((p) => p[1] ?? 0);
  let [xlo, xhi, ylo, yhi] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (marker) { xlo = Math.min(xlo, marker[0]); xhi = Math.max(xhi, marker[0]); ylo = Math.min(ylo, marker[1]); yhi = Math.max(yhi, marker[1]); }
  const sx = (v) => pad + (v - xlo) / ((xhi - xlo) || 1) * (cssW - 2 * pad);
  const sy = (v) => cssH - pad - (v - ylo) / ((yhi - ylo) || 1) * (cssH - 2 * pad);

  ctx.strokeStyle = "#e3e6ea"; ctx.lineWidth = 1;
  if (xlo < 0 && xhi > 0) { ctx.beginPath(); ctx.moveTo(sx(0), pad / 2); ctx.lineTo(sx(0), cssH - pad / 2); ctx.stroke(); }
  if (ylo < 0 && yhi > 0) { ctx.beginPath(); ctx.moveTo(pad / 2, sy(0)); ctx.lineTo(cssW - pad / 2, sy(0)); ctx.stroke(); }
  ctx.globalAlpha = 0.6;
  pca.points.forEach((p, i) => {
    ctx.fillStyle = DIGIT_COLOURS[pca.labels[i] % 10];
    ctx.beginPath(); ctx.arc(sx(p[0]), sy(p[1] ?? 0), 1.9, 0, 2 * Math.PI); ctx.fill();
  });
  ctx.globalAlpha = 1;
  ctx.fillStyle = "#6b7280"; ctx.font = "11px system-ui"; ctx.textAlign = "left";
  const evr = pca.explained_variance_ratio || [];
  ctx.fillText(`PC1 ${fmtPct(evr[0])}`, pad, cssH - 6);
  ctx.save(); ctx.translate(11, pad + 60); ctx.rotate(-Math.PI / 2); ctx.fillText(`PC2 ${fmtPct(evr[1])}`, 0, 0); ctx.restore();
  ctx.textAlign = "right";
  ctx.fillText(`x ${xlo.toFixed(1)} … ${xhi.toFixed(1)}   y ${ylo.toFixed(1)} … ${yhi.toFixed(1)}`, cssW - 6, 12);
  if (marker) {
    const [mx, my] = [sx(marker[0]), sy(marker[1] ?? 0)];
    ctx.strokeStyle = "#fff"; ctx.lineWidth = 5;
    cross(ctx, mx, my);
    ctx.strokeStyle = "#111"; ctx.lineWidth = 2.2;
    cross(ctx, mx, my);
  }
}

function cross(ctx, x, y) {
  ctx.beginPath(); ctx.moveTo(x - 7, y - 7); ctx.lineTo(x + 7, y + 7); ctx.moveTo(x + 7, y - 7); ctx.lineTo(x - 7, y + 7); ctx.stroke();
}

function fmtPct(v) { return v === undefined ? "" : `(${(100 * v).toFixed(0)} %)`; }
