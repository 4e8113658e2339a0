"""RunPod entry point: check the environment, load and warm up the worker, then serve jobs.

    python -u handler.py                                  # on RunPod
    python handler.py --rp_serve_api --rp_api_port 8000   # local API server
"""

import atexit
import logging
import os
import sys
from typing import NoReturn

from src.job.redaction import RedactingFilter
from src.plumbing.config import ConfigError, Settings

log = logging.getLogger("worker")

CREDENTIAL_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3")
# huggingface_hub's HTTP client logs every request at INFO: a model download is a line per file.
CHATTY_LOGGERS = ("httpx", "httpx2")
# A start failure is one line, however long or multi-line the underlying error.
MAX_START_ERROR_CHARS = 600


def progress_sender(job: dict):
    """Progress goes to RunPod's job stream when running there; locally to the log."""
    if os.environ.get("RUNPOD_WEBHOOK_POST_STREAM"):
        import runpod  # imported by main() before the first job

        return lambda update: runpod.serverless.progress_update(job, update)
    return lambda update: log.info("job %s: step %s of %s", job.get("id"), update["step"], update["of"])


def start_failed(reason: str) -> NoReturn:
    sys.exit(f"start failed: {' '.join(reason.split())[:MAX_START_ERROR_CHARS]}")


def main() -> None:
    # 1. The environment, before the heavy imports: a bad value stops the start in seconds.
    try:
        settings = Settings.from_env(os.environ)
    except ConfigError as exc:
        start_failed(str(exc))
    # force: whoever imported the runpod SDK before main() (tools/handler_start.py) has had the root
    # logger configured by it (INFO, in rp_upload), which would make this call, and LOG_LEVEL, a no-op.
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # Whatever logs a job's URL (an exception's message, a traceback), its secret parts stay out.
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    # At DEBUG these log signed request headers (access key ids), presigned URLs and
    # request bodies: they stay at INFO or above whatever LOG_LEVEL says.
    for library in CREDENTIAL_LOGGERS:
        logging.getLogger(library).setLevel(max(logging.INFO, logging.getLevelName(settings.log_level)))
    for library in CHATTY_LOGGERS:
        logging.getLogger(library).setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
    # Weights never come from the network at job time. huggingface_hub reads this when first
    # imported (below, by the download or by diffusers), so it is set before either.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    # 2. DOWNLOAD_MODELS=missing: what HF_HOME lacks is downloaded now, before anything loads and
    #    before the processes of several GPUs start, so it is fetched once (src/models/files/download.py
    #    goes online for the download alone).
    if settings.download_models == "missing":
        from src.models.files.download import DownloadFailed, fetch_missing

        try:
            fetch_missing(settings, token=os.environ.get("HF_TOKEN") or None)
        except DownloadFailed as exc:
            start_failed(str(exc))
        except Exception as exc:
            start_failed(f"DOWNLOAD_MODELS=missing: {type(exc).__name__}: {exc}")

    # 3. WEIGHTS_PREFETCH: the weights the load will read start going into the page cache now, so
    #    they are read while the libraries below import (src/models/files/early_read.py imports no torch).
    #    Only an optimization: where it cannot start, the load reads them itself.
    from src.models.files.early_read import read_at_start

    try:
        early_read = read_at_start(settings)
    except Exception as exc:
        log.warning("weights read-ahead not started before the imports (%s: %s)", type(exc).__name__, exc)
        early_read = None

    # The runpod SDK's import (about 2 s) is the first of the heavy ones, so after the read began.
    import runpod

    if not {"RUNPOD_LOG_LEVEL", "RUNPOD_DEBUG_LEVEL"} & os.environ.keys():
        # The SDK's default level, DEBUG, logs every job's whole output: presigned URLs,
        # which let anyone who reads the log fetch the images, and inline base64.
        runpod.RunPodLogger().set_level("INFO")

    import diffusers
    import transformers

    import torch

    from src.models.files.tensors import ModelNotFound
    from src.serving.deadline import JobGuard
    from src.serving.parallel import Leader, ParallelPlan, StartFailed
    from src.serving.startup import start_worker  # imports torch and diffusers: after logging is set up

    guard = JobGuard(settings.job_timeout_s)

    # Their per-call notices (e.g. "guidance_scale is ignored") would repeat on every job.
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()

    # 4. Load and warm up: on several GPUs, one process per GPU (src/serving/parallel.py), the
    #    read-ahead in this one. A start that cannot serve exits non-zero with one line.
    try:
        plan = ParallelPlan.for_settings(settings, torch.cuda.device_count())
        if plan.enabled:
            leader = Leader.launch(settings, plan, early_read)
            atexit.register(leader.shutdown)
            worker, run_job = leader.worker, leader.handle
        else:
            worker = start_worker(settings, early_read)
            run_job = worker.handle
    except (ConfigError, ModelNotFound, StartFailed) as exc:
        start_failed(str(exc))
    except Exception as exc:
        start_failed(f"{type(exc).__name__}: {exc}")

    # 5. Serve, each job under JOB_TIMEOUT_S (the Layered pipeline may load during a job).
    def handle(job: dict) -> dict:
        for pipeline in worker.host.loaded_pipelines():
            guard.watch(pipeline)
        return guard.run(lambda: run_job(job, progress_sender(job)))

    runpod.serverless.start({"handler": handle})


if __name__ == "__main__":
    main()
