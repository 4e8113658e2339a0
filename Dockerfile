# Qwen image edit / layered worker for RunPod serverless.
# No weights in the image: they are read from the network volume (HF_HOME below),
# filled beforehand with tools/download_models.py.
#
# torch 2.13.0 (the version the local venv and tests use), built for CUDA 12.6: it runs on
# any CUDA 12.x host driver (>= 525 via minor-version compatibility), where the cuda13.0 tag
# would need >= 580 on every host; it covers A100/A6000/A40/L40S/H100/H200 (sm_80 to sm_90).
# The image ships torchvision too. Blackwell (B200, sm_100) would need a cuda12.8+ build.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

ENV HF_HOME=/runpod-volume/huggingface-cache \
    HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# 1. Dependencies. The base image's torch and torchvision are pinned as constraints so
#    that no requirement can pull a different (CPU or other-CUDA) torch over them.
COPY requirements.txt ./
RUN python -c "import torch, torchvision; print('torch==' + torch.__version__); print('torchvision==' + torchvision.__version__)" \
        > /tmp/base-constraints.txt \
    && pip install --constraint /tmp/base-constraints.txt --requirement requirements.txt \
    && rm /tmp/base-constraints.txt \
    && python -c "import torch, diffusers, transformers, runpod; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| runpod', runpod.__version__)"

# 2. Worker code.
COPY handler.py .
COPY src/ ./src/

CMD ["python", "-u", "handler.py"]
