"""Serving jobs: the start (startup), the worker (parse, run, store, respond), its answer
(response), the operations it runs on the pipelines, its outputs (result images, layers,
archives), the job deadline and multi-GPU ranks. The models are met through one door,
src.models.host.ModelHost.

The top layer: may import every other package; nothing in src imports it (docs/architecture.md).
"""
