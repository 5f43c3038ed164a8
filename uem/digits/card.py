"""The digits DiT's quality at full depth, and its model card.

Class agreement (the shipped classifier reads the requested digit) and the Frechet distance of the classifier's
features against the 300 held-out test digits, with and without guidance, measured on exported files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ...common.model_card import model_card
from .classifier import class_agreement, extract_features, frechet_distance, load_classifier, test_accuracy
from .data import NUM_CLASSES, load_digits_dataset
from .files import CLASSIFIER_DIR
from .model import NULL_CLASS, PATCH_SIZE, build_transformer
from .pipeline import GUIDANCE_SCALE, DigitsDiTPipeline


@torch.no_grad()
def sample_digits(pipe, per_class: int, guidance_scale: float, steps: int, seed: int, batch_size: int = 100):
    """``per_class`` samples of each digit, in batches seeded ``seed, seed + 1, ...``.

    Returns ``(images [10 * per_class, 1, S, S] in [0, 1], labels [10 * per_class])``.
    """
    labels = torch.arange(NUM_CLASSES).repeat(per_class)
    chunks = []
    for i, chunk in enumerate(labels.split(batch_size)):
        generator = torch.Generator(pipe.device).manual_seed(seed + i)
        chunks.append(pipe(chunk.tolist(), guidance_scale=guidance_scale, generator=generator,
                           num_inference_steps=steps, output_type="pt").images.cpu())
    return torch.cat(chunks), labels


def measure_backbone(directory: Path, per_class: int, steps: int, seed: int) -> dict:
    """Class agreement and Frechet distance of the pipeline in ``directory``, without guidance and at the default.

    The Frechet distance is biased upwards at small N, so the reference (real train digits against the
    real test digits) uses as many real digits as there are samples.
    """
    classifier = load_classifier(CLASSIFIER_DIR)
    pipe = DigitsDiTPipeline.from_pretrained(str(directory), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.transformer.config.sample_size
    count = NUM_CLASSES * per_class
    test_images, _ = load_digits_dataset(size, "test").tensors
    test_features = extract_features(classifier, (test_images + 1) / 2)
    train_images, _ = load_digits_dataset(size, "train").tensors
    reference = frechet_distance(extract_features(classifier, (train_images[:count] + 1) / 2), test_features)
    figures = {"reference_frechet": reference, "reference_count": min(count, len(train_images)),
               "classifier_accuracy": test_accuracy(classifier), "per_class": per_class, "steps": steps,
               "seed": seed, "rows": []}
    for scale in sorted({1.0, GUIDANCE_SCALE}):
        images, labels = sample_digits(pipe, per_class, scale, steps, seed)
        row = {"guidance_scale": scale, "class_agreement": class_agreement(images, labels, classifier),
               "frechet": frechet_distance(extract_features(classifier, images), test_features)}
        figures["rows"].append(row)
        print(f"guidance {scale:g}: class agreement {row['class_agreement']:.4f}, Frechet {row['frechet']:.2f} "
              f"(real train digits: {reference:.2f})")
    return figures


def _seconds_per_step(log_path: Path) -> np.ndarray:
    """Seconds per step between consecutive ``log.jsonl`` records (each spans ``--log-every`` steps)."""
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    return np.array([(b["seconds"] - a["seconds"]) / (b["step"] - a["step"]) for a, b in zip(records, records[1:])])


def backbone_card(directory: Path, run: dict, steps_done: int, seconds: float, figures: dict, export_command: str,
                  log_path: Path, *, grad_clip: float, ema_decay: float) -> str:
    """``MODEL_CARD.md`` of an exported digits DiT: how it was made (``run.json``'s contents) and ``figures``."""
    weights = Path(directory) / "transformer" / "diffusion_pytorch_model.safetensors"
    cfg = run["config"]
    params = sum(p.numel() for p in build_transformer(cfg["image_size"], cfg["num_layers"], cfg["num_heads"],
                                                      cfg["head_dim"]).parameters())
    commands = f"`{run['command']}`" + "".join(
        f", then `{e['command']}` (from step {e['from_step']}: the cosine stretched to {e['steps']} steps, "
        f"a warm restart)" for e in run.get("extensions", [])
    )
    rows = "\n".join(
        f"| {r['guidance_scale']:g} | {r['class_agreement'] * 100:.1f}% | {r['frechet']:.1f} |" for r in figures["rows"]
    )
    pace = " / ".join(f"{q:.2f}" for q in np.percentile(_seconds_per_step(log_path), [10, 50, 90]))
    size = cfg["image_size"]
    return model_card(
        "dit-digits: the embedded class-conditional DiT",
        f"""A diffusers `DiTTransformer2DModel` in pixel space, loaded by
`diffexit.uem.digits.embedded.load_embedded_pipeline()` as a `DigitsDiTPipeline` (DiT's sampling loop without a VAE).
It draws the digits 0..9 at {size}x{size}.""",
        {
            "Architecture": f"""{cfg['num_layers']} blocks, {cfg['num_heads']} heads x {cfg['head_dim']}, patch
  {PATCH_SIZE}, 1 channel in and out, adaLN-Zero init; class labels 0..9, null class {NULL_CLASS}
  (`num_embeds_ada_norm`) for classifier-free guidance. {params / 1e6:.2f}M parameters, of which rows 10..999 of the
  per-block label tables (1.5M) are unused zeros. Stored in fp16 ({weights.stat().st_size / 2**20:.1f} MiB); load in
  float32.""",
            "Objective": """DDPM epsilon MSE, 1000-step `squaredcos_cap_v2` schedule, labels dropped to the null class
  for 10% of samples (one draw per sample, for all blocks). Shipped sampler: DDIM, "trailing" spacing,
  x0 clipped to [-1, 1].""",
            "Data": """`sklearn.datasets.load_digits` (1797 images, 8x8, values 0..16), bilinearly upsampled, scaled
  to [-1, 1]; the fixed 1497-image "train" split (`diffexit.uem.digits.data.load_digits_dataset`).""",
            "Training": f"""{steps_done} steps of batch {cfg['batch_size']}, AdamW peak lr {cfg['lr']} (100-step
  warmup, cosine to a tenth), gradient clip {grad_clip}, EMA decay up to {ema_decay}; these weights are the EMA. Seed
  {cfg['seed']}, {cfg['threads']} CPU thread. {seconds / 60:.0f} min of training on a 2-core CPU machine shared with
  other jobs, at {pace} s/step (10th, 50th, 90th percentile over `log.jsonl`).""",
            "Commands": f"{commands}.",
        },
        [("Quality at full depth", f"""{NUM_CLASSES * figures['per_class']} samples ({figures['per_class']} per digit), {figures['steps']} DDIM
steps, one seed per batch of 100 counting up from {figures['seed']}, judged by the shipped digits classifier
(`uem/digits/weights/classifier`, {figures['classifier_accuracy'] * 100:.1f}% on the held-out real digits). Class
agreement: the classifier reads the requested digit. Frechet distance: on the classifier's 64-d features, against
the 300 held-out test digits; {figures['reference_count']} real train digits score
{figures['reference_frechet']:.1f} on the same scale (the distance grows as N shrinks).

| guidance scale | class agreement | Frechet distance |
| --- | --- | --- |
{rows}

The pipeline's default guidance scale is {GUIDANCE_SCALE:g}.
Measured on the shipped fp16 files by `{export_command}`.""")],
    )
