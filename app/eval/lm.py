"""The ``diffexit`` model of lm-evaluation-harness: ``generate_until`` decodes through ``generate text``'s engines.

lm-eval has no diffusion-LM model class (LLaDA, Dream and Fast-dLLM each register their own). This one takes the
model and the decoding spec by ``generate text``'s names in ``--model_args``::

    model=charlm-block,method=sched,schedule=cosine:7.5:2.5,stat=quantile,cache=prefix,parallel_threshold=0.9

``model`` is an embedded name (``charlm``, ``charlm-block``, ``gemma``), a model folder or a hub id; the rest are
the fields of :class:`~diffexit.dllm.decode_spec.DecodeSpec` and the halting rule's parameters
(:func:`~diffexit.dllm.decode_spec.option_names`), plus ``dtype``, ``trust_remote_code``, ``loop`` and ``mask_id``
for models loaded through transformers. ``halting`` is another name for ``method`` (lm-eval wrappers of dLLMs call
it so).

A request decodes exactly as ``generate text`` would decode its context as a prompt (the same loader, engine and
spec), then is cut at the first of the request's ``until`` strings. On the embedded models a request whose document
names an embedded ``task`` (the shipped ``diffexit_*`` tasks) is decoded with that task's layout, as
``generate text --task`` does; any other prompt with the short layout. lm-eval's ``max_gen_toks`` is not used: a
diffusion LM decodes a fixed span, ``gen_length``.

``loglikelihood`` (multiple-choice and loglikelihood tasks) is LLaDA's Monte-Carlo estimator
(:mod:`diffexit.dllm.likelihood`) on a bidirectional model of the llada loop: ``mc_num`` samples (LLaDA's 128; 0
turns the estimator off), 32 per forward pass, seeded by the request's text, so a score depends on neither its
batch nor the process; ``is_check_greedy`` (LLaDA's default, true) also decodes the continuation greedily for
lm-eval's ``is_greedy``. The decoding options apply to ``generate_until`` only. On the embedded models the context
is left-padded to its task's layout and the continuation starts where answers do. A block-causal model, the dream
loop, DiffusionGemma and ``loglikelihood_rolling`` are refused (:class:`LoglikelihoodUnsupported`).

Per request the model keeps its forward passes (``nfe``) and seconds (its batch's wall-clock over the batch's size,
or the request's own for a log-likelihood): :attr:`DiffexitLM.records`, which ``diffexit eval`` adds to lm-eval's
logged samples.
"""

from __future__ import annotations

import time
from typing import Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

MODEL_OPTIONS = ("model", "dtype", "trust_remote_code", "loop", "mask_id")
LIKELIHOOD_OPTIONS = ("mc_num", "is_check_greedy")
DEFAULT_BATCH_SIZE = 16


class LoglikelihoodUnsupported(RuntimeError):
    """A task asked for log-likelihoods, which this model does not estimate for this model or these options."""


@register_model("diffexit")
class DiffexitLM(LM):
    """An lm-eval ``LM`` decoding with diffexit's engines; see the module docstring for ``model_args``.

    ``batch_size`` is prompts per decode (lm-eval's ``--batch_size``; ``auto`` means the default, 16); ``device``
    is lm-eval's ``--device`` (default: accelerate's device for this process). ``instances`` lists the models made
    in this process, for ``diffexit eval`` to read their ``records`` once lm-eval is done.
    """

    instances: list["DiffexitLM"] = []

    def __init__(self, batch_size=None, max_batch_size=None, device=None, **options):
        super().__init__()
        from ...dllm.decode_spec import option_names, spec_from_options

        if "halting" in options:
            if "method" in options:
                raise ValueError("give the halting rule once: halting= and method= name the same option")
            options["method"] = options.pop("halting")
        valid = list(dict.fromkeys([*MODEL_OPTIONS, *LIKELIHOOD_OPTIONS, "halting", *option_names()]))
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown --model_args key(s) {unknown}; the keys are {valid}")
        self.batch_size = _batch_size(batch_size)
        model_options = {k: options.pop(k) for k in MODEL_OPTIONS if k in options}
        self.mc_num, self.check_greedy = _likelihood_options({k: options.pop(k) for k in LIKELIHOOD_OPTIONS
                                                              if k in options})
        try:
            spec = spec_from_options({k: v for k, v in options.items() if k not in ("gen_length", "steps")})
            lengths = {k: options[k] for k in ("gen_length", "steps") if k in options}
            if lengths:
                spec = spec.replace(**lengths)
        except (TypeError, ValueError) as e:
            raise ValueError(f"--model_args: {e}") from None
        from ..jobs import process_state

        state = process_state()
        self.engine = _engine(model_options, spec, device or state.device)
        self._rank, self._world_size = state.process_index, state.num_processes
        self.records: list[dict] = []
        DiffexitLM.instances.append(self)

    # lm-eval's multi-process hooks: the processes accelerate started (gloo on CPU).

    def all_gather(self, tensor):
        import torch
        import torch.distributed as dist

        tensor = tensor.reshape(1) if tensor.dim() == 0 else tensor  # as accelerate's gather: scalars stack
        parts = [tensor.clone() for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.cat(parts)

    def gather_object(self, obj, dst=0):
        import torch.distributed as dist

        parts = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, parts, dst=dst)
        return parts

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    # Chat templates (lm-eval's --apply_chat_template): the model's tokenizer's own.

    @property
    def _tokenizer(self):
        return self.engine.pipe.tokenizer if hasattr(self.engine, "pipe") else self.engine.tokenizer

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self._tokenizer, "name_or_path", "") or type(self._tokenizer).__name__).replace("/", "__")

    def chat_template(self, chat_template=False):
        return getattr(self._tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        if getattr(self._tokenizer, "chat_template", None) is None:
            raise ValueError(f"the tokenizer of {self.tokenizer_name} has no chat template; drop --apply_chat_template")
        return self._tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)

    # Requests.

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        from ..jobs import Item

        items = [Item(f"request-{i}", None, _payload(req), source=f"request {i} ({req.task_name} doc {req.doc_id})")
                 for i, req in enumerate(requests)]
        self.engine.check(items)
        groups: dict = {}
        for i, item in enumerate(items):
            groups.setdefault(self.engine.group(item), []).append(i)
        answers: list[Optional[str]] = [None] * len(items)
        bar = tqdm(total=len(items), desc="diffexit", disable=disable_tqdm or self.rank != 0)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                began = time.perf_counter()
                results = self.engine.run([items[i] for i in batch])
                seconds = (time.perf_counter() - began) / len(batch)
                for i, (record, _) in zip(batch, results):
                    until = requests[i].args[1].get("until") if len(requests[i].args) > 1 else None
                    answers[i] = _cut(record["output"], until)
                    self.records.append({"task": requests[i].task_name, "doc_id": requests[i].doc_id,
                                         "idx": requests[i].idx, "nfe": record["nfe"], "seconds": seconds})
                bar.update(len(batch))
        bar.close()
        return answers

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """LLaDA's estimate of each request's ``(log p(continuation | context), is_greedy)`` (module docstring)."""
        import torch
        from tqdm.auto import tqdm

        from ...dllm.likelihood import BATCH_SIZE, greedy_matches, loglikelihood
        from ..job_inputs import item_seed

        model, mask_id, encode = self._scorer()
        batch = min(BATCH_SIZE, self.mc_num)
        out = []
        for req in tqdm(requests, desc="diffexit loglikelihood", disable=disable_tqdm or self.rank != 0):
            context, continuation = req.args[0], req.args[1]
            prompt, prompt_mask, target = encode(context, continuation, (req.doc or {}).get("task")
                                                 if isinstance(req.doc, dict) else None)
            began = time.perf_counter()
            generator = torch.Generator().manual_seed(item_seed(f"{context}\x00{continuation}"))
            ll = loglikelihood(model, prompt, target, mask_id=mask_id, mc_num=self.mc_num, batch_size=batch,
                               prompt_mask=prompt_mask, generator=generator)
            greedy = self.check_greedy and greedy_matches(model, prompt, target, mask_id=mask_id,
                                                          prompt_mask=prompt_mask)
            self.records.append({"task": req.task_name, "doc_id": req.doc_id, "idx": req.idx,
                                 "nfe": self.mc_num // batch + (len(target) if self.check_greedy else 0),
                                 "seconds": time.perf_counter() - began})
            out.append((ll, greedy))
        return out

    def _scorer(self):
        """``(model, mask_id, encode)`` for :meth:`loglikelihood`, where ``encode(context, continuation, task)``
        gives ``(prompt_ids [P], prompt_mask [P] or None, continuation_ids [L])`` on the model's device;
        :class:`LoglikelihoodUnsupported` where the estimator cannot apply."""
        from ...dllm.likelihood import check_bidirectional

        if self.mc_num == 0:
            raise LoglikelihoodUnsupported("this task scores log-likelihoods and mc_num=0 turns the estimator off: set "
                                           "mc_num (LLaDA's default is 128), or pick a generate_until task")
        if hasattr(self.engine, "pipe"):
            pipe = self.engine.pipe
            if pipe.loop != "llada":
                raise LoglikelihoodUnsupported(f"this task scores log-likelihoods, and LLaDA's estimator reads "
                                               f"unshifted logits: the {pipe.loop} loop's model shifts them; run it "
                                               f"with loop=llada if it is a LLaDA-style model, or pick a "
                                               f"generate_until task")
            model, tokenizer, mask_id, encode = pipe.model, pipe.tokenizer, pipe.mask_id, _encode_pair
        elif hasattr(self.engine, "layout"):
            model, tokenizer, mask_id = self.engine.model, self.engine.tokenizer, self.engine.tokenizer.mask_token_id
            encode = _embedded_encoder(self.engine)
        else:
            raise LoglikelihoodUnsupported("this task scores log-likelihoods, which a DiffusionGemma model does not "
                                           "give (it denoises uniform noise, not masks): pick a generate_until task")
        try:
            check_bidirectional(model)
        except ValueError as e:
            raise LoglikelihoodUnsupported(f"this task scores log-likelihoods: {e}") from None
        device = next(model.parameters()).device

        def on_device(context, continuation, task):
            prompt, prompt_mask, target = encode(tokenizer, context, continuation, task)
            return (prompt.to(device), None if prompt_mask is None else prompt_mask.to(device), target.to(device))

        return model, mask_id, on_device

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise LoglikelihoodUnsupported("this task scores rolling log-likelihoods (perplexity), which LLaDA's "
                                       "estimator does not give: it scores a continuation after a context; pick a "
                                       "multiple-choice, loglikelihood or generate_until task")


def _likelihood_options(given: dict) -> tuple[int, bool]:
    """``(mc_num, is_check_greedy)`` from ``--model_args`` (lm-eval turns digits into ints, true/false into bools)."""
    from ...dllm.likelihood import BATCH_SIZE, MC_NUM

    mc_num = given.get("mc_num", MC_NUM)
    if isinstance(mc_num, str) and mc_num.strip().isdigit():
        mc_num = int(mc_num)
    if isinstance(mc_num, bool) or not isinstance(mc_num, int) or mc_num < 0:
        raise ValueError(f"--model_args: mc_num must be a whole number of Monte-Carlo samples (0: no log-likelihoods), "
                         f"got {mc_num!r}")
    if mc_num > BATCH_SIZE and mc_num % BATCH_SIZE:
        raise ValueError(f"--model_args: mc_num={mc_num} must be at most {BATCH_SIZE} or a multiple of it (the "
                         f"estimator draws {BATCH_SIZE} per forward pass); use mc_num={mc_num // BATCH_SIZE * BATCH_SIZE}")
    greedy = given.get("is_check_greedy", True)
    if isinstance(greedy, str) and greedy.lower() in ("true", "false"):
        greedy = greedy.lower() == "true"
    if not isinstance(greedy, bool):
        raise ValueError(f"--model_args: is_check_greedy must be true or false, got {greedy!r}")
    return mc_num, greedy


def _encode_pair(tokenizer, context: str, continuation: str, task):
    """LLaDA's encoding of a transformers model's request: the context's trailing spaces move to the continuation,
    and the continuation's tokens are those of the whole text after the context's."""
    import torch

    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    prompt = tokenizer(context)["input_ids"]
    return torch.tensor(prompt), None, torch.tensor(whole[len(prompt):])


def _embedded_encoder(engine):
    """The embedded format's request encoding: the context left-padded to its task's layout (the short one without
    a task), the continuation's characters after it."""
    import torch

    from ...dllm.charlm.tasks import TASKS
    from ...dllm.charlm.tokenizer import encode_prompts
    from ..jobs import Item

    def encode(tokenizer, context: str, continuation: str, task):
        payload = {"prompt": context, **({"task": task} if task in TASKS else {})}
        layout = engine.layout(Item("request", None, payload))
        try:
            ids, mask = encode_prompts(tokenizer, [context], layout.prompt_length)
        except ValueError as e:
            raise ValueError(f"a log-likelihood request's context: {e}") from None
        target = torch.tensor(tokenizer(continuation, add_special_tokens=False)["input_ids"], dtype=torch.long)
        positions = engine.model.config.max_position_embeddings
        if layout.prompt_length + len(target) > positions:
            raise ValueError(f"a log-likelihood request's continuation is {len(target)} tokens: after the "
                             f"{layout.prompt_length}-token prompt it passes the model's {positions} positions")
        return ids[0], mask[0], target

    return encode


def _batch_size(value) -> int:
    if value in (None, "auto") or (isinstance(value, str) and value.startswith("auto")):
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or str(size) != str(value).strip():
        raise ValueError(f"--batch_size must be a positive whole number or auto, got {value!r}")
    return size


def _payload(request) -> dict:
    from ...dllm.charlm.tasks import TASKS

    payload = {"prompt": request.args[0]}
    task = (request.doc or {}).get("task") if isinstance(request.doc, dict) else None
    if task in TASKS:
        payload["task"] = task
    return payload


def _cut(text: str, until) -> str:
    """``text`` up to the first of the stop strings ``until`` (a string or a list), as lm-eval's models cut."""
    stops = [until] if isinstance(until, str) else list(until or [])
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


def _engine(model_options: dict, spec, device):
    """The engine ``generate text`` decodes with, for this model and spec: its loader and its engine builder."""
    from ..generate_text import build_engines
    from ..jobs import JobError
    from ..text_model_options import TextModelOptions, load_text_model

    try:
        loaded = load_text_model(TextModelOptions(**model_options), device)
        return build_engines(loaded, spec.method, spec.params, spec.replace(method="full", params={}))[0]
    except JobError as e:
        raise ValueError(str(e)) from None
