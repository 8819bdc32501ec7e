"""The trained unCLIP system as one object: CLIP, the diffusion prior and the decoder cascade.

    unclip = UnCLIP.load("models/")  # a run's models/ folder; edges resolve runs and URIs
    drawn = unclip.generate(["a large red circle on a white background"], seeds=[0])
    variations = unclip.vary(drawn.images, num=4)

The CLI, the served model, the evaluate step and the benchmarks all draw through it, so a
prompt, seed and model give the same image whichever of them asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from dalle2.config import SampleConfig
from dalle2.decoder import Decoder
from dalle2.device import autocast, autocast_dtype
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
    from dalle2.clip import OpenClip


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
        with_tokens = self.prior.cfg.use_text_tokens or self.decoder.reads_text
        n = self.decoder.stages[0].cfg.best_of
        out_images, out_embeds = [], []
        chunks = range(0, len(prompts), batch_size)
        for start in tqdm(chunks, desc="sample", disable=not progress):
            caps = prompts[start : start + batch_size]
            gen = shared
            if seeds is not None:
                rows = seeds[start : start + batch_size]
                gen = [torch.Generator(device=device).manual_seed(int(s)) for s in rows]
            enc = self.clip.encode_text(caps, with_tokens=with_tokens)
            tokens = None if enc.tokens is None else enc.tokens.float()
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


def _check_finite(images: Tensor, embed: Tensor, rows: str) -> None:
    if not bool(torch.isfinite(images).all() and torch.isfinite(embed).all()):
        raise NonFiniteOutputError(
            f"sampling produced NaN or infinite values for {rows}; no images were written "
            "(check the models' weights and sampling settings)"
        )
