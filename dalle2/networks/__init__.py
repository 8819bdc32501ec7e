"""Networks: shared layers, the decoder UNet and the prior transformer.

They know nothing of diffusion (no betas, no losses): the diffusion process is handed them.
"""

from dalle2.networks.prior_transformer import PriorTransformer
from dalle2.networks.unet import UNet

__all__ = ["PriorTransformer", "UNet"]
