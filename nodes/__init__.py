"""ComfyUI nodes (classic V1 API). Every ``comfy``/``folder_paths``/``server`` import happens inside a function,
so this package imports, and its schemas can be tested, where ComfyUI is absent."""

from .loaders import FlashCheckpointLoader, FlashTextEncoderLoader, FlashVAELoader
from .sampling import FlashSampler, FlashScheduler

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "SD35FlashCheckpointLoader": FlashCheckpointLoader,
    "SD35FlashTextEncoderLoader": FlashTextEncoderLoader,
    "SD35FlashVAELoader": FlashVAELoader,
    "SD35FlashScheduler": FlashScheduler,
    "SD35FlashSampler": FlashSampler,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "SD35FlashCheckpointLoader": "Flash Checkpoint Loader",
    "SD35FlashTextEncoderLoader": "Triple Text Encoder Loader (T5 optional)",
    "SD35FlashVAELoader": "Flash VAE Loader",
    "SD35FlashScheduler": "Flash Scheduler",
    "SD35FlashSampler": "Flash Sampler",
}
