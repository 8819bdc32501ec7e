"""The pictures of docs/uses.md: an edit, an interpolation row and a text-diff row, each drawn
by the `dalle2` command that the page shows, from one trained model.

    python scripts/uses_pictures.py --model models:/unclip-emoji64@champion --name emoji64 \
        --a "grinning face, noto style" --b "red heart, noto style" \
        --edit "red heart, noto style" --source "grinning face, noto style" \
        --target "grinning face, twemoji style"
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dalle2.edges.cli import main as dalle2

ROOT = Path(__file__).resolve().parent.parent
SCALE = 2  # each 64 px image drawn at 128 px


def run(argv: list[str]) -> str:
    """Run one `dalle2` command; returns it as a user types it."""
    if dalle2(argv) != 0:
        raise SystemExit(f"dalle2 {shlex.join(argv)} failed")
    return "dalle2 " + shlex.join(argv)


def row(paths: list[Path], label: str) -> Image.Image:
    images = [Image.open(p).convert("RGB") for p in paths]
    side = images[0].width * SCALE
    canvas = Image.new("RGB", (side * len(images), side + 18), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        canvas.paste(im.resize((side, side), Image.Resampling.NEAREST), (i * side, 18))
        draw.rectangle((i * side, 18, (i + 1) * side - 1, side + 17), outline="gray")
    draw.text((4, 3), label, fill="black")
    return canvas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="what `dalle2 generate --model` takes")
    p.add_argument("--name", required=True, help="writes docs/uses-NAME.png")
    p.add_argument("--a", required=True, help="the first image's prompt")
    p.add_argument("--b", required=True, help="the second image's prompt")
    p.add_argument("--edit", required=True, help="what to draw in the first image's mask")
    p.add_argument("--source", required=True, help="textdiff --from")
    p.add_argument("--target", required=True, help="textdiff --to")
    p.add_argument(
        "--mask-box",
        type=float,
        nargs=4,
        default=[0, 0.5, 1, 1],
        metavar=("X0", "Y0", "X1", "Y1"),
        help="the region redrawn, in fractions of the side (default: the lower half)",
    )
    args = p.parse_args()
    model = ["--model", args.model, "--quiet", "--device", "cpu"]
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        commands = [run(["generate", args.a, args.b, "--out", str(t / "gen"), *model])]
        a, b = t / "gen" / "0000.png", t / "gen" / "0001.png"
        size = Image.open(a).width
        mask = np.zeros((size, size), np.uint8)
        x0, y0, x1, y1 = (round(f * size) for f in args.mask_box)
        mask[y0:y1, x0:x1] = 255  # white: redrawn
        Image.fromarray(mask).save(t / "mask.png")
        edit = ["edit", str(a), args.edit, "--mask", str(t / "mask.png"), "--num", "3"]
        commands.append(run([*edit, "--out", str(t / "edit"), *model]))
        interp = ["interpolate", str(a), str(b), "--num", "6", "--out", str(t / "interp")]
        commands.append(run([*interp, *model]))
        diff = ["textdiff", str(a), "--from", args.source, "--to", args.target, "--num", "5"]
        commands.append(run([*diff, "--out", str(t / "diff"), *model]))
        rows = [
            row(
                [a, t / "mask.png", *sorted((t / "edit").glob("*.png"))],
                "edit: image, mask, 3 edits",
            ),
            row(sorted((t / "interp").glob("*.png")), "interpolate: A ... B"),
            row(sorted((t / "diff").glob("*.png")), "textdiff: from ... to"),
        ]
        width = max(r.width for r in rows)
        sheet = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
        y = 0
        for r in rows:
            sheet.paste(r, (0, y))
            y += r.height
        out = ROOT / "docs" / f"uses-{args.name}.png"
        sheet.save(out)
    print(f"wrote {out}")
    for command in commands:
        print(command.replace(tmp, "TMP"))


if __name__ == "__main__":
    main()
