"""Hopper FP8 attention (cuDNN frontend's `sdpa_fp8`) against torch's bf16 SDPA: speed and deviation.

    python tools/fp8_attention_bench.py --out bench/results --label fp8-attention

Batch 1, 24 heads of 128, no mask, Q/K/V laid out as diffusers' `_native_attention` passes them
((B, S, H, D) memory seen as (B, H, S, D)). For each token count it times (CUDA events, median of
`--repeats` after a warm-up): torch's bf16 `scaled_dot_product_attention` (its own kernel choice);
the cuDNN FP8 graph's execution alone; and quantize + execute + dequantize, what an integration pays:
Q, K and V each cast to e4m3 with one scale per tensor (amax / 448, computed on every call). The graph is
built once per shape and its build timed apart. On Hopper the node writes O in e4m3 only (a bf16 or
fp16 O is Blackwell-only), so O is scaled by `scale_o` and dequantized to bf16. The deviation from the
bf16 output (relative L2, cosine) is measured on unit-normal Q/K/V and on Q/K with a few outlier
channels. Writes `<out>/<gpu>-<date>-<label>.json`; a shape that fails keeps its error and the run goes on.

The calls follow NVIDIA/cudnn-frontend: test/python/sdpa/fp8.py (`generate_graph_fwd`: `cudnn.pygraph`,
`sdpa_fp8(q=, k=, v=, descale_q=, ..., scale_o=, generate_stats=, attn_scale=)` returning O, Stats,
Amax_S, Amax_O; `set_output/set_dim/set_stride/set_data_type`; validate -> build_operation_graph ->
create_execution_plans([heur_mode.A, FALLBACK]) -> check_support -> build_plans; `execute(pack, workspace,
handle=)`), benchmark/sdpa_benchmark_training/benchmark_single_sdpa.py (BSHD strides under BHSD dims),
samples/cpp/sdpa/fp8_fwd_current_scaling.cpp (scale_s = 448), include/cudnn_frontend/node/
sdpa_support_surface.h (half/bf16 O needs Blackwell); checked against the 1.32.0 wheel's
cudnn/_pygraph.py (`_CAPTURED_OPS["sdpa_fp8"]`, `pygraph.execute`) and its binding's docstring.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.attention_bench import HEAD_DIM, HEADS, time_ms  # noqa: E402
from tools.bench_results import write_results  # noqa: E402

ATTN_SCALE = 1 / math.sqrt(HEAD_DIM)  # SDPA's default
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
S_SCALE = 448.0  # softmax values in [0, 1] onto e4m3's range (the C++ current-scaling sample; 1.32's docstring)
O_HEADROOM = 2.0  # |O| <= max|V|; a factor 2 more for the rounding of the quantized probabilities
OUTLIER_CHANNELS = [5, 37, 70, 101]
BUSY_CYCLES = 5_000_000  # GPU busy-wait before each timed call, so host overhead is not timed


def load_cudnn():
    """The cuDNN frontend, over the libcudnn torch loads (which it finds by soname when not in site-packages)."""
    torch.backends.cudnn.version()  # loads torch's libcudnn first
    try:
        import cudnn
    except Exception as error:  # noqa: BLE001 -- ImportError, or a failed dlopen of libcudnn
        sys.exit(f"import cudnn failed ({type(error).__name__}: {error}); install nvidia-cudnn-frontend==1.32.0 "
                 "(pip install --no-deps --target DIR, then PYTHONPATH=DIR)")
    return cudnn


def inputs(seq: int, outlier_scale: float | None, generator: torch.Generator):
    def one(outliers: bool) -> torch.Tensor:
        x = torch.randn(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=generator)
        if outliers:
            x[..., OUTLIER_CHANNELS] *= outlier_scale
        return x.permute(0, 2, 1, 3)
    return one(outlier_scale is not None), one(outlier_scale is not None), one(False)


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`x` in e4m3 (same strides) with one scale per tensor, and its descale amax / 448 as a (1, 1, 1, 1) tensor."""
    descale = (x.abs().amax().float().clamp(min=1e-12) / E4M3_MAX).reshape(1, 1, 1, 1)
    return (x / descale).to(torch.float8_e4m3fn), descale


class Fp8Sdpa:
    """One cuDNN `sdpa_fp8` graph for one shape, with its output and scale buffers."""

    def __init__(self, cudnn, handle, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, stats: bool):
        self.handle, seq = handle, q8.shape[2]
        fp8, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=f32, compute_data_type=f32)
        self.q, self.k, self.v = (graph.tensor(dim=list(t.shape), stride=list(t.stride()), data_type=fp8)
                                  for t in (q8, k8, v8))
        names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
        self.scalars = {name: graph.tensor(dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32) for name in names}
        o, st, amax_s, amax_o = graph.sdpa_fp8(q=self.q, k=self.k, v=self.v, **self.scalars,
                                               generate_stats=stats, attn_scale=ATTN_SCALE)
        self.o8 = torch.empty(1, seq, HEADS, HEAD_DIM, device="cuda", dtype=torch.float8_e4m3fn).permute(0, 2, 1, 3)
        o.set_output(True).set_dim(list(self.o8.shape)).set_stride(list(self.o8.stride())).set_data_type(fp8)
        self.buffers = {o: self.o8}
        one = [1, 1, 1, 1]
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim(one).set_stride(one).set_data_type(f32)
            self.buffers[amax] = torch.zeros(one, device="cuda")
        self.amax_o = self.buffers[amax_o]
        if stats:
            st.set_output(True).set_dim([1, HEADS, seq, 1]).set_stride([HEADS * seq, seq, 1, 1]).set_data_type(f32)
            self.buffers[st] = torch.empty(1, HEADS, seq, 1, device="cuda")
        self.buffers[self.scalars["scale_s"]] = torch.full(one, S_SCALE, device="cuda")
        self.buffers[self.scalars["descale_s"]] = torch.full(one, 1 / S_SCALE, device="cuda")
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace = torch.empty(graph.get_workspace_size(), device="cuda", dtype=torch.uint8)

    def execute(self, q8, k8, v8, dq, dk, dv, scale_o) -> torch.Tensor:
        """The graph alone: e4m3 Q, K, V and their descales in, e4m3 O (times `scale_o`) out."""
        pack = {self.q: q8, self.k: k8, self.v: v8, self.scalars["descale_q"]: dq, self.scalars["descale_k"]: dk,
                self.scalars["descale_v"]: dv, self.scalars["scale_o"]: scale_o, **self.buffers}
        self.graph.execute(pack, self.workspace, handle=self.handle)
        return self.o8

    def __call__(self, q, k, v) -> torch.Tensor:
        """Quantize, execute, dequantize: bf16 in, bf16 out."""
        (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
        descale_o = dv * O_HEADROOM
        return (self.execute(q8, k8, v8, dq, dk, dv, 1 / descale_o).float() * descale_o).to(torch.bfloat16)


def deviation(out: torch.Tensor, ref: torch.Tensor) -> dict:
    a, b = out.float(), ref.float()
    return {"rel_l2": float((a - b).norm() / b.norm()), "cosine": float((a * b).sum() / (a.norm() * b.norm()))}


def run_case(cudnn, handle, case: dict, args) -> None:
    """Fills `case` as it goes, so a failure keeps what was measured before it."""
    seq = case["seq"]
    generator = torch.Generator(device="cuda").manual_seed(seq)
    q, k, v = inputs(seq, None, generator)
    flops = case["flops"] = 4 * seq * seq * HEAD_DIM * HEADS
    case["sdpa_bf16_ms"] = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), args.repeats, BUSY_CYCLES)
    (q8, dq), (k8, dk), (v8, dv) = quantize(q), quantize(k), quantize(v)
    begin = time.perf_counter()
    try:
        attention, case["fp8_stats"] = Fp8Sdpa(cudnn, handle, q8, k8, v8, stats=False), False
    except Exception as error:  # noqa: BLE001 -- a Hopper FP8 graph may need Stats; try once with them
        case["fp8_no_stats_error"] = f"{type(error).__name__}: {error}"[:500]
        attention, case["fp8_stats"] = Fp8Sdpa(cudnn, handle, q8, k8, v8, stats=True), True
    case["fp8_build_s"] = time.perf_counter() - begin
    scale_o = 1 / (dv * O_HEADROOM)
    case["fp8_exec_ms"] = time_ms(lambda: attention.execute(q8, k8, v8, dq, dk, dv, scale_o), args.repeats,
                                  BUSY_CYCLES)
    case["fp8_quant_exec_ms"] = time_ms(lambda: attention(q, k, v), args.repeats, BUSY_CYCLES)
    torch.cuda.synchronize()
    begin = time.perf_counter()
    for _ in range(args.repeats):
        attention.execute(q8, k8, v8, dq, dk, dv, scale_o)
    case["fp8_exec_host_ms"] = (time.perf_counter() - begin) * 1e3 / args.repeats  # enqueue cost, GPU runs behind
    torch.cuda.synchronize()
    for key in ("sdpa_bf16", "fp8_exec", "fp8_quant_exec"):
        case[f"{key}_tflops"] = flops / case[f"{key}_ms"] / 1e9
    case["speedup_exec"] = case["sdpa_bf16_ms"] / case["fp8_exec_ms"]
    case["speedup_quant_exec"] = case["sdpa_bf16_ms"] / case["fp8_quant_exec_ms"]
    case["deviation"] = {}
    for name, outliers in (("unit_normal", None), (f"qk_outliers_x{args.outlier_scale:g}", args.outlier_scale)):
        q, k, v = inputs(seq, outliers, generator)
        ref, out = F.scaled_dot_product_attention(q, k, v), attention(q, k, v)
        case["deviation"][name] = {**deviation(out, ref), "amax_o": float(attention.amax_o),
                                   "amax_ref": float(ref.abs().amax())}


def parse_lengths(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--label", default="fp8-attention")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--seq", type=parse_lengths, default=[8689, 9757, 12994], help="comma-separated token counts")
    parser.add_argument("--outlier-scale", type=float, default=20.0, help=f"Q/K channels {OUTLIER_CHANNELS} times this")
    args = parser.parse_args()
    cudnn = load_cudnn()
    handle = cudnn.create_handle()
    cudnn.set_stream(handle, torch.cuda.current_stream().cuda_stream)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "cudnn_frontend": getattr(cudnn, "__version__", None),
               "cudnn_backend": cudnn.backend_version() if hasattr(cudnn, "backend_version") else None,
               "torch_cudnn": torch.backends.cudnn.version(), "date": datetime.date.today().isoformat(),
               "label": args.label, "command": " ".join(sys.argv),
               "settings": {"heads": HEADS, "head_dim": HEAD_DIM, "s_scale": S_SCALE, "o_headroom": O_HEADROOM,
                            "o_dtype": "e4m3, dequantized to bf16", "outlier_channels": OUTLIER_CHANNELS,
                            "repeats": args.repeats}, "cases": []}
    heads = ("bf16 ms", "fp8 ms", "q+fp8 ms", "bf16 TF", "fp8 TF", "x exec", "x q+fp8", "build s")
    print(f"{'seq':>6} " + " ".join(f"{h:>8}" for h in heads) + "  deviation from bf16 (rel L2, cosine)")
    for seq in args.seq:
        case = {"seq": seq}
        try:
            run_case(cudnn, handle, case, args)
        except Exception as error:  # noqa: BLE001 -- record it and go on to the next shape
            case["error"] = f"{type(error).__name__}: {error}"[:2000]
            print(f"{seq:>6} failed: {case['error'][:300]}", flush=True)
        else:
            dev = "  ".join(f"{name} {d['rel_l2']:.4f} {d['cosine']:.5f}" for name, d in case["deviation"].items())
            row = (case["sdpa_bf16_ms"], case["fp8_exec_ms"], case["fp8_quant_exec_ms"], case["sdpa_bf16_tflops"],
                   case["fp8_exec_tflops"], case["speedup_exec"], case["speedup_quant_exec"], case["fp8_build_s"])
            print(f"{seq:>6} " + " ".join(f"{x:>8.3f}" for x in row) + f"  {dev}", flush=True)
        results["cases"].append(case)
        write_results(results, Path(args.out))


if __name__ == "__main__":
    main()
