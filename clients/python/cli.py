"""`aevae encode IMAGE.png ...` and `aevae decode z1,z2,... -o out.png`: the client from a shell.

Pillow (the ui and report extras) is imported inside the commands, so the library never needs it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Callable, TypeVar

from aevae.services.settings import PORTS  # stdlib only

# Latents such as -1.5,0.2 start with "-": without this, argparse would take them for options.
_NUMBERS = re.compile(r"^-[0-9.]+([eE][-+]?\d+)?(,[-+]?[0-9.]+([eE][-+]?\d+)?)*$")
# The most pixels `aevae decode` writes into one PNG (64 Mi; 8192 x 8192): the row of images, upscaled by
# --scale, is built in memory first, and without a bound a large --scale ended in numpy's MemoryError.
MAX_PNG_PIXELS = 1 << 26

T = TypeVar("T")


def version_arg(text: str) -> int | None:
    """--version as argparse reads it: a version number from 1 to 2**63 - 1, or 0 for the newest, as in the
    API (a request's version 0 is the newest). 0 becomes None, the client's "newest": passed on as 0, the client
    refused it in Python's words ("expected None"). Anything else is refused naming the accepted range (the
    wire's, imported here: registering the commands imports no protobuf)."""
    from aevae.v1.tensors import MAX_VERSION

    try:
        number = int(text)
    except ValueError:
        number = -1
    if not 0 <= number <= MAX_VERSION:
        raise argparse.ArgumentTypeError(f"expected a version number from 1 to {MAX_VERSION:,} or 0 for the "
                                         f"newest, got {text!r}")
    return number or None


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("encode", help="encode images (PNG, JPEG, ...) to latents through the encoder service")
    e.add_argument("images", nargs="+", metavar="IMAGE", help="grey or colour images in the model's image shape "
                   "or its shape before padding (32x32 or 28x28 for MNIST models; other sizes are resized to "
                   "the latter, which the service pads; at most 16,777,216 pixels, as encode-batch); white digit "
                   "on black, like MNIST")
    e.add_argument("--encoder", default=f"127.0.0.1:{PORTS['encoder']}", metavar="HOST:PORT")
    e.add_argument("--model", default="vae", help="model name in the repository (default vae)")
    e.add_argument("--version", type=version_arg, default=None, help="model version, 0 for the newest (default)")
    e.add_argument("--invert", action="store_true", help="invert the images first (dark digit on light paper)")
    e.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30; over 1e9: no deadline)")
    add_security_arguments(e)
    e.set_defaults(func=encode)

    d = sub.add_parser("decode", help="decode latents to a PNG through the decoder service",
                       epilog="Example: aevae decode 0.5,-1.2,0.3,2.0 -o digit.png (several latents: a row)")
    d.add_argument("latents", nargs="+", metavar="Z1,Z2,...", help="one comma-separated latent vector per image")
    d.add_argument("-o", "--output", required=True, help="PNG to write (several latents: one row of images); - "
                                                          "writes the PNG to standard output")
    d.add_argument("--decoder", default=f"127.0.0.1:{PORTS['decoder']}", metavar="HOST:PORT")
    d.add_argument("--model", default="vae", help="model name in the repository (default vae)")
    d.add_argument("--version", type=version_arg, default=None, help="model version, 0 for the newest (default)")
    d.add_argument("--scale", type=int, default=1, help="upscale the PNG by this integer factor (default 1; the PNG "
                                                        f"may have at most {MAX_PNG_PIXELS:,} pixels)")
    d.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30; over 1e9: no deadline)")
    add_security_arguments(d)
    d._negative_number_matcher = _NUMBERS
    d.set_defaults(func=decode)


def add_security_arguments(p: argparse.ArgumentParser) -> None:
    """How a command reaches TLS and token-protected services (default: the AEVAE_* variables)."""
    g = p.add_argument_group("TLS and token (default: AEVAE_TOKEN, AEVAE_TOKEN_FILE, AEVAE_TLS_CA, "
                                 "AEVAE_TLS_CERT, AEVAE_TLS_KEY)")
    g.add_argument("--token-file", default=None, metavar="FILE", help="file holding the services' bearer token")
    g.add_argument("--tls-ca", default=None, metavar="PEM", help="CA that signed the services' certificate: TLS")
    g.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate, for mutual TLS")
    g.add_argument("--tls-key", default=None, metavar="PEM", help="the client certificate's key")


def security_options(args: argparse.Namespace) -> dict:
    """The client keyword arguments of `add_security_arguments`' options that were given."""
    names = ("token_file", "tls_ca", "tls_cert", "tls_key")
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def connect(client: Callable[..., T], target: str, args: argparse.Namespace) -> T:
    """The client of `target` with the command's timeout and TLS and token options. What is wrong with those
    (a token file that cannot be read, a PEM that is no certificate) is the command's own error, said as such:
    prefixed with the address like the server's answers, it read as if the server had refused the call."""
    from aevae.client import AevaeError
    from aevae.errors import UserError

    try:
        return client(target, timeout=args.timeout, **security_options(args))
    except AevaeError as exc:
        raise UserError(exc.details()) from None


def _pillow():
    from aevae.errors import UserError

    try:
        from PIL import Image
    except ModuleNotFoundError:
        raise UserError("reading and writing images needs pillow: pip install 'aevae[ui]'") from None
    return Image


def _read_image(path: str, invert: bool, shapes: list[tuple[int, int]]):
    """A grey uint8 image in one of the model's accepted (height, width) shapes; else resized to the last."""
    import re
    import warnings

    import numpy as np

    from aevae.batch.png import MAX_PIXELS, grey8  # encode-batch's bound and reading, for the same answers here
    from aevae.errors import UserError

    Image = _pillow()
    try:
        with warnings.catch_warnings():  # Pillow warns of big images as it opens them: they are refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
    except Image.DecompressionBombError as exc:  # past twice Pillow's own bound, refused as it opens: a traceback
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise UserError(f"cannot read image {path}: {pixels}, over the limit of {MAX_PIXELS:,}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None
    try:
        with opened as img:
            if img.width * img.height > MAX_PIXELS:
                raise UserError(f"cannot read image {path}: {img.width * img.height:,} pixels, over the limit of "
                                f"{MAX_PIXELS:,}")
            grey = Image.fromarray(grey8(img, "it"))  # ValueError below: "cannot read image P: it is ..."
            if (grey.size[1], grey.size[0]) not in shapes:
                h, w = shapes[-1]
                print(f"{path}: resized from {grey.size[0]}x{grey.size[1]} to {w}x{h}", file=sys.stderr)
                grey = grey.resize((w, h), Image.Resampling.LANCZOS)
            array = np.asarray(grey, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from None
    return 255 - array if invert else array


def encode(args: argparse.Namespace) -> int:
    import numpy as np

    from aevae.errors import UserError, require_positive
    from aevae.client import AevaeError, EncoderClient

    require_positive("--timeout", args.timeout)
    try:
        with connect(EncoderClient, args.encoder, args) as client:
            served = {m.name: m for m in client.list_models()}
            if args.model not in served:
                raise UserError(f"{args.encoder} serves no model {args.model!r}; it serves {sorted(served)}")
            h, w = served[args.model].image_shape[:2]
            shapes = [(h, w), (h - 4, w - 4)] if h > 4 and w > 4 else [(h, w)]  # padded by 2 per side, or not
            images = [_read_image(path, args.invert, shapes) for path in args.images]
            # Images of the two shapes travel in separate calls: one tensor has one shape.
            rows = {}
            for size in sorted({img.shape for img in images}):
                chosen = [i for i, img in enumerate(images) if img.shape == size]
                result = client.encode(np.stack([images[i] for i in chosen]), model=args.model, version=args.version)
                rows.update({i: (result, j) for j, i in enumerate(chosen)})
    except AevaeError as exc:
        raise UserError(f"{args.encoder}: {exc}") from None
    for i, path in enumerate(args.images):
        result, j = rows[i]
        line = ",".join(f"{v:.4f}" for v in result.mean[j])
        extra = "" if result.logvar is None else "  logvar " + ",".join(f"{v:.4f}" for v in result.logvar[j])
        say(f"{path}\t{result.model}/{result.version}\t{line}{extra}")
    return 0


def say(line: str, stream: Any = None) -> None:
    """Prints a line of a command's output. A stdout that cannot take it (a full disk, a closed pipe: `| head
    -0`) was a traceback and exit 1, and a path the terminal's encoding cannot show (PYTHONIOENCODING=ascii)
    one more: UserError naming stdout; an unencodable character is written escaped."""
    from aevae.errors import UserError

    from aevae.output import silence, write_text

    stream = stream or sys.stdout
    try:
        write_text(stream, line + "\n")
        stream.flush()
    except OSError as exc:
        silence(stream)
        raise UserError(f"cannot write to {'standard output' if stream is sys.stdout else 'its stream'}: "
                        f"{exc.strerror or exc}") from None


def write_image(Image: Any, row: Any, output: str) -> None:
    """Writes the PNG whole or not at all: into a temporary beside `output`, renamed over it once complete.
    Written in place, a full disk or a file-size limit left a truncated file where an earlier image was, which
    was lost. `-` writes the PNG to standard output."""
    import io

    from aevae.output import silence, write_whole

    if output == "-":
        data = io.BytesIO()
        Image.fromarray(row).save(data, format="PNG")
        try:
            sys.stdout.buffer.write(data.getvalue())
            sys.stdout.flush()
        except OSError:
            silence(sys.stdout)
            raise
        return
    if os.path.isdir(output):  # pillow said "unknown file extension:", the name a folder has not
        raise ValueError("it is a folder; name the PNG file to write, e.g. -o digit.png")
    extension = os.path.splitext(output)[1].lower()
    image_format = Image.registered_extensions().get(extension) if extension else "PNG"
    if image_format is None:
        raise ValueError(f"unknown file extension: {extension}")
    # a short temporary name, so that an output name near the file system's limit still has one
    write_whole(output, lambda tmp: Image.fromarray(row).save(tmp, format=image_format),
                tmp=f".aevae-{os.getpid()}.partial")


def check_png_size(count: int, height: int, width: int, scale: int) -> None:
    """UserError when `count` images of height x width side by side, upscaled by `scale`, would make a PNG of
    more than MAX_PNG_PIXELS: checked before the row is built, so the answer is a sentence, not a MemoryError."""
    import math

    from aevae.errors import UserError

    pixels = count * height * width * scale * scale
    if pixels <= MAX_PNG_PIXELS:
        return
    largest = math.isqrt(MAX_PNG_PIXELS // max(1, count * height * width))
    images = f"{count} image{'s' if count > 1 else ''} of {width}x{height}"
    fix = f"--scale at most {largest}" if largest >= 1 else "fewer latents per PNG"
    raise UserError(f"--scale {scale} would make a PNG of {width * count * scale:,} x {height * scale:,} = {pixels:,} "
                    f"pixels; at most {MAX_PNG_PIXELS:,} are written ({images}: {fix})")


def decode(args: argparse.Namespace) -> int:
    import numpy as np

    from aevae.errors import UserError, require_positive
    from aevae.client import AevaeError, DecoderClient
    from aevae.output import closed_at_start

    require_positive("--timeout", args.timeout)
    rows = []
    for position, z in enumerate(args.latents, 1):
        try:
            rows.append([float(v) for v in z.split(",")])
        except ValueError:  # the one that is not, by position: the whole list (20,000 latents) said nothing
            shown = z if len(z) <= 80 else z[:77] + "..."
            raise UserError(f"latents must be comma-separated numbers such as 0.5,-1.2,0.3,2.0; latent {position} "
                            f"of {len(args.latents)} is {shown!r}") from None
    if len({len(row) for row in rows}) > 1:  # numbers all, but not one array: not "must be numbers"
        raise UserError(f"every latent needs as many values as the model's latent dimension; got latents of "
                        f"{', '.join(str(len(row)) for row in rows)} values")
    # float64 as typed: the client names a value beyond float32's range (cast here, it became an infinity the
    # user never typed, with numpy's overflow warning)
    latents = np.array(rows, dtype=np.float64)
    if args.scale < 1:
        raise UserError(f"--scale must be a positive integer, got {args.scale}")
    if args.output == "-" and 1 in closed_at_start:
        raise UserError("-o -: standard output was closed when the command started (>&-), and the PNG would be "
                        "lost; name a file, or give standard output a file or pipe")
    Image = _pillow()
    try:
        with connect(DecoderClient, args.decoder, args) as client:
            decoded = client.decode_result(latents, model=args.model, version=args.version, dtype="uint8")
    except AevaeError as exc:
        raise UserError(f"{args.decoder}: {exc}") from None
    images = decoded.images
    check_png_size(len(images), images.shape[1], images.shape[2], args.scale)
    row = np.concatenate(list(images), axis=1)
    if args.scale > 1:
        row = row.repeat(args.scale, axis=0).repeat(args.scale, axis=1)
    try:
        write_image(Image, row, args.output)
    except (OSError, ValueError) as exc:
        where = "standard output" if args.output == "-" else args.output
        raise UserError(f"cannot write {where}: {exc}") from None
    # the summary on stderr when the PNG itself went to stdout
    say(f"wrote {'the PNG to standard output' if args.output == '-' else args.output} ({len(images)} "
        f"image{'s' if len(images) > 1 else ''} of {decoded.model}/{decoded.version}, {row.shape[1]}x{row.shape[0]})",
        sys.stderr if args.output == "-" else None)
    return 0
