r"""Minimal client for `python -m runtime.serve`: send a photo, save the generated image(s).

examples:
  python examples/client.py --face photo.jpg --prompt "a portrait, oil painting" --width 256 --height 256 \
      --out out.png
  python examples/client.py --pipeline ip-adapter --image cat.jpg --prompt "a cat" --num-images 2 --out cat.webp

Uses only the standard library plus httpx (copy it anywhere). Retries 429 / 503 answers (server busy
or warming up) after the server's Retry-After; on other errors (the server's answer, a missing photo,
a server it cannot reach) prints one line `error: ...` and exits 2 (-v: the traceback too).
"""
from __future__ import annotations

import argparse
import base64
import sys
import time
from pathlib import Path

import httpx


def generate(url: str, pipeline: str, photo: Path, fields: dict, retries: int = 5, timeout_s: float = 600) -> list[bytes]:
    """POST the photo (multipart) and the fields; returns the encoded images (1 or num_images)."""
    form = {key: str(value) for key, value in fields.items() if value is not None}
    if int(fields.get("num_images", 1)) > 1:
        form["output"] = "json"
    endpoint = f"{url.rstrip('/')}/v1/{pipeline}"
    for attempt in range(retries + 1):
        with photo.open("rb") as stream:
            try:
                response = httpx.post(endpoint, data=form, timeout=timeout_s,
                                      files={"image": (photo.name, stream, "application/octet-stream")})
            except httpx.TransportError as error:
                raise ClientError(f"could not reach {endpoint} ({type(error).__name__}: {error}): start the server "
                                  "(python -m runtime.serve --build DIR) or pass its --url") from error
        if response.status_code in (429, 503) and attempt < retries:
            wait = float(response.headers.get("retry-after", 1))
            print(f"server busy ({response.status_code}), retrying in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)
            continue
        break
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:500]
        raise ClientError(f"the server answered {response.status_code}: {message}")
    if response.headers["content-type"].startswith("image/"):
        return [response.content]
    return [base64.b64decode(item["data"]) for item in response.json()["images"]]


class ClientError(Exception):
    """A mistake or a failure the message explains (the server's answer, a missing photo, no server)."""


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes are a ClientError (one `error:` line), every default in the help."""

    def error(self, message: str):
        raise ClientError(f"{message} (see {self.prog} --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The examples keep their lines; an option's help ends with its default (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (action.default in (None, argparse.SUPPRESS) or isinstance(action.default, bool) or action.required
                or action.help is None or "default" in action.help):
            return action.help or ""
        return action.help + " (default: %(default)s)"


def parser() -> Parser:
    """The client's flags."""
    p = Parser(prog="python examples/client.py", description=__doc__.split("\n")[0],
               epilog=__doc__.split("\n\n")[1], formatter_class=HelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the server")
    p.add_argument("--pipeline", default="instantid", choices=["instantid", "ip-adapter", "ip-adapter-plus"],
                   help="the endpoint: /v1/PIPELINE")
    p.add_argument("--face", "--image", dest="photo", type=Path, required=True,
                   help="the face photo (instantid) or the reference image (ip-adapter)")
    p.add_argument("--prompt", required=True, help="text prompt")
    p.add_argument("--negative-prompt", help="negative prompt (default: the model's)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance; <= 1 disables it")
    p.add_argument("--ip-scale", type=float, help="strength of the face / image tokens (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--width", type=int, help="output width in px, with --height (default: the server's default size)")
    p.add_argument("--height", type=int, help="output height in px, with --width")
    p.add_argument("--num-images", type=int, default=1, help="images to generate (NAME-i.EXT each)")
    p.add_argument("--out", type=Path, required=True, help="out.png / .jpg / .webp (the suffix sets the format)")
    p.add_argument("-v", "--verbose", action="store_true", help="on an error, show the traceback too")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return run(argv)
    except (ClientError, httpx.HTTPError, OSError) as error:
        if "-v" in argv or "--verbose" in argv:
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2


def run(argv: list[str]) -> int:
    """Parse, post, write the image(s); ClientError (or httpx / OS errors) on failure."""
    args = parser().parse_args(argv)
    if (args.width is None) != (args.height is None):
        raise ClientError("give both --width and --height, or neither (the server's default size)")
    if not args.photo.is_file():
        raise ClientError(f"{args.photo}: no such file: give the path of a photo (JPEG, PNG or WebP)")
    fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(args.out.suffix.lower(), "png")
    fields = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
              "guidance": args.guidance, "ip_scale": args.ip_scale, "seed": args.seed, "width": args.width,
              "height": args.height, "num_images": args.num_images, "format": fmt}
    images = generate(args.url, args.pipeline, args.photo, fields)
    paths = [args.out] if len(images) == 1 else [args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}")
                                                 for i in range(len(images))]
    for data, path in zip(images, paths):
        path.write_bytes(data)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
