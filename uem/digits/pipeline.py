"""A pixel-space DiT pipeline for the embedded digits model: DiTPipeline's loop without the VAE.

The loop mirrors diffusers' ``DiTPipeline`` step for step, so whatever plugs into that one plugs in here
the same way (a wrapped ``transformer`` forward, a swapped ``pipe.scheduler``):

- classifier-free guidance stacks the conditional rows over the unconditional ones, ``[cond; uncond]``,
  as two halves of one batch; the null class is ``transformer.config.num_embeds_ada_norm`` (1000);
- each step calls ``self.transformer(x, timestep=t_batch, class_labels=labels).sample`` once and
  ``self.scheduler.step(eps, t, x)`` once; a learned-sigma transformer's variance channels are dropped first.

Two deliberate differences: the scheduler steps the guided half only (DiTPipeline steps both identical
halves and throws one away), and it gets the ``generator`` when it takes one, so stochastic schedulers
(DDPM) are reproducible per seed too.
"""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from .data import NUM_CLASSES

OUTPUT_TYPES = ("pil", "np", "pt")
# The default classifier-free guidance weight; the shipped DiT's cards and calibrations were measured at it.
GUIDANCE_SCALE = 2.0


class DigitsDiTPipeline(DiffusionPipeline):
    r"""Class-conditional generation of digits 0..9 with a pixel-space ``DiTTransformer2DModel``.

    Args:
        transformer: a class-conditional ``DiTTransformer2DModel`` predicting epsilon on
            ``[B, C, S, S]`` images in [-1, 1], trained with label ``num_embeds_ada_norm`` as the null class.
        scheduler: any diffusers scheduler with ``set_timesteps`` / ``step`` (the shipped one is DDIM).
    """

    model_cpu_offload_seq = "transformer"

    def __init__(self, transformer, scheduler):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: list[int] | torch.Tensor,
        guidance_scale: float = GUIDANCE_SCALE,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 25,  # the step count every calibration and bench uses
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate one image per entry of ``class_labels``.

        Args:
            class_labels: the digit (0..9) to draw, one per image.
            guidance_scale: classifier-free guidance weight ``w`` in ``eps_u + w (eps_c - eps_u)``;
                guidance (and its doubled batch) is on when ``w > 1``.
            generator: seeds the initial noise (and a stochastic scheduler's noise).
            num_inference_steps: denoising steps.
            output_type: ``"pil"`` (list of grey ``PIL.Image``), ``"np"`` (float ``[B, S, S, C]`` in [0, 1])
                or ``"pt"`` (float ``[B, C, S, S]`` in [0, 1]).

        Returns:
            ``ImagePipelineOutput(images=...)``, or ``(images,)`` when ``return_dict`` is False.
        """
        if not torch.is_tensor(class_labels):
            if isinstance(class_labels, int) and not isinstance(class_labels, bool):
                class_labels = [class_labels]
            if not isinstance(class_labels, (list, tuple)):
                raise ValueError(f"class_labels must be a list of digits in 0..{NUM_CLASSES - 1}, got "
                                 f"{type(class_labels).__name__} {class_labels!r}")
            bad = [c for c in class_labels if isinstance(c, bool) or not isinstance(c, int)]
            if bad:
                raise ValueError(f"class_labels must be digits as whole numbers 0..{NUM_CLASSES - 1}, like [3], got "
                                 f"{bad[0]!r}")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        if len(labels) == 0:
            raise ValueError("class_labels is empty; pass at least one digit in 0..9")
        if labels.min() < 0 or labels.max() >= NUM_CLASSES:
            raise ValueError(f"class_labels must be digits in 0..{NUM_CLASSES - 1}, got {labels.tolist()}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number (1 or below turns guidance off), got "
                             f"{guidance_scale}")

        device = self._execution_device
        batch_size = len(labels)
        size = self.transformer.config.sample_size
        channels = self.transformer.config.in_channels
        latents = randn_tensor(
            (batch_size, channels, size, size), generator=generator, device=device, dtype=self.transformer.dtype
        )

        guided = guidance_scale > 1
        labels = labels.to(device)
        null = torch.full_like(labels, self.transformer.config.num_embeds_ada_norm)
        labels_input = torch.cat([labels, null]) if guided else labels

        step_kwargs = {}
        if "generator" in inspect.signature(self.scheduler.step).parameters:
            step_kwargs["generator"] = generator

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = torch.as_tensor(t, device=device).reshape(-1).expand(len(model_input))

            noise_pred = self.transformer(model_input, timestep=timesteps, class_labels=labels_input).sample

            # A learned-sigma transformer appends a variance half; the sampler steps the noise, as in DiTPipeline.
            noise_pred = noise_pred[:, :channels]
            if guided:
                cond_eps, uncond_eps = noise_pred.chunk(2)
                noise_pred = uncond_eps + guidance_scale * (cond_eps - uncond_eps)

            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample

        images = (latents.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
