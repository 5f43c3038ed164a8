"""The embedded image setup: scikit-learn's handwritten digits, a class-conditional DiT trained on them, and a
classifier that judges what it draws.

- ``data``: the digits as a diffusion training set, with the fixed train/test split.
- ``model``: the digits DiT (a diffusers ``DiTTransformer2DModel``), its noise schedule and sampler.
- ``pipeline``: ``DigitsDiTPipeline``, DiTPipeline's loop without the VAE.
- ``classifier``: the CNN and the measures on it (class agreement, Frechet distance).
- ``train`` (``diffexit train image``) and ``card``: training the backbone, and its model card.
- ``files`` and ``embedded``: where the shipped weights live, and their offline loaders.

The DeeDiff method (``diffexit.uem``) never imports this package.
"""
