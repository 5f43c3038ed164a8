"""The embedded text setup: a character-level masked-diffusion LM and the generated tasks it is trained and judged on.

- ``tokenizer``: characters, plus ``[PAD]``, ``[EOS]``, ``[MASK]``; left-padded prompts, EOS-padded spans.
- ``tasks``: seeded generators and exact scorers, with their prompt/span layouts and decoding setups.
- ``model``: ``DiffusionLlama``, a bidirectional transformers Llama with learned absolute positions, and its loaders.
- ``train``: ``diffexit train text``.
- ``weights/``: the shipped model, tokenizer, ``training.json`` and ``MODEL_CARD.md``.

The decoding methods (``diffexit.dllm``) never import this package; it imports them.
"""
