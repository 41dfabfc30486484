"""Write tests/data/stock_nodes.json: a real ComfyUI's ``/object_info`` entries for the stock node types our graphs
use (``flash_core.node_specs.STOCK_NODE_TYPES``), so that tests without ComfyUI can check workflows against them.

    COMFYUI_ROOT=/path/to/ComfyUI /path/to/comfyui-python tests/comfyui/make_stock_snapshot.py [--commit SHA]

Run it with ComfyUI's own Python environment. tests/comfyui/test_workflow_schemas.py checks the file against the
live ComfyUI; rerun this script when that test reports a change in a newer ComfyUI.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SNAPSHOT = REPO / "tests" / "data" / "stock_nodes.json"
FIELDS = ("name", "display_name", "input", "input_order", "output", "output_is_list", "output_name", "output_node")


def stock_node_types() -> tuple[str, ...]:
    """``STOCK_NODE_TYPES`` from flash_core/node_specs.py, with this checkout imported as ``sd35_flash`` (whatever its
    folder is called)."""
    if "sd35_flash" not in sys.modules:
        spec = importlib.util.spec_from_file_location("sd35_flash", REPO / "__init__.py",
                                                      submodule_search_locations=[str(REPO)])
        package = importlib.util.module_from_spec(spec)
        sys.modules["sd35_flash"] = package
        spec.loader.exec_module(package)
    return importlib.import_module("sd35_flash.flash_core.node_specs").STOCK_NODE_TYPES


def load_comfyui(root: str | os.PathLike):
    """Import ComfyUI from ``root`` on the CPU with its stock nodes (no custom or API nodes) loaded, and return
    ``(nodes_module, node_info)``: ``node_info(name)`` is the function ComfyUI's ``/object_info`` route calls."""
    root = str(Path(root).resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True
    # ComfyUI's utils package before `server` needs it (main.py imports it first): importing `nodes` puts comfy/,
    # which has a utils.py, ahead of the root on sys.path, so put the root ahead of it for this one import.
    # A failed `import server` (one that met this problem) leaves comfy/utils.py registered as `utils`: drop it.
    if "utils" in sys.modules and not hasattr(sys.modules["utils"], "__path__"):
        del sys.modules["utils"]
    sys.path.insert(0, root)
    try:
        importlib.import_module("utils.install_util")
    finally:
        sys.path.remove(root)
    import server

    import nodes

    if "EmptySD3LatentImage" not in nodes.NODE_CLASS_MAPPINGS:  # the comfy_extras nodes, loaded once
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    code = next(c for c in server.PromptServer.__init__.__code__.co_consts
                if isinstance(c, types.CodeType) and c.co_name == "node_info")
    return nodes, types.FunctionType(code, vars(server), "node_info")


def snapshot_entry(info: dict) -> dict:
    """The fields of an ``/object_info`` entry that workflows are checked against, as JSON sends them."""
    return json.loads(json.dumps({field: info.get(field) for field in FIELDS}))


def comfyui_version(root: str | os.PathLike) -> str:
    text = (Path(root) / "comfyui_version.py").read_text()
    return text.split("__version__ =")[1].split()[0].strip("\"'")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_ROOT"), help="ComfyUI checkout ($COMFYUI_ROOT)")
    parser.add_argument("--commit", help="the checkout's commit (default: git rev-parse in it)")
    parser.add_argument("--out", type=Path, default=SNAPSHOT)
    options = parser.parse_args(argv)
    if not options.comfyui:
        parser.error("set COMFYUI_ROOT or pass --comfyui")
    commit = options.commit or subprocess.run(["git", "-C", options.comfyui, "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip()
    if not commit:
        parser.error(f"{options.comfyui} is not a git checkout: pass --commit")
    _, node_info = load_comfyui(options.comfyui)
    snapshot = {"comfyui": {"commit": commit, "version": comfyui_version(options.comfyui)},
                "nodes": {name: snapshot_entry(node_info(name)) for name in stock_node_types()}}
    options.out.write_text(json.dumps(snapshot, indent=1) + "\n")
    print(f"wrote {options.out} ({len(snapshot['nodes'])} node types, ComfyUI {commit})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
