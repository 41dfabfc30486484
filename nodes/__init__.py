"""ComfyUI nodes (classic V1 API). Every ``comfy``/``folder_paths``/``server`` import happens inside a function,
so this package imports, and its schemas can be tested, where ComfyUI is absent.

Inside ComfyUI, importing the pack also adds its ``demo/`` folder (the demo model, when present) to ComfyUI's
``checkpoints`` folders, so the Flash Checkpoint Loader offers ``sd35_flash_demo.safetensors`` out of the box.
"""

import sys
from pathlib import Path

from .loaders import FlashCheckpointLoader, FlashTextEncoderLoader, FlashVAELoader
from .quantize import FlashQuantizeModel
from .sampling import FlashSampler, FlashScheduler
from .training import (
    FlashTrainData,
    FlashTrainDMD,
    FlashTrainMerge,
    FlashTrainPretrain,
    FlashTrainSave,
    FlashTrainSetup,
    FlashTrainSplit,
)

NODE_CLASS_MAPPINGS: dict[str, type] = {
    "SD35FlashCheckpointLoader": FlashCheckpointLoader,
    "SD35FlashTextEncoderLoader": FlashTextEncoderLoader,
    "SD35FlashVAELoader": FlashVAELoader,
    "SD35FlashQuantizeModel": FlashQuantizeModel,
    "SD35FlashScheduler": FlashScheduler,
    "SD35FlashSampler": FlashSampler,
    "SD35FlashTrainSetup": FlashTrainSetup,
    "SD35FlashTrainData": FlashTrainData,
    "SD35FlashTrainPretrain": FlashTrainPretrain,
    "SD35FlashTrainDMD": FlashTrainDMD,
    "SD35FlashTrainSplit": FlashTrainSplit,
    "SD35FlashTrainMerge": FlashTrainMerge,
    "SD35FlashTrainSave": FlashTrainSave,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "SD35FlashCheckpointLoader": "Flash Checkpoint Loader",
    "SD35FlashTextEncoderLoader": "Triple Text Encoder Loader (T5 optional)",
    "SD35FlashVAELoader": "Flash VAE Loader",
    "SD35FlashQuantizeModel": "Quantize MODEL (SD3.5 Flash)",
    "SD35FlashScheduler": "Flash Scheduler",
    "SD35FlashSampler": "Flash Sampler",
    "SD35FlashTrainSetup": "Flash Distillation Setup",
    "SD35FlashTrainData": "Flash Teacher Data",
    "SD35FlashTrainPretrain": "Flash Trajectory Pre-training",
    "SD35FlashTrainDMD": "Flash DMD (timestep sharing)",
    "SD35FlashTrainSplit": "Flash Split Fine-tune + Merge",
    "SD35FlashTrainMerge": "Flash Merge Branches",
    "SD35FlashTrainSave": "Save Flash Checkpoint",
}


DEMO_FOLDER = Path(__file__).resolve().parent.parent / "demo"  # where flash_core.cli.DEMO_CHECKPOINT lives


def register_demo_folder(folder: str | Path = DEMO_FOLDER) -> bool:
    """Add ``folder`` (default: the pack's ``demo/``) to ComfyUI's ``checkpoints`` folders; True if it is listed.

    Only inside ComfyUI: ComfyUI has imported ``folder_paths`` before it loads any custom node, and the pack never
    imports it itself here (outside ComfyUI that import would set up ComfyUI's folders as a side effect). A
    missing folder (an installation without the demo model) is left out.
    """
    folder_paths = sys.modules.get("folder_paths")
    folder = Path(folder)
    if folder_paths is None or not folder.is_dir() or not hasattr(folder_paths, "add_model_folder_path"):
        return False
    folder_paths.add_model_folder_path("checkpoints", str(folder))  # no-op when already listed
    return True


register_demo_folder()
