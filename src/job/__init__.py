"""The job's contract: what a job may ask (schema) and how its images travel (codec).

The bottom layer: imports nothing else from src (docs/architecture.md).
"""
