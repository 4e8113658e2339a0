"""`make demo`: the worker's main jobs end to end on this machine, on tiny random models.

Starts a loopback S3 (moto) and handler.py behind the runpod SDK's local API server,
then sends a single edit, a 2-image edit and a decomposition with one layer edited
through the repo's own clients, which print URLs, timings and cost and save the images
(and, for the layers, a PSD and a contact sheet) under --out.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.local_stack import REPO_ROOT, start_api, start_s3  # noqa: E402

NOTICE = """
NOTE: these are TINY RANDOM-WEIGHT models, so every image above is noise: the demo
shows the plumbing (jobs, S3, presigned URLs, timings, cost), not the model.
For real images, run the worker on a GPU with the real weights:
  python tools/download_models.py --hf-home /runpod-volume/huggingface-cache
  HF_HOME=/runpod-volume/huggingface-cache python -u handler.py
(see README.md, "Deploy on RunPod").
"""


def make_samples(folder: Path) -> list[Path]:
    """Two small drawn scenes to send as inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    house = Image.new("RGB", (320, 240), (135, 190, 235))
    draw = ImageDraw.Draw(house)
    draw.rectangle((0, 170, 320, 240), fill=(90, 160, 70))
    draw.rectangle((110, 110, 210, 180), fill=(200, 80, 60))
    draw.polygon([(100, 110), (160, 60), (220, 110)], fill=(120, 60, 40))
    draw.ellipse((250, 20, 290, 60), fill=(250, 220, 60))
    hat = Image.new("RGB", (240, 240), (245, 245, 245))
    draw = ImageDraw.Draw(hat)
    draw.ellipse((40, 140, 200, 180), fill=(30, 30, 30))
    draw.rectangle((80, 70, 160, 160), fill=(30, 30, 30))
    paths = [folder / "house.png", folder / "hat.png"]
    house.save(paths[0])
    hat.save(paths[1])
    return paths


def client(script: str, url: str, *args: str) -> None:
    print(f"\n$ python tools/{script} --url {url} {' '.join(args)}", flush=True)
    subprocess.run([sys.executable, f"tools/{script}", "--url", url, *args], cwd=REPO_ROOT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-home", default=".cache/hf", help="HF cache with the tiny models")
    parser.add_argument("--out", default="outputs", help="where the clients save images")
    args = parser.parse_args()

    out = Path(args.out)
    house, hat = make_samples(out / "samples")
    s3 = start_s3()
    print(f"loopback S3 at {s3.endpoint_url}, bucket {s3.bucket}")
    env = {"HF_HOME": str(Path(args.hf_home).resolve()), "DEVICE": "cpu", **s3.env()}
    print("starting the worker's local API (loads and warms up the models first)...", flush=True)
    api = start_api(env, out / "worker.log")
    print(f"worker serving at {api.url}; its log: {api.log_path}")
    size = ["--width", "512", "--height", "384", "--steps", "4", "--seed", "42"]
    try:
        client("test_qwen_edit.py", api.url, "--image", str(house), "--prompt", "make the house blue",
               *size, "--out", str(out))
        client("test_qwen_edit.py", api.url, "--image", str(house), "--image", str(hat),
               "--prompt", "put the hat on the roof", *size, "--out", str(out))
        client("test_layers.py", api.url, "--image", str(house), "--prompt", "a house under a blue sky",
               "--layers", "3", "--steps", "4", "--seed", "42", "--edit", "2:paint the house green",
               "--edit-steps", "4", "--resize-to-input", "--archive", "psd", "--out", str(out))
    finally:
        api.stop()
        s3.stop()
    print(NOTICE)


if __name__ == "__main__":
    main()
