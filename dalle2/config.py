"""Typed, validated configuration for every stage of the pipeline.

One flat model per concern (Karlo style: each stage has a `net`/`unet` part and a
`diffusion` part). Every model forbids unknown keys so that a typo in a YAML file is an
error, not a silently ignored setting.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator


class ConfigError(ValueError):
    """A user-facing configuration problem, phrased as one sentence."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# ----------------------------------------------------------------------------- diffusion


class DiffusionConfig(_Strict):
    """The Gaussian process of one model; networks never see any of this."""

    schedule: Literal["cosine", "linear"] = "cosine"  # noise schedule of training and sampling
    num_steps: int = Field(1000, ge=2, le=10_000)  # training timesteps
    prediction: Literal["eps", "x0", "v"] = "eps"  # what the network outputs
    loss_weighting: Literal["none", "min_snr", "p2"] = "none"  # per-timestep loss weights
    min_snr_gamma: float = Field(5.0, gt=0)  # clamp of the SNR weight (Hang et al. 2023)
    learned_variance: bool = False  # hybrid loss of Nichol & Dhariwal 2021
    # how training draws the noise level: every timestep alike, or ln(sigma) normal as in
    # EDM (Karras et al. 2022), sigma = sqrt((1 - a_t) / a_t) in the data's units, which
    # spends the steps on the middle levels where the image is decided
    noise_levels: Literal["uniform", "lognormal"] = "uniform"
    lognormal_mean: float = -1.2  # of ln(sigma); EDM's P_mean
    lognormal_std: float = Field(1.2, gt=0)  # EDM's P_std


class SampleConfig(_Strict):
    """How to draw samples from a trained model."""

    sampler: Literal["ddpm", "ddim", "dpmpp_2m"] = "ddim"  # dpmpp_2m needs the fewest steps
    steps: int = Field(50, ge=1, le=10_000)  # solver steps
    guidance_scale: float = Field(1.0, ge=0.0)  # 1 = plain conditional prediction
    eta: float = Field(0.0, ge=0.0, le=1.0)  # DDIM stochasticity
    clamp: Literal["none", "static", "dynamic"] = "static"  # images only


# ----------------------------------------------------------------------------- training


class TrainConfig(_Strict):
    """Optimisation settings shared by every trained model."""

    steps: int = Field(1000, ge=1)  # optimizer steps (each of grad_accum batches)
    batch_size: int = Field(64, ge=1)  # global, over every process
    lr: float = Field(3e-4, gt=0)  # peak AdamW learning rate
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to lr * this
    warmup_steps: int = Field(100, ge=0)  # linear LR warm-up
    weight_decay: float = Field(0.0, ge=0)  # AdamW's, not on norms and biases
    grad_clip: float = Field(1.0, gt=0)  # max gradient norm
    grad_accum: int = Field(1, ge=1)  # batches per optimizer step
    ema_decay: float = Field(0.999, ge=0, lt=1)  # the EMA weights are the ones saved and sampled
    ema_warmup: bool = True  # decay ramps up so early EMA is not stuck at init
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 CPU, fp16 CUDA
    log_every: int = Field(25, ge=1)  # steps between metrics sent to MLflow
    checkpoint_every: int = Field(1000, ge=1)  # resumable checkpoints (and at the end, SIGTERM)
    seed: int = 0  # weights, data order and noise
    # wall-clock cap per attempt, for laptop budgets; the run then depends on the machine's
    # speed: pin `steps` to the `{model}/steps` it logged to reproduce it
    max_minutes: float | None = Field(None, gt=0)
    # data-parallel processes (torchrun); batch_size stays the global batch, split across them
    num_processes: int = Field(1, ge=1)
    # torch.compile of the training forward (fused kernels); auto: on CUDA only. Where the
    # compiler fails (no C++ compiler on CPU), training goes on without it, with a warning
    compile: Literal["off", "on", "auto"] = "auto"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.num_processes:
            raise ValueError(
                f"batch_size {self.batch_size} must divide by num_processes {self.num_processes}"
            )
        return self


# ----------------------------------------------------------------------------- networks


class PriorNetConfig(_Strict):
    """Causal transformer that denoises a CLIP image embedding."""

    dim: int = Field(256, ge=8)  # transformer width
    depth: int = Field(4, ge=1)  # layers
    heads: int = Field(4, ge=1)
    dim_head: int = Field(64, ge=4)
    ff_mult: int = Field(4, ge=1)
    embed_dim: int = Field(512, ge=2)  # CLIP embedding size (image and text)
    text_token_dim: int | None = None  # width of CLIP's per-token encodings; None = unused
    max_text_len: int = Field(77, ge=1)  # text tokens read (CLIP's context length)
    # "sequence": DALL-E 2's layout, text tokens lead the causal sequence through every layer.
    # "context": every layer's attention reads keys and values projected from the text tokens,
    # which are not updated themselves: a text token then costs a key/value projection per
    # layer (2 dim^2) instead of a whole block (~12 dim^2). CLIP's per-token encodings come
    # out of CLIP's own text transformer already contextualised.
    text_tokens_as: Literal["sequence", "context"] = "sequence"
    dropout: float = Field(0.0, ge=0, lt=1)


class UNetConfig(_Strict):
    """Image denoiser of one decoder stage."""

    in_channels: int = 3
    dim: int = Field(64, ge=8)  # channels at the first level
    dim_mults: tuple[int, ...] = (1, 2, 4)  # width per level, x dim
    num_res_blocks: int = Field(2, ge=1)  # residual blocks per level
    attn_levels: tuple[int, ...] = (2,)  # indices into dim_mults that get self-attention
    heads: int = Field(4, ge=1)
    dim_head: int = Field(32, ge=4)
    image_embed_dim: int = Field(512, ge=2)  # CLIP embedding size
    num_image_tokens: int = Field(4, ge=0)  # image embedding as context tokens
    cond_dim: int = Field(128, ge=8)  # width of the context tokens
    # Width of CLIP's per-token text encodings, projected into the context tokens (GLIDE and
    # DALL-E 2 condition the decoder on the caption as well); None = the unet reads no text.
    text_token_dim: int | None = Field(None, ge=1)
    lowres_cond: bool = False  # upsampler: concatenates the upsampled low-res image
    fold: int = Field(1, ge=1)  # pixel-unshuffle factor at the input (1 = none)
    dropout: float = Field(0.0, ge=0, lt=1)
    learned_variance: bool = False  # doubles output channels
    # "classic": both paths at level i's width, concatenated skips into 3x3 convs.
    # "efficient": Imagen's Efficient U-Net: the down path carries the previous level's
    # width and each skip is merged by a 1x1 conv, ~40% fewer FLOPs at equal widths.
    layout: Literal["classic", "efficient"] = "classic"

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        if not self.dim_mults:
            raise ValueError("dim_mults must list at least one level")
        bad = [i for i in self.attn_levels if not 0 <= i < len(self.dim_mults)]
        if bad:
            raise ValueError(f"attn_levels {bad} are outside 0..{len(self.dim_mults) - 1}")
        return self


# ----------------------------------------------------------------------------- stages


class EmojiConfig(_Strict):
    """Which emoji art the `emoji` source builds (dalle2/data/emoji.py)."""

    # noto (Google), twemoji (Twitter), fluent (Microsoft), openmoji; each caption ends in
    # ", {style} style", so a style can be asked for
    styles: tuple[Literal["noto", "twemoji", "fluent", "openmoji"], ...] = (
        "noto",
        "twemoji",
        "fluent",
        "openmoji",
    )
    flags: bool = True  # the 270 country and region flags (many tricolours alike at 32 px)

    @model_validator(mode="after")
    def _check(self) -> EmojiConfig:
        if not self.styles or len(set(self.styles)) != len(self.styles):
            raise ValueError("styles must name at least one style, each once")
        return self


class HoldoutRule(_Strict):
    """Also hold out the captions matching `match`, a share of their groups at a time.

    A caption's group is the caption with `group_ignore` removed, so every caption of a
    held group is held together: match ": dark skin tone, " with group_ignore
    ", [a-z]+ style$" withholds the dark skin tone of a share of the emoji in every style,
    while their other tones and the dark tone of other emoji are trained on.
    """

    name: str = Field(pattern=r"^[a-z0-9_]+$")  # metrics: unseen_{name}/...
    match: str  # a regular expression searched in the caption
    fraction: float = Field(gt=0, le=1)  # share of the matching groups held out
    group_ignore: str | None = None  # a regular expression removed to name the group

    @model_validator(mode="after")
    def _check(self) -> HoldoutRule:
        for key in ("match", "group_ignore"):
            value = getattr(self, key)
            try:
                re.compile(value or "")
            except re.error as err:
                raise ValueError(f"{key} {value!r} is not a regular expression ({err})") from None
        return self


class DataConfig(_Strict):
    """Where images come from and how img2dataset fetches them."""

    # a built-in source when url_list is null: shapes64 (drawn here) or emoji (npm art)
    source: Literal["shapes64", "emoji"] = "shapes64"
    emoji: EmojiConfig = EmojiConfig()
    url_list: str | None = None  # parquet/csv/tsv with url+caption; None = the source
    url_col: str = "url"  # column names in url_list
    caption_col: str = "caption"  # column names in url_list
    num_synthetic: int = Field(4000, ge=1)  # shapes64 size when url_list is None
    synthetic_seed: int = 0  # shapes64's drawing seed
    image_size: int = Field(64, ge=8)  # img2dataset resizes to this (px)
    resize_mode: Literal["no", "center_crop", "border", "keep_ratio"] = "center_crop"
    encode_format: Literal["png", "jpg", "webp"] = "png"  # png keeps flat colours exact
    data_dir: str = "data"  # relative to the project root; versioned by data.dvc
    # fewer downloads than this share stop the run
    min_success_ratio: float = Field(0.9, ge=0, le=1)
    processes: int = Field(2, ge=1)
    threads: int = Field(8, ge=1)  # img2dataset threads per process
    distributor: Literal["multiprocessing", "pyspark"] = "multiprocessing"  # img2dataset's
    # URL schemes img2dataset may fetch; a file:// row would read the pipeline machine's disk
    allowed_url_schemes: tuple[str, ...] = ("http", "https")
    shard_size: int = Field(1000, ge=1)  # images per tar shard
    timeout_s: float = Field(10.0, gt=0)  # per URL
    # kept out of training: a share of the distinct captions (every image of them), or of
    # the pairs for datasets whose captions never repeat; see data.Holdout
    holdout: Literal["captions", "pairs"] = "captions"
    holdout_fraction: float = Field(0.05, ge=0, lt=1)  # share of captions (or pairs) held out
    holdout_rules: tuple[HoldoutRule, ...] = ()  # further held-out sets, each measured apart
    shuffle_buffer: int = Field(1000, ge=1)  # samples per loader worker mixed before batching
    # DataLoader processes per training process that read, decode and augment; 0 reads in the
    # training process (best on a 2-core CPU, where a worker competes with the training threads)
    loader_workers: int = Field(2, ge=0)
    dvc_push: bool = True  # push the data snapshot to the DVC remote after a download

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.url_list is not None and self.source != "shapes64":
            raise ValueError(
                f"data.url_list and data.source {self.source} both name the images; set one of them"
            )
        names = [r.name for r in self.holdout_rules]
        if len(set(names)) != len(names) or "captions" in names or "pairs" in names:
            raise ValueError(f"holdout_rules names {names} must be distinct, not captions/pairs")
        return self


class ClipTowerConfig(_Strict):
    """A small open_clip CLIP, trained from scratch when no pretrained one is named."""

    embed_dim: int = Field(512, ge=2)  # CLIP ViT-B-32's, like the prior's and unets' defaults
    image_size: int = Field(64, ge=8)  # input size (px)
    vision_width: int = Field(256, ge=8)
    # an int: a ViT of that depth; four ints: open_clip's ModifiedResNet (blocks per stage),
    # whose convolutions learn small shapes from few samples faster than patch embeddings
    vision_layers: PositiveInt | tuple[PositiveInt, PositiveInt, PositiveInt, PositiveInt] = 4
    patch_size: int = Field(8, ge=1)
    text_width: int = Field(256, ge=8)
    text_layers: int = Field(4, ge=1)
    heads: int = Field(4, ge=1)
    context_length: int = Field(32, ge=2)  # text tokens
    compact_vocab: bool = True  # keep only the BPE tokens the captions use


class ClipConfig(_Strict):
    """Which CLIP embeds images and text: pretrained open_clip, a file, or trained here."""

    pretrained_model: str | None = None  # open_clip model name, e.g. "ViT-B-32"
    pretrained_weights: str | None = None  # open_clip tag ("openai") or a local file path
    tower: ClipTowerConfig = ClipTowerConfig()
    train: TrainConfig = TrainConfig(steps=600, batch_size=128, lr=1e-3, warmup_steps=50)
    unique_captions_per_batch: bool = True  # no false negatives in the contrastive loss
    # horizontal flips in CLIP training; off where the caption says which way (emoji's
    # "facing right", flags, letters)
    random_flip: bool = True
    # hard negatives from the batch's own words (NegCLIP without a parser): "swap" trades two
    # words where captions of that length differ, "replace" takes one such word from another
    # caption; the image must prefer its caption to the negative (dalle2/recipes/clip.py)
    negatives: Literal["none", "swap", "replace"] = "none"
    embed_batch_size: int = Field(256, ge=1)  # images per batch in compute_clip_embeddings

    @model_validator(mode="after")
    def _check(self) -> ClipConfig:
        if self.pretrained_weights and not self.pretrained_model:
            raise ValueError("pretrained_weights needs pretrained_model (the architecture)")
        return self


class PriorConfig(_Strict):
    """Diffusion prior: text embedding -> image embedding."""

    net: PriorNetConfig = PriorNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig(prediction="x0", num_steps=1000)
    use_text_tokens: bool = False  # condition on per-token text encodings too
    # share trained without the text (classifier-free guidance)
    cond_drop_prob: float = Field(0.1, ge=0, le=1)
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig(steps=64, guidance_scale=1.0, clamp="none")
    best_of: int = Field(2, ge=1)  # candidates per caption; keep the closest to the text


class DecoderStageConfig(_Strict):
    """One unet of the decoder cascade, trained on its own."""

    image_size: int = Field(32, ge=8)  # output size (px)
    lowres_size: int | None = None  # set for upsamplers: size of the previous stage
    unet: UNetConfig = UNetConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    # share trained without the image embedding (guidance)
    cond_drop_prob: float = Field(0.1, ge=0, le=1)
    # DALL-E 2 drops the caption half of the time: the unet still draws from the image
    # embedding alone (variations, prompts whose tokens it never saw)
    text_drop_prob: float = Field(0.5, ge=0, le=1)
    # share trained on the caption's tokens without the image embedding (a text-reading
    # unet only): tokens name each word apart, so the unet must learn to draw from them
    # too, rather than only from an embedding that already says everything it saw
    embed_drop_prob: float = Field(0.0, ge=0, le=1)
    # training only: each unit image embedding is moved off itself by noise of norm up to
    # this (0.6: cosine ~0.86 at CLIP's widths), because the prior's embeddings are never
    # exact and the unet should still draw from near ones. 0: the embeddings as they are
    embed_noise: float = Field(0.0, ge=0, le=2)
    lowres_noise_level: float = Field(0.2, ge=0, lt=1)  # max aug noise level (0..1 of T)
    lowres_sample_noise_level: float = Field(0.1, ge=0, lt=1)  # aug level used at sampling
    lowres_blur_sigma: tuple[float, float] = (0.4, 0.6)  # Gaussian blur range in training
    random_crop: int | None = None  # train upsamplers on crops of this size
    train: TrainConfig = TrainConfig()
    sample: SampleConfig = SampleConfig(guidance_scale=3.0)
    # images drawn per caption at this stage (at the first, each from its own prior draw);
    # the one CLIP's image tower puts closest to the caption's embedding goes on. 1: no reranking
    best_of: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> DecoderStageConfig:
        if (self.lowres_size is None) == self.unet.lowres_cond:
            raise ValueError("lowres_size must be set exactly when unet.lowres_cond is true")
        if self.lowres_size is not None and self.lowres_size >= self.image_size:
            raise ValueError("lowres_size must be smaller than image_size")
        if self.image_size % (self.unet.fold * 2 ** (len(self.unet.dim_mults) - 1)):
            raise ValueError("image_size must divide by fold * 2**(len(dim_mults) - 1)")
        if self.unet.learned_variance != self.diffusion.learned_variance:
            raise ValueError("unet.learned_variance and diffusion.learned_variance must agree")
        if self.embed_drop_prob and not self.unet.text_token_dim:
            raise ValueError(
                "embed_drop_prob needs a unet that reads caption tokens (text_token_dim)"
            )
        return self


class EvalConfig(_Strict):
    """What the evaluate step samples and measures."""

    num_prompts: int = Field(64, ge=1)  # captions sampled for metrics
    batch_size: int = Field(32, ge=1)  # images sampled at once
    inception_weights: str | None = None  # path to torch-fidelity's InceptionV3 weights
    grid_size: int = Field(16, ge=1)  # pairs in samples.png
    seed: int = 0  # the prompts' and the noise's


class RegistryConfig(_Strict):
    """Where the register_model step puts the pipeline's model, and when it becomes champion."""

    name: str = Field("unclip", min_length=1)  # MLflow registered model
    # a metric of the evaluate step; held-out captions (unseen_captions/...) measure what
    # a user's new prompt gets, seen_captions/... what training already covered
    metric: str = "unseen_captions/fidelity_all"
    greater_is_better: bool = True  # the metric's direction
    alias: str = Field("champion", min_length=1)  # moved to a new version only when it is better


class UnclipConfig(_Strict):
    """The whole pipeline's configuration (the `config` parameter in zenml_config.yaml)."""

    name: str = "shapes64"  # the run's name in MLflow
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA where there is one
    progress: bool = True  # tqdm bars
    data: DataConfig = DataConfig()
    clip: ClipConfig = ClipConfig()
    prior: PriorConfig = PriorConfig()
    decoder: tuple[DecoderStageConfig, ...] = (DecoderStageConfig(),)
    eval: EvalConfig = EvalConfig()
    registry: RegistryConfig = RegistryConfig()

    @property
    def reads_text_tokens(self) -> bool:
        """Whether any model reads CLIP's per-token text encodings (embeddings store them)."""
        return self.prior.use_text_tokens or any(s.unet.text_token_dim for s in self.decoder)

    @model_validator(mode="after")
    def _check(self) -> UnclipConfig:
        if not self.decoder:
            raise ValueError("decoder needs at least one stage")
        if self.decoder[0].lowres_size is not None:
            raise ValueError("the first decoder stage cannot be an upsampler")
        for prev, stage in zip(self.decoder, self.decoder[1:], strict=False):
            if stage.lowres_size != prev.image_size:
                raise ValueError(
                    f"stage of size {stage.image_size} expects lowres_size {prev.image_size}"
                )
        if self.clip.pretrained_model is None:  # a pretrained CLIP's sizes: check_files
            check_widths(self, self.clip.tower.embed_dim, self.clip.tower.text_width, "clip.tower")
        return self


def check_widths(cfg: UnclipConfig, embed_dim: int, token_width: int | None, where: str) -> None:
    """The sizes that must agree with CLIP's, in one sentence naming the keys to change."""
    if cfg.prior.net.embed_dim != embed_dim:
        raise ValueError(
            f"prior.net.embed_dim is {cfg.prior.net.embed_dim} but the CLIP embeds in "
            f"{embed_dim} dimensions ({where}); set prior.net.embed_dim to {embed_dim}"
        )
    for i, stage in enumerate(cfg.decoder):
        if stage.unet.image_embed_dim != embed_dim:
            raise ValueError(
                f"decoder.{i}.unet.image_embed_dim is {stage.unet.image_embed_dim} but the CLIP "
                f"embeds in {embed_dim} dimensions ({where}); set it to {embed_dim}"
            )
    if token_width is None:
        return
    net = cfg.prior.net
    if cfg.prior.use_text_tokens and net.text_token_dim != token_width:
        raise ValueError(
            f"prior.use_text_tokens reads CLIP's text tokens, {token_width} wide ({where}), but "
            f"prior.net.text_token_dim is {net.text_token_dim}; set it to {token_width}"
        )
    for i, stage in enumerate(cfg.decoder):
        if stage.unet.text_token_dim not in (None, token_width):
            raise ValueError(
                f"decoder.{i}.unet.text_token_dim is {stage.unet.text_token_dim} but CLIP's "
                f"text tokens are {token_width} wide ({where}); set it to {token_width}"
            )


def _describe(err: ValidationError) -> str:
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key (check the spelling)"
    more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
    if not first["loc"]:  # a check across sections names its keys itself
        return f"invalid config: {msg}{more}"
    where = ".".join(str(p) for p in first["loc"])
    return f"invalid config at '{where}': {msg}{more}"


def parse_config(data: dict[str, Any] | UnclipConfig) -> UnclipConfig:
    """Validate a plain dict into an UnclipConfig, raising a one-sentence ConfigError."""
    if isinstance(data, UnclipConfig):
        return data
    try:
        return UnclipConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


PIPELINE_STEPS = (
    "download_images",
    "compute_clip_embeddings",
    "train_prior",
    "evaluate",
    "register_model",
)


def check_run_steps(steps: dict[str, Any], cfg: UnclipConfig) -> None:
    """A ZenML run config's `steps:` block names only steps of this pipeline (either CLIP
    step, so one block serves a trained and a pretrained CLIP), and when it attaches the
    tracker to some, every step that runs (else their metrics never reach MLflow)."""
    unused_clip = "load_pretrained_clip" if cfg.clip.pretrained_model is None else "train_clip"
    stages = [f"train_decoder_unet_{i}" for i in range(len(cfg.decoder))]
    known = {*PIPELINE_STEPS, "train_clip", "load_pretrained_clip", *stages}
    unknown = sorted(set(steps) - known)
    if unknown:
        raise ConfigError(
            f"the steps: block names {unknown}, which this pipeline does not have (the config "
            f"has {len(cfg.decoder)} decoder stages: {', '.join(stages)}); remove or rename them"
        )
    tracked = {k for k, v in steps.items() if isinstance(v, dict) and v.get("experiment_tracker")}
    missing = [s for s in sorted(known - {unused_clip}) if s not in tracked]
    if tracked and missing:
        raise ConfigError(
            f"the steps: block attaches the experiment tracker to some steps but not to "
            f"{missing}; add them, or their metrics will not reach MLflow"
        )


def load_config(path: str | Path) -> UnclipConfig:
    """Read a ZenML run YAML (its `parameters.config`) or a bare config YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML ({err})") from None
    steps: Any = None
    if isinstance(raw, dict) and "parameters" in raw:
        steps = raw.get("steps")
        raw = (raw.get("parameters") or {}).get("config", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping")
    cfg = parse_config(raw)
    if steps is not None:
        if not isinstance(steps, dict):
            raise ConfigError(f"config file {path}: steps: must be a mapping of step names")
        check_run_steps(steps, cfg)
    return cfg
