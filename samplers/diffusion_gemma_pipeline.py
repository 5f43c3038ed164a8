"""``SchEDDiffusionGemmaPipeline``: diffusers' ``DiffusionGemmaPipeline`` with a stopping rule of your choice.

The stock pipeline freezes a sample once its prediction has been stable for ``stability_threshold`` steps and its
mean token entropy is below ``confidence_threshold``, inline in its loop. This subclass takes any
``DiffusionGemmaAdaptiveStopping`` (``rule(argmax_canvas, logits) -> BoolTensor``, transformers' interface) as
``stopping=``; without one it applies the stock rule with the stock thresholds::

    from diffexit.samplers.diffusion_gemma_pipeline import SchEDDiffusionGemmaPipeline
    pipe = SchEDDiffusionGemmaPipeline.from_pipe(pipe)          # or .from_pretrained / (model, scheduler, processor)
    out = pipe(prompt, stopping=SchEDStopping(ThresholdSchedule("cosine", 7.5, 2.5)))

Each denoising step is the stock loop's (model, ``scheduler.step``, self-conditioning on the scheduler's
``pred_logits``, the corrector sweeps of a predictor-corrector scheduler), and the stop test is the rule's, on the
inputs the stock test reads: the argmax of ``pred_logits`` (frozen for finished samples) and ``pred_logits``. So
the default, ``StableAndConfidentStoppingCriteria(1, 0.005)``, gives the stock pipeline's output token for token
(tests/test_diffusion_gemma.py checks it).

The loop is this module's own rather than a call to the parent's for a second reason: diffusers 0.42's pipeline
passes ``past_key_values=`` to ``create_diffusion_decoder_attention_mask``, which transformers 5.24 renamed to
``cache=``, so the stock ``__call__`` raises ``TypeError`` with the transformers this project pins.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from diffusers import DiffusionGemmaPipeline
from diffusers.pipelines.diffusion_gemma.pipeline_output import DiffusionGemmaPipelineOutput
from transformers import DynamicCache, StaticCache
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaAdaptiveStopping,
    StableAndConfidentStoppingCriteria,
)

STOCK_STABILITY, STOCK_CONFIDENCE = 1, 0.005  # DiffusionGemmaPipeline's defaults
_UNSET = object()


class SchEDDiffusionGemmaPipeline(DiffusionGemmaPipeline):
    """``DiffusionGemmaPipeline`` plus ``stopping=``; see the module docstring.

    ``stopping`` replaces ``stability_threshold`` / ``confidence_threshold`` (pass one or the other;
    ``confidence_threshold=None`` runs every step, as in the stock pipeline). After a call, ``decoder_passes``
    ``[B]`` holds the decoder forward passes each sample took part in (a pass counts for a sample until its rule
    stops it in that canvas), corrector sweeps included.
    """

    @torch.no_grad()
    def __call__(self, prompt=None, *, stopping: DiffusionGemmaAdaptiveStopping | None = None,
                 stability_threshold=_UNSET, confidence_threshold=_UNSET, **kwargs):
        if stopping is None:
            stability = STOCK_STABILITY if stability_threshold is _UNSET else stability_threshold
            confidence = STOCK_CONFIDENCE if confidence_threshold is _UNSET else confidence_threshold
            stopping = None if confidence is None else StableAndConfidentStoppingCriteria(stability, confidence)
        else:
            if not isinstance(stopping, DiffusionGemmaAdaptiveStopping):
                raise ValueError(f"stopping must be a DiffusionGemmaAdaptiveStopping (e.g. diffexit's SchEDStopping),"
                                 f" got {type(stopping).__name__}")
            given = [n for n, v in (("stability_threshold", stability_threshold),
                                    ("confidence_threshold", confidence_threshold)) if v is not _UNSET]
            if given:
                raise ValueError(f"{', '.join(given)} set the stock stopping rule, and stopping= replaces it; pass "
                                 f"one or the other")
        return self._generate(stopping, prompt=prompt, **kwargs)

    def _generate(
        self,
        stopping: DiffusionGemmaAdaptiveStopping | None,
        prompt=None,
        messages=None,
        image=None,
        add_generation_prompt: bool = True,
        gen_length: int = 256,
        num_inference_steps: int = 48,
        temperature: float = 0.0,
        cache_implementation: str | None = None,
        eos_early_stop: bool = True,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "text",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ):
        if callback_on_step_end is not None and hasattr(callback_on_step_end, "tensor_inputs"):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        tensor_inputs = callback_on_step_end_tensor_inputs or ["canvas"]
        self.check_inputs(prompt=prompt, messages=messages, gen_length=gen_length,
                          num_inference_steps=num_inference_steps, output_type=output_type,
                          callback_on_step_end_tensor_inputs=tensor_inputs)
        ids, mask, multimodal = self._prepare_inputs(prompt=prompt, messages=messages, image=image,
                                                     add_generation_prompt=add_generation_prompt)
        device = self._execution_device
        ids, mask = ids.to(device), mask.to(device)
        multimodal = {k: v.to(device) for k, v in multimodal.items()}
        batch, prompt_length = ids.shape
        eos_token_id = self.eos_token_id if eos_token_id is None else eos_token_id

        canvas_length = self.model.config.canvas_length
        num_canvases = -(-gen_length // canvas_length)
        # A predictor-corrector scheduler spends part of the per-canvas budget on corrector sweeps, as the stock
        # pipeline does: the first `corrected` predictor steps each add `sweeps` forwards.
        sweeps = getattr(self.scheduler.config, "corrector_steps", 0)
        corrected = (num_inference_steps - 1) // (1 + sweeps) if sweeps > 0 else 0
        predictor_steps = num_inference_steps - corrected * sweeps
        timestep_kwargs = {"device": device}
        if "block_length" in inspect.signature(self.scheduler.set_timesteps).parameters:
            timestep_kwargs["block_length"] = canvas_length
        self.scheduler.set_timesteps(predictor_steps, **timestep_kwargs)
        step_params = set(inspect.signature(self.scheduler.step).parameters)
        step_kwargs = {k: v for k, v in {"mask_token_id": None, "temperature": temperature,
                                         "generator": generator}.items() if k in step_params}
        self._num_timesteps = predictor_steps * num_canvases
        if hasattr(stopping, "begin"):  # SchEDStopping reads its progress from the step budget
            stopping.begin(predictor_steps)

        text_config = self.model.config.get_text_config(decoder=True)
        cache = (StaticCache(config=text_config, max_cache_len=prompt_length + num_canvases * canvas_length)
                 if cache_implementation == "static" else DynamicCache(config=text_config))
        sequence, seq_mask = ids, mask
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.decoder_passes = torch.zeros(batch, dtype=torch.long, device=device)
        global_step = 0
        bar = self.progress_bar(total=self._num_timesteps)
        for _ in range(num_canvases):
            length = sequence.shape[1]
            positions = torch.arange(length, length + canvas_length, device=device).unsqueeze(0)
            cached = cache.get_seq_length()
            torch.compiler.cudagraph_mark_step_begin()
            self.model.model.encoder(input_ids=sequence[:, cached:], attention_mask=seq_mask, cache=cache,
                                     position_ids=torch.arange(cached, length, device=device).unsqueeze(0),
                                     **(multimodal if cached == 0 else {}))
            masks = self.model.model.decoder.create_diffusion_decoder_attention_mask(
                config=self.model.config, inputs_embeds=torch.empty((batch, canvas_length, 0), device=device),
                cache=cache, decoder_attention_mask=F.pad(seq_mask.bool(), (0, canvas_length), value=True),
            )

            def denoise(canvas, conditioning):
                torch.compiler.cudagraph_mark_step_begin()
                return self.model(decoder_input_ids=canvas, cache=cache,
                                  self_conditioning_logits=conditioning, decoder_attention_mask=masks,
                                  decoder_position_ids=positions).logits.clone()

            canvas = torch.randint(0, text_config.vocab_size, (batch, canvas_length), device=device,
                                   generator=generator)
            conditioning = None
            done = torch.zeros(batch, dtype=torch.bool, device=device)
            argmax = canvas
            if stopping is not None:
                stopping.reset()
            for step in range(predictor_steps):
                self.decoder_passes += (~done) * (1 + (sweeps if step < corrected else 0))
                logits = denoise(canvas, conditioning)
                out = self.scheduler.step(model_output=logits, timestep=step, sample=canvas, return_dict=True,
                                          **step_kwargs)
                canvas, conditioning = out.prev_sample, out.pred_logits
                if step < corrected:
                    for _ in range(sweeps):
                        canvas = self.scheduler.step_correct(model_output=denoise(canvas, conditioning),
                                                             timestep=step, sample=canvas,
                                                             generator=generator).prev_sample
                if callback_on_step_end is not None:
                    local = {"canvas": canvas, "logits": logits}
                    returned = callback_on_step_end(self, global_step, step, {k: local[k] for k in tensor_inputs})
                    canvas = returned.pop("canvas", canvas)
                global_step += 1
                bar.update()

                if stopping is None:
                    continue
                # The rule reads what the stock test reads: the prediction (kept as it was for finished samples)
                # and the logits the scheduler sampled from. A finished sample's canvas is its frozen prediction.
                argmax = torch.where(done[:, None], argmax, conditioning.argmax(-1))
                done = done | stopping(argmax, conditioning)
                canvas = torch.where(done[:, None], argmax, canvas)
                if bool(done.all()):
                    break

            sequence = torch.cat([sequence, canvas], -1)
            seq_mask = F.pad(seq_mask, (0, canvas_length), value=1)
            if eos_early_stop and eos_token_id is not None:
                finished |= (canvas == eos_token_id).any(-1)
                if finished.all():
                    break
        bar.close()

        sequences = sequence[:, prompt_length:]
        texts = None
        if output_type == "text" and self.processor is not None:
            trimmed = [row if eos_token_id is None or not (row == eos_token_id).any()
                       else row[: int((row == eos_token_id).nonzero()[0, 0]) + 1] for row in sequences]
            texts = self.processor.batch_decode(trimmed, skip_special_tokens=True)
        if not return_dict:
            return sequences, texts
        return DiffusionGemmaPipelineOutput(sequences=sequences, texts=texts)
