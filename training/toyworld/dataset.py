"""The toy world as a teacher dataset (docs/toyworld.md "Teacher"): what ``teacher.dataset = "toyworld"`` names where
the caller plugs it in (``sd35-flash-train``, the toy-world build): :data:`DATASETS`, passed to the training as
``datasets``."""

from __future__ import annotations

from collections.abc import Mapping

from ..config import ConfigError
from ..teacher import CaptionedImages, DatasetSource
from . import world

NAME = "toyworld"


def toyworld_images(count: int, seed: int, image_size: int = world.IMAGE_SIZE) -> CaptionedImages:
    """``count`` toy-world scenes (docs/toyworld.md "World") drawn with ``seed``, with their shape regions."""
    if image_size != world.IMAGE_SIZE:
        raise ConfigError(f"teacher.image_size: the toy world is {world.IMAGE_SIZE} px, got {image_size}")
    batch = world.sample(count, seed, regions=True)
    return CaptionedImages(batch.images, batch.captions, batch.regions)


DATASETS: Mapping[str, DatasetSource] = {NAME: toyworld_images}
