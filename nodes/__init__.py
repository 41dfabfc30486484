"""ComfyUI nodes (classic V1 API). Every ``comfy``/``folder_paths``/``server`` import happens inside a function,
so this package imports, and its schemas can be tested, where ComfyUI is absent.

Inside ComfyUI, importing the pack also adds its ``demo/`` folder (the demo model, when present) to ComfyUI's
``checkpoints`` folders, so the Flash Checkpoint Loader offers ``sd35_flash_demo.safetensors`` out of the box.
"""

import sys
from pathlib import Path

from ..flash_core.demo import DEMO_FOLDER
from .loaders import FlashCheckpointLoader, FlashTextEncoderLoader, FlashVAELoader
from .quantize import FlashQuantizeModel
from .sampling import FlashSampler, FlashScheduler
from .schema import display_name
from .training import (
    FlashTrainData,
    FlashTrainDMD,
    FlashTrainMerge,
    FlashTrainPretrain,
    FlashTrainSave,
    FlashTrainSetup,
    FlashTrainSplit,
)

NODE_CLASSES = (FlashCheckpointLoader, FlashTextEncoderLoader, FlashVAELoader, FlashQuantizeModel, FlashScheduler,
                FlashSampler, FlashTrainSetup, FlashTrainData, FlashTrainPretrain, FlashTrainDMD, FlashTrainSplit,
                FlashTrainMerge, FlashTrainSave)
NODE_CLASS_MAPPINGS: dict[str, type] = {cls.NODE_TYPE: cls for cls in NODE_CLASSES}
# the titles of flash_core/node_specs.py, the table the graph builder and every node schema come from
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {name: display_name(name) for name in NODE_CLASS_MAPPINGS}


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
