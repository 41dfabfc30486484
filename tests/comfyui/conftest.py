"""Tests against a real ComfyUI checkout: they run when COMFYUI_ROOT points at one, and skip otherwise.

ComfyUI is imported the way its own unit tests do it outside the server: argument parsing off and
``--cpu`` set before ``comfy.model_management`` is imported (docs/comfyui.md "CPU note").
"""

import os
import sys
from pathlib import Path

import pytest

COMFYUI_ROOT = os.environ.get("COMFYUI_ROOT")


def pytest_collection_modifyitems(config, items):
    if COMFYUI_ROOT and (Path(COMFYUI_ROOT) / "comfy").is_dir():
        return
    reason = ("COMFYUI_ROOT is not set" if not COMFYUI_ROOT
              else f"COMFYUI_ROOT={COMFYUI_ROOT} has no comfy/ package")
    skip = pytest.mark.skip(reason=f"{reason}: point it at a ComfyUI checkout to run tests/comfyui")
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def comfy():
    """The imported ``comfy`` package, CPU only."""
    if COMFYUI_ROOT not in sys.path:
        sys.path.insert(0, COMFYUI_ROOT)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ops  # noqa: F401  (imports model_management with --cpu in force)

    return comfy


@pytest.fixture(scope="session")
def comfy_tokenizers() -> Path:
    """The ComfyUI root, as a tokenizer path: ``load_tokenizers`` reads the tokenizers ComfyUI bundles and its SD3
    CLIP uses (comfy/sd1_tokenizer: CLIP's BPE for CLIP-L and CLIP-G; comfy/text_encoders/t5_tokenizer: T5's)."""
    from sd35_flash.flash_core.text import find_tokenizer_dirs

    root = Path(COMFYUI_ROOT)
    dirs = find_tokenizer_dirs(root)
    assert dirs.clip_l == dirs.clip_g == root / "comfy" / "sd1_tokenizer", dirs
    assert dirs.t5 == root / "comfy" / "text_encoders" / "t5_tokenizer", dirs
    return root
