"""The example workflows in ``example_workflows/`` (UI format, and API format in ``api/``), written with the graph
builder of flash_core/graph.py.

The training example takes every widget it does not set on purpose from the nodes' own defaults, which come from
the training config (training/config.py, through nodes/schema.py): a default changed there changes the example
when it is written again, and the test that compares the committed files says so.

``python -m sd35_flash.nodes.workflows --write-examples example_workflows`` regenerates the example workflows.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

from ..flash_core.demo import DEMO_FILE_NAME
from ..flash_core.graph import Graph, empty_latent_size, generation_graph, native_sampler_graph
from ..flash_core.node_specs import NODE_SPECS
from . import NODE_CLASS_MAPPINGS

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "example_workflows"
EXAMPLE_PROMPT = "a large red circle at the top"  # in the demo model's vocabulary (training/toyworld/world.py)
# The demo model (training/toyworld): 16 px images from a VAE without downsampling (1 pixel per latent), so its
# EmptySD3LatentImage is 128 x 128 (ComfyUI divides by 8: a 16 x 16 latent), and VAEDecode gives 16 px.
DEMO_IMAGE_SIZE = 16
DEMO_DOWNSCALE = 1
DEMO_SHOW_SIZE = 128  # the demo example enlarges its 16 px image (nearest) to this before saving
TRAINING_PROMPTS = "a red circle at the top\na blue square at the bottom\na green triangle in the center"
TRAINING_SAMPLES_PER_PROMPT = 4  # teacher samples for each of the example's three prompts
TRAINING_NODE_TYPES = ("SD35FlashTrainSetup", "SD35FlashTrainData", "SD35FlashTrainPretrain", "SD35FlashTrainDMD",
                       "SD35FlashTrainSplit", "SD35FlashTrainSave")  # the training example's chain, in order


def widget_defaults(node_type: str) -> dict[str, object]:
    """The widget values a new node of ``node_type`` has in the editor: each widget's default, else a combo's
    first choice (as ComfyUI picks it); a combo without choices here (a model file list) is left out."""
    schema = NODE_CLASS_MAPPINGS[node_type].INPUT_TYPES()
    values = {}
    for slot in NODE_SPECS[node_type].widgets:
        kind, options = schema["optional" if slot.optional else "required"][slot.name]
        if "default" in options:
            values[slot.name] = options["default"]
        elif isinstance(kind, list) and kind:
            values[slot.name] = kind[0]
    return values


def widget_values(node_type: str, given: Mapping[str, object]) -> dict[str, object]:
    """:func:`widget_defaults` of ``node_type`` with the values ``given`` by widget name (others refused)."""
    names = [slot.name for slot in NODE_SPECS[node_type].widgets]
    unknown = [name for name in given if name not in names]
    if unknown:
        raise ValueError(f"{node_type} has no widget {', '.join(unknown)} (its widgets: {', '.join(names)})")
    return {**widget_defaults(node_type), **given}


def training_graph(teacher: str = DEMO_FILE_NAME, *, prompts: str = TRAINING_PROMPTS, width: int = DEMO_IMAGE_SIZE,
                   height: int = DEMO_IMAGE_SIZE, samples_per_prompt: int = TRAINING_SAMPLES_PER_PROMPT,
                   downscale_factor: int = DEMO_DOWNSCALE, **widgets: Mapping[str, object]) -> tuple[dict, dict]:
    """The distillation as a graph: setup -> teacher data -> pre-training -> DMD -> split + merge -> save, and
    an image from the merged student (text encoders and VAE from the teacher file). ``width`` / ``height`` are
    pixels; ``downscale_factor`` is the teacher VAE's pixels per latent (sizes as in
    :func:`~..flash_core.graph.generation_graph`; the defaults fit the demo model).

    ``widgets``: more widget values by node type (``SD35FlashTrainDMD={"iterations": 10}``); every widget not
    given holds its node's default (:func:`widget_defaults`: the training config's, for a training option). The
    image is drawn with the setup's seed and student steps, and saved under the save node's filename.
    """
    unknown = [name for name in widgets if name not in TRAINING_NODE_TYPES]
    if unknown:
        raise ValueError(f"the training graph has no node {', '.join(unknown)} ({', '.join(TRAINING_NODE_TYPES)})")
    setup_given = {"teacher": teacher, "prompts": prompts, "width": width, "height": height,
                   "samples_per_prompt": samples_per_prompt, **widgets.get("SD35FlashTrainSetup", {})}
    values = {t: widget_values(t, setup_given if t == "SD35FlashTrainSetup" else widgets.get(t, {}))
              for t in TRAINING_NODE_TYPES}
    g = Graph()
    setup = g.add("SD35FlashTrainSetup", **values["SD35FlashTrainSetup"])
    data = g.add("SD35FlashTrainData", training=setup["training"], **values["SD35FlashTrainData"])
    pretrain = g.add("SD35FlashTrainPretrain", training=data["training"], **values["SD35FlashTrainPretrain"])
    dmd = g.add("SD35FlashTrainDMD", training=pretrain["training"], **values["SD35FlashTrainDMD"])
    split = g.add("SD35FlashTrainSplit", training=dmd["training"], **values["SD35FlashTrainSplit"])
    g.add("SD35FlashTrainSave", training=split["training"], **values["SD35FlashTrainSave"])
    loader = g.add("SD35FlashCheckpointLoader", ckpt_name=teacher, t5="auto", weight_dtype="auto", quantize="none")
    positive = g.add("CLIPTextEncode", title="Positive Prompt", text=prompts.splitlines()[0], clip=loader["CLIP"])
    latent = g.add("EmptySD3LatentImage", **empty_latent_size(width, height, downscale_factor), batch_size=1)
    chosen = values["SD35FlashTrainSetup"]
    samples = g.add("SD35FlashSampler", model=split["MODEL"], positive=positive[0], latent_image=latent[0],
                    seed=chosen["seed"], steps=chosen["student_steps"], cfg=1.0, mode="auto", denoise=1.0)
    image = g.add("VAEDecode", samples=samples[0], vae=loader["VAE"])
    g.add("SaveImage", images=image[0], filename_prefix=values["SD35FlashTrainSave"]["filename"])
    return g.api(), g.workflow()


_EXAMPLE = {"checkpoint": DEMO_FILE_NAME, "width": DEMO_IMAGE_SIZE, "height": DEMO_IMAGE_SIZE, "seed": 0,
            "downscale_factor": DEMO_DOWNSCALE}
EXAMPLES: dict[str, Callable[[], tuple[dict, dict]]] = {
    "sd35_flash_demo": lambda: generation_graph("a blue triangle at the top", steps=4,
                                                filename_prefix="sd35_flash_demo", show_at=DEMO_SHOW_SIZE,
                                                **_EXAMPLE),
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
    parser = argparse.ArgumentParser(prog="python -m sd35_flash.nodes.workflows",
                                     description="Write the example ComfyUI workflows (UI format, and API in api/).")
    parser.add_argument("--write-examples", metavar="DIR", type=Path, default=EXAMPLES_DIR,
                        help=f"output folder (default {EXAMPLES_DIR})")
    for path in write_examples(parser.parse_args(argv).write_examples):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
