"""The trained unCLIP system as one object: CLIP, the diffusion prior and the decoder cascade.

    unclip = UnCLIP.load("models/")  # a run's models/ folder; edges resolve runs and URIs
    drawn = unclip.generate(["a large red circle on a white background"], seeds=[0])
    variations = unclip.vary(drawn.images, num=4)
    edited = unclip.edit(drawn.images, masks, ["a small blue square on a white background"])
    row = unclip.interpolate(image_a, image_b, num=8)
    moved = unclip.textdiff(image, "a red circle", "a blue circle", num=5)

The CLI, the served model, the evaluate step and the benchmarks all draw through it, so a
prompt, seed and model give the same image whichever of them asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dalle2.config import SampleConfig
from dalle2.decoder import Decoder
from dalle2.device import autocast, autocast_dtype
from dalle2.diffusion import Inpaint
from dalle2.models import (
    ModelArtifact,
    check_complete,
    model_names,
    pack_clip,
    pack_prior,
    pack_stage,
    unpack_clip,
    unpack_prior,
    unpack_stage,
)
from dalle2.prior import DiffusionPrior

if TYPE_CHECKING:  # open_clip takes seconds to import: only loading a CLIP pays for it
    from dalle2.clip import OpenClip, TextEncoding


class NonFiniteOutputError(RuntimeError):
    """The models produced NaN or infinite values: there is no image to write."""


@dataclass(frozen=True)
class Drawn:
    """Images drawn for prompts, and the CLIP image embeddings they were drawn from."""

    images: Tensor  # (N, 3, H, W) in [0, 1], on the CPU
    embeds: Tensor  # (N, E): the prior's draw each kept image came from


class UnCLIP(nn.Module):
    """CLIP (text and image embeddings), the prior (text -> image embedding) and the
    decoder (image embedding -> image), on one device."""

    def __init__(self, clip: OpenClip, prior: DiffusionPrior, decoder: Decoder) -> None:
        super().__init__()
        self.clip, self.prior, self.decoder = clip, prior, decoder

    # ------------------------------------------------------------------ files
    @classmethod
    def load(cls, folder: Path | str, num_stages: int | None = None) -> UnCLIP:
        """From a folder with clip/, prior/ and decoder_unet_{i}/ (what a run logs as its
        `models` artifact and the registered model holds). A folder that lacks one is
        refused (check_complete; pass `num_stages` where the config is known), never loaded
        as a shorter cascade."""
        folder = Path(folder)
        held = [d.name for d in folder.iterdir() if d.is_dir()] if folder.is_dir() else []
        check_complete(held, num_stages, str(folder))
        names = model_names(held, num_stages)
        clip, prior, *stages = (ModelArtifact.from_dir(folder / n) for n in names)
        return cls.from_artifacts(clip, prior, stages)

    @classmethod
    def from_artifacts(
        cls, clip: ModelArtifact, prior: ModelArtifact, stages: Sequence[ModelArtifact]
    ) -> UnCLIP:
        """From the models as the pipeline's steps pass them; stages in any order."""
        unpacked = sorted((unpack_stage(a) for a in stages), key=lambda s: s[0])
        decoder = Decoder([stage for _, stage in unpacked])
        return cls(unpack_clip(clip), unpack_prior(prior), decoder).eval()

    def artifacts(self) -> dict[str, ModelArtifact]:
        """Each model's files by its folder name: clip, prior, decoder_unet_{i}."""
        models = {"clip": pack_clip(self.clip), "prior": pack_prior(self.prior)}
        for i, stage in enumerate(self.decoder.stages):
            models[f"decoder_unet_{i}"] = pack_stage(stage, i)
        return models

    def save(self, folder: Path | str) -> Path:
        """Write the folder `load` reads (safetensors, JSON configs, sha256 manifests)."""
        folder = Path(folder)
        for name, artifact in self.artifacts().items():
            artifact.to_dir(folder / name)
        return folder

    # ------------------------------------------------------------------ sampling
    @property
    def device(self) -> torch.device:
        return self.clip.device

    @property
    def output_size(self) -> int:
        """The side of the images the cascade draws (its last stage's)."""
        return int(self.decoder.stages[-1].cfg.image_size)

    @property
    def image_size(self) -> int:
        """The side of the images CLIP reads (`vary`'s inputs are resized to it)."""
        return int(self.clip.image_size)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        batch_size: int = 32,
        decoder_cfgs: Sequence[SampleConfig | None] | None = None,
        progress: bool = False,
    ) -> Drawn:
        """Images for prompts, in batches of `batch_size`.

        `seeds`, one per prompt, gives each its own noise generator: a prompt's image then
        does not depend on the batch it is drawn in (served requests); otherwise one
        generator seeded `seed` draws for all of them. `decoder_cfgs` replaces the sampling
        settings of some decoder stages (None keeps a stage's own). Where the base stage
        draws best_of n images a caption, each comes from its own prior draw and CLIP keeps
        the one closest to the caption.
        """
        prompts = list(prompts)
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts; pass one each")
        self.eval()
        device = self.device
        shared = torch.Generator(device=device).manual_seed(seed)
        dtype = autocast_dtype(device, "auto")
        n = self.decoder.stages[0].cfg.best_of
        out_images, out_embeds = [], []
        chunks = range(0, len(prompts), batch_size)
        for start in tqdm(chunks, desc="sample", disable=not progress):
            caps = prompts[start : start + batch_size]
            gen = shared
            if seeds is not None:
                rows = seeds[start : start + batch_size]
                gen = [torch.Generator(device=device).manual_seed(int(s)) for s in rows]
            enc, tokens = self._encode(caps)
            with autocast(device, dtype):
                embed = self.prior.sample(
                    enc.embed.float().repeat_interleave(n, 0),
                    None if tokens is None else tokens.repeat_interleave(n, 0),
                    None if enc.mask is None else enc.mask.repeat_interleave(n, 0),
                    generator=gen,
                )
                images, embed = self.decoder.sample(
                    embed.view(len(caps), n, -1) if n > 1 else embed,
                    tokens,
                    enc.mask,
                    cfgs=decoder_cfgs,
                    generator=gen,
                    text_embed=enc.embed,
                    encode_image=self.clip.encode_image,
                )
            _check_finite(images, embed, f"prompts {start}..{start + len(caps) - 1}")
            out_images.append(images.float().cpu())
            out_embeds.append(embed.float().cpu())
        return Drawn(torch.cat(out_images), torch.cat(out_embeds))

    @torch.no_grad()
    def vary(
        self,
        images: Tensor,
        *,
        num: int = 1,
        seed: int = 0,
        batch_size: int = 16,
        progress: bool = False,
    ) -> Tensor:
        """`num` new images (N * num, 3, H, W) in [0, 1] for each of `images` (N, 3, S, S)
        in [0, 1], decoded from its CLIP image embedding: unCLIP's variations, no prior.
        An image's variations are consecutive rows."""
        self.eval()
        device = self.device
        inputs = images.repeat_interleave(num, dim=0)
        gen = torch.Generator(device=device).manual_seed(seed)
        out = []
        chunks = range(0, len(inputs), batch_size)
        for start in tqdm(chunks, desc="vary", disable=not progress):
            embed = self.clip.encode_image(inputs[start : start + batch_size].to(device)).float()
            drawn = self.decoder.sample(embed, generator=gen)[0]
            _check_finite(drawn, embed, f"images {start}..{start + len(embed) - 1}")
            out.append(drawn.cpu())
        return torch.cat(out)

    @torch.no_grad()
    def edit(
        self,
        images: Tensor,
        masks: Tensor,
        prompts: Sequence[str] | None = None,
        *,
        references: Tensor | None = None,
        seed: int = 0,
        resample: int = 4,
        progress: bool = False,
    ) -> Tensor:
        """`images` (B, 3, H, W) in [0, 1] redrawn where `masks` (B, 1, H, W) is 1, kept where
        it is 0, through every decoder stage (RePaint with `resample` passes a step). What is
        drawn comes from `prompts` (through the prior) or from the CLIP embeddings of
        `references` (B, 3, h, w) in [0, 1]. Returns (B, 3, S, S) at the cascade's size: the
        kept pixels are the input's, resized to S."""
        if (prompts is None) == (references is None):
            raise ValueError("edit with prompts or with reference images, one of the two")
        self.eval()
        device, size = self.device, self.output_size
        gen = torch.Generator(device=device).manual_seed(seed)
        known = _resize(images.to(device), size) * 2 - 1
        keep = (_resize(masks.float().to(device), size, nearest=True) < 0.5).float()
        tokens = mask = None
        with autocast(device, autocast_dtype(device, "auto")):  # as generate samples
            if prompts is not None:
                enc, tokens = self._encode(list(prompts))
                mask = enc.mask
                embed = self.prior.sample(enc.embed.float(), tokens, mask, generator=gen)
            else:
                embed = self.clip.encode_image(references.to(device)).float()
            drawn, _ = self.decoder.sample(
                embed,
                tokens,
                mask,
                generator=gen,
                progress=progress,
                inpaint=Inpaint(known, keep, resample),
            )
        _check_finite(drawn, embed, f"images 0..{len(drawn) - 1}")
        return drawn.cpu()

    @torch.no_grad()
    def interpolate(self, a: Tensor, b: Tensor, *, num: int = 8, seed: int = 0) -> Tensor:
        """`num` images (num, 3, S, S) in [0, 1] decoded from a spherical interpolation of the
        CLIP image embeddings of `a` and `b` ((3, h, w) in [0, 1]), every one from the same
        noise (DALL-E 2, section 3.2): the ends are `vary`'s images of a and b for `seed`."""
        if num < 2:
            raise ValueError("an interpolation needs at least its two ends (num >= 2)")
        ea, eb = (self.clip.encode_image(x[None].to(self.device)).float() for x in (a, b))
        t = torch.linspace(0, 1, num, device=self.device)
        embeds = slerp(ea[0], eb[0], t)
        embeds[0], embeds[-1] = ea[0], eb[0]  # the ends exactly as vary embeds them
        return self._decode_fixed_noise(embeds, seed)

    @torch.no_grad()
    def textdiff(
        self,
        image: Tensor,
        source: str,
        target: str,
        *,
        num: int = 5,
        max_angle: float = 0.5,
        seed: int = 0,
    ) -> Tensor:
        """`num` images (num, 3, S, S) in [0, 1] moving `image` ((3, h, w) in [0, 1]) along the
        difference of two captions' CLIP text embeddings (DALL-E 2, section 3.3): its image
        embedding slerped towards normalise(text(target) - text(source)) by 0..max_angle,
        every one from the same noise; the first is `vary`'s image for `seed`."""
        if num < 2:
            raise ValueError("a text diff needs at least the image and one step (num >= 2)")
        z = self.clip.encode_image(image[None].to(self.device)).float()
        text = self.clip.encode_text([source, target]).embed.float()
        direction = F.normalize(text[1] - text[0], dim=-1)
        t = torch.linspace(0, max_angle, num, device=self.device)
        embeds = slerp(z[0], direction, t)
        embeds[0] = z[0]
        return self._decode_fixed_noise(embeds, seed)

    def _encode(self, prompts: list[str]) -> tuple[TextEncoding, Tensor | None]:
        """CLIP's encoding of prompts, with the caption tokens (as float) where the prior or
        a unet reads them."""
        reads = self.prior.cfg.use_text_tokens or self.decoder.reads_text
        enc = self.clip.encode_text(prompts, with_tokens=reads)
        return enc, None if enc.tokens is None else enc.tokens.float()

    def _decode_fixed_noise(self, embeds: Tensor, seed: int) -> Tensor:
        """Each embedding's image from the same noise: one generator per row, all seeded
        alike (a row draws the noise `vary` draws alone for that seed)."""
        self.eval()
        gens = [torch.Generator(device=self.device).manual_seed(seed) for _ in embeds]
        drawn = self.decoder.sample(embeds, generator=gens)[0]
        _check_finite(drawn, embeds, f"images 0..{len(drawn) - 1}")
        return drawn.cpu()


def slerp(a: Tensor, b: Tensor, t: Tensor) -> Tensor:
    """Spherical interpolation (N, E) of the unit directions of a and b (E,) at fractions t
    (N,); linear where the two are (anti)parallel."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a * b).sum().clamp(-1, 1))
    if float(torch.sin(omega)) < 1e-6:
        return F.normalize(torch.lerp(a[None], b[None], t[:, None]), dim=-1)
    w_a = torch.sin((1 - t) * omega) / torch.sin(omega)
    w_b = torch.sin(t * omega) / torch.sin(omega)
    return w_a[:, None] * a + w_b[:, None] * b


def _resize(images: Tensor, size: int, nearest: bool = False) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.float()
    if nearest:
        return F.interpolate(images.float(), size=(size, size), mode="nearest")
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True).clamp(
        0, 1
    )


def _check_finite(images: Tensor, embed: Tensor, rows: str) -> None:
    if not bool(torch.isfinite(images).all() and torch.isfinite(embed).all()):
        raise NonFiniteOutputError(
            f"sampling produced NaN or infinite values for {rows}; no images were written "
            "(check the models' weights and sampling settings)"
        )
