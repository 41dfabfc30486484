"""Workflow schemas against a live ComfyUI: the stock-node snapshot the CI tests check workflows with is still what
this ComfyUI serves, ComfyUI's own ``/object_info`` code takes our nodes, and ComfyUI's own prompt validation
accepts our example workflows and the CLI's graph."""

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: workflow_check

from sd35_flash.flash_core import graph, node_specs  # noqa: E402
from sd35_flash.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, loaders, workflows  # noqa: E402

from make_stock_snapshot import SNAPSHOT, load_comfyui, snapshot_entry  # noqa: E402
from workflow_check import FILE_PATTERN, our_schemas  # noqa: E402

MODEL_FILES = ["sd35_flash_demo.safetensors", "clip_l.safetensors", "clip_g.safetensors", "t5xxl.safetensors",
               "sd3_vae.safetensors"]


@pytest.fixture(scope="module")
def server(comfy, monkeypatch_module):
    """ComfyUI's ``nodes`` module and ``node_info``, with our node classes registered as a custom pack is."""
    nodes, node_info = load_comfyui(os.environ["COMFYUI_ROOT"])
    for name, cls in NODE_CLASS_MAPPINGS.items():
        monkeypatch_module.setitem(nodes.NODE_CLASS_MAPPINGS, name, cls)
        monkeypatch_module.setitem(nodes.NODE_DISPLAY_NAME_MAPPINGS, name, NODE_DISPLAY_NAME_MAPPINGS[name])
    return nodes, node_info


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_stock_snapshot_is_what_this_comfyui_serves(server):
    _, node_info = server
    snapshot = json.loads(SNAPSHOT.read_text())["nodes"]
    assert sorted(snapshot) == sorted(node_specs.STOCK_NODE_TYPES)
    for name, entry in snapshot.items():
        assert snapshot_entry(node_info(name)) == entry, (
            f"ComfyUI's {name} changed: rerun tests/comfyui/make_stock_snapshot.py and check flash_core/node_specs.py")


def test_our_nodes_pass_the_servers_node_info(server, monkeypatch):
    _, node_info = server
    monkeypatch.setattr(loaders, "filenames", lambda *folders: [FILE_PATTERN])
    ours = our_schemas()
    for name in NODE_CLASS_MAPPINGS:
        info = node_info(name)
        json.dumps(info)  # what web.json_response does with it
        assert snapshot_entry(info) == ours[name], name  # the CI tests' schemas are the server's
        assert info["category"] in ("SD3.5 Flash", "SD3.5 Flash/training") and info["description"]


def _validate(prompt: dict):
    import execution

    ok, error, outputs, node_errors = asyncio.run(execution.validate_prompt("sd35-flash-test", prompt, None))
    return ok, error, node_errors


@pytest.fixture
def model_files(monkeypatch):
    """ComfyUI lists MODEL_FILES in every model folder."""
    import folder_paths

    monkeypatch.setattr(folder_paths, "get_filename_list", lambda folder: list(MODEL_FILES))


@pytest.mark.parametrize("name", sorted(workflows.EXAMPLES))
def test_comfyui_accepts_the_example_prompt(server, model_files, name):
    api = json.loads((workflows.EXAMPLES_DIR / "api" / f"{name}.json").read_text())
    ok, error, node_errors = _validate(api)
    assert ok, (error, node_errors)


def test_comfyui_accepts_the_cli_graph_with_every_option(server, model_files):
    api, _ = graph.generation_graph("a cat", checkpoint="sd35_flash_demo.safetensors", negative="blurry", cfg=3.0,
                                    seed=-5, batch=2, use_t5=False, dtype="fp16", mode="renoise",
                                    vae="sd3_vae.safetensors", clip_l="clip_l.safetensors",
                                    clip_g="clip_g.safetensors", t5="t5xxl.safetensors")
    ok, error, node_errors = _validate(api)
    assert ok, (error, node_errors)


def test_comfyui_refuses_what_the_validator_refuses(server, model_files):
    api, _ = graph.generation_graph("a cat")
    sampler = next(n for n in api.values() if n["class_type"] == "SD35FlashSampler")
    sampler["inputs"]["steps"] = 0
    ok, _, node_errors = _validate(api)
    assert not ok and "steps" in json.dumps(node_errors)
