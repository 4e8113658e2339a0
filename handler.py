"""RunPod entry point: build the worker from the environment, then serve jobs.

    python -u handler.py                                  # on RunPod
    python handler.py --rp_serve_api --rp_api_port 8000   # local API server
"""

import logging
import os
import sys

import runpod

from src.config import ConfigError, Settings
from src.pipelines import ModelNotFound

log = logging.getLogger("worker")


def progress_sender(job: dict):
    """Progress goes to RunPod's job stream when running there; locally to the log."""
    if os.environ.get("RUNPOD_WEBHOOK_POST_STREAM"):
        return lambda update: runpod.serverless.progress_update(job, update)
    return lambda update: log.info("job %s: step %s of %s", job.get("id"), update["step"], update["of"])


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Weights come from the volume only; never from the network at job time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers
    import transformers

    from src.worker import Worker  # imports torch and diffusers: after logging is set up

    # Their per-call notices (e.g. "guidance_scale is ignored") would repeat on every job.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()

    try:
        worker = Worker.start(Settings.from_env(os.environ))
    except (ConfigError, ModelNotFound) as exc:
        sys.exit(f"start failed: {exc}")
    except Exception as exc:  # a start that cannot serve must say why in one line
        sys.exit(f"start failed: {type(exc).__name__}: {exc}")

    runpod.serverless.start({"handler": lambda job: worker.handle(job, progress_sender(job))})


if __name__ == "__main__":
    main()
