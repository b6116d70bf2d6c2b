"""pcm-policy: a diffusion-policy controller whose action chunks are sampled by parallel Picard iteration
(ParaDiGMS, arXiv 2305.16317) and accelerated by a Picard Consistency Model with model switching (PCM,
arXiv 2503.19731). The README's "Code map" lists the modules."""
