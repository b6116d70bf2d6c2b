"""Networks: the FiLM-conditioned temporal UNet action head (LoRA adapters in `lora`) and the image encoder (`vision`)."""
from pcm_policy.model.unet import ConditionalUnet1D
from pcm_policy.model.vision import VisionEncoder, VisionEncoderConfig, build_vision_encoder

__all__ = ["ConditionalUnet1D", "VisionEncoder", "VisionEncoderConfig", "build_vision_encoder"]
