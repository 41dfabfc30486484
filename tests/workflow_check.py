"""Checks ComfyUI graphs against node schemas, without ComfyUI.

A *schema* is a node type's ``/object_info`` entry (``input``, ``input_order``, ``output``, ``output_name``...).
Ours come from our node classes exactly as ComfyUI's ``server.node_info`` builds them (:func:`our_schemas`);
ComfyUI's stock nodes from a snapshot of a real ComfyUI (tests/data/stock_nodes.json, written by
tests/comfyui/make_stock_snapshot.py and compared with the live server by tests/comfyui/test_workflow_schemas.py).

:func:`check_api` and :func:`check_workflow` return a list of problems (empty: the graph is valid): unknown node
types, links between different types, missing required inputs, widget values the schema does not allow, and in
the UI format a widgets_values list of the wrong length or links that do not match the nodes' slots.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

STOCK_SNAPSHOT = Path(__file__).resolve().parent / "data" / "stock_nodes.json"
FILE_PATTERN = "*.safetensors"  # stands for a folder listing (models/...), empty outside ComfyUI
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
SCHEMA_FIELDS = ("name", "display_name", "input", "input_order", "output", "output_is_list", "output_name",
                 "output_node")


# ------------------------------------------------------------------------------------------------ schemas


def v1_node_info(name: str, cls: type, display_name: str | None = None) -> dict:
    """The ``/object_info`` fields of a classic (V1) node class, built as ComfyUI's ``server.node_info`` does,
    JSON round-tripped (tuples become lists, as the server sends them)."""
    inputs = cls.INPUT_TYPES()
    outputs = list(cls.RETURN_TYPES)
    info = {"name": name, "display_name": display_name or name, "input": inputs,
            "input_order": {section: list(entries) for section, entries in inputs.items()},
            "output": outputs, "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(outputs))),
            "output_name": list(getattr(cls, "RETURN_NAMES", outputs)),
            "output_node": getattr(cls, "OUTPUT_NODE", False) is True}
    return json.loads(json.dumps(info))


def our_schemas() -> dict[str, dict]:
    """Our nodes' schemas, their model-file lists shown as ``[FILE_PATTERN]`` (ComfyUI fills them from models/)."""
    from sd35_flash.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, loaders

    with mock.patch.object(loaders, "filenames", lambda *folders: [FILE_PATTERN]):
        return {name: v1_node_info(name, cls, NODE_DISPLAY_NAME_MAPPINGS.get(name))
                for name, cls in NODE_CLASS_MAPPINGS.items()}


def stock_schemas() -> dict[str, dict]:
    return json.loads(STOCK_SNAPSHOT.read_text())["nodes"]


def all_schemas() -> dict[str, dict]:
    return {**stock_schemas(), **our_schemas()}


@dataclass(frozen=True)
class Input:
    name: str
    type: str  # "COMBO" for a list of options
    config: dict
    options: tuple | None
    required: bool

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.config.get("forceInput")

    @property
    def control(self) -> bool:
        """The editor adds a control_after_generate widget after this one (its rule: the option, else INT inputs
        named seed or noise_seed)."""
        legacy = self.type == "INT" and self.name in ("seed", "noise_seed")
        return bool(self.config.get("control_after_generate", legacy))


def inputs_of(schema: dict) -> list[Input]:
    """Required then optional inputs in input order (hidden inputs are not part of a graph)."""
    result = []
    for section in ("required", "optional"):
        for name in schema.get("input_order", {}).get(section, []):
            spec = schema["input"][section][name]
            kind, config = spec[0], (spec[1] if len(spec) > 1 else {}) or {}
            options = None
            if isinstance(kind, list):
                kind, options = "COMBO", tuple(kind)
            elif kind == "COMBO":
                options = tuple(config.get("options", ()))
            result.append(Input(name, kind, config, options, section == "required"))
    return result


def types_match(output_type: str, input_type: str) -> bool:
    return output_type == input_type or "*" in (output_type, input_type)


def check_value(where: str, spec: Input, value) -> list[str]:
    """Is ``value`` allowed for the widget ``spec``?"""
    kind, config = spec.type, spec.config
    if kind == "COMBO":
        if value in spec.options:
            return []
        if FILE_PATTERN in spec.options and isinstance(value, str) and value.endswith(".safetensors"):
            return []
        return [f"{where}: {value!r} is not one of {list(spec.options)}"]
    expected = {"INT": int, "FLOAT": (int, float), "STRING": str, "BOOLEAN": bool}[kind]
    if not isinstance(value, expected) or (kind in ("INT", "FLOAT") and isinstance(value, bool)):
        return [f"{where}: {value!r} is not a {kind}"]
    if kind in ("INT", "FLOAT"):
        if "min" in config and value < config["min"]:
            return [f"{where}: {value} is below the minimum {config['min']}"]
        if "max" in config and value > config["max"]:
            return [f"{where}: {value} is above the maximum {config['max']}"]
    return []


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


# ------------------------------------------------------------------------------------------------ API format


def check_api(prompt: dict, schemas: dict[str, dict]) -> list[str]:
    """Problems of an API prompt ``{"id": {"class_type", "inputs"}}``."""
    errors = []
    for node_id, node in prompt.items():
        kind = node.get("class_type")
        where = f"node {node_id} ({kind})"
        if kind not in schemas:
            errors.append(f"{where}: unknown node type")
            continue
        inputs = {spec.name: spec for spec in inputs_of(schemas[kind])}
        values = node.get("inputs", {})
        errors += [f"{where}: unknown input '{name}'" for name in values if name not in inputs]
        for name, spec in inputs.items():
            here = f"{where}.{name}"
            if name not in values:
                if spec.required:
                    errors.append(f"{here}: required input missing")
                continue
            value = values[name]
            if _is_link(value):
                source = prompt.get(value[0])
                if source is None or source.get("class_type") not in schemas:
                    errors.append(f"{here}: links to missing or unknown node {value[0]}")
                    continue
                outputs = schemas[source["class_type"]]["output"]
                if not 0 <= value[1] < len(outputs):
                    errors.append(f"{here}: node {value[0]} has no output {value[1]}")
                elif not types_match(outputs[value[1]], spec.type):
                    errors.append(f"{here}: takes {spec.type} but is linked to a {outputs[value[1]]} output")
            elif not spec.is_widget:
                errors.append(f"{here}: takes a {spec.type} link, got the value {value!r}")
            else:
                errors += check_value(here, spec, value)
    if not any(schemas.get(n.get("class_type"), {}).get("output_node") for n in prompt.values()):
        errors.append("the prompt has no output node (ComfyUI refuses to run it)")
    return errors


# ------------------------------------------------------------------------------------------------ UI format


def check_workflow(workflow: dict, schemas: dict[str, dict]) -> list[str]:
    """Problems of a UI (LiteGraph 0.4) workflow."""
    errors = []
    if workflow.get("version") != 0.4:
        errors.append(f"version is {workflow.get('version')!r}, not 0.4")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    if len(nodes) != len(workflow["nodes"]) or len(links) != len(workflow["links"]):
        errors.append("node or link ids are not unique")
    if nodes and workflow.get("last_node_id", 0) < max(nodes):
        errors.append("last_node_id is below the largest node id")
    if links and workflow.get("last_link_id", 0) < max(links):
        errors.append("last_link_id is below the largest link id")

    for link_id, (_, src, src_slot, dst, dst_slot, kind) in links.items():
        where = f"link {link_id}"
        if src not in nodes or dst not in nodes:
            errors.append(f"{where}: joins missing nodes {src} -> {dst}")
            continue
        outputs, inputs = nodes[src].get("outputs", []), nodes[dst].get("inputs", [])
        if not (0 <= src_slot < len(outputs) and link_id in (outputs[src_slot].get("links") or [])):
            errors.append(f"{where}: node {src} output {src_slot} does not list it")
        elif not (0 <= dst_slot < len(inputs) and inputs[dst_slot].get("link") == link_id):
            errors.append(f"{where}: node {dst} input {dst_slot} does not hold it")
        elif not (types_match(outputs[src_slot]["type"], inputs[dst_slot]["type"])
                  and types_match(outputs[src_slot]["type"], kind)):
            errors.append(f"{where}: joins a {outputs[src_slot]['type']} output to a {inputs[dst_slot]['type']} "
                          f"input (link type {kind})")

    for node_id, node in nodes.items():
        kind = node.get("type")
        where = f"node {node_id} ({kind})"
        if kind not in schemas:
            errors.append(f"{where}: unknown node type")
            continue
        schema, specs = schemas[kind], inputs_of(schemas[kind])
        by_name = {s.name: s for s in specs}
        for slot in node.get("inputs", []):
            spec = by_name.get(slot["name"])
            if spec is None:
                errors.append(f"{where}: unknown input '{slot['name']}'")
            elif not types_match(slot["type"], spec.type):
                errors.append(f"{where}.{spec.name}: slot type {slot['type']}, schema type {spec.type}")
            elif slot.get("link") is not None and slot["link"] not in links:
                errors.append(f"{where}.{spec.name}: link {slot['link']} does not exist")
        connected = {s["name"] for s in node.get("inputs", []) if s.get("link") is not None}
        errors += [f"{where}.{s.name}: required input not connected"
                   for s in specs if s.required and not s.is_widget and s.name not in connected]
        declared = [(o["name"], o["type"]) for o in node.get("outputs", [])]
        if declared != list(zip(schema["output_name"], schema["output"], strict=True)):
            errors.append(f"{where}: outputs {declared} differ from the schema's")

        widgets = [s for s in specs if s.is_widget]  # a widget turned into a linked input keeps its value
        values = list(node.get("widgets_values", []))
        expected = sum(1 + s.control for s in widgets)
        if len(values) != expected:
            errors.append(f"{where}: {len(values)} widgets_values, the schema has {expected} widgets "
                          f"({', '.join(s.name + ' + control' * s.control for s in widgets)})")
            continue
        for spec in widgets:
            errors += check_value(f"{where}.{spec.name}", spec, values.pop(0))
            if spec.control:
                control = values.pop(0)
                if control not in CONTROL_VALUES:
                    errors.append(f"{where}.{spec.name}: control_after_generate {control!r} is not one of "
                                  f"{list(CONTROL_VALUES)}")
    return errors


def workflow_to_api(workflow: dict, schemas: dict[str, dict]) -> dict:
    """The API prompt the editor queues for a valid UI workflow (widgets by name, links as [source id, slot])."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in sorted(workflow["nodes"], key=lambda n: n["id"]):
        schema = schemas[node["type"]]
        values = list(node.get("widgets_values", []))
        links_in = {s["name"]: links[s["link"]] for s in node.get("inputs", []) if s.get("link") is not None}
        inputs = {}
        for spec in inputs_of(schema):
            if spec.is_widget:
                inputs[spec.name] = values.pop(0)
                if spec.control:
                    values.pop(0)
            if spec.name in links_in:
                inputs[spec.name] = [str(links_in[spec.name][1]), links_in[spec.name][2]]
        title = node.get("title") or schema.get("display_name") or node["type"]
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": node["type"], "_meta": {"title": title}}
    return prompt


def check_graph(api: dict | None = None, workflow: dict | None = None, schemas: dict | None = None) -> list[str]:
    """Both formats, and (given both) that the workflow queues exactly the API prompt."""
    schemas = schemas if schemas is not None else all_schemas()
    errors = (check_api(api, schemas) if api is not None else []) + \
        (check_workflow(workflow, schemas) if workflow is not None else [])
    if not errors and api is not None and workflow is not None and workflow_to_api(workflow, schemas) != api:
        errors.append("the UI workflow does not queue the API prompt")
    return errors
