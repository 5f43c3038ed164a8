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
inputs the stock test reads: the argmax of ``pred_logits`` (frozen for finished samples) and ``pred_logits``. The
canvas loop is diffexit's (``diffexit.dllm.gemma_loop.run_canvases``): a sample that stopped leaves the decoder's
batch, so the decoder passes (the cost) run on the samples still denoising only. The scheduler still steps the
whole batch (cheap next to a decoder pass), a stopped sample's rows holding its frozen canvas and last logits, so it
draws the stock loop's noise and keeps its per-sample state, and the output is the stock pipeline's token for token
with any rule: the default, ``StableAndConfidentStoppingCriteria(1, 0.005)``, gives the stock pipeline's output
(tests/test_diffusion_gemma.py checks it). With ``eos_early_stop`` a sample that wrote EOS leaves the batch for good
(the stock pipeline goes on decoding it, and trims its text at the EOS): its later canvases are ``eos_token_id``,
and where a rule then ends a canvas's steps sooner than the stock loop would, later canvases draw other noise.

The loop is not a call to the parent's for a second reason: diffusers 0.42's pipeline passes ``past_key_values=``
to ``create_diffusion_decoder_attention_mask``, which transformers 5.24 renamed to ``cache=``, so the stock
``__call__`` raises ``TypeError`` with the transformers this project pins.
"""

from __future__ import annotations

import inspect

import torch
from diffusers import DiffusionGemmaPipeline
from diffusers.pipelines.diffusion_gemma.pipeline_output import DiffusionGemmaPipelineOutput
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    DiffusionGemmaAdaptiveStopping,
    StableAndConfidentStoppingCriteria,
)

from ..dllm.gemma_loop import check_compactable, run_canvases

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
        if cache_implementation not in (None, "dynamic"):
            raise ValueError(f"cache_implementation={cache_implementation!r}: the loop drops rows of a DynamicCache as "
                             f"samples stop; leave it unset")
        check_compactable(stopping)
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
        if callable(getattr(stopping, "bind", None)):  # the learned rule loads and checks its commit model
            stopping.bind(self.model)
        if hasattr(stopping, "begin"):  # SchEDStopping and the learned rule read progress from the step budget
            stopping.begin(predictor_steps)

        def finalize(sequences, finished):
            if eos_early_stop and eos_token_id is not None:
                finished = finished | (sequences[:, -canvas_length:] == eos_token_id).any(-1)
            return sequences, finished

        bar = self.progress_bar(total=self._num_timesteps)
        sampling = _SchedulerSampling(self, batch, step_kwargs, sweeps, corrected, generator,
                                      callback_on_step_end, tensor_inputs, bar)
        out = run_canvases(self.model, ids, mask, canvases=num_canvases, steps=predictor_steps, sampling=sampling,
                           rule=stopping, finalize=finalize, fill_id=0 if eos_token_id is None else eos_token_id,
                           prefill_kwargs=multimodal)
        bar.close()
        self.decoder_passes = out.passes

        sequences = out.sequences[:, prompt_length:]
        texts = None
        if output_type == "text" and self.processor is not None:
            trimmed = [row if eos_token_id is None or not (row == eos_token_id).any()
                       else row[: int((row == eos_token_id).nonzero()[0, 0]) + 1] for row in sequences]
            texts = self.processor.batch_decode(trimmed, skip_special_tokens=True)
        if not return_dict:
            return sequences, texts
        return DiffusionGemmaPipelineOutput(sequences=sequences, texts=texts)


class _SchedulerSampling:
    """The stock pipeline's denoising step for ``run_canvases``: the scheduler steps the whole batch, the rows of the
    samples in the decoder call taking its logits and canvas, the others keeping their last ones (no effect on any
    other row, and the same noise drawn as the stock loop draws); see the module docstring."""

    def __init__(self, pipe, batch: int, step_kwargs: dict, sweeps: int, corrected: int, generator, callback,
                 tensor_inputs, bar):
        self.pipe, self.scheduler, self.batch, self.step_kwargs = pipe, pipe.scheduler, batch, step_kwargs
        self.sweeps, self.corrected, self.generator, self.bar = sweeps, corrected, generator, bar
        self.callback, self.tensor_inputs, self.global_step = callback, tensor_inputs, 0
        self.vocab = pipe.model.config.get_text_config(decoder=True).vocab_size
        self.canvas = self.logits = None

    def start_canvas(self, canvas: int, rows: list[int], device) -> torch.LongTensor:
        self.canvas = torch.randint(0, self.vocab, (self.batch, self.pipe.model.config.canvas_length), device=device,
                                    generator=self.generator)
        self.logits = None
        return self.canvas[rows]

    def _full(self, logits: torch.Tensor, rows: torch.LongTensor) -> torch.Tensor:
        if self.logits is None:
            self.logits = torch.zeros((self.batch, *logits.shape[1:]), dtype=logits.dtype, device=logits.device)
        self.logits[rows] = logits
        return self.logits

    def step(self, logits, canvas, step: int, rows: list[int], denoise):
        index = torch.tensor(rows, device=canvas.device)
        self.canvas[index] = canvas
        out = self.scheduler.step(model_output=self._full(logits, index), timestep=step, sample=self.canvas,
                                  return_dict=True, **self.step_kwargs)
        self.canvas, conditioning = out.prev_sample, out.pred_logits
        if step < self.corrected:
            for _ in range(self.sweeps):
                swept = self._full(denoise(self.canvas[index], conditioning[index]), index)
                self.canvas = self.scheduler.step_correct(model_output=swept, timestep=step, sample=self.canvas,
                                                          generator=self.generator).prev_sample
        if self.callback is not None:
            local = {"canvas": self.canvas, "logits": self.logits}
            returned = self.callback(self.pipe, self.global_step, step, {k: local[k] for k in self.tensor_inputs})
            self.canvas = returned.pop("canvas", self.canvas)
        self.global_step += 1
        self.bar.update()
        return self.canvas[index], conditioning[index]

    def final(self, canvas: torch.LongTensor, argmax: torch.LongTensor) -> torch.LongTensor:
        """A canvas that ran every step ends as its last sampled canvas, as in the stock loop."""
        return canvas
