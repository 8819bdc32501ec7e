"""Networks: attention/resnet layers, the decoder unet and the prior transformer.

They know nothing of diffusion: no betas, no losses.
"""

from dalle2.networks.prior_transformer import PriorTransformer
from dalle2.networks.unet import UNet

__all__ = ["PriorTransformer", "UNet"]
