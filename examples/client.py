"""Minimal client for `python -m runtime.serve`: send a photo, save the generated image(s).

    python examples/client.py --face photo.jpg --prompt "a portrait, oil painting" --out out.png
    python examples/client.py --pipeline ip-adapter --face cat.jpg --prompt "a cat" --num-images 2 --out cat.webp

Uses only the standard library plus httpx. Retries 429 / 503 answers (server busy or warming up)
after the server's Retry-After; prints the server's message and exits 2 on other errors.
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
    for attempt in range(retries + 1):
        with photo.open("rb") as stream:
            response = httpx.post(f"{url.rstrip('/')}/v1/{pipeline}", data=form, timeout=timeout_s,
                                  files={"image": (photo.name, stream, "application/octet-stream")})
        if response.status_code in (429, 503) and attempt < retries:
            wait = float(response.headers.get("retry-after", 1))
            print(f"server busy ({response.status_code}), retrying in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)
            continue
        break
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except ValueError:
            message = response.text[:500]
        raise RuntimeError(f"{response.status_code}: {message}")
    if response.headers["content-type"].startswith("image/"):
        return [response.content]
    return [base64.b64decode(item["data"]) for item in response.json()["images"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pipeline", default="instantid", choices=["instantid", "ip-adapter", "ip-adapter-plus"])
    parser.add_argument("--face", "--image", dest="photo", type=Path, required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--ip-scale", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True, help="out.png / .jpg / .webp (the suffix sets the format)")
    args = parser.parse_args(argv)
    fmt = {".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}.get(args.out.suffix.lower(), "png")
    fields = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
              "guidance": args.guidance, "ip_scale": args.ip_scale, "seed": args.seed, "width": args.width,
              "height": args.height, "num_images": args.num_images, "format": fmt}
    try:
        images = generate(args.url, args.pipeline, args.photo, fields)
    except (RuntimeError, httpx.HTTPError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = [args.out] if len(images) == 1 else [args.out.with_name(f"{args.out.stem}-{i}{args.out.suffix}")
                                                 for i in range(len(images))]
    for data, path in zip(images, paths):
        path.write_bytes(data)
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
