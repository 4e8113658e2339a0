"""Serving jobs: the worker (parse, run, store, respond), the operations it runs on the
pipelines, its outputs (result images, layers, archives), the job deadline and multi-GPU
ranks.

The top layer: may import every other package; nothing in src imports it (docs/architecture.md).
"""
