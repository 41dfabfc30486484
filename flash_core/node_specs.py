"""The node types our ComfyUI graphs use, in one table: each one's title, its inputs in order (name, kind, optional,
control_after_generate) and its outputs.

Pure Python, no ComfyUI import. The graph builder (:mod:`.graph`) writes graphs from it, and our node classes
(nodes/schema.py) take from it the names, order, kinds and required/optional split of their inputs, their
``RETURN_TYPES`` / ``RETURN_NAMES`` and their display titles, adding only what it does not hold (choices,
defaults, bounds, tooltips). ComfyUI's stock node types are here as a real ComfyUI serves them:
tests/test_workflows.py checks them against a snapshot of its ``/object_info`` (tests/data/stock_nodes.json).
"""

from __future__ import annotations

from dataclasses import dataclass

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")  # inputs the editor shows as widgets, not slots
OUR_PREFIX = "SD35Flash"  # the type names of our node classes (nodes/) start with it


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
    "SD35FlashTrainMerge": _spec("Flash Merge Branches", "training:FLASH_TRAINING merge_alpha:FLOAT",
                                 "training:FLASH_TRAINING MODEL"),
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
OUR_NODE_TYPES = tuple(t for t in NODE_SPECS if t.startswith(OUR_PREFIX))
STOCK_NODE_TYPES = tuple(t for t in NODE_SPECS if not t.startswith(OUR_PREFIX))
