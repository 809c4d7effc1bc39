// The numbers beside the figure: value ranges of latents, and the seed's information-theory view computed
// from each served model's metadata (image shape, latent dimension), never written in.

const BITS_PER_PIXEL = 8;   // uint8 grey levels, 0..255
const BITS_PER_LATENT = 32; // float32

export function rangeOf(latents) {
  if (!latents.length) return "–";
  let lo = Infinity, hi = -Infinity;
  for (const z of latents) for (const v of z) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  return `[${lo.toFixed(2)}, ${hi.toFixed(2)}]`;
}

export function infoRows(infos, kinds) {
  const rows = [["quantity", ...kinds.map((k) => k.toUpperCase())]];
  const get = (fn) => infos.map((info) => (info ? fn(info) : "–"));
  const imageBits = (info) => (info.image_shape || []).reduce((a, b) => a * b, 1) * BITS_PER_PIXEL;
  const latentBits = (info) => info.latent_dim * BITS_PER_LATENT;
  const fmt = (n) => n.toLocaleString("en-US");
  rows.push(["model", ...get((i) => `${i.name} v${i.version}`)]);
  rows.push(["bits in an image", ...get((i) => `${(i.image_shape || []).join(" × ")} × ${BITS_PER_PIXEL} = ${fmt(imageBits(i))}`)]);
  rows.push(["bits in the latent", ...get((i) => `${i.latent_dim} × ${BITS_PER_LATENT} = ${fmt(latentBits(i))}`)]);
  rows.push(["ratio", ...get((i) => `${fmt(+(imageBits(i) / latentBits(i)).toFixed(2))} ×`)]);
  rows.push(["compression", ...get((i) => `${(100 * (1 - latentBits(i) / imageBits(i))).toFixed(2)} %`)]);
  // What the code carries, measured: a VAE's posterior noise bounds it by the KL to the prior (test set,
  // nats per image, from the manifest); an AE's code has no noise, so only its float32 bits bound it.
  rows.push(["information in the code (test KL)", ...get((i) => (i.kind === "vae" && Number.isFinite(i.metrics?.test_kl)
    ? `${i.metrics.test_kl.toFixed(1)} nats = ${(i.metrics.test_kl / Math.LN2).toFixed(1)} bits`
    : `no noise: up to ${fmt(latentBits(i))} bits`))]);
  rows.push(["reconstruction cost (test BCE)", ...get((i) => (Number.isFinite(i.metrics?.test_bce)
    ? `${i.metrics.test_bce.toFixed(1)} nats` : "–"))]);
  return rows;
}

export const INFO_NOTE = "From the served models' metadata: image shape at 8 bits per pixel, latent dimension at "
  + "float32, and the test-set figures each version was written with. A ratio of bit counts is no probability: "
  + "a code of 128 bits can name 2^128 of the 2^8192 possible 32 × 32 images, not one in 64. What a code carries "
  + "is measured: the VAE's noise limits its code to its KL, a few bits per dimension, so neighbouring codes must "
  + "decode to alike digits; the AE's code has no such limit, and nothing makes the space between its codes "
  + "decode to digits.";

export function renderTable(table, rows) {
  table.replaceChildren(...rows.map((row, r) => {
    const tr = document.createElement("tr");
    row.forEach((cell, c) => {
      const td = document.createElement(r === 0 || c === 0 ? "th" : "td");
      td.textContent = cell;
      if (r > 0 && c > 0) td.className = "num";
      tr.appendChild(td);
    });
    return tr;
  }));
}
