"""Where the demo model lives: one name for the file the toy-world build writes, the CLI generates with by
default and the ComfyUI loader lists (docs/toyworld.md "The demo model")."""

from pathlib import Path

DEMO_FILE_NAME = "sd35_flash_demo.safetensors"
DEMO_FOLDER = Path(__file__).resolve().parent.parent / "demo"
DEMO_CHECKPOINT = DEMO_FOLDER / DEMO_FILE_NAME
