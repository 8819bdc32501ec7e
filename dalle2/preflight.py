"""What a config names outside itself (a URL list, weight files, the emoji packages, a
pretrained CLIP's sizes), checked before any step starts: one ConfigError sentence rather
than a failure an hour into a run."""

from __future__ import annotations

import json
from pathlib import Path

from dalle2.config import ConfigError, UnclipConfig, check_widths
from dalle2.data import emoji


def _pretrained_widths(name: str) -> tuple[int, int | None] | None:
    """(embedding size, text token width) of a pretrained open_clip model, read from its
    config without weights; None when only loading it would tell (a hub model)."""
    if name.startswith("local-dir:"):
        folder = Path(name.removeprefix("local-dir:"))
        meta = folder / "open_clip_config.json"
        if not meta.is_file():
            raise ConfigError(
                f"clip.pretrained_model {name}: {meta} does not exist; point it at a folder "
                "holding open_clip_config.json and the weights"
            )
        try:
            model_cfg = json.loads(meta.read_text())["model_cfg"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{meta} is not an open_clip config (no model_cfg)") from None
    else:
        import open_clip

        model_cfg = open_clip.get_model_config(name)
        if model_cfg is None:
            if ":" in name:  # hf-hub:... is only known once downloaded
                return None
            raise ConfigError(
                f"clip.pretrained_model '{name}' is not an open_clip model name; "
                "`open_clip.list_models()` lists them"
            )
    return int(model_cfg["embed_dim"]), (model_cfg.get("text_cfg") or {}).get("width")


def _must_exist(path: str, key: str, what: str) -> None:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key} {path} does not exist; {what}")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as err:
        raise ConfigError(f"{key} {path} cannot be read ({err.strerror})") from None


def check_resources(cfg: UnclipConfig) -> None:
    """What the config names outside itself, checked before any step: the files exist and
    a pretrained CLIP's sizes agree with the prior's and unets' (ConfigError otherwise)."""
    if cfg.data.url_list is not None:
        _must_exist(cfg.data.url_list, "data.url_list", "point it at your URL list")
    elif cfg.data.source == "emoji":
        try:
            emoji.check_fetchable(cfg.data.emoji.styles)
        except emoji.EmojiError as err:
            raise ConfigError(str(err)) from None
    weights = cfg.clip.pretrained_weights
    if weights and (Path(weights).suffix or "/" in weights or weights.startswith(".")):
        _must_exist(weights, "clip.pretrained_weights", "point it at a local weight file")
    if cfg.eval.inception_weights is not None:
        _must_exist(
            cfg.eval.inception_weights,
            "eval.inception_weights",
            "point it at torch-fidelity's InceptionV3 weights or remove it",
        )
    if cfg.clip.pretrained_model is not None:
        widths = _pretrained_widths(cfg.clip.pretrained_model)
        if widths is not None:
            try:
                check_widths(cfg, *widths, f"clip.pretrained_model {cfg.clip.pretrained_model}")
            except ValueError as err:
                raise ConfigError(f"invalid config: {err}") from None
