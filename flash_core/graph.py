"""ComfyUI graphs in both of ComfyUI's formats from one description: the API prompt (what ``/prompt`` runs and
SaveImage stores as the PNG ``prompt`` chunk) and the UI workflow (LiteGraph 0.4 JSON, what the editor opens,
stored as the ``workflow`` chunk and shipped in ``example_workflows/``).

Pure Python, no ComfyUI import. :data:`NODE_SPECS` describes exactly the node types our graphs use;
tests/test_workflows.py checks it against our nodes' ``INPUT_TYPES`` and against a snapshot of a real ComfyUI's
``/object_info`` (tests/data/stock_nodes.json), so it cannot drift from the schemas ComfyUI will load it with.

``python -m sd35_flash.flash_core.graph --write-examples example_workflows`` regenerates the example workflows.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")  # inputs the editor shows as widgets, not slots
CONTROL_AFTER_GENERATE = "fixed"  # the seed widget's companion value: keep the seed, so the graph reproduces
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "example_workflows"
DEMO_CHECKPOINT_NAME = "sd35_flash_demo.safetensors"
EXAMPLE_PROMPT = "a large red circle at the top"  # in the demo model's vocabulary (training/toyworld/world.py)
# The demo model (training/toyworld): 16 px images from a VAE without downsampling (1 pixel per latent), so its
# EmptySD3LatentImage is 128 x 128 (ComfyUI divides by 8: a 16 x 16 latent), and VAEDecode gives 16 px.
DEMO_IMAGE_SIZE = 16
DEMO_DOWNSCALE = 1
DEMO_SHOW_SIZE = 128  # the demo example enlarges its 16 px image (nearest) to this before saving
SEED_RANGE = 2 ** 64  # ComfyUI's seed widgets take 0 .. 2**64 - 1; torch seeds a negative s as s mod 2**64


@dataclass(frozen=True)
class Slot:
    """One input of a node type, in the node's input order (required, then optional)."""

    name: str
    type: str  # a ComfyUI type ("MODEL", "LATENT" ...) or a widget type (WIDGET_TYPES; "COMBO" for lists)
    optional: bool = False
    control: bool = False  # an INT widget followed by a control_after_generate value in the UI format

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES


@dataclass(frozen=True)
class NodeSpec:
    """What a graph needs to know about a node type: its default title, inputs and outputs."""

    title: str
    inputs: tuple[Slot, ...]
    outputs: tuple[tuple[str, str], ...]  # (name, type) per output slot
    size: tuple[int, int] | None = None  # editor size; computed from the slots where None

    @property
    def links(self) -> tuple[Slot, ...]:
        return tuple(s for s in self.inputs if not s.is_widget)

    @property
    def widgets(self) -> tuple[Slot, ...]:
        return tuple(s for s in self.inputs if s.is_widget)


def _spec(title: str, inputs: str, outputs: str, size: tuple[int, int] | None = None) -> NodeSpec:
    """``inputs``: ``name:TYPE`` words in input order; ``?`` after the type marks an optional input and ``*`` a
    control_after_generate widget. ``outputs``: ``TYPE`` or ``name:TYPE`` words."""
    slots = tuple(Slot(name, kind.rstrip("?*"), optional=kind.endswith("?"), control=kind.endswith("*"))
                  for name, _, kind in (word.partition(":") for word in inputs.split()))
    outs = tuple((name, kind or name) for name, _, kind in (word.partition(":") for word in outputs.split()))
    return NodeSpec(title, slots, outs, size)


NODE_SPECS: dict[str, NodeSpec] = {
    # ours (nodes/)
    "SD35FlashCheckpointLoader": _spec("Flash Checkpoint Loader",
                                       "ckpt_name:COMBO t5:COMBO weight_dtype:COMBO quantize:COMBO?", "MODEL CLIP VAE"),
    "SD35FlashTextEncoderLoader": _spec("Triple Text Encoder Loader (T5 optional)",
                                        "clip_l:COMBO clip_g:COMBO t5xxl:COMBO", "CLIP"),
    "SD35FlashVAELoader": _spec("Flash VAE Loader", "vae_name:COMBO", "VAE"),
    "SD35FlashQuantizeModel": _spec("Quantize MODEL (SD3.5 Flash)", "model:MODEL format:COMBO group_size:INT", "MODEL"),
    "SD35FlashScheduler": _spec("Flash Scheduler", "model:MODEL steps:INT denoise:FLOAT", "SIGMAS"),
    "SD35FlashSampler": _spec("Flash Sampler", "model:MODEL positive:CONDITIONING latent_image:LATENT seed:INT* "
                              "steps:INT cfg:FLOAT mode:COMBO denoise:FLOAT negative:CONDITIONING?", "LATENT"),
    "SD35FlashTrainSetup": _spec("Flash Distillation Setup",
                                 "teacher:COMBO prompts:STRING run_name:STRING student_steps:COMBO width:INT "
                                 "height:INT samples_per_prompt:INT batch_size:INT seed:INT* student_init:MODEL? "
                                 "config_toml:STRING?", "training:FLASH_TRAINING", size=(420, 420)),
    "SD35FlashTrainData": _spec("Flash Teacher Data", "training:FLASH_TRAINING teacher_steps:INT teacher_cfg:FLOAT",
                                "training:FLASH_TRAINING"),
    "SD35FlashTrainPretrain": _spec("Flash Trajectory Pre-training", "training:FLASH_TRAINING iterations:INT "
                                    "lr:FLOAT loss:COMBO resume:BOOLEAN", "training:FLASH_TRAINING MODEL",
                                    size=(420, 320)),
    "SD35FlashTrainDMD": _spec("Flash DMD (timestep sharing)", "training:FLASH_TRAINING iterations:INT lr:FLOAT "
                               "score_sample:COMBO real_cfg:FLOAT fake_updates_per_step:INT "
                               "trajectory_weight:FLOAT resume:BOOLEAN", "training:FLASH_TRAINING MODEL",
                               size=(420, 380)),
    "SD35FlashTrainSplit": _spec("Flash Split Fine-tune + Merge", "training:FLASH_TRAINING iterations:INT "
                                 "lr:FLOAT boundary:FLOAT merge_alpha:FLOAT resume:BOOLEAN",
                                 "training:FLASH_TRAINING MODEL", size=(420, 340)),
    "SD35FlashTrainSave": _spec("Save Flash Checkpoint", "training:FLASH_TRAINING stage:COMBO filename:STRING "
                                "overwrite:BOOLEAN?", ""),
    # ComfyUI's (stock)
    "CLIPTextEncode": _spec("CLIP Text Encode (Prompt)", "text:STRING clip:CLIP", "CONDITIONING", size=(420, 180)),
    "EmptySD3LatentImage": _spec("EmptySD3LatentImage", "width:INT height:INT batch_size:INT", "LATENT"),
    "VAEDecode": _spec("VAE Decode", "samples:LATENT vae:VAE", "IMAGE"),
    "SaveImage": _spec("Save Image", "images:IMAGE filename_prefix:STRING", "", size=(420, 470)),
    "ImageScale": _spec("Upscale Image", "image:IMAGE upscale_method:COMBO width:INT height:INT crop:COMBO", "IMAGE"),
    "SamplerCustomAdvanced": _spec("SamplerCustomAdvanced", "noise:NOISE guider:GUIDER sampler:SAMPLER "
                                   "sigmas:SIGMAS latent_image:LATENT", "output:LATENT denoised_output:LATENT"),
    "RandomNoise": _spec("RandomNoise", "noise_seed:INT*", "NOISE"),
    "BasicGuider": _spec("BasicGuider", "model:MODEL conditioning:CONDITIONING", "GUIDER"),
    "CFGGuider": _spec("CFGGuider", "model:MODEL positive:CONDITIONING negative:CONDITIONING cfg:FLOAT", "GUIDER"),
    "KSamplerSelect": _spec("KSamplerSelect", "sampler_name:COMBO", "SAMPLER"),
}
OUR_NODE_TYPES = tuple(t for t in NODE_SPECS if t.startswith("SD35Flash"))
STOCK_NODE_TYPES = tuple(t for t in NODE_SPECS if not t.startswith("SD35Flash"))


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


def generation_graph(prompt: str, *, checkpoint: str | os.PathLike = DEMO_CHECKPOINT_NAME, negative: str = "",
                     steps: int = 4, seed: int = 0, width: int = 1024, height: int = 1024, cfg: float = 1.0,
                     batch: int = 1, use_t5: bool = True, dtype: str = "auto", mode: str | None = None,
                     vae: str | os.PathLike | None = None, clip_l: str | os.PathLike | None = None,
                     clip_g: str | os.PathLike | None = None, t5: str | os.PathLike | None = None,
                     filename_prefix: str = "sd35_flash", quantize: str = "none", downscale_factor: int = 8,
                     show_at: int | None = None) -> tuple[dict, dict]:
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


def empty_latent_size(width: int, height: int, downscale_factor: int = 8) -> dict[str, int]:
    """EmptySD3LatentImage's ``width`` / ``height`` for an image of ``width`` x ``height`` pixels from a VAE of
    ``downscale_factor`` pixels per latent (ComfyUI's node always divides by 8)."""
    return {"width": width * 8 // downscale_factor, "height": height * 8 // downscale_factor}


def native_sampler_graph(prompt: str, *, checkpoint: str = DEMO_CHECKPOINT_NAME, steps: int = 4, seed: int = 0,
                         width: int = 1024, height: int = 1024, sampler: str = "euler",
                         filename_prefix: str = "sd35_flash", downscale_factor: int = 8) -> tuple[dict, dict]:
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


TRAINING_PROMPTS = "a red circle at the top\na blue square at the bottom\na green triangle in the center"


def training_graph(teacher: str = DEMO_CHECKPOINT_NAME, *, prompts: str = TRAINING_PROMPTS, run_name: str = "flash_run",
                   student_steps: int = 4, width: int = DEMO_IMAGE_SIZE, height: int = DEMO_IMAGE_SIZE,
                   samples_per_prompt: int = 4, batch_size: int = 4, seed: int = 0, teacher_steps: int = 32,
                   pretrain_iterations: int = 2000, dmd_iterations: int = 1200, split_iterations: int = 400,
                   filename: str = "sd35_flash_student", downscale_factor: int = DEMO_DOWNSCALE) -> tuple[dict, dict]:
    """The distillation as a graph: setup -> teacher data -> pre-training -> DMD -> split + merge -> save, and
    an image from the merged student (text encoders and VAE from the teacher file). ``width`` / ``height`` are
    pixels; ``downscale_factor`` is the teacher VAE's pixels per latent (sizes as in :func:`generation_graph`;
    the defaults fit the demo model)."""
    g = Graph()
    setup = g.add("SD35FlashTrainSetup", teacher=teacher, prompts=prompts, run_name=run_name,
                  student_steps=student_steps, width=width, height=height, samples_per_prompt=samples_per_prompt,
                  batch_size=batch_size, seed=seed, config_toml="")
    data = g.add("SD35FlashTrainData", training=setup[0], teacher_steps=teacher_steps, teacher_cfg=4.0)
    pretrain = g.add("SD35FlashTrainPretrain", training=data[0], iterations=pretrain_iterations, lr=1e-5, loss="l2",
                     resume=False)
    dmd = g.add("SD35FlashTrainDMD", training=pretrain[0], iterations=dmd_iterations, lr=1e-5,
                score_sample="shared_next", real_cfg=2.0, fake_updates_per_step=5, trajectory_weight=0.0,
                resume=False)
    split = g.add("SD35FlashTrainSplit", training=dmd[0], iterations=split_iterations, lr=1e-5, boundary=500.0,
                  merge_alpha=0.5, resume=False)
    g.add("SD35FlashTrainSave", training=split[0], stage="latest", filename=filename, overwrite=False)
    loader = g.add("SD35FlashCheckpointLoader", ckpt_name=teacher, t5="auto", weight_dtype="auto", quantize="none")
    positive = g.add("CLIPTextEncode", title="Positive Prompt", text=prompts.splitlines()[0], clip=loader["CLIP"])
    latent = g.add("EmptySD3LatentImage", **empty_latent_size(width, height, downscale_factor), batch_size=1)
    samples = g.add("SD35FlashSampler", model=split["MODEL"], positive=positive[0], latent_image=latent[0], seed=seed,
                    steps=student_steps, cfg=1.0, mode="auto", denoise=1.0)
    image = g.add("VAEDecode", samples=samples[0], vae=loader["VAE"])
    g.add("SaveImage", images=image[0], filename_prefix="sd35_flash_student")
    return g.api(), g.workflow()


_EXAMPLE = {"checkpoint": DEMO_CHECKPOINT_NAME, "width": DEMO_IMAGE_SIZE, "height": DEMO_IMAGE_SIZE, "seed": 0,
            "downscale_factor": DEMO_DOWNSCALE}
EXAMPLES: dict[str, Callable[[], tuple[dict, dict]]] = {
    "sd35_flash_demo": lambda: generation_graph("a blue triangle at the top", steps=4, filename_prefix="sd35_flash_demo",
                                                show_at=DEMO_SHOW_SIZE, **_EXAMPLE),
    "sd35_flash_4step": lambda: generation_graph(EXAMPLE_PROMPT, steps=4, filename_prefix="sd35_flash_4step",
                                                 **_EXAMPLE),
    "sd35_flash_2step": lambda: generation_graph(EXAMPLE_PROMPT, steps=2, filename_prefix="sd35_flash_2step",
                                                 **_EXAMPLE),
    "sd35_flash_t5_off": lambda: generation_graph(EXAMPLE_PROMPT, steps=4, use_t5=False,
                                                  filename_prefix="sd35_flash_t5_off", **_EXAMPLE),
    "sd35_flash_native_sampler": lambda: native_sampler_graph(EXAMPLE_PROMPT, steps=4,
                                                              filename_prefix="sd35_flash_native_sampler",
                                                              **_EXAMPLE),
    "sd35_flash_training": training_graph,
}


def dump(data: dict) -> str:
    """The text of an example workflow file."""
    return json.dumps(data, indent=2) + "\n"


def example_files() -> dict[str, str]:
    """Relative path -> text of every example workflow: ``NAME.json`` (UI format) and ``api/NAME.json``."""
    files = {}
    for name, build in EXAMPLES.items():
        api, ui = build()
        files[f"{name}.json"] = dump(ui)
        files[f"api/{name}.json"] = dump(api)
    return files


def write_examples(folder: str | os.PathLike = EXAMPLES_DIR) -> list[Path]:
    written = []
    for relative, text in example_files().items():
        path = Path(folder) / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sd35_flash.flash_core.graph",
                                     description="Write the example ComfyUI workflows (UI format, and API in api/).")
    parser.add_argument("--write-examples", metavar="DIR", type=Path, default=EXAMPLES_DIR,
                        help=f"output folder (default {EXAMPLES_DIR})")
    for path in write_examples(parser.parse_args(argv).write_examples):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
