// A drawing pad, and the MNIST preparation of what was drawn: the ink's bounding box scaled to fit 20 x 20,
// placed in a 28 x 28 image with its centre of mass in the middle, white on black.
// By keyboard: with the pad focused, the arrow keys move a pen (shown by `pen`, an element over the canvas)
// and Space or Enter lifts or lowers it; a lowered pen draws as it moves.

export function drawingPad(canvas, pen = null) {
  const ctx = canvas.getContext("2d", { willReadFrequently: true }); // read back by toMnist
  let last = null;
  let inked = false;

  function clear() {
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    inked = false;
  }

  function point(event) {
    const rect = canvas.getBoundingClientRect();
    return [(event.clientX - rect.left) * canvas.width / rect.width,
            (event.clientY - rect.top) * canvas.height / rect.height];
  }

  function stroke(from, to) {
    ctx.strokeStyle = "#000";
    ctx.lineWidth = canvas.width / 11;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from[0], from[1]);
    ctx.lineTo(to[0], to[1]);
    ctx.stroke();
    inked = true;
  }

  canvas.addEventListener("pointerdown", (event) => {
    canvas.setPointerCapture(event.pointerId);
    last = point(event);
    stroke(last, [last[0] + 0.01, last[1]]);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const p = point(event);
    stroke(last, p);
    last = p;
  });
  const end = () => { last = null; };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);

  const keyboard = { x: canvas.width / 2, y: canvas.height / 2, down: false };
  function showPen() {
    if (!pen) return;
    pen.style.left = `${(keyboard.x / canvas.width) * canvas.clientWidth + canvas.offsetLeft}px`;
    pen.style.top = `${(keyboard.y / canvas.height) * canvas.clientHeight + canvas.offsetTop}px`;
    pen.classList.toggle("down", keyboard.down);
  }
  canvas.addEventListener("focus", () => { // the pen only for the keyboard, not after a click
    if (pen && canvas.matches(":focus-visible")) { pen.hidden = false; showPen(); }
  });
  canvas.addEventListener("blur", () => { if (pen) pen.hidden = true; });
  canvas.addEventListener("keydown", (event) => {
    const step = (canvas.width / 28) * (event.shiftKey ? 3 : 1);
    const moves = { ArrowLeft: [-step, 0], ArrowRight: [step, 0], ArrowUp: [0, -step], ArrowDown: [0, step] };
    if (event.key === " " || event.key === "Enter") {
      keyboard.down = !keyboard.down;
      if (keyboard.down) stroke([keyboard.x, keyboard.y], [keyboard.x + 0.01, keyboard.y]);
    } else if (moves[event.key]) {
      const from = [keyboard.x, keyboard.y];
      keyboard.x = Math.min(canvas.width, Math.max(0, keyboard.x + moves[event.key][0]));
      keyboard.y = Math.min(canvas.height, Math.max(0, keyboard.y + moves[event.key][1]));
      if (keyboard.down) stroke(from, [keyboard.x, keyboard.y]);
    } else {
      return;
    }
    event.preventDefault();
    if (pen) pen.hidden = false;
    showPen();
  });
  clear();

  return { clear, isEmpty: () => !inked, toMnist: () => toMnist(canvas) };
}

// Returns a Uint8Array of 28 * 28 pixels (white ink on black), or null when nothing was drawn.
export function toMnist(canvas) {
  const { width, height } = canvas;
  const src = canvas.getContext("2d", { willReadFrequently: true }).getImageData(0, 0, width, height).data;
  let x0 = width, y0 = height, x1 = -1, y1 = -1;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (src[(y * width + x) * 4] < 250) {
        if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
      }
    }
  }
  if (x1 < 0) return null;
  const w = x1 - x0 + 1, h = y1 - y0 + 1;
  const scale = 20 / Math.max(w, h);
  const tw = Math.max(1, Math.round(w * scale)), th = Math.max(1, Math.round(h * scale));

  // scale the ink box down to at most 20 x 20 (the browser's smoothing averages, like MNIST's anti-aliasing)
  const small = document.createElement("canvas");
  small.width = tw; small.height = th;
  const sctx = small.getContext("2d", { willReadFrequently: true });
  sctx.imageSmoothingEnabled = true;
  sctx.imageSmoothingQuality = "high";
  sctx.drawImage(canvas, x0, y0, w, h, 0, 0, tw, th);
  const ink = sctx.getImageData(0, 0, tw, th).data;

  let mass = 0, mx = 0, my = 0;
  const values = new Float32Array(tw * th);
  for (let i = 0; i < tw * th; i++) {
    const v = 255 - ink[i * 4];
    values[i] = v;
    mass += v; mx += v * (i % tw); my += v * Math.floor(i / tw);
  }
  const cx = mass ? mx / mass : tw / 2, cy = mass ? my / mass : th / 2;
  const ox = Math.round(14 - cx - 0.5), oy = Math.round(14 - cy - 0.5);
  const out = new Uint8Array(28 * 28);
  for (let y = 0; y < th; y++) {
    for (let x = 0; x < tw; x++) {
      const X = x + ox, Y = y + oy;
      if (X >= 0 && X < 28 && Y >= 0 && Y < 28) out[Y * 28 + X] = Math.min(255, Math.round(values[y * tw + x]));
    }
  }
  return out;
}
