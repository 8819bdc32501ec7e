"""The emoji source (dalle2/data/emoji.py) on small tarballs in the four npm packages' own layouts.

The builder, the download step over loopback, the refusals, the holdout rules and the tiny
pipeline through ZenML, all offline: the tests write the tarballs and pin their hashes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import re
import shutil
import sys
import tarfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import register_stack
from PIL import Image
from test_download import _read_samples
from test_pipeline_e2e import BIN, PIPELINE, REPO, run

from dalle2.config import ConfigError, DataConfig, HoldoutRule, parse_config
from dalle2.data import emoji
from dalle2.data.download import (
    DOWNLOADS_DIR,
    SOURCE_FILE,
    DownloadError,
    dataset_key,
    prepare_dataset,
    serve_directory,
)
from dalle2.data.shards import Holdout
from dalle2.preflight import check_resources

# ----------------------------------------------------------------------------- the test set

TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
TONED = {"1F44B": "waving hand", "1F44D": "thumbs up"}  # each with five skins
PLAIN = {
    "1F600": "grinning face",
    "2764": "red heart",  # FE0F in the datasource file names, never in emojibase's
    "1F308": "rainbow",
    "2B50": "star",
    "1F34E": "red apple",
    "1F91A": "raised back of hand",
}
FRANCE, BOUVET, NORWAY = "1F1EB-1F1F7", "1F1E7-1F1FB", "1F1F3-1F1F4"
FLAGS = {FRANCE: "flag: France", BOUVET: "flag: Bouvet Island", NORWAY: "flag: Norway"}
SKINS = {f"{b}-{t}": f"{name}: {tone}" for b, name in TONED.items() for t, tone in TONES.items()}
LABELS = PLAIN | TONED | SKINS | FLAGS
MERGED = "1F44B-1F3FD"  # noto's medium-toned waving hand is its base's picture
UNNAMED = "E50A"  # a project's own extra, no CLDR name
UNREADABLE = "1F34E"  # twemoji's red apple file is not a PNG
# noto draws Norway's flag like Bouvet Island's: both are dropped

# the code points each style's package has a picture of
CODES = {
    "noto": [*PLAIN, *TONED, *SKINS, *FLAGS],
    "twemoji": [*PLAIN, *TONED, *SKINS, FRANCE],
    "fluent": [*PLAIN, *TONED, *(c for c in SKINS if c.startswith("1F44B")), FRANCE],
    "openmoji": [*(c for c in PLAIN if c != "1F308"), *TONED, *SKINS, FRANCE],  # 1F308: black only
}
# the (label) captions each style must give, by the rules of the module docstring
EXPECTED = {
    "noto": {LABELS[c] for c in CODES["noto"]} - {SKINS[MERGED], FLAGS[BOUVET], FLAGS[NORWAY]},
    "twemoji": {LABELS[c] for c in CODES["twemoji"]} - {PLAIN[UNREADABLE]},
    "fluent": {LABELS[c] for c in CODES["fluent"]},
    "openmoji": {LABELS[c] for c in CODES["openmoji"]},
}
STYLES = tuple(CODES)
WHITE = np.array([255, 255, 255], np.uint8)
DARK_RULE = HoldoutRule(
    name="dark_tone", match=": dark skin tone, ", fraction=0.5, group_ignore=", [a-z]+ style$"
)


def colour(style: str, code: str) -> tuple[int, int, int]:
    """A distinct colour per picture, never near white."""
    if style == "noto" and code in (MERGED, NORWAY):  # the identical pairs
        code = {MERGED: "1F44B", NORWAY: BOUVET}[code]
    r, g, b = hashlib.blake2b(f"{style}:{code}".encode(), digest_size=3).digest()
    return r // 2, g // 2, b // 2


def chars(code: str) -> str:
    return "".join(chr(int(p, 16)) for p in code.split("-"))


def rgba_picture(rgb: tuple[int, int, int], size: int = 64) -> np.ndarray:
    """(size, size, 4): a solid square on fully transparent pixels whose RGB is not white
    (the colour a file leaves under alpha 0 is arbitrary), and a half-transparent black row."""
    out = np.zeros((size, size, 4), np.uint8)
    out[..., :3] = (255, 0, 0)  # transparent red
    lo, hi = size // 4, 3 * size // 4
    out[lo:hi, lo:hi] = (*rgb, 255)
    out[size - 4] = (0, 0, 0, 128)
    return out


def png(rgb: tuple[int, int, int], mode: str, size: int = 64) -> bytes:
    """The picture as a PNG file of `mode` (RGBA, LA, P with a transparent index, or RGB)."""
    rgba = rgba_picture(rgb, size)
    if mode == "RGBA":
        image = Image.fromarray(rgba, "RGBA")
    elif mode == "LA":
        image = Image.fromarray(rgba, "RGBA").convert("LA")
    elif mode == "P":  # index 0 is red, marked transparent; index 1 the square's colour
        image = Image.fromarray((rgba[..., 3] == 255).astype(np.uint8), "P")
        image.putpalette([255, 0, 0, *rgb])
        image.info["transparency"] = 0
    else:
        white = Image.new("RGBA", (size, size), (255, 255, 255, 255))
        image = Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def composited(blob: bytes) -> np.ndarray:
    """The oracle: a PNG's pixels over white by the alpha formula, computed in numpy."""
    rgba = np.asarray(Image.open(io.BytesIO(blob)).convert("RGBA")).astype(np.float64)
    alpha = rgba[..., 3:] / 255
    return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


MODES = {"1F600": "RGBA", "2764": "P", "1F308": "LA", "2B50": "RGB"}  # noto's file modes


def datasource(vendor: str, style: str) -> dict[str, bytes]:
    """emoji-datasource-<vendor>: img/<vendor>/64/<lowercase hex>.png and emoji.json."""
    files: dict[str, bytes] = {}
    for code in CODES[style]:
        name = (code + ("-FE0F" if code == "2764" else "")).lower()
        size = 72 if (style, code) == ("twemoji", "2B50") else 64  # one to resize
        blob = png(
            colour(style, code), MODES.get(code, "RGBA") if style == "noto" else "RGBA", size
        )
        if (style, code) == ("twemoji", UNREADABLE):
            blob = b"<html>not a png</html>"
        files[f"img/{vendor}/64/{name}.png"] = blob
    if style == "noto":
        files[f"img/{vendor}/64/{UNNAMED.lower()}.png"] = png((1, 2, 3), "RGBA")
    rows = [{"unified": c, "image": f"{c.lower()}.png", f"has_img_{vendor}": True} for c in LABELS]
    files["emoji.json"] = json.dumps(rows).encode()
    return files


def rect(rgb: tuple[int, int, int]) -> str:
    return '<rect x="8" y="8" width="16" height="16" fill="#{:02x}{:02x}{:02x}"/>'.format(*rgb)


def fluent() -> dict[str, bytes]:
    """@iconify-json/fluent-emoji-flat: icons.json (32 px SVG bodies, aliases) + chars.json."""
    icons, char_map = {}, {}
    for code in CODES["fluent"]:
        name = re.sub(r"[^a-z]+", "-", LABELS[code].lower()).strip("-")
        char_map[(code + ("-fe0f" if code == "2764" else "")).lower()] = name
        if code == "1F91A":
            continue  # an alias, below
        rgb = colour("fluent", code)
        if code == "1F44B":  # asymmetric, so a mirror image differs
            body = (
                '<rect x="2" y="6" width="12" height="20" fill="#{:02x}{:02x}{:02x}"/>'.format(*rgb)
                + '<circle cx="24" cy="16" r="5" fill="#000000"/>'
            )
        elif code in PLAIN:
            body = '<circle cx="16" cy="16" r="9" fill="#{:02x}{:02x}{:02x}"/>'.format(*rgb)
        else:
            body = rect(rgb)
        icons[name] = {"body": body}
    aliases = {"raised-back-of-hand": {"parent": "waving-hand", "hFlip": True}}
    data = {"prefix": "fluent-emoji-flat", "icons": icons, "aliases": aliases}
    data |= {"width": 32, "height": 32, "lastModified": 0}
    return {"icons.json": json.dumps(data).encode(), "chars.json": json.dumps(char_map).encode()}


def openmoji_svg(fill: str) -> bytes:
    return (
        '<svg id="emoji" viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg">'
        f'<g id="color"><rect x="18" y="18" width="36" height="36" fill="{fill}"/></g>'
        '<g id="line"><rect x="18" y="18" width="36" height="36" fill="none" stroke="#000000" '
        'stroke-linejoin="round" stroke-width="2"/></g></svg>'
    ).encode()


def openmoji() -> dict[str, bytes]:
    """openmoji: color/svg/<HEX>.svg, black/svg/<HEX>.svg (line art) and data/openmoji.json."""
    files = {
        f"color/svg/{c}.svg": openmoji_svg("#{:02x}{:02x}{:02x}".format(*colour("openmoji", c)))
        for c in CODES["openmoji"]
    }
    for c in ("1F600", "1F308"):  # the line art; 1F308 has none in colour
        files[f"black/svg/{c}.svg"] = openmoji_svg("#000000")
    rows = [{"emoji": chars(c), "hexcode": c, "annotation": LABELS[c]} for c in CODES["openmoji"]]
    files["data/openmoji.json"] = json.dumps(rows).encode()
    return files


def emojibase() -> dict[str, bytes]:
    """emojibase-data: en/data.json, skins nested under their base."""

    def entry(code: str, label: str, group: int, order: int) -> dict:
        return {
            "label": label,
            "hexcode": code,
            "emoji": chars(code),
            "text": "",
            "type": 1,
            "order": order,
            "group": group,
            "tags": label.split(),
        }

    data = []
    for i, (code, label) in enumerate([*PLAIN.items(), *TONED.items(), *FLAGS.items()]):
        e = entry(code, label, 9 if code in FLAGS else 1 if code in TONED else 0, i)
        if code in TONED:
            e["skins"] = [
                {**entry(f"{code}-{t}", f"{label}: {tone}", 1, i), "tone": n}
                for n, (t, tone) in enumerate(TONES.items(), 1)
            ]
        data.append(e)
    return {"en/data.json": json.dumps(data).encode()}


def write_tgz(path: Path, pkg: emoji.Package, files: dict[str, bytes]) -> Path:
    """An npm tarball: gzipped tar, every member under package/, package.json included."""
    meta = {"package.json": json.dumps({"name": pkg.name, "version": pkg.version}).encode()}
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in sorted((meta | files).items()):
            info = tarfile.TarInfo(f"package/{name}")
            info.size, info.mtime = len(blob), 499162500  # npm's fixed 1985-10-26 mtime
            tar.addfile(info, io.BytesIO(blob))
    return path


@functools.cache
def package_files() -> dict[str, dict[str, bytes]]:
    """Each package's files under package/, by "names" or style."""
    return {
        "names": emojibase(),
        "noto": datasource("google", "noto"),
        "twemoji": datasource("twitter", "twemoji"),
        "fluent": fluent(),
        "openmoji": openmoji(),
    }


def real_packages() -> dict[str, emoji.Package]:
    return {"names": emoji.NAMES, **emoji.STYLES}


@pytest.fixture(scope="module")
def tarballs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The five tarballs, named as `npm pack` names the real packages."""
    folder = tmp_path_factory.mktemp("tarballs")
    real = real_packages()
    return {
        k: write_tgz(folder / real[k].filename, real[k], files)
        for k, files in package_files().items()
    }


def pinned(tarballs: dict[str, Path]) -> dict[str, emoji.Package]:
    """The real packages' names and versions, pinned to the test tarballs' hashes."""
    real = real_packages()
    return {
        k: dataclasses.replace(real[k], integrity=emoji.integrity_of(path))
        for k, path in tarballs.items()
    }


def pin(mp: pytest.MonkeyPatch, tarballs: dict[str, Path], cache: Path) -> dict[str, emoji.Package]:
    """Point dalle2.data.emoji at the test tarballs: pinned, cached where `npm pack` puts them."""
    (cache / "npm").mkdir(parents=True, exist_ok=True)
    pins = pinned(tarballs)
    for key, pkg in pins.items():
        shutil.copy(tarballs[key], cache / "npm" / pkg.filename)
        if key == "names":
            mp.setattr(emoji, "NAMES", pkg)
        else:
            mp.setitem(emoji.STYLES, key, pkg)
    mp.setenv("DALLE2_CACHE_DIR", str(cache))
    return pins


@pytest.fixture
def cache(tarballs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's cache folder holding the pinned test tarballs."""
    pin(monkeypatch, tarballs, tmp_path / "user-cache")
    return tmp_path / "user-cache"


class Built(NamedTuple):
    """What emoji.build wrote: its folder, its index and its log."""

    out: Path
    frame: pd.DataFrame
    log: str  # what the builder logged

    def image(self, caption: str) -> np.ndarray:
        (rel,) = self.frame.loc[self.frame["caption"] == caption, "rel"]
        return np.asarray(Image.open(self.out / rel))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def built(tarballs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The builder's output over all four styles, flags included."""
    root = tmp_path_factory.mktemp("built")
    (root / "out").mkdir()
    handler = _Records()
    logger = logging.getLogger(emoji.__name__)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp:
            pin(mp, tarballs, root / "cache")
            frame = emoji.build(root / "out", STYLES, cache=root / "cache", progress=False)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return Built(root / "out", frame, "\n".join(handler.messages))


def source_png(style: str, code: str) -> bytes:
    vendor = {"noto": "google", "twemoji": "twitter"}[style]
    name = (code + ("-FE0F" if code == "2764" else "")).lower()
    return package_files()[style][f"img/{vendor}/64/{name}.png"]


def one_line(err: pytest.ExceptionInfo[BaseException]) -> str:
    """The error's message, checked to be a single line."""
    message = str(err.value)
    assert "\n" not in message and message.strip() == message, message
    return message


# ----------------------------------------------------------------------------- the builder


def test_captions_are_the_cldr_name_and_the_style(built: Built) -> None:
    for style in STYLES:
        rows = built.frame[built.frame["style"] == style]
        assert set(rows["caption"]) == {f"{label}, {style} style" for label in EXPECTED[style]}
        assert all(Path(rel).parts[0] == style for rel in rows["rel"])
    assert built.frame["caption"].is_unique
    assert "waving hand: dark skin tone, noto style" in set(built.frame["caption"])
    assert "red heart, twemoji style" in set(built.frame["caption"])  # 2764-fe0f.png
    pd.testing.assert_frame_equal(pd.read_parquet(built.out / "index.parquet"), built.frame)


def test_every_image_is_rgb_64px_composited_on_white(built: Built) -> None:
    for code, mode in MODES.items():  # the sources do hold every kind of file
        assert Image.open(io.BytesIO(source_png("noto", code))).mode == mode
    code_of = {label: code for code, label in LABELS.items()}
    for rel, text, style in built.frame.itertuples(index=False):
        image = Image.open(built.out / rel)
        assert (image.mode, image.size) == ("RGB", (64, 64)), rel
        pixels = np.asarray(image)
        code = code_of[text.removesuffix(f", {style} style")]
        # every source leaves its corner fully transparent, with red (or black) beneath
        assert (pixels[0, 0] == WHITE).all(), f"{text}: a transparent pixel is not white"
        if style in ("noto", "twemoji") and (style, code) != ("twemoji", "2B50"):
            # RGBA, P with a transparent index, LA and RGB files: the alpha formula, exactly
            diff = np.abs(pixels.astype(int) - composited(source_png(style, code)))
            assert diff.max() <= 1, f"{text} ({MODES.get(code, 'RGBA')}) is not composited"
        elif code not in ("1F44B", "1F91A") or style != "fluent":  # those two: hflip test
            assert np.abs(pixels[32, 32].astype(int) - colour(style, code)).max() <= 2, text
    # the 72 px twemoji star was resized as if drawn on white: no transparent red bleeds in
    on_white = Image.fromarray(composited(source_png("twemoji", "2B50")))
    expected = np.asarray(on_white.resize((64, 64), Image.LANCZOS)).astype(int)
    # (8-bit premultiplied rounding stays within 6 levels; a straight-alpha resize is 31 off)
    assert np.abs(built.image("star, twemoji style").astype(int) - expected).max() <= 10


def test_a_skin_variant_identical_to_its_base_is_merged_under_the_base_caption(
    built: Built,
) -> None:
    captions = set(built.frame["caption"])
    assert "waving hand: medium skin tone, noto style" not in captions
    merged = composited(source_png("noto", MERGED))
    assert np.array_equal(built.image("waving hand, noto style"), merged)
    assert sum(np.array_equal(built.image(c), merged) for c in captions if "noto" in c) == 1
    for tone in set(TONES.values()) - {"medium skin tone"}:  # drawn apart: each kept
        assert f"waving hand: {tone}, noto style" in captions
    assert "waving hand: medium skin tone, twemoji style" in captions  # drawn apart there
    assert "merged as identical" in built.log and "1 merged" in built.log


def test_identical_skin_variants_unlike_their_base_are_dropped(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = dict(package_files()["twemoji"])
    light = files["img/twitter/64/1f44d-1f3fb.png"]
    files["img/twitter/64/1f44d-1f3fc.png"] = light  # medium-light drawn like light
    pkg = emoji.STYLES["twemoji"]
    path = write_tgz(cache / "npm" / pkg.filename, pkg, files)
    monkeypatch.setitem(
        emoji.STYLES, "twemoji", dataclasses.replace(pkg, integrity=emoji.integrity_of(path))
    )
    (tmp_path / "out").mkdir()
    frame = emoji.build(tmp_path / "out", ("twemoji",), cache=cache, progress=False)
    captions = list(frame["caption"])
    assert captions.count("thumbs up, twemoji style") == 1, "one picture per caption"
    for tone in ("light", "medium-light"):  # which tone would the picture be?
        assert f"thumbs up: {tone} skin tone, twemoji style" not in captions
    assert "thumbs up: dark skin tone, twemoji style" in captions


def test_identical_flags_of_different_emoji_are_both_dropped(built: Built) -> None:
    captions = set(built.frame["caption"])
    assert not {"flag: Norway, noto style", "flag: Bouvet Island, noto style"} & captions
    assert "flag: France, noto style" in captions
    norway = composited(source_png("noto", NORWAY))
    assert not any(np.array_equal(built.image(c), norway) for c in captions)
    assert "2 dropped as identical to another emoji's" in built.log


def test_files_without_a_cldr_name_or_unreadable_are_skipped_and_counted(built: Built) -> None:
    total = sum(len(c) for c in CODES.values()) + 1  # + noto's unnamed file
    assert f"{len(built.frame)} images of {total} files" in built.log
    assert "(1 without a CLDR name, 1 unreadable, 0 flags left out" in built.log
    unnamed = composited(package_files()["noto"][f"img/google/64/{UNNAMED.lower()}.png"])
    assert not any(np.array_equal(built.image(c), unnamed) for c in built.frame["caption"])
    assert "red apple, twemoji style" not in set(built.frame["caption"])


def test_flags_false_leaves_flags_out(built: Built, cache: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    frame = emoji.build(tmp_path / "out", STYLES, flags=False, cache=cache, progress=False)
    with_flags = set(built.frame["caption"])
    assert set(frame["caption"]) == {c for c in with_flags if not c.startswith("flag: ")}
    assert len(frame) < len(with_flags)


def test_openmoji_black_line_art_is_not_used(built: Built) -> None:
    rows = built.frame[built.frame["style"] == "openmoji"]
    assert len(rows) == len(CODES["openmoji"])
    assert "rainbow, openmoji style" not in set(rows["caption"])  # only in black/svg/
    face = built.image("grinning face, openmoji style")
    assert np.abs(face[32, 32].astype(int) - colour("openmoji", "1F600")).max() <= 2


def test_an_hflip_alias_renders_mirrored(built: Built) -> None:
    hand = built.image("waving hand, fluent style").astype(int)
    back = built.image("raised back of hand, fluent style").astype(int)
    assert np.abs(hand - hand[:, ::-1]).max() > 100, "the parent icon must be asymmetric"
    assert np.abs(back - hand[:, ::-1]).max() <= 8  # the circle's antialiasing may differ
    # the parent: its square on the left, a black disc on the right; the alias: swapped
    square, disc = np.array(colour("fluent", "1F44B")), np.zeros(3)
    assert (hand[32, 16] == square).all() and (hand[32, 48] == disc).all()
    assert (back[32, 48] == square).all() and (back[32, 16] == disc).all()


def test_attribution_names_every_style_licence(built: Built, cache: Path, tmp_path: Path) -> None:
    text = (built.out / "ATTRIBUTION.md").read_text()
    for pkg in real_packages().values():
        assert f"npm `{pkg.spec}`; licence {pkg.licence}" in text
        assert pkg.credit in text
    (tmp_path / "out").mkdir()
    emoji.build(tmp_path / "out", ("noto",), cache=cache, progress=False)
    only_noto = (tmp_path / "out" / "ATTRIBUTION.md").read_text()
    assert "licence Apache-2.0" in only_noto and "licence MIT" in only_noto  # + the names
    assert "licence CC-BY-4.0" not in only_noto and "`twemoji` style" not in only_noto


# ----------------------------------------------------------------------------- download step


def test_download_step_shards_hold_the_builder_images_and_captions(
    cache: Path, dvc_project: Path
) -> None:
    cfg = DataConfig(source="emoji", processes=1, threads=4, shard_size=25, timeout_s=5)
    prepared = prepare_dataset(cfg, dvc_project, progress=False)
    (src,) = [p.parent for p in (dvc_project / ".cache").glob("emoji-*/index.parquet")]
    frame = pd.read_parquet(src / "index.parquet")

    def digest(image: np.ndarray) -> str:
        return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()

    built = sorted(
        (c, digest(np.asarray(Image.open(src / r).convert("RGB"))))
        for r, c in zip(frame["rel"], frame["caption"], strict=True)
    )
    samples = _read_samples(sorted(prepared.path.glob("*.tar")))
    assert sorted((s.caption, digest(s.image)) for s in samples) == built
    captions = {f"{label}, {style} style" for style in STYLES for label in EXPECTED[style]}
    assert {c for c, _ in built} == captions
    assert prepared.stats.successes == prepared.stats.count == len(frame)
    assert len(list(prepared.path.glob("*.tar"))) == -(-len(frame) // 25)
    assert prepared.path.name == dataset_key(cfg) and prepared.path.name.startswith("emoji-")
    attribution = (prepared.path / "ATTRIBUTION.md").read_text()
    assert attribution == (src / "ATTRIBUTION.md").read_text()
    assert "licence CC-BY-SA-4.0" in attribution
    source = json.loads((prepared.path / SOURCE_FILE).read_text())
    assert source["emoji"]["packages"] == [p.integrity for p in real_packages().values()]


def test_the_same_images_as_a_url_list_give_the_same_pairs(
    cache: Path, dvc_project: Path, tmp_path: Path
) -> None:
    """How a user brings their own images: a URL list with captions of the same form takes
    the same path (loopback HTTP, img2dataset) and gives the same pairs as the source."""
    common = {"processes": 1, "threads": 4, "shard_size": 25, "timeout_s": 5}
    from_source = prepare_dataset(DataConfig(source="emoji", **common), dvc_project, False)
    (src,) = [p.parent for p in (dvc_project / ".cache").glob("emoji-*/index.parquet")]
    frame = pd.read_parquet(src / "index.parquet")
    with serve_directory(src) as base:
        urls = tmp_path / "my-emoji.parquet"
        listed = {"url": [f"{base}/{r}" for r in frame["rel"]], "caption": frame["caption"]}
        pd.DataFrame(listed).to_parquet(urls)
        cfg = DataConfig(url_list=str(urls), **common)
        from_list = prepare_dataset(cfg, dvc_project, progress=False)
    assert from_list.path != from_source.path

    def pairs(folder: Path) -> list[tuple[str, bytes]]:
        samples = _read_samples(sorted(folder.glob("*.tar")))
        return sorted((s.caption, np.ascontiguousarray(s.image).tobytes()) for s in samples)

    assert pairs(from_list.path) == pairs(from_source.path)
    held = Holdout(0.2, "captions")
    assert [held.held("", c) for c, _ in pairs(from_list.path)] == [
        held.held("", c) for c, _ in pairs(from_source.path)
    ]


# ----------------------------------------------------------------------------- refusals


def test_a_tampered_tarball_is_refused_naming_the_file(cache: Path, dvc_project: Path) -> None:
    path = cache / "npm" / emoji.STYLES["twemoji"].filename
    files = package_files()["twemoji"] | {"img/twitter/64/1f600.png": png((0, 0, 0), "RGB")}
    write_tgz(path, emoji.STYLES["twemoji"], files)  # a valid tarball, not the pinned bytes
    with pytest.raises(emoji.EmojiError) as err:
        emoji.fetch(emoji.STYLES["twemoji"], cache)
    message = one_line(err)
    assert message.startswith(f"{path} does not match the pinned integrity of ")
    assert "delete it and run again" in message

    cfg = DataConfig(source="emoji", processes=1, threads=2)
    with pytest.raises(DownloadError) as err:
        prepare_dataset(cfg, dvc_project, progress=False)
    assert one_line(err) == message
    assert not (dvc_project / "data").exists()
    assert not list((dvc_project / ".cache").glob("emoji-*")), "a half-built folder is left"


def test_a_refused_emoji_build_leaves_no_unfinished_download(
    cache: Path, dvc_project: Path
) -> None:
    path = cache / "npm" / emoji.STYLES["twemoji"].filename
    path.write_bytes(path.read_bytes() + b"\0")
    cfg = DataConfig(source="emoji", processes=1, threads=2)
    with pytest.raises(DownloadError):
        prepare_dataset(cfg, dvc_project, progress=False)
    assert not (dvc_project / DOWNLOADS_DIR / f"{dataset_key(cfg)}.partial").exists()


def test_without_npm_an_uncached_tarball_is_refused_before_any_step(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    cfg = parse_config({"data": {"source": "emoji"}})
    check_resources(cfg)  # every tarball cached: npm is not needed
    missing = cache / "npm" / emoji.STYLES["fluent"].filename
    missing.unlink()
    with pytest.raises(ConfigError) as err:
        check_resources(cfg)
    message = one_line(err)
    assert f"needs npm to fetch {emoji.STYLES['fluent'].spec}, and npm is not on PATH" in message
    assert message.endswith(
        f"install Node.js (e.g. `apt-get install npm`) or put the tarball at {missing}"
    )
    check_resources(parse_config({"data": {"source": "emoji", "emoji": {"styles": ["noto"]}}}))
    kept = {
        emoji.NAMES.filename,
        *(emoji.STYLES[s].filename for s in ("noto", "twemoji", "openmoji")),
    }
    assert {p.name for p in (cache / "npm").iterdir()} == kept, "nothing was fetched"


needs_npm = pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")


@pytest.fixture
def offline_npm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """npm with a registry that refuses connections, its own cache, and no retries."""
    for key, value in {
        "registry": "http://127.0.0.1:9",
        "fetch_retries": "0",
        "fetch_timeout": "2000",
        "cache": str(tmp_path / "npm-cache"),
        "update_notifier": "false",
        "audit": "false",
        "fund": "false",
    }.items():
        monkeypatch.setenv(f"npm_config_{key}", value)


@dataclasses.dataclass(frozen=True)
class LocalPackage(emoji.Package):
    """A pinned package whose `npm pack` spec is a tarball on disk instead of name@version."""

    path: str = ""

    @property
    def spec(self) -> str:
        return self.path


@needs_npm
@pytest.mark.usefixtures("offline_npm")
def test_npm_pack_fetches_a_scoped_package_into_the_cache(
    tarballs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = LocalPackage(
        **dataclasses.asdict(pinned(tarballs)["fluent"]), path=str(tarballs["fluent"])
    )
    cache = tmp_path / "user-cache"
    path = emoji.fetch(pkg, cache)
    # npm names a scoped package's tarball without the @ and with - for /
    assert path == cache / "npm" / "iconify-json-fluent-emoji-flat-1.2.6.tgz"
    assert path.read_bytes() == tarballs["fluent"].read_bytes()
    assert [p.name for p in (cache / "npm").iterdir()] == [path.name], "no leftovers"
    (tmp_path / "empty-bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    assert emoji.fetch(pkg, cache) == path, "a cached tarball needs no npm"


@needs_npm
@pytest.mark.usefixtures("offline_npm")
def test_a_failed_npm_pack_is_refused_in_one_sentence(tmp_path: Path) -> None:
    pkg = emoji.Package("dalle2-tests-no-such-package", "0.0.0", "sha512-none", "MIT", "none")
    cache = tmp_path / "user-cache"
    with pytest.raises(emoji.EmojiError) as err:
        emoji.fetch(pkg, cache)
    message = one_line(err)
    assert message.startswith("`npm pack dalle2-tests-no-such-package@0.0.0` failed (")
    assert "check that the npm registry is reachable (`npm config get registry`)" in message
    assert message.endswith(f"or put the tarball at {cache / 'npm' / pkg.filename}")
    assert not list((cache / "npm").iterdir()), "no tarball and no temp folder are left"


# ----------------------------------------------------------------------------- holdout rules


def test_a_holdout_rule_holds_one_emoji_dark_tone_in_every_style(built: Built) -> None:
    captions = list(built.frame["caption"])
    keys = [f"{i:09d}" for i in range(len(captions))]
    holdout = Holdout(0.2, "captions", (DARK_RULE,))
    group = {c: re.sub(DARK_RULE.group_ignore or "", "", c) for c in captions}
    dark = {c for c in captions if ": dark skin tone, " in c}
    held = {c for k, c in zip(keys, captions, strict=True) if holdout.held_in(k, c) == "dark_tone"}
    # with this rule's hash, the waving hand's dark tone is held and the thumbs up's is not
    assert {group[c] for c in held} == {"waving hand: dark skin tone"}
    assert held == {c for c in dark if group[c] == "waving hand: dark skin tone"}
    assert len(held) == len(STYLES), "held in every style together"
    for c in captions:  # its other tones are trained on or held by the caption split only
        if c.startswith("waving hand") and c not in held:
            assert holdout.held_in("", c) in (None, "captions"), c
    assert holdout.sets == [
        ("holdout:captions", "unseen_captions"),
        ("holdout:dark_tone", "unseen_dark_tone"),
        ("train", "seen_captions"),
    ]
    pairs = list(zip(keys, captions, strict=True))
    assert {c for k, c in pairs if holdout.keeps("holdout:dark_tone", k, c)} == held
    train = {c for k, c in pairs if holdout.keeps("train", k, c)}
    unseen = {c for k, c in pairs if holdout.keeps("holdout:captions", k, c)}
    assert train and unseen and not (train & held) and not (train & unseen) and not unseen & held
    assert train | unseen | held == set(captions)


def test_a_holdout_rule_keeps_groups_whole_over_many_emoji() -> None:
    styles = ("noto", "twemoji", "fluent", "openmoji")
    tones = list(TONES.values())
    captions = [
        f"emoji {i}: {tone}, {style} style" for i in range(60) for tone in tones for style in styles
    ]
    holdout = Holdout(0.0, "captions", (DARK_RULE,))
    held = {c for c in captions if holdout.keeps("holdout:dark_tone", "", c)}
    groups = {c.rsplit(",", 1)[0] for c in held}
    assert 15 <= len(groups) <= 45, "about half the emoji's dark tone (fraction 0.5)"
    assert held == {f"{g}, {s} style" for g in groups for s in styles}
    assert all(": dark skin tone, " in c for c in held), "no other tone, not medium-dark"
    assert not {c for c in captions if holdout.keeps("train", "", c)} & held


# ----------------------------------------------------------------------------- end to end

# `zenml` with dalle2.data.emoji pinned to the test tarballs (the local orchestrator runs every
# step in this process, so the pins reach the download step); guarded, as img2dataset's
# spawned workers import this file again
PINNED_ZENML = """\
import json, os, sys

if __name__ == "__main__":
    from dalle2.data import emoji

    pins = json.loads(os.environ["DALLE2_TEST_EMOJI_PINS"])
    emoji.NAMES = emoji.Package(**pins.pop("names"))
    emoji.STYLES.update({s: emoji.Package(**p) for s, p in pins.items()})
    from zenml.cli.cli import cli

    sys.argv[0] = "zenml"
    sys.exit(cli())
"""


@pytest.fixture(scope="module")
def emoji_run(tarballs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh project (git, DVC, ZenML + MLflow) that ran tiny-emoji.yaml once."""
    root = tmp_path_factory.mktemp("emoji-project")
    shutil.copy(REPO / "tests" / "configs" / "tiny-emoji.yaml", root / "tiny-emoji.yaml")
    (root / "pinned_zenml.py").write_text(PINNED_ZENML)
    with pytest.MonkeyPatch.context() as mp:
        pins = pin(mp, tarballs, root.parent / f"{root.name}-cache")
        # its own ZenML store: the e2e test registers the same component names in the shared one
        mp.setenv("ZENML_CONFIG_PATH", str(root.parent / f"{root.name}-zenml-config"))
        mp.setenv(
            "DALLE2_TEST_EMOJI_PINS",
            json.dumps({k: dataclasses.asdict(p) for k, p in pins.items()}),
        )
        dvc = BIN / "dvc"
        for cmd in (  # as test_pipeline_e2e's project; no path here holds a space
            "git init -q",
            f"{dvc} init -q",
            f"{dvc} remote add -d local {root.parent / 'emoji-remote'}",
        ):
            run(cmd.split(), root)
        register_stack(root, "emoji_stack", f"sqlite:///{root / 'mlruns.db'}")
        command = ["pipeline", "run", PIPELINE, "-c", "tiny-emoji.yaml"]
        run([sys.executable, str(root / "pinned_zenml.py"), *command], root)
    return root


def test_tiny_pipeline_on_emoji_logs_real_data_metrics_for_every_set(
    emoji_run: Path, built: Built
) -> None:
    from mlflow import MlflowClient

    cfg = yaml.safe_load((emoji_run / "tiny-emoji.yaml").read_text())["parameters"]["config"]
    holdout = Holdout.of(parse_config(cfg).data)
    held = {holdout.held_in("", c) for c in built.frame["caption"]}
    assert {"captions", "dark_tone", None} <= held, "each set must hold pairs"

    client = MlflowClient(tracking_uri=f"sqlite:///{emoji_run / 'mlruns.db'}")
    (run_,) = client.search_runs([client.get_experiment_by_name("unclip-emoji-test").experiment_id])
    metrics = run_.data.metrics
    assert metrics["data/successes"] == len(built.frame)
    for name in ("unseen_captions", "unseen_dark_tone"):
        for key in (
            "retrieval_top5",
            "retrieval_top5_real",
            "retrieval_top5_floor",
            "nn_train_distance",
            "nn_train_distance_real",
            "clip_frechet_distance",
        ):
            assert f"{name}/{key}" in metrics, f"{name}/{key} missing from the MLflow run"
            assert np.isfinite(metrics[f"{name}/{key}"]), f"{name}/{key}"
    for key in ("retrieval_top1", "retrieval_top5", "nn_train_distance", "clip_frechet_distance"):
        assert f"seen_captions/{key}" in metrics, key
    assert "seen_captions/nn_train_distance_real" not in metrics  # real ones are training images
    assert not any(k.split("/")[-1].startswith("fidelity_") for k in metrics), "not shapes64"
    assert 0 <= metrics["unseen_dark_tone/retrieval_top5"] <= 1
    samples = client.list_artifacts(run_.info.run_id, "samples")
    assert any(f.path == "samples/samples.png" and (f.file_size or 0) > 0 for f in samples)
