"""ComfyUI graphs in both of ComfyUI's formats from one description: the API prompt (what ``/prompt`` runs and
SaveImage stores as the PNG ``prompt`` chunk) and the UI workflow (LiteGraph 0.4 JSON, what the editor opens,
stored as the ``workflow`` chunk and shipped in ``example_workflows/``).

Pure Python, no ComfyUI import. The node types come from one table, :data:`.node_specs.NODE_SPECS`, which our
node classes take their schemas from and which tests/test_workflows.py checks against a snapshot of a real
ComfyUI's ``/object_info`` (tests/data/stock_nodes.json), so a graph cannot drift from the schemas ComfyUI will
load it with. ``sd35-flash generate`` embeds :func:`generation_graph` in its PNGs, and nodes/workflows.py writes
the example workflows with this builder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .demo import DEMO_FILE_NAME
from .node_specs import NODE_SPECS, NodeSpec
from .vae import RELEASED_DOWNSCALE

CONTROL_AFTER_GENERATE = "fixed"  # the seed widget's companion value: keep the seed, so the graph reproduces
SEED_RANGE = 2 ** 64  # ComfyUI's seed widgets take 0 .. 2**64 - 1; torch seeds a negative s as s mod 2**64


@dataclass(frozen=True)
class Output:
    """Output ``slot`` of node ``node``: what a link input is given."""

    node: int
    slot: int
    type: str


@dataclass
class Node:
    id: int
    type: str
    values: dict[str, object]  # input name -> widget value or Output
    title: str | None = None

    @property
    def spec(self) -> NodeSpec:
        return NODE_SPECS[self.type]

    def __getitem__(self, key: int | str) -> Output:
        """An output by slot index or name: ``loader["CLIP"]``, ``loader[1]``."""
        outputs = self.spec.outputs
        slot = key if isinstance(key, int) else next((i for i, (n, _) in enumerate(outputs) if n == key), None)
        if slot is None or not 0 <= slot < len(outputs):
            raise KeyError(f"{self.type} has no output {key!r} (outputs: {', '.join(n for n, _ in outputs)})")
        return Output(self.id, slot, outputs[slot][1])


class Graph:
    """Nodes added in execution-compatible order (an input's source is added before it); ids count from 1."""

    def __init__(self):
        self.nodes: list[Node] = []

    def add(self, node_type: str, *, title: str | None = None, **inputs) -> Node:
        """Add a node; every widget and every required link input must be given, links as :class:`Output`."""
        if node_type not in NODE_SPECS:
            raise ValueError(f"unknown node type '{node_type}' (known: {', '.join(NODE_SPECS)})")
        spec = NODE_SPECS[node_type]
        slots = {s.name: s for s in spec.inputs}
        unknown = inputs.keys() - slots.keys()
        if unknown:
            raise ValueError(f"{node_type} has no input {', '.join(sorted(unknown))}")
        for slot in spec.inputs:
            value = inputs.get(slot.name)
            if value is None:
                if not slot.optional:
                    raise ValueError(f"{node_type} needs its input '{slot.name}'")
            elif slot.is_widget == isinstance(value, Output):
                raise ValueError(f"{node_type}.{slot.name} takes {'a value' if slot.is_widget else 'a link'}")
            elif isinstance(value, Output) and value.type != slot.type:
                raise ValueError(f"{node_type}.{slot.name} takes {slot.type}, not {value.type}")
        node = Node(len(self.nodes) + 1, node_type, {k: v for k, v in inputs.items() if v is not None}, title)
        self.nodes.append(node)
        return node

    # ---------------------------------------------------------------------------------------------- API format

    def api(self) -> dict:
        """The API prompt: ``{"id": {"inputs": ..., "class_type": ..., "_meta": {"title": ...}}}``."""
        prompt = {}
        for node in self.nodes:
            inputs = {}
            for slot in node.spec.inputs:
                if slot.name in node.values:
                    value = node.values[slot.name]
                    inputs[slot.name] = [str(value.node), value.slot] if isinstance(value, Output) else value
            prompt[str(node.id)] = {"inputs": inputs, "class_type": node.type,
                                    "_meta": {"title": node.title or node.spec.title}}
        return prompt

    # ---------------------------------------------------------------------------------------------- UI format

    def _columns(self) -> dict[int, int]:
        """Left-to-right column per node: one past its deepest source; a node without inputs sits just left of
        its first consumer, so loaders and latents stand next to what they feed."""
        column: dict[int, int] = {}
        for node in self.nodes:
            sources = [v.node for v in node.values.values() if isinstance(v, Output)]
            column[node.id] = 1 + max((column[s] for s in sources), default=-1)
        for node in reversed(self.nodes):
            consumers = [n.id for n in self.nodes
                         if any(isinstance(v, Output) and v.node == node.id for v in n.values.values())]
            if consumers and not node.spec.links:
                column[node.id] = max(0, min(column[c] for c in consumers) - 1)
        return column

    @staticmethod
    def _size(spec: NodeSpec) -> list[int]:
        """LiteGraph's computed size: 20 px per slot row, 24 per widget (the seed's control is a widget too)."""
        if spec.size:
            return list(spec.size)
        rows = max(len(spec.links), len(spec.outputs), 1)
        widgets = sum(1 + s.control for s in spec.widgets)
        return [315 if widgets else 225, 20 * rows + 6 + (24 * widgets + 8 if widgets else 0)]

    def workflow(self) -> dict:
        """The UI workflow (LiteGraph 0.4): nodes laid out by column, links ``[id, from, slot, to, slot, type]``."""
        links: list[list] = []
        inputs: dict[int, list[dict]] = {}
        outgoing: dict[tuple[int, int], list[int]] = {}
        for node in self.nodes:
            inputs[node.id] = []
            for index, slot in enumerate(node.spec.links):
                value = node.values.get(slot.name)
                link = None
                if isinstance(value, Output):
                    link = len(links) + 1
                    links.append([link, value.node, value.slot, node.id, index, slot.type])
                    outgoing.setdefault((value.node, value.slot), []).append(link)
                inputs[node.id].append({"name": slot.name, "type": slot.type, "link": link})

        column = self._columns()
        sizes = {node.id: self._size(node.spec) for node in self.nodes}
        x, width, y = {}, {}, {}
        for node in self.nodes:
            width[column[node.id]] = max(width.get(column[node.id], 0), sizes[node.id][0])
        for c in sorted(width):
            x[c] = x[c - 1] + width[c - 1] + 80 if c - 1 in x else 40
        order = {node_id: i for i, node_id in enumerate(self._execution_order())}

        nodes = []
        for node in self.nodes:
            c = column[node.id]
            top = y.get(c, 40)
            y[c] = top + sizes[node.id][1] + 70  # title bar (30) + gap
            widgets_values: list = []
            for slot in node.spec.widgets:
                widgets_values.append(node.values[slot.name])
                if slot.control:
                    widgets_values.append(CONTROL_AFTER_GENERATE)
            entry = {
                "id": node.id, "type": node.type, "pos": [x[c], top], "size": sizes[node.id], "flags": {},
                "order": order[node.id], "mode": 0, "inputs": inputs[node.id],
                "outputs": [{"name": name, "type": kind, "links": outgoing.get((node.id, slot), []),
                             "slot_index": slot} for slot, (name, kind) in enumerate(node.spec.outputs)],
                "properties": {"Node name for S&R": node.type},
                "widgets_values": widgets_values,
            }
            if node.title:
                entry["title"] = node.title
            nodes.append(entry)
        return {"last_node_id": len(self.nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
                "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}

    def _execution_order(self) -> list[int]:
        """Topological order, ties broken by id (LiteGraph's ``order``)."""
        done: list[int] = []
        pending = list(self.nodes)
        while pending:
            ready = next(n for n in pending if all(v.node in done for v in n.values.values() if isinstance(v, Output)))
            done.append(ready.id)
            pending.remove(ready)
        return done


# ------------------------------------------------------------------------------------------------ graphs


def _name(path: str | os.PathLike | None) -> str | None:
    return None if path is None else Path(path).name


def generation_graph(prompt: str, *, checkpoint: str | os.PathLike = DEMO_FILE_NAME, negative: str = "",
                     steps: int = 4, seed: int = 0, width: int = 1024, height: int = 1024, cfg: float = 1.0,
                     batch: int = 1, use_t5: bool = True, dtype: str = "auto", mode: str | None = None,
                     vae: str | os.PathLike | None = None, clip_l: str | os.PathLike | None = None,
                     clip_g: str | os.PathLike | None = None, t5: str | os.PathLike | None = None,
                     filename_prefix: str = "sd35_flash", quantize: str = "none",
                     downscale_factor: int = RELEASED_DOWNSCALE, show_at: int | None = None) -> tuple[dict, dict]:
    """The ComfyUI graph that does what ``sd35-flash generate`` does with these arguments (file arguments by
    their file name, as ComfyUI lists them): ``(api_prompt, ui_workflow)``.

    ``width`` / ``height`` are the image's pixels; ``downscale_factor`` is the VAE's pixels per latent (8 for the
    released SD3 VAE, 1 for the demo model's): ComfyUI's EmptySD3LatentImage always makes ``width // 8`` latents,
    so it is given ``width * 8 / downscale_factor`` (128 for the demo's 16 px), and VAEDecode, with the VAE's own
    ratio (nodes/native.build_vae), gives back ``width`` pixels. ``show_at``: an ImageScale (nearest-exact) to that
    width before SaveImage, so a tiny image is visible (the demo example).

    Separate text encoder files go to one Triple Text Encoder Loader (those not given are 'none'); in ComfyUI they
    then replace all of the checkpoint's text encoders, where the CLI fills in the missing ones from it.
    ``quantize`` (``none``, ``int8``, ``fp8``, ``int6``, ``int4``) is ``generate --weights``: the loader quantizes
    the MM-DiT while loading it.
    """
    g = Graph()
    loader = g.add("SD35FlashCheckpointLoader", ckpt_name=_name(checkpoint), t5="auto" if use_t5 else "off",
                   weight_dtype=dtype, quantize=quantize)
    clip = loader["CLIP"]
    if clip_l or clip_g or t5:
        clip = g.add("SD35FlashTextEncoderLoader", clip_l=_name(clip_l) or "none", clip_g=_name(clip_g) or "none",
                     t5xxl=(_name(t5) if use_t5 else None) or "none")["CLIP"]
    positive = g.add("CLIPTextEncode", title="Positive Prompt", text=prompt, clip=clip)
    negative_node = g.add("CLIPTextEncode", title="Negative Prompt", text=negative, clip=clip) if cfg != 1 else None
    latent = g.add("EmptySD3LatentImage", **empty_latent_size(width, height, downscale_factor), batch_size=batch)
    samples = g.add("SD35FlashSampler", model=loader["MODEL"], positive=positive[0], latent_image=latent[0],
                    seed=seed % SEED_RANGE, steps=steps, cfg=float(cfg), mode=mode or "auto", denoise=1.0,
                    negative=negative_node[0] if negative_node else None)
    vae_out = g.add("SD35FlashVAELoader", vae_name=_name(vae))["VAE"] if vae else loader["VAE"]
    image = g.add("VAEDecode", samples=samples[0], vae=vae_out)[0]
    if show_at:
        image = g.add("ImageScale", title="Enlarge (nearest)", image=image, upscale_method="nearest-exact",
                      width=show_at, height=round(show_at * height / width), crop="disabled")[0]
    g.add("SaveImage", images=image, filename_prefix=filename_prefix)
    return g.api(), g.workflow()


def empty_latent_size(width: int, height: int, downscale_factor: int = RELEASED_DOWNSCALE) -> dict[str, int]:
    """EmptySD3LatentImage's ``width`` / ``height`` for an image of ``width`` x ``height`` pixels from a VAE of
    ``downscale_factor`` pixels per latent (ComfyUI's node always divides by 8)."""
    return {"width": width * RELEASED_DOWNSCALE // downscale_factor,
            "height": height * RELEASED_DOWNSCALE // downscale_factor}


def native_sampler_graph(prompt: str, *, checkpoint: str = DEMO_FILE_NAME, steps: int = 4, seed: int = 0,
                         width: int = 1024, height: int = 1024, sampler: str = "euler",
                         filename_prefix: str = "sd35_flash",
                         downscale_factor: int = RELEASED_DOWNSCALE) -> tuple[dict, dict]:
    """The Flash Scheduler's sigmas on ComfyUI's own SamplerCustomAdvanced (RandomNoise, BasicGuider at CFG 1,
    KSamplerSelect): the same image as the Flash Sampler in euler mode. Sizes as in :func:`generation_graph`."""
    g = Graph()
    loader = g.add("SD35FlashCheckpointLoader", ckpt_name=checkpoint, t5="auto", weight_dtype="auto", quantize="none")
    positive = g.add("CLIPTextEncode", title="Positive Prompt", text=prompt, clip=loader["CLIP"])
    guider = g.add("BasicGuider", model=loader["MODEL"], conditioning=positive[0])
    noise = g.add("RandomNoise", noise_seed=seed % SEED_RANGE)
    select = g.add("KSamplerSelect", sampler_name=sampler)
    sigmas = g.add("SD35FlashScheduler", model=loader["MODEL"], steps=steps, denoise=1.0)
    latent = g.add("EmptySD3LatentImage", **empty_latent_size(width, height, downscale_factor), batch_size=1)
    samples = g.add("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=select[0],
                    sigmas=sigmas[0], latent_image=latent[0])
    image = g.add("VAEDecode", samples=samples["output"], vae=loader["VAE"])
    g.add("SaveImage", images=image[0], filename_prefix=filename_prefix)
    return g.api(), g.workflow()
