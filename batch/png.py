"""Grey-scale PNG bytes for many small images, fast: one zlib call per image, no image library.

A PNG of an 8-bit grey image is the signature, an IHDR chunk (the same for every image of one shape), one IDAT
chunk (zlib of the rows, each prefixed by filter byte 0) and IEND. Pillow reads the result back exactly.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
LEVEL = 1  # zlib level: for 28 x 28 digits level 6 is 5 % smaller and 3x slower (measured), 9 is 8x slower


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_many(images: np.ndarray, level: int = LEVEL) -> list[bytes]:
    """N x H x W uint8 -> N PNG files as bytes."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected N x H x W uint8 images, got {images.shape} {images.dtype}")
    n, height, width = images.shape
    head = SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    tail = _chunk(b"IEND", b"")
    rows = np.zeros((n, height, width + 1), np.uint8)  # filter byte 0 (None) before each row
    rows[:, :, 1:] = images
    compress, crc, pack = zlib.compress, zlib.crc32, struct.pack
    out = []
    for raw in rows.reshape(n, -1):
        data = compress(raw.tobytes(), level)
        out.append(b"".join((head, pack(">I", len(data)), b"IDAT", data, pack(">I", crc(data, crc(b"IDAT"))), tail)))
    return out


def decode_many(blobs: list[bytes]) -> np.ndarray:
    """PNG files -> N x H x W uint8 (grey; colour is converted), with pillow."""
    import io

    from PIL import Image

    arrays = []
    for blob in blobs:
        with Image.open(io.BytesIO(blob)) as img:
            arrays.append(np.asarray(img.convert("L"), dtype=np.uint8))
    return np.stack(arrays) if arrays else np.zeros((0, 0, 0), np.uint8)
