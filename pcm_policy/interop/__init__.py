"""Bring your own policy: import other tools' trained diffusion policies as pcm-policy base checkpoints.

One module per source format, each returning an `ImportedPolicy` (config, normalizer, network weights under
our names, card) that `write_imported_checkpoint` writes as an ordinary checkpoint directory:

- `lerobot.import_lerobot(path)`: a lerobot `save_pretrained` directory (DiffusionPolicy, state inputs)
- `diffusion_policy.import_diffusion_policy(path)`: a Diffusion Policy workspace `.ckpt`
  (DiffusionUnetLowdimPolicy with a global observation condition; the EMA weights)

and back (`diffusion_policy_export`, `lerobot_export`, sharing `exporting`; an export carries `export_marker`'s
mark, and only a marked earlier export is ever replaced). A `.ckpt` is read by `safe_pickle` (an allowlist of
globals, BUILD on the types that need it) and its config resolved by `safe_config` (our own resolvers only).

The source's facts (parameter names, normalization formulas, conditioning order, sampling) are written down in
`tests/data/interop/FACTS.md`.
"""
from pcm_policy.interop.common import ImportedPolicy, write_imported_checkpoint
from pcm_policy.interop.diffusion_policy import import_diffusion_policy
from pcm_policy.interop.lerobot import import_lerobot

__all__ = ["ImportedPolicy", "import_diffusion_policy", "import_lerobot", "write_imported_checkpoint"]
