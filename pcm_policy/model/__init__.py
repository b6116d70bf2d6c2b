"""Networks: the FiLM-conditioned temporal UNet action head (and LoRA adapters in `lora`)."""
from pcm_policy.model.unet import ConditionalUnet1D

__all__ = ["ConditionalUnet1D"]
