"""The toy world's evaluator (issue 6 "An evaluator"; docs/toyworld.md "Metrics that discriminate").

* :class:`AttributeClassifier`: a small CNN trained on toy images to predict every attribute of
  :data:`~.world.ATTRIBUTES` (layout, both objects' colour and shape, size, position, background). It is a
  measuring instrument only: never use it as a training loss (docs/toyworld.md "Pitfalls" 4: that would leak the
  metric). Its penultimate layer, :meth:`AttributeClassifier.features`, is the feature space of the Frechet
  distances, as Inception's pool layer is for FID.
* :func:`frechet_distance`: ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)`` between Gaussians
  fitted to two feature sets (float64, symmetric square roots by ``torch.linalg.eigh``; no scipy). FD_T compares
  a model's samples with the teacher's 32-step CFG samples, FD_real with real images, beside
  :func:`real_vs_real_floor` at the same sample counts (the value two independent real sets give).
* :func:`paired_mse` (same noise, same prompt: a student's image against the teacher's) and
  :func:`attribute_accuracy` (all attributes right, and each attribute) against caption labels.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from . import world

FEATURE_DIM = 128


class AttributeClassifier(nn.Module):
    """Conv 16 -> 8 -> 4 px, a 128-d feature layer, one linear head per attribute."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM):
        super().__init__()

        def block(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU()]

        self.body = nn.Sequential(
            *block(3, width), *block(width, width), *block(width, 2 * width, 2), *block(2 * width, 2 * width),
            *block(2 * width, 4 * width, 2), nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(classes))
                                    for name, classes in world.ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """{attribute: logits [N, classes]} for images [N, 3, 16, 16] in [-1, 1]."""
        h = self.body(images)
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """[N, 128] float32 features (the Frechet distances' space), computed in chunks."""
        return torch.cat([self.body(images[i:i + batch_size].float()) for i in range(0, len(images), batch_size)])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> dict[str, torch.Tensor]:
        """{attribute: predicted class [N]}."""
        feats = self.features(images, batch_size)
        return {name: head(feats).argmax(-1) for name, head in self.heads.items()}


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mild blur and noise, so that slightly soft or grainy generated images are read like clean ones."""
    n = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=generator) * 0.5
    noise = torch.randn(images.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.08
    return images * (1 - mix) + blurred * mix + noise


def classifier_loss(model: AttributeClassifier, images: torch.Tensor,
                    labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Sum over attributes of the cross-entropy on the samples where the attribute applies (label >= 0)."""
    logits = model(images)
    losses = {name: F.cross_entropy(logits[name], labels[name], ignore_index=-1)
              for name in world.ATTRIBUTES if bool((labels[name] >= 0).any())}
    return sum(losses.values()), {name: loss.item() for name, loss in losses.items()}


def train_classifier(iterations: int = 400, batch_size: int = 128, lr: float = 2e-3, width: int = 32,
                     seed: int = 0, progress: bool = True) -> tuple[AttributeClassifier, list[dict]]:
    """Train the classifier on fresh toy images every step (AdamW, cosine decay); all randomness from ``seed``.

    Returns the model (eval mode, frozen) and its log, one dict per step: ``step``, ``loss`` and ``acc`` (the
    training batch's all-attributes accuracy).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AttributeClassifier(width)
    data = torch.Generator().manual_seed(seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(iterations, 1), eta_min=lr * 0.05)
    log = []
    bar = tqdm(range(iterations), desc="toy classifier", unit="it", disable=not progress)
    for step in bar:
        labels = world.sample_labels(batch_size, data)
        images = _augment(world.render(labels, data), data)
        loss, _ = classifier_loss(model, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            acc = attribute_accuracy({k: v.argmax(-1) for k, v in model(images).items()}, labels)["all"]
        log.append({"step": step, "loss": loss.item(), "acc": acc})
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
    return model.eval().requires_grad_(False), log


# ---------------------------------------------------------------------------------------------- metrics


def attribute_accuracy(pred: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """Accuracy per attribute over the samples where it applies (label >= 0; attributes that apply nowhere,
    e.g. background against caption labels, are left out), and ``all``: the fraction of samples with every
    applicable attribute right."""
    names = [n for n in world.ATTRIBUTES if n in labels and bool((labels[n] >= 0).any())]
    if not names:
        raise ValueError("attribute_accuracy: no labelled attribute (every label is -1)")
    out, every = {}, torch.ones_like(labels[names[0]], dtype=torch.bool)
    for name in names:
        applies = labels[name] >= 0
        right = pred[name].to(labels[name].device) == labels[name]
        out[name] = right[applies].float().mean().item()
        every &= right | ~applies
    out["all"] = every.float().mean().item()
    return out


def shape_accuracy(pred: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> dict[str, float]:
    """{shape name: how often an object asked to be that shape (either object of a scene) is read as it}: where
    ``shape`` and ``shape_2`` lose their accuracy (a circle drawn as a square reads differently from a triangle
    drawn as anything); shapes no label asks for are left out."""
    asked = torch.cat([labels["shape"], labels["shape_2"]])
    drawn = torch.cat([pred["shape"].to(asked.device), pred["shape_2"].to(asked.device)])
    return {name: (drawn[asked == k] == k).float().mean().item()
            for k, name in enumerate(world.SHAPES) if bool((asked == k).any())}


def paired_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared difference of paired samples (same prompt, same noise), over every element."""
    if a.shape != b.shape:
        raise ValueError(f"paired_mse needs paired tensors of one shape, got {list(a.shape)} and {list(b.shape)}")
    return (a.double() - b.double()).pow(2).mean().item()


def gaussian_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) in float64; the covariance is the unbiased one (N - 1)."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"Frechet distance needs features [N >= 2, D], got shape {list(features.shape)}")
    x = features.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance_gaussian(mu_a: torch.Tensor, cov_a: torch.Tensor, mu_b: torch.Tensor,
                              cov_b: torch.Tensor) -> float:
    """Frechet (2-Wasserstein squared) distance of N(mu_a, cov_a) and N(mu_b, cov_b).

    ``tr (S_a^1/2 S_b S_a^1/2)^1/2`` is the sum of the square roots of that symmetric PSD matrix's eigenvalues;
    it equals ``tr (S_a S_b)^1/2`` of the usual FID formula without a non-symmetric matrix square root.
    """
    mu_a, mu_b, cov_a, cov_b = (t.double() for t in (mu_a, mu_b, cov_a, cov_b))
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    trace_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_root
    return max(value.item(), 0.0)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets [N_a, D] and [N_b, D]."""
    if feats_a.shape[1:] != feats_b.shape[1:]:
        raise ValueError(f"feature sets of different widths: {list(feats_a.shape)} and {list(feats_b.shape)}")
    return frechet_distance_gaussian(*gaussian_stats(feats_a), *gaussian_stats(feats_b))


def repeat_prompts(prompts: list[str] | tuple[str, ...], count: int) -> list[str]:
    """``count`` prompts cycling through ``prompts`` (fixed prompt sets of any size)."""
    return [prompts[i % len(prompts)] for i in range(count)]


def real_vs_real_floor(classifier: AttributeClassifier, prompts=world.EVAL_PROMPTS, count_a: int = 1000,
                       count_b: int = 2000, seed: int = 0) -> float:
    """FD between two independent sets of real images for the same prompts, of the table's sample counts: the
    floor under which no FD_real can be read as a difference (docs/toyworld.md: about 24 for 1000 vs 2000)."""
    generator = torch.Generator().manual_seed(seed)
    real_a = world.sample_for_prompts(repeat_prompts(prompts, count_a), generator).images
    real_b = world.sample_for_prompts(repeat_prompts(prompts, count_b), generator).images
    return frechet_distance(classifier.features(real_a), classifier.features(real_b))


def paired_bootstrap(a: torch.Tensor, b: torch.Tensor, statistic, resamples: int = 1000, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """``statistic(a) - statistic(b)`` and its paired bootstrap interval: ``a`` and ``b`` hold one row per
    evaluation sample, row ``i`` of both from the same prompt (and noise), so each resample draws one set of row
    indices for both. ``statistic`` maps rows to a number (an FD to a fixed reference, a mean). Returns
    (difference, low, high) at ``level`` from the percentiles of ``resamples`` resampled differences."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"paired_bootstrap needs one row per sample in both, got {a.shape[0]} and {b.shape[0]}")
    generator = torch.Generator().manual_seed(seed)
    n = a.shape[0]
    diffs = []
    for _ in range(resamples):
        idx = torch.randint(n, (n,), generator=generator)
        diffs.append(statistic(a[idx]) - statistic(b[idx]))
    diffs = torch.tensor(diffs, dtype=torch.float64)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(diffs, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return statistic(a) - statistic(b), low, high


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, sample standard deviation) of a metric over seeds (0 spread for one seed)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def save_classifier(path: Path, model: AttributeClassifier, width: int) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), {"width": str(width)})
    return path


def load_classifier(path: str | Path) -> AttributeClassifier:
    """The evaluator classifier written by the build (its width is in the file's metadata)."""
    with safe_open(str(path), framework="pt") as f:
        width = int(f.metadata()["width"])
    model = AttributeClassifier(width)
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
