// The latent grid: two dimensions of one model swept together, the others held at its black line, and the
// decoded images laid out as one picture (an <img>, not a canvas: see pixels.js). Rows run from the y
// dimension's highest value at the top down to its lowest, columns from the x dimension's lowest at the left,
// as in a plot. The cell nearest the black line is framed.

export const GRID_STEPS = 9;
const GAP = 2; // pixels between cells and around the picture: room for the frame

// n values from lo to hi, both included.
export function gridValues(lo, hi, n = GRID_STEPS) {
  return Array.from({ length: n }, (_, i) => lo + (i / (n - 1)) * (hi - lo));
}

// The grid's latents in picture order (row by row from the top): z with its xDim and yDim replaced.
export function gridLatents(z, xDim, yDim, xs, ys) {
  const latents = [];
  for (let r = ys.length - 1; r >= 0; r--) {
    for (const x of xs) {
      const row = z.slice();
      row[xDim] = x;
      row[yDim] = ys[r];
      latents.push(row);
    }
  }
  return latents;
}

// Whether v falls in a sweep's span, half a step beyond its ends included (the end cells' share).
export function within(values, v) {
  const half = Math.abs(values[1] - values[0]) / 2;
  return v >= Math.min(values[0], values.at(-1)) - half && v <= Math.max(values[0], values.at(-1)) + half;
}

export function nearest(values, v) {
  return values.reduce((best, value, i) => (Math.abs(value - v) < Math.abs(values[best] - v) ? i : best), 0);
}

// One grey picture of n x n images (each `width` x `height` bytes, white on black as the models draw them),
// with the cell at [row, column] `mark` framed in white (black on the page, which shows them inverted).
export function composeGrid(images, width, height, n, mark) {
  const W = n * width + (n + 1) * GAP, H = n * height + (n + 1) * GAP;
  const bytes = new Uint8Array(W * H);
  images.forEach((image, k) => {
    const top = GAP + Math.floor(k / n) * (height + GAP), left = GAP + (k % n) * (width + GAP);
    for (let y = 0; y < height; y++) bytes.set(image.subarray(y * width, (y + 1) * width), (top + y) * W + left);
  });
  if (mark) {
    const [row, column] = mark;
    const top = row * (height + GAP), left = column * (width + GAP);
    const bottom = top + height + 2 * GAP - 1, right = left + width + 2 * GAP - 1;
    for (let y = top; y <= bottom; y++) {
      for (let x = left; x <= right; x++) {
        const inside = y >= top + GAP && y <= bottom - GAP && x >= left + GAP && x <= right - GAP;
        if (!inside) bytes[y * W + x] = 255;
      }
    }
  }
  return { bytes, width: W, height: H };
}
