"""OpenAI-compatible serving over the context-parallel inference engine (and the reference's
``PUT /api``): ``torchrun ... -m megatron_longvita.serve``.

Pieces: ``protocol`` (HTTP bodies -> validated requests), ``prompts`` (chat template, media,
context limit), ``scheduler`` (queue, batching, per-request output), ``ranks`` (the engine loop
all ranks run, commands broadcast from rank 0), ``app`` (FastAPI routes, metrics), ``cli``.
"""
