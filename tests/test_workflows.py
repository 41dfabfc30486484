"""ComfyUI graphs: the example workflows and the CLI's graph are valid for our node schemas and ComfyUI's stock
ones (tests/data/stock_nodes.json), and the validator catches what ComfyUI would refuse."""

import copy
import json
from pathlib import Path

import pytest

from sd35_flash.flash_core import node_specs
from sd35_flash.flash_core.graph import Graph, generation_graph
from sd35_flash.flash_core.node_specs import NODE_SPECS
from sd35_flash.nodes import workflows

from workflow_check import (
    all_schemas,
    check_api,
    check_graph,
    check_workflow,
    inputs_of,
    our_schemas,
    stock_schemas,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "example_workflows"


@pytest.fixture(scope="module")
def schemas():
    return all_schemas()


def _spec_from_schema(schema: dict):
    inputs = [(i.name, i.type, not i.required, i.control) for i in inputs_of(schema)]
    outputs = list(zip(schema["output_name"], schema["output"], strict=True))
    return schema["display_name"] or schema["name"], inputs, outputs


def _spec_from_table(spec: node_specs.NodeSpec):
    return spec.title, [(s.name, s.type, s.optional, s.control) for s in spec.inputs], list(spec.outputs)


def test_node_table_matches_our_node_classes():
    ours = our_schemas()
    assert set(node_specs.OUR_NODE_TYPES) == set(ours)
    for name in node_specs.OUR_NODE_TYPES:
        assert _spec_from_table(NODE_SPECS[name]) == _spec_from_schema(ours[name]), name


def test_node_table_matches_the_comfyui_snapshot():
    stock = stock_schemas()
    assert sorted(stock) == sorted(node_specs.STOCK_NODE_TYPES)
    for name in node_specs.STOCK_NODE_TYPES:
        assert _spec_from_table(NODE_SPECS[name]) == _spec_from_schema(stock[name]), name


def test_example_files_are_what_the_script_writes():
    expected = workflows.example_files()
    committed = {p.relative_to(EXAMPLES).as_posix(): p.read_text() for p in EXAMPLES.rglob("*.json")}
    assert sorted(committed) == sorted(expected)
    for name, text in expected.items():
        assert committed[name] == text, f"example_workflows/{name} is stale: run python -m " \
                                        "sd35_flash.nodes.workflows --write-examples example_workflows"


def test_the_script_writes_the_examples(tmp_path):
    assert workflows.main(["--write-examples", str(tmp_path)]) == 0
    assert {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json")} == set(workflows.example_files())


@pytest.mark.parametrize("name", sorted(workflows.EXAMPLES))
def test_example_workflow_is_valid_in_both_formats(name, schemas):
    ui = json.loads((EXAMPLES / f"{name}.json").read_text())  # the template ComfyUI lists: example_workflows/*.json
    api = json.loads((EXAMPLES / "api" / f"{name}.json").read_text())
    assert check_graph(api, ui, schemas) == []


def _nodes(api: dict, class_type: str) -> list[dict]:
    return [n["inputs"] for n in api.values() if n["class_type"] == class_type]


def test_examples_say_what_their_names_say():
    def api(name):
        return json.loads((EXAMPLES / "api" / f"{name}.json").read_text())

    assert _nodes(api("sd35_flash_4step"), "SD35FlashSampler")[0]["steps"] == 4
    assert _nodes(api("sd35_flash_2step"), "SD35FlashSampler")[0]["steps"] == 2
    assert _nodes(api("sd35_flash_t5_off"), "SD35FlashCheckpointLoader")[0]["t5"] == "off"
    native = api("sd35_flash_native_sampler")
    assert _nodes(native, "KSamplerSelect") == [{"sampler_name": "euler"}]
    assert {n["class_type"] for n in native.values()} >= {"SD35FlashScheduler", "SamplerCustomAdvanced",
                                                          "RandomNoise", "BasicGuider"}
    for name in workflows.EXAMPLES:
        (latent,) = _nodes(api(name), "EmptySD3LatentImage")
        assert latent["width"] % 16 == 0 and latent["height"] % 16 == 0
        assert _nodes(api(name), "SD35FlashCheckpointLoader")[0]["ckpt_name"] == "sd35_flash_demo.safetensors"


def test_generation_graph_with_every_option_is_valid(schemas):
    api, ui = generation_graph("a cat", checkpoint="/models/mmdit_only.safetensors", negative="blurry", steps=8,
                               seed=-1, width=768, height=512, cfg=3.5, batch=3, use_t5=False, dtype="bf16",
                               mode="renoise", vae="vae/sd3_vae.safetensors", clip_l="clip_l.safetensors",
                               clip_g="clip_g.safetensors", t5="t5xxl.safetensors", filename_prefix="cat",
                               quantize="int4")
    assert check_graph(api, ui, schemas) == []
    (loader,) = _nodes(api, "SD35FlashCheckpointLoader")
    assert loader == {"ckpt_name": "mmdit_only.safetensors", "t5": "off", "weight_dtype": "bf16", "quantize": "int4"}
    assert _nodes(api, "SD35FlashTextEncoderLoader") == [
        {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "none"}]
    assert _nodes(api, "SD35FlashVAELoader") == [{"vae_name": "sd3_vae.safetensors"}]
    (sampler,) = _nodes(api, "SD35FlashSampler")
    assert sampler["seed"] == 2 ** 64 - 1  # torch seeds -1 as 2**64 - 1
    assert (sampler["steps"], sampler["cfg"], sampler["mode"], sampler["denoise"]) == (8, 3.5, "renoise", 1.0)
    assert sorted(n["text"] for n in _nodes(api, "CLIPTextEncode")) == ["a cat", "blurry"]
    assert _nodes(api, "EmptySD3LatentImage") == [{"width": 768, "height": 512, "batch_size": 3}]
    assert _nodes(api, "SaveImage")[0]["filename_prefix"] == "cat"


def test_generation_graph_at_cfg_1_has_no_negative_prompt(schemas):
    api, ui = generation_graph("a cat")
    assert check_graph(api, ui, schemas) == []
    assert len(_nodes(api, "CLIPTextEncode")) == 1 and "negative" not in _nodes(api, "SD35FlashSampler")[0]
    (sampler,) = [n for n in ui["nodes"] if n["type"] == "SD35FlashSampler"]
    assert sampler["widgets_values"] == [0, "fixed", 4, 1.0, "auto", 1.0]
    assert [i["link"] is None for i in sampler["inputs"]] == [False, False, False, True]  # negative: open


def test_ui_layout_runs_left_to_right():
    _, ui = generation_graph("a cat")
    x = {n["id"]: n["pos"][0] for n in ui["nodes"]}
    assert all(x[src] < x[dst] for _, src, _, dst, _, _ in ui["links"])
    order = {n["id"]: n["order"] for n in ui["nodes"]}
    assert all(order[src] < order[dst] for _, src, _, dst, _, _ in ui["links"])


# ------------------------------------------------------------------------------------------------ the validator


@pytest.fixture
def example():
    return generation_graph("a cat", cfg=2.0, width=512, height=512)


def _find(api: dict, class_type: str) -> str:
    return next(i for i, n in api.items() if n["class_type"] == class_type)


def test_validator_catches_a_link_of_the_wrong_type(example, schemas):
    api, ui = copy.deepcopy(example)
    sampler, loader = _find(api, "SD35FlashSampler"), _find(api, "SD35FlashCheckpointLoader")
    api[sampler]["inputs"]["positive"] = [loader, 0]  # MODEL into CONDITIONING
    assert any("positive: takes CONDITIONING but is linked to a MODEL" in e for e in check_api(api, schemas))

    link = next(lk for lk in ui["links"] if lk[5] == "VAE")  # re-point the VAE link at the latent input
    decode = next(n for n in ui["nodes"] if n["id"] == link[3])
    decode["inputs"][0]["link"], decode["inputs"][1]["link"] = link[0], None
    link[4] = 0
    errors = check_workflow(ui, schemas)
    assert any("joins a VAE output to a LATENT input" in e for e in errors), errors
    assert any("vae: required input not connected" in e for e in errors), errors


def test_validator_catches_an_unknown_node(example, schemas):
    api, ui = copy.deepcopy(example)
    api[_find(api, "EmptySD3LatentImage")]["class_type"] = "EmptyLatentImageXL"
    assert any("unknown node type" in e for e in check_api(api, schemas))
    next(n for n in ui["nodes"] if n["type"] == "VAEDecode")["type"] = "VAEDecodeTiledFast"
    assert any("(VAEDecodeTiledFast): unknown node type" in e for e in check_workflow(ui, schemas))


def test_validator_catches_widget_values_out_of_range(example, schemas):
    api, ui = copy.deepcopy(example)
    inputs = api[_find(api, "SD35FlashSampler")]["inputs"]
    inputs["steps"], inputs["cfg"], inputs["mode"] = 0, "high", "dpmpp"
    errors = check_api(api, schemas)
    assert any("steps: 0 is below the minimum 1" in e for e in errors), errors
    assert any("cfg: 'high' is not a FLOAT" in e for e in errors), errors
    assert any("mode: 'dpmpp' is not one of" in e for e in errors), errors

    latent = next(n for n in ui["nodes"] if n["type"] == "EmptySD3LatentImage")
    latent["widgets_values"][0] = 99999
    sampler = next(n for n in ui["nodes"] if n["type"] == "SD35FlashSampler")
    sampler["widgets_values"][1] = "sometimes"
    loader = next(n for n in ui["nodes"] if n["type"] == "SD35FlashCheckpointLoader")
    loader["widgets_values"][0] = "model.ckpt"  # a file name, but not one our loader lists
    errors = check_workflow(ui, schemas)
    assert any("width: 99999 is above the maximum 16384" in e for e in errors), errors
    assert any("control_after_generate 'sometimes'" in e for e in errors), errors
    assert any("ckpt_name: 'model.ckpt' is not one of" in e for e in errors), errors


def test_validator_catches_missing_inputs_and_widget_counts(example, schemas):
    api, ui = copy.deepcopy(example)
    del api[_find(api, "VAEDecode")]["inputs"]["vae"]
    del api[_find(api, "SaveImage")]
    errors = check_api(api, schemas)
    assert any("vae: required input missing" in e for e in errors), errors
    assert any("no output node" in e for e in errors), errors
    sampler = next(n for n in ui["nodes"] if n["type"] == "SD35FlashSampler")
    sampler["widgets_values"].pop(1)  # the seed's control value
    assert any("5 widgets_values, the schema has 6" in e for e in check_workflow(ui, schemas))


def test_validator_sees_when_the_two_formats_disagree(example, schemas):
    api, ui = copy.deepcopy(example)
    api[_find(api, "SD35FlashSampler")]["inputs"]["seed"] = 5
    assert check_graph(api, ui, schemas) == ["the UI workflow does not queue the API prompt"]


def test_graph_builder_refuses_bad_graphs():
    g = Graph()
    loader = g.add("SD35FlashCheckpointLoader", ckpt_name="a.safetensors", t5="auto", weight_dtype="auto")
    with pytest.raises(ValueError, match="takes CLIP, not MODEL"):
        g.add("CLIPTextEncode", text="x", clip=loader["MODEL"])
    with pytest.raises(ValueError, match="unknown node type"):
        g.add("KSamplerFlash")
    with pytest.raises(ValueError, match="needs its input 'clip'"):
        g.add("CLIPTextEncode", text="x")
    with pytest.raises(KeyError, match="no output 'LATENT'"):
        loader["LATENT"]
