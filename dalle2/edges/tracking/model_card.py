"""A short model card in markdown: what a registered model was trained on, how, how well.

The register_model step writes it into the MLflow run (artifact `model_card.md` and the run
description), the model version's description and the logged model itself, so whoever
finds the model in the registry or serves it reads the same page.
"""

from __future__ import annotations

import math

from dalle2.config import DecoderStageConfig, SampleConfig, UnclipConfig
from dalle2.data.shards import DatasetRef, Holdout

# measured by the evaluate step; fidelity_* only on shapes64 (its pixel reader)
HEADLINE = (
    "fidelity_all",
    "fidelity_color",
    "fidelity_shape",
    "empty_canvas",
    "clip_score",
    "clip_score_real",
    "clip_frechet_distance",
    "fid",
    "prior_cos_true",
    "retrieval_top1",
    "retrieval_top5",
    "retrieval_top5_real",
    "retrieval_top5_floor",
    "nn_train_distance",
    "nn_train_distance_real",
)


def _sampling(s: SampleConfig) -> str:
    return f"{s.sampler} {s.steps} steps, guidance {s.guidance_scale:g}"


def _stage(st: DecoderStageConfig) -> str:
    u = st.unet
    size = f"{st.lowres_size} -> {st.image_size} px upsampler" if st.lowres_size else ""
    return (
        f"{size or f'{st.image_size} px base'}, unet dim {u.dim} x {list(u.dim_mults)}, "
        f"predicts {st.diffusion.prediction}{', reads caption tokens' if u.text_token_dim else ''}"
    )


def _steps(name: str, configured: int, capped: bool, trained: dict[str, int | None]) -> str:
    """Steps a model trained: measured on this run, else what the config fixes."""
    got = trained.get(name)
    if got is not None:
        return str(got)
    # a cached step trained in an earlier run, which holds the measured count
    return f"up to {configured} (clock-capped)" if capped else f"{configured} (in an earlier run)"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.4g}"


def model_card(
    cfg: UnclipConfig,
    dataset: DatasetRef,
    metrics: dict[str, float],
    trained_steps: dict[str, int | None],
    run_id: str | None = None,
    env: dict[str, str] | None = None,
) -> str:
    """The card of the models one pipeline run produced; `trained_steps` maps clip, prior and
    decoder_unet_{i} to the steps the run measured (None for models from ZenML's cache);
    `env` is the run's `env.*` tags (environment.py), what the weights depend on."""
    d, held = cfg.data, Holdout.of(cfg.data)
    sets = [name for _, name in held.sets]  # held-out sets first, the seen captions last
    if d.url_list:
        source = f"URL list `{d.url_list}`"
    elif d.source == "emoji":
        source = f"emoji art ({', '.join(d.emoji.styles)}) with CLDR names, from npm"
    else:
        source = (
            f"shapes64, the generated dataset ({d.num_synthetic} images, seed {d.synthetic_seed})"
        )
    kept = "distinct captions (every image of them)" if held.by == "captions" else "pairs"
    lines = [
        f"# unCLIP text-to-image model `{cfg.name}`",
        "",
        "CLIP, a diffusion prior and a decoder cascade (Ramesh et al. 2022), trained by the "
        "`unclip_pipeline` ZenML pipeline" + (f", MLflow run `{run_id}`." if run_id else "."),
        "",
        "## Data",
        f"- {source}, {d.image_size} px",
        f"- DVC md5 `{dataset.md5}`: {dataset.num_samples} image-caption pairs "
        f"({dataset.num_failed} failed downloads)",
        f"- held out of all training: {d.holdout_fraction:g} of the {kept}",
        *(
            f"- also held out (`unseen_{r.name}/`): {r.fraction:g} of the groups of captions "
            f"matching `{r.match}`"
            + (f" (a group ignores `{r.group_ignore}`)" if r.group_ignore else "")
            for r in d.holdout_rules
        ),
        "",
        "## Models",
        "| model | what | trained steps | sampling |",
        "|---|---|---|---|",
    ]
    c = cfg.clip
    if c.pretrained_model:
        what = f"pretrained open_clip {c.pretrained_model} ({c.pretrained_weights or 'no tag'})"
        lines.append(f"| clip | {what} | - | - |")
    else:
        t = c.tower
        what = f"trained here, embed {t.embed_dim}, {t.image_size} px, context {t.context_length}"
        steps = _steps("clip", c.train.steps, c.train.max_minutes is not None, trained_steps)
        lines.append(f"| clip | {what} | {steps} | - |")
    p = cfg.prior
    tokens = ", text tokens" if p.use_text_tokens else ""
    what = f"transformer dim {p.net.dim} x {p.net.depth}{tokens}"
    steps = _steps("prior", p.train.steps, p.train.max_minutes is not None, trained_steps)
    lines.append(f"| prior | {what} | {steps} | {_sampling(p.sample)}, best of {p.best_of} |")
    for i, st in enumerate(cfg.decoder):
        name = f"decoder_unet_{i}"
        steps = _steps(name, st.train.steps, st.train.max_minutes is not None, trained_steps)
        best = f", best of {st.best_of}" if st.best_of > 1 else ""
        lines.append(f"| {name} | {_stage(st)} | {steps} | {_sampling(st.sample)}{best} |")
    lines += [
        "",
        f"## Metrics ({cfg.eval.num_prompts} prompts per set, eval seed {cfg.eval.seed})",
        "| metric | " + " | ".join(f"`{name}/`" for name in sets) + " |",
        "|---" * (len(sets) + 1) + "|",
    ]
    for key in HEADLINE:
        row = [metrics.get(f"{name}/{key}") for name in sets]
        if any(v is not None for v in row):
            lines.append(f"| {key} | " + " | ".join(_fmt(v) for v in row) + " |")
    reg = cfg.registry
    lines += [
        "",
        f"Registered as `{reg.name}`; a version takes `@{reg.alias}` when its `{reg.metric}` is "
        f"{'higher' if reg.greater_is_better else 'lower'} than the holder's.",
        "",
        *(
            [
                "## Environment",
                f"- uv.lock sha256 `{env.get('env.lock_sha256')}`; installed packages' sha256 "
                f"`{env.get('env.packages_sha256')}` (`run/environment.txt`)",
                f"- Python {env.get('env.python')}, torch {env.get('env.torch')}, "
                f"on {env.get('env.device')}",
                "",
            ]
            if env
            else []
        ),
        "## Use",
        f"    mlflow models serve -m models:/{reg.name}@{reg.alias} --env-manager local",
        f'    dalle2 generate "a prompt" --model models:/{reg.name}@{reg.alias}',
        "",
        "## Known limits",
    ]
    if d.url_list is None and d.source == "emoji":
        lines.append(
            f"- emoji only: one emoji on white, in the styles it was trained on "
            f"({', '.join(d.emoji.styles)}); CLIP knows no word outside the CLDR names."
        )
    elif d.url_list is None:
        lines.append(
            "- shapes64 only: one flat shape (circle, square, triangle) of one of six colours "
            "and two sizes on a white, black or gray background; nothing else can be drawn."
        )
    if c.pretrained_model is None:
        lines.append(
            f"- CLIP was trained here on these captions only: words it never read carry no "
            f"meaning, and prompts over {c.tower.context_length - 2} tokens are refused."
        )
    lines += [
        "- Held-out captions are the honest measure: seen captions were trained on.",
        "- Metrics of two versions compare only under the same eval settings and data.",
        "",
    ]
    if d.url_list is None and d.source == "emoji":
        from dalle2.data import emoji

        lines += [emoji.attribution(d.emoji.styles).replace("# ", "## ", 1)]
    return "\n".join(lines)
