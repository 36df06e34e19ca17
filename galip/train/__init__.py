"""Training: the GALIP trainer and what it needs to run for days on many processes.

``trainer`` is the loop (``galip train``; under torchrun ``torchrun ... -m galip train``): D and G
phases, evaluation during training, samples, logging. ``checkpoint`` writes and reads its
checkpoints (state_dicts + config + step + RNG, atomically); ``reference_format`` converts the
reference code's checkpoints to ours and back, optimiser states included, on top of ``checkpoint``;
``distributed`` sets up the process group from torchrun's environment; ``runlock`` keeps one writer
per output folder. ``clip_pretrain`` is the demo's other training stage (``galip train-clip``: fit
the tiny CLIP to the demo captions first) and ``clip_probe`` measures what that CLIP tells apart.
"""
