"""The worker's settings and its ways to the outside world: configuration, the bucket, job
URLs (the SSRF guard and bounded downloads) and metering.

Imports only src.job (docs/architecture.md).
"""
