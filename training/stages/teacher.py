"""The teacher stage: an MM-DiT trained from scratch by rectified flow on a dataset's VAE latents (docs/toyworld.md
"Teacher"; docs/algorithm.md "Notation"), with the frozen VAE and text encoders of ``teacher.components``. The EMA of
the weights is saved, with those components, as ``teacher.safetensors``: an official checkpoint the distillation
stages can name as ``model.teacher``.

The dataset is ``teacher.dataset``: a name the caller provides (``Trainer(datasets=...)``) or a folder of
captioned images (:func:`..teacher.load_dataset`); it is encoded once into a :class:`..teacher.LatentPool`.
"""

from __future__ import annotations

import torch
from PIL import Image

from ...flash_core.checkpoint import (
    CheckpointFiles,
    component_state_dict,
    index_checkpoint,
    load_mmdit,
    load_vae,
)
from ...flash_core.errors import CheckpointError
from ...flash_core.mmdit import MMDiT
from ...flash_core.schedule import teacher_sigmas
from .. import objectives as obj
from ..config import Config, ConfigError, teacher_architecture
from ..distributed import World
from ..teacher import LatentPool, load_dataset, logit_normal_sigmas
from . import Driver, StagePlan
from .networks import (
    enable_gradient_checkpointing,
    make_optimizer,
    norm_value,
    optimizer_step,
    set_lr,
    velocity_fn,
)
from .previews import sample_grid


def component_files(config: Config) -> CheckpointFiles:
    """``teacher.components``: the frozen VAE and text encoders the teacher is trained with (and ships with)."""
    path = config.teacher.components
    if not path:
        raise ConfigError("teacher.components: no checkpoint given (the VAE and text encoders to train with)")
    files = index_checkpoint(path)
    if not files.has("vae") or not (files.has("clip_l") or files.has("clip_g")):
        raise ConfigError(f"teacher.components: '{path}' must hold a VAE and CLIP text encoders; it holds "
                          f"{', '.join(files.components) or 'nothing'}")
    return files


def latent_pool(trainer: Driver, files: CheckpointFiles, vae) -> LatentPool:
    """The teacher's dataset encoded once: latents by ``vae``, captions by the components' text encoders."""
    from ...flash_core.text import TripleTextEncoder, load_tokenizers

    config = trainer.config
    cfg = config.teacher
    dataset = load_dataset(cfg.dataset, cfg.dataset_size, cfg.image_size, config.train.seed, trainer.datasets)
    if cfg.region_weight and dataset.regions is None:
        raise ConfigError(f"teacher.region_weight: the dataset '{cfg.dataset}' has no region maps (the toy world "
                          f"has them); set it to 0")
    text_encoder = TripleTextEncoder.from_state_dicts(
        **{slot: component_state_dict(files, slot) if files.has(slot) else None
           for slot in ("clip_l", "clip_g", "t5")},
        tokenizers=load_tokenizers(config.model.tokenizers or None), device=trainer.world.device)
    return LatentPool.build(dataset, vae, text_encoder, progress=trainer.progress)


def new_teacher(config: Config, device: torch.device) -> MMDiT:
    """A fresh MM-DiT of ``[teacher]``'s architecture (training init: adaLN-zero), seeded by ``train.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.train.seed)
        teacher = MMDiT(teacher_architecture(config.teacher))
    teacher = teacher.to(device)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(teacher)
    return teacher.requires_grad_(True).train()


def initial_teacher(config: Config, device: torch.device) -> MMDiT:
    """The teacher the stage trains: ``teacher.init``'s MM-DiT when given (an unquantized MM-DiT of
    ``[teacher]``'s architecture), else :func:`new_teacher`."""
    teacher = new_teacher(config, device)
    path = config.teacher.init
    if path:
        try:
            given = load_mmdit(path)
        except CheckpointError as e:
            raise ConfigError(f"teacher.init: {e}") from None
        mine, theirs = teacher.state_dict(), given.state_dict()
        if given.config != teacher.config or mine.keys() != theirs.keys():
            raise ConfigError(f"teacher.init: '{path}' is not an unquantized MM-DiT of [teacher]'s architecture: "
                              f"it is {given.config}, [teacher] makes {teacher.config}")
        with torch.no_grad():
            teacher.load_state_dict({k: v.to(mine[k].dtype) for k, v in theirs.items()})
    return teacher


def flow_matching_step(config: Config, world: World, model, pool: LatentPool,
                       generator: torch.Generator) -> torch.Tensor:
    """The rectified-flow loss ``||v(x_s, s) - (eps - x0)||^2`` on a global batch drawn with ``generator``
    (logit-normal sigmas, caption dropout to the null prompt, T5 and CLIP dropout, the region weight), on this
    rank's slice."""
    cfg, drop, d = config.teacher, config.dropout, world.device
    b = cfg.batch_size
    rows = torch.randint(len(pool), (b,), generator=generator)
    use_t5 = bool(torch.rand((), generator=generator) >= drop.t5)
    null = torch.rand(b, generator=generator) < cfg.caption_dropout
    drop_l = torch.rand(b, generator=generator) < drop.clip_l
    drop_g = torch.rand(b, generator=generator) < drop.clip_g
    drop_l &= ~drop_g  # never both: a sample keeps at least one CLIP
    eps = torch.randn((b, *pool.latents.shape[1:]), generator=generator)
    sigma = logit_normal_sigmas(b, cfg.logit_normal_mean, cfg.logit_normal_std, generator)
    captions = torch.where(null, pool.null_index, pool.caption_index[rows])
    local = world.local
    context, pooled = pool.conditioning_for(local(captions), use_t5, local(drop_l), local(drop_g))
    v = velocity_fn(model, context.to(d), pooled.to(d), config.train.autocast == "bf16")
    weight = pool.region_weights(local(rows), cfg.region_weight)
    return obj.flow_matching_loss(v, local(pool.latents[rows]).to(d), local(eps).to(d), local(sigma).to(d),
                                  None if weight is None else weight.to(d))


@torch.no_grad()
def teacher_preview(config: Config, device: torch.device, mmdit: torch.nn.Module, pool: LatentPool,
                    vae) -> Image.Image:
    """Teacher samples for the dataset's first captions: ``data.teacher_steps`` Euler steps on the shifted
    schedule with CFG ``data.teacher_cfg``, fixed seeds (``train.sample_seeds``), T5 on."""
    seeds = config.train.sample_seeds
    rows = pool.caption_index[torch.arange(len(seeds)) % len(pool)]
    context, pooled = pool.conditioning_for(rows, True)
    uncond = pool.conditioning_for(torch.full_like(rows, pool.null_index), True)
    sigmas = teacher_sigmas(config.data.teacher_steps, config.data.shift).to(device)
    return sample_grid(mmdit, vae, seeds, pool.latents.shape[1:], sigmas, context, pooled, uncond,
                       config.data.teacher_cfg)


def prepare(trainer: Driver) -> StagePlan:
    """The teacher stage: the pool, a fresh (or ``teacher.init``'s) teacher, AdamW, and the EMA that is saved."""
    config, device = trainer.config, trainer.world.device
    cfg = config.teacher
    files = component_files(config)
    vae = load_vae(component_state_dict(files, "vae"), device=device)
    pool = latent_pool(trainer, files, vae)
    teacher = initial_teacher(config, device)
    model = trainer.wrap(teacher)
    optimizer = make_optimizer(teacher.parameters(), cfg.optim)
    ema = {k: v.detach().clone() for k, v in teacher.state_dict().items()}

    def train_step(step: int, generator: torch.Generator) -> dict[str, float]:
        loss = flow_matching_step(config, trainer.world, model, pool, generator)
        values = {"loss": loss.item(), "lr": set_lr(optimizer, cfg.optim, step, cfg.iterations)}
        values["grad_norm"] = norm_value(optimizer_step(model, optimizer, loss, cfg.optim))
        obj.ema_update(ema, dict(teacher.named_parameters()), obj.ema_decay_at(step, cfg.ema_decay))
        return values

    return StagePlan(
        cfg.iterations, {"teacher": teacher, "ema": ema}, {"teacher": optimizer}, train_step, {"teacher": teacher},
        lambda: trainer.save_output("teacher", ema, cfg.iterations, parts_from=cfg.components, student=False),
        preview_model=teacher, preview=lambda mmdit: teacher_preview(config, device, mmdit, pool, vae))
