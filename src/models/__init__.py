"""The models on the GPU: loading the diffusers pipelines from the HF cache, their weights,
memory modes, FP8, LoRAs and their sources, and the speed switches.

Imports src.job and src.plumbing, never src.serving (docs/architecture.md).
"""
