"""The decoder: a cascade of independently trained diffusion unets.

Stage 1 draws a small image from a CLIP image embedding (and, when its unet reads text,
CLIP's per-token caption encodings); each later stage upsamples the previous stage's image.
Upsamplers train on ground-truth low-res images that are blurred and noised, so that they
forgive the artefacts of the stage before them.

    loss = stage.loss(images, image_embed, text_tokens, text_mask)  # images in [-1, 1]
    images, _ = Decoder(stages).sample(image_embed, text_tokens, text_mask)  # in [0, 1]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dalle2.config import DecoderStageConfig, SampleConfig
from dalle2.diffusion import GaussianDiffusion, Generators, Inpaint, best_of, guided_sample, randn
from dalle2.networks import UNet
from dalle2.prior import scale_embed


def resize(images: Tensor, size: int) -> Tensor:
    """Antialiased resize of (B, C, H, W) images to size x size."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(
        images.float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )


def gaussian_blur(images: Tensor, sigma: Tensor) -> Tensor:
    """Blur each image with its own sigma (B,), a separable 5-tap kernel."""
    x = torch.arange(-2, 3, device=images.device, dtype=torch.float32)
    k = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None].float().clamp(min=1e-3) ** 2))
    k = k / k.sum(dim=1, keepdim=True)  # (B, 5)
    b, c, h, w = images.shape
    flat = images.float().reshape(1, b * c, h, w)
    kk = k.repeat_interleave(c, dim=0)  # (B*C, 5)
    flat = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="reflect"), kk[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, 2, 2), mode="reflect"), kk[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


class DecoderStage(nn.Module):
    """One unet of the cascade with its process and low-res conditioning."""

    def __init__(self, cfg: DecoderStageConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.unet = UNet(cfg.unet)
        self.process = GaussianDiffusion.from_config(cfg.diffusion)

    @property
    def is_upsampler(self) -> bool:
        return self.cfg.lowres_size is not None

    @property
    def reads_text(self) -> bool:
        return self.cfg.unet.text_token_dim is not None

    def _augment_lowres(self, lowres: Tensor, level: Tensor, noise: Tensor | None) -> Tensor:
        """Noise a low-res image (already at this stage's size) to augmentation `level`."""
        t = (level * (self.process.num_steps - 1)).round().long()
        noise = torch.randn_like(lowres) if noise is None else noise
        return self.process.q_sample(lowres, t, noise)

    def loss(
        self,
        images: Tensor,
        image_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
    ) -> Tensor:
        """Diffusion loss for images (B, 3, H, W) in [-1, 1]; resized to this stage's size.
        Text (B, L, D) tokens and (B, L) mask are read only by a stage whose unet reads text."""
        cfg = self.cfg
        target = resize(images, cfg.image_size)
        b = target.shape[0]
        lowres = level = None
        if self.is_upsampler:
            low = resize(images, cfg.lowres_size)
            lo, hi = cfg.lowres_blur_sigma
            sigma = lo + (hi - lo) * torch.rand(b, device=low.device)
            low = resize(gaussian_blur(low, sigma), cfg.image_size)
            level = torch.rand(b, device=low.device) * cfg.lowres_noise_level
            lowres = self._augment_lowres(low, level, None)
        if cfg.random_crop is not None and cfg.random_crop < cfg.image_size:
            target, lowres = self._crop(target, lowres, cfg.random_crop)
        drop = torch.rand(b, device=target.device) < cfg.cond_drop_prob
        embed = scale_embed(self._perturb(image_embed) if cfg.embed_noise else image_embed)
        text: dict[str, Tensor | None] = {}
        if self.reads_text:
            drop_text = torch.rand(b, device=target.device) < cfg.text_drop_prob
            text = {"text_tokens": text_tokens, "text_mask": text_mask, "drop_text": drop_text}
            if cfg.embed_drop_prob:
                text["drop_embed"] = torch.rand(b, device=target.device) < cfg.embed_drop_prob

        def model(x: Tensor, t: Tensor) -> Tensor:
            return self.unet(x, t, embed, lowres, level, drop_cond=drop, **text)

        return self.process.training_loss(model, target)

    forward = loss  # calling the module computes the loss, so DDP's hooks see it

    def _perturb(self, image_embed: Tensor) -> Tensor:
        """Each unit embedding plus isotropic noise of norm ~U(0, embed_noise): the unet
        learns to draw from embeddings near the true ones, as the prior's samples are."""
        unit = F.normalize(image_embed.float(), dim=-1)
        radius = torch.rand(unit.shape[0], 1, device=unit.device) * self.cfg.embed_noise
        direction = F.normalize(torch.randn_like(unit), dim=-1)
        return unit + radius * direction

    @staticmethod
    def _crop(target: Tensor, lowres: Tensor | None, size: int) -> tuple[Tensor, Tensor | None]:
        top, left = torch.randint(0, target.shape[-1] - size + 1, (2,)).tolist()
        crop = (slice(None), slice(None), slice(top, top + size), slice(left, left + size))
        return target[crop], None if lowres is None else lowres[crop]

    @torch.no_grad()
    def sample(
        self,
        image_embed: Tensor,
        lowres: Tensor | None = None,
        *,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        cfg: SampleConfig | None = None,
        generator: Generators = None,
        progress: bool = False,
        inpaint: Inpaint | None = None,
    ) -> Tensor:
        """(B, 3, S, S) images in [-1, 1]; `lowres` (B, 3, s, s) in [-1, 1] for upsamplers.
        Without text a text-reading stage draws from the image embedding alone. With
        `inpaint` (any size) the pixels it keeps stay and the rest is drawn."""
        cfg = cfg or self.cfg.sample
        b = image_embed.shape[0]
        size = self.cfg.image_size
        device = image_embed.device
        level = None
        if self.is_upsampler:
            if lowres is None:
                raise ValueError("an upsampler stage needs the previous stage's images")
            level = torch.full((b,), self.cfg.lowres_sample_noise_level, device=device)
            noise = randn((lowres.shape[0], 3, size, size), generator, device)
            lowres = self._augment_lowres(resize(lowres, size), level, noise)
        embed = scale_embed(image_embed)
        keep = torch.zeros(b, dtype=torch.bool, device=device)
        text = {"text_tokens": text_tokens, "text_mask": text_mask} if self.reads_text else {}

        def cond(x: Tensor, t: Tensor) -> Tensor:
            return self.unet(x, t, embed, lowres, level, drop_cond=keep, **text)

        def uncond(x: Tensor, t: Tensor) -> Tensor:
            return self.unet(x, t, embed, lowres, level, drop_cond=~keep, **text)

        x = guided_sample(
            cond,
            uncond,
            self.process,
            (b, 3, size, size),
            cfg,
            device=device,
            learned_variance=self.cfg.unet.learned_variance,
            generator=generator,
            progress=progress,
            inpaint=None if inpaint is None else inpaint.at(size),
        )
        return x.float().clamp(-1, 1)


class Decoder(nn.Module):
    """Stages chained at sampling time only (each one trains on its own)."""

    def __init__(self, stages: Sequence[DecoderStage]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)

    @property
    def reads_text(self) -> bool:
        return any(stage.reads_text for stage in self.stages)

    @torch.no_grad()
    def sample(
        self,
        image_embed: Tensor,
        text_tokens: Tensor | None = None,
        text_mask: Tensor | None = None,
        *,
        cfgs: Sequence[SampleConfig | None] | None = None,
        generator: Generators = None,
        progress: bool = False,
        text_embed: Tensor | None = None,
        encode_image: Callable[[Tensor], Tensor] | None = None,
        inpaint: Inpaint | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) images in [0, 1] drawn through the whole cascade, and the (B, E) image
        embedding each was drawn from.

        Given the captions' CLIP `text_embed` (B, E) and CLIP's `encode_image` ((N, 3, h, w)
        in [0, 1] -> (N, E)), a stage with best_of n > 1 draws n images per caption and
        passes on the one closest to its caption; without them every stage draws one.
        `image_embed` may hold n candidates per caption, (B, n, E) (the prior's own draws),
        for a first stage with best_of n: it then draws one image from each, so a caption
        whose first embedding draws nothing still gets its other chances. With `inpaint`,
        every stage keeps its pixels at its own size (an edit).
        """
        cfgs = list(cfgs) if cfgs is not None else [None] * len(self.stages)
        rank = text_embed is not None and encode_image is not None
        embed, images = image_embed, None
        for stage, cfg in zip(self.stages, cfgs, strict=True):
            n = stage.cfg.best_of if rank else 1
            if embed.dim() == 3:
                if embed.shape[1] != n:
                    raise ValueError(
                        f"{embed.shape[1]} candidate embeddings a caption for a stage that "
                        f"draws {n} images a caption (best_of, with text_embed and encode_image)"
                    )
                drawn_from = embed.flatten(0, 1)
            else:
                drawn_from = _repeat(embed, n)
            drawn = stage.sample(
                drawn_from,
                _repeat(images, n),
                text_tokens=_repeat(text_tokens, n),
                text_mask=_repeat(text_mask, n),
                cfg=cfg,
                generator=generator,
                progress=progress,
                inpaint=None if inpaint is None else _repeat_inpaint(inpaint, n),
            )
            if n > 1:
                found = encode_image((drawn + 1) / 2)
                drawn, pick = best_of(drawn, found, text_embed)
                rows = torch.arange(len(pick), device=pick.device)
                embed = drawn_from.view(-1, n, drawn_from.shape[-1])[rows, pick]
            images = drawn
        return (images + 1) / 2, embed


def _repeat_inpaint(inpaint: Inpaint, n: int) -> Inpaint:
    if n == 1:
        return inpaint
    return Inpaint(_repeat(inpaint.known, n), _repeat(inpaint.keep, n), inpaint.resample)


def _repeat(x: Tensor | None, n: int) -> Tensor | None:
    """Each row n times in a row: a caption's candidates stay together (and with its noise
    generator, see `randn`)."""
    return x if x is None or n == 1 else x.repeat_interleave(n, dim=0)
