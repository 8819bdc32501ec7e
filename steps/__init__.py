"""ZenML steps, one per file: config in, library call, typed artifact out."""

from steps.compute_clip_embeddings import compute_clip_embeddings
from steps.download_images import download_images
from steps.evaluate import evaluate
from steps.materializers import ModelArtifactMaterializer
from steps.register_model import register_model
from steps.train_clip import load_pretrained_clip, train_clip
from steps.train_decoder_unet import train_decoder_unet
from steps.train_prior import train_prior

__all__ = [
    "ModelArtifactMaterializer",
    "compute_clip_embeddings",
    "download_images",
    "evaluate",
    "load_pretrained_clip",
    "register_model",
    "train_clip",
    "train_decoder_unet",
    "train_prior",
]
