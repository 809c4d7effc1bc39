// Grey images on canvases. The models work white on black (MNIST); the page shows black on white, as the
// seed does, because that reads better (the page's lede says so). Canvases are the image's own size and scaled by CSS (pixelated).

export function paint(canvas, bytes, width, height) {
  if (canvas.width !== width || canvas.height !== height) { canvas.width = width; canvas.height = height; }
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  const data = image.data;
  for (let i = 0, j = 0; i < bytes.length; i++, j += 4) {
    const v = 255 - bytes[i];
    data[j] = v; data[j + 1] = v; data[j + 2] = v; data[j + 3] = 255;
  }
  ctx.putImageData(image, 0, 0);
}

export function blank(canvas) {
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
}

// Static pictures (thumbnails, strips) go into <img> elements, not canvases: Chromium re-produces every
// canvas layer on each frame it composites, so fifty small canvases cost a drag more than the decoding does.
const scratch = document.createElement("canvas");
export function toImage(img, bytes, width, height) {
  paint(scratch, bytes, width, height);
  img.src = scratch.toDataURL("image/png");
  img.width = width;
  img.height = height;
}
