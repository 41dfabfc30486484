"""ComfyUI-SD35-Flash: SD3.5-Flash as a ComfyUI node pack and a Python library.

ComfyUI imports this file as the pack's entry point; pip installs the same folder as ``sd35_flash``.
The engine lives in :mod:`flash_core` (no ComfyUI imports), the distillation in :mod:`training`, and
the ComfyUI adapters in :mod:`nodes`.
"""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__version__ = "0.1.0"
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
