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

Per request the model keeps its forward passes (``nfe``) and seconds (its batch's wall-clock over the batch's size):
:attr:`DiffexitLM.records`, which ``diffexit eval`` adds to lm-eval's logged samples. ``loglikelihood`` is not
supported (:class:`LoglikelihoodUnsupported`).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Optional

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

MODEL_OPTIONS = ("model", "dtype", "trust_remote_code", "loop", "mask_id")
DEFAULT_BATCH_SIZE = 16


class LoglikelihoodUnsupported(RuntimeError):
    """A task asked for log-likelihoods, which this model does not estimate."""


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
        valid = list(dict.fromkeys([*MODEL_OPTIONS, "halting", *option_names()]))
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown --model_args key(s) {unknown}; the keys are {valid}")
        self.batch_size = _batch_size(batch_size)
        model_options = {k: options.pop(k) for k in MODEL_OPTIONS if k in options}
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

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        raise LoglikelihoodUnsupported(_NO_LOGLIKELIHOOD)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise LoglikelihoodUnsupported(_NO_LOGLIKELIHOOD)


_NO_LOGLIKELIHOOD = ("the diffexit model only generates (generate_until): this task scores log-likelihoods, which a "
                     "diffusion LM needs a Monte-Carlo estimator for (LLaDA's), not implemented here; pick a "
                     "generate_until task (e.g. gsm8k, or the shipped diffexit_* tasks)")


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
    from .. import generate_text as gt
    from ..jobs import JobError

    args = SimpleNamespace(model=model_options.get("model"), dtype=model_options.get("dtype", "float32"),
                           gen_length=spec.gen_length, steps=spec.steps, block_length=spec.block_length,
                           cache=spec.cache, parallel_threshold=spec.parallel_threshold, loop=model_options.get("loop"),
                           mask_id=model_options.get("mask_id"), trust_remote_code=model_options.get("trust_remote_code"))
    if args.dtype not in gt.DTYPES:
        raise ValueError(f"dtype must be one of {list(gt.DTYPES)}, got {args.dtype!r}")
    try:
        kind, model, tokenizer = gt.load_model(args, device)
        loop = spec.replace(method="full", params={})
        return gt.build_engines(args, kind, model, tokenizer, spec.method, spec.params, loop)[0]
    except JobError as e:
        raise ValueError(str(e)) from None
