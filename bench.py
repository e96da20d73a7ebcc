"""Benchmarks of the PTUnifier implementation (not timed tests). Results go to bench_results/.

Every comparison runs side by side in one process: the variants' repeats are interleaved (each
round runs every variant once, in turn, so machine drift is shared) and medians are reported.
Shared CPU machines are noisy: read ratios, not absolute times, and rerun when in doubt.

    python bench.py gpu                                    # a lent GPU: everything below, <= 5 min
    python bench.py step  --preset tiny --variants eager compile      # samples/s, FLOPs, MFU, compile s
    python bench.py step  --preset base --device cuda --batches 32 64 --variants eager compile cudagraphs
    python bench.py reuse --preset tiny                    # step.fast_passes vs the plain passes
    python bench.py data  --preset base --render 512 --workers 4 8 16 # loader on 288-px PNG files
    python bench.py flops --preset base --batch 32         # analytic FLOPs only, no timing
    python bench.py encoders                               # our ViT / text encoder vs transformers

A "step" is what train.py does per optimisation step without accumulation: forward of
step.PretrainStep (four fusion passes, bf16 autocast on CUDA as in train.py), backward, gradient
clipping, AdamW (train.make_optimizer). Inputs are a synthetic batch of full-length texts that
start with the start token, with round(0.15 x the real tokens) masked positions, padded per text
to the data loader's bucket (data.mlm_positions); --pad-fraction cuts every other text short.
The variants: `eager`; `compile`, torch.compile(fullgraph=True) of the step's forward and
backward (its first call, which compiles both, is timed apart: "compile s"); `cudagraphs`, the
same in mode "reduce-overhead", which replays them as CUDA graphs (CUDA only).

`gpu` runs, on the `base` preset at 288 px in bf16: the eager step at batches 32, 64, 96, the
compiled and CUDA-graph steps at batch 64, then the loader at 4, 8 and 16 workers reading 512
synthetic cases rendered as 288-px PNG files, against the fastest step; one table, and
bench_results/gpu.json written after each part.

FLOP convention (`step_flops`): a multiply-add is 2 FLOPs. Counted: every matmul (Linear and the
patch convolution or conv stem, 2 x weight entries per output position, i.e. 6 x parameters x
tokens for a training pass) and attention (QK^T and AV: 4 x Lq x Lk x D per sample and layer). Not counted: embedding
lookups (word, position, token type, ViT positions, modality type, prompt-pool rows), biases,
LayerNorm, activations, softmax, losses (elementwise, < 1% at base). Training = 3 x forward
(backward = input gradient + weight gradient, each as costly as the forward), except prompt
scoring, which runs on detached tensors and is counted once. 3 x is a slight upper bound of what
autograd runs: the first convolution needs no input gradient, and in the naive step's MLM pass
the last image-stream fusion layer and the poolers feed no loss, so their backward never runs
(tests/test_flops.py checks both against FlopCounterMode).
MFU = step_flops(...)["total"] / (median step seconds x peak FLOP/s of the device).

`encoders` builds transformers' CLIPVisionModel and RobertaModel at base widths (768, 12 heads,
MLP 3072) with reduced depth, loads the same weights into our encoders through our Hugging Face
loader, then times forward + backward of both side by side (interleaved repeats, median).
Ratio = transformers time / our time: >= 1.0 means ours is at least as fast. Takes about a
minute on 2 CPU cores with the defaults.
"""

import argparse
import dataclasses
import json
import math
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import copies
import dicom
import synth
import train
from data import (MLM_BUCKET, Batch, PretrainDataset, image_to_tensor, itm_pairs, load_image, make_train_stream,
                  mlm_positions)
from losses import LossWeights
from hf import config_from_hf, load_hf_encoders
from model import Config, PTUnifier
from recipes import RECIPES
from step import PretrainStep
from tokenizer import Tokenizer, round_up

RESULTS = Path("bench_results")
# Dense bf16 tensor-core peak FLOP/s (vendor datasheets, without sparsity). A CPU has no sensible
# default: pass --peak-flops NUMBER, or `gemm` to use this machine's measured fp32 matmul rate.
PEAK_FLOPS = {"a100": 312e12, "h100": 989e12, "h200": 989e12}
# What the GPU row of `step` is judged against (issue targets, base preset, 288 px, bf16).
GPU_TARGET = dict(preset="base", image_size=288, batch=32, mfu=0.40, memory_gb=40.0)


# ----------------------------------------------------------------------------- analytic FLOPs

def block_flops(batch: int, seq: int, width: int, mlp: int) -> int:
    """Forward FLOPs of one transformer block on [batch, seq, width]: q/k/v/out projections
    (4 D^2) and the MLP (2 D M) per token, plus attention scores and mixing (4 L^2 D) per sample."""
    return 2 * batch * seq * (4 * width * width + 2 * width * mlp) + 4 * batch * seq * seq * width


def stem_flops(cfg: Config, batch: int) -> int:
    """Pixels -> patch tokens: one patch_size convolution, or the conv stem's stride-2 3x3 layers
    (16, 32, ... channels, at most the width) and its 1x1 convolution (model.conv_stem)."""
    grid, width = cfg.image_size // cfg.patch_size, cfg.vision_width
    if cfg.vision_stem == "patch":
        return 2 * batch * grid * grid * 3 * cfg.patch_size ** 2 * width
    flops, channels, side = 0, 3, cfg.image_size
    for i in range(int(math.log2(cfg.patch_size))):
        out, side = min(width, 16 * 2 ** i), side // 2
        flops += 2 * batch * side * side * 9 * channels * out
        channels = out
    return flops + 2 * batch * grid * grid * channels * width


def vision_flops(cfg: Config, batch: int, seq: int, patch_conv: bool) -> int:
    """ViT forward on [batch, seq] tokens; the stem runs only on real images."""
    stem = stem_flops(cfg, batch) if patch_conv else 0
    return stem + cfg.vision_layers * block_flops(batch, seq, cfg.vision_width, cfg.vision_mlp)


def text_flops(cfg: Config, batch: int, seq: int) -> int:
    """Text encoder forward on [batch, seq] tokens (embeddings are lookups: not counted)."""
    return cfg.text_layers * block_flops(batch, seq, cfg.text_width, cfg.text_mlp)


def stream_flops(cfg: Config, batch: int, own: int, other: int) -> int:
    """One co-attention layer of one stream with own length Lx and other length Lo: self-attention
    q/k/v/out (4 H^2) + cross-attention q/out (2 H^2) + FFN (2 H M) per own token, cross-attention
    k/v (2 H^2) per other token; attention 4 (Lx^2 + Lx Lo) H per sample."""
    H, M = cfg.hidden_size, cfg.fusion_mlp
    return (2 * batch * (own * (6 * H * H + 2 * H * M) + other * 2 * H * H)
            + 4 * batch * (own * own + own * other) * H)


def fusion_flops(cfg: Config, batch: int, lt: int, li: int) -> int:
    """Fusion forward: input projections, co-attention layers of both streams, two poolers."""
    H = cfg.hidden_size
    proj = 2 * batch * (lt * cfg.text_width + li * cfg.vision_width) * H
    layer = stream_flops(cfg, batch, lt, li) + stream_flops(cfg, batch, li, lt)
    return proj + cfg.fusion_layers * layer + 2 * 2 * batch * H * H


def mlm_fusion_flops(cfg: Config, batch: int, lt: int, li: int, positions: int) -> int:
    """The MLM pass's fusion (Fusion.forward's text_rows): every layer but the last in full; the last runs
    the text stream's self-attention on all Lt tokens and its cross-attention queries and FFN on
    the `positions` MLM positions of each text only; no last image-stream layer, no poolers."""
    H, M, rows = cfg.hidden_size, cfg.fusion_mlp, batch * positions
    proj = 2 * batch * (lt * cfg.text_width + li * cfg.vision_width) * H
    before = (cfg.fusion_layers - 1) * (stream_flops(cfg, batch, lt, li) + stream_flops(cfg, batch, li, lt))
    last = (2 * batch * lt * 4 * H * H + 4 * batch * lt * lt * H  # self-attention, every token
            + 2 * batch * li * 2 * H * H                          # cross-attention k/v, once per image
            + 2 * rows * (2 * H * H + 2 * H * M) + 4 * rows * li * H)  # queries, out, FFN of the rows
    return proj + before + last


def typical_positions(text_len: int) -> int:
    """MLM positions per text of a batch of full texts: 15% of them, bucketed as the loader does."""
    return round_up(max(1, round(0.15 * text_len)), MLM_BUCKET, text_len)


def prompt_scoring_flops(cfg: Config, batch: int, width: int) -> int:
    """Eq. 3 scores query [B, D] @ pool^T [D, S] (pool mode; static prompts score nothing)."""
    return 2 * batch * cfg.pool_size * width if cfg.prompt_mode in ("pool", "pool_frozen") else 0


def step_flops(cfg: Config, batch: int, text_len: int, reuse=True, positions: int | None = None) -> dict:
    """Analytic FLOPs of one pre-training step (step.PretrainStep + backward) of `batch` pairs
    with texts of `text_len` tokens and `positions` MLM positions per text (the batch's
    mlm_positions width; default `typical_positions`).

    Returns training FLOPs (3 x forward; prompt scoring 1 x) per component and in "total", and the
    forward-only counts under "forward". Convention in the module docstring (multiply-add = 2).
    The four passes (step.py): 1. MLM text + image, 2. ITM text + (other) image, 3. image +
    textual prompts (k_t + 2 tokens), 4. text + visual prompts (1 + k_v tokens). The ViT runs on
    the true images once (both paths) plus once on the visual prompts; the text
    encoder on the true texts twice with reuse where it has no dropout (3 times otherwise: MLM's
    masked texts, ITM's and the text-only pass's) plus once on the textual prompts. With reuse the
    MLM pass fuses only the rows its head reads (mlm_fusion_flops); the plain step fuses all. The
    MLM head reads `positions` rows per text either way.
    """
    B, L = batch, text_len
    li = 1 + (cfg.image_size // cfg.patch_size) ** 2  # CLS + patches
    lp_t, lp_v = cfg.k_textual + 2, 1 + cfg.k_visual  # [<s>, prompts, </s>] and [CLS, prompts]
    P = typical_positions(L) if positions is None else positions
    H, E = cfg.hidden_size, cfg.embed_dim
    text_passes = 2 if reuse and cfg.text_dropout == 0 else 3
    fwd = {
        "vision": vision_flops(cfg, B, li, True) + vision_flops(cfg, B, lp_v, False),
        "text": text_passes * text_flops(cfg, B, L) + text_flops(cfg, B, lp_t),
        "fusion": ((mlm_fusion_flops(cfg, B, L, li, P) if reuse else fusion_flops(cfg, B, L, li))
                   + fusion_flops(cfg, B, L, li) + fusion_flops(cfg, B, lp_t, li) + fusion_flops(cfg, B, L, lp_v)),
        "prompt_scoring": (prompt_scoring_flops(cfg, B, cfg.vision_width)
                           + prompt_scoring_flops(cfg, B, cfg.text_width)),
        "mlm_head": 2 * B * P * (H * H + H * cfg.vocab_size),
        "itm_head": 2 * B * 2 * H * 2,
        "itc_head": 2 * (2 * B * 2 * H * E) + 2 * (2 * B * B * E),  # projections + logits both ways
    }
    fwd["total"] = sum(fwd.values())
    out = {k: (v if k == "prompt_scoring" else 3 * v) for k, v in fwd.items() if k != "total"}
    out["total"] = sum(out.values())
    out["forward"] = fwd
    return out


# ----------------------------------------------------------------------------- measuring

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run, device: torch.device) -> float:
    """Wall time of `run()`, with the device queue drained before and after."""
    sync(device)
    start = time.perf_counter()
    run()
    sync(device)
    return time.perf_counter() - start


def interleaved(cases: dict, repeats: int, warmup: int, device: torch.device) -> dict[str, list]:
    """Seconds of every repeat per case; each round runs every case once, in turn."""
    for _ in range(warmup):
        for run in cases.values():
            run()
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            times[name].append(seconds(run, device))
    return times


def saved_activation_bytes(run, params) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves for backward during `run()`:
    the activation memory of a step, comparable across variants in one process and on any device."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(seen.values())


def peak_allocated(run, device: torch.device) -> float | None:
    """Peak bytes allocated on a CUDA device during `run()` (None on CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def gemm_flops_per_s(device: torch.device, dtype: torch.dtype, n: int = 2048) -> float:
    """Measured dense matmul rate (median of 5) of this device: a practical CPU 'peak'."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b
    return 2 * n ** 3 / statistics.median(seconds(lambda: a @ b, device) for _ in range(5))


def resolve_peak(arg: str, device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """--peak-flops: a number, a name in PEAK_FLOPS, `gemm` (measured), or `auto` (GPU name)."""
    if arg == "gemm":
        return gemm_flops_per_s(device, dtype), f"measured {dtype} matmul"
    if arg in PEAK_FLOPS:
        return PEAK_FLOPS[arg], arg
    if arg == "auto":
        if device.type != "cuda":
            return None, "unknown (CPU: pass --peak-flops NUMBER or gemm)"
        name = torch.cuda.get_device_name(device).lower()
        for key, value in PEAK_FLOPS.items():
            if key in name:
                return value, key
        return None, f"unknown GPU {name!r}: pass --peak-flops NUMBER"
    try:
        return float(arg), "given"
    except ValueError:
        raise SystemExit(f"bench.py --peak-flops: {arg!r} is not a number, 'auto', 'gemm' or one of "
                         f"{sorted(PEAK_FLOPS)}") from None


# ----------------------------------------------------------------------------- a step to measure

@dataclasses.dataclass
class Setup:
    """Model, optimiser and synthetic batch of one benchmark run."""
    cfg: Config
    model: PTUnifier
    optimizer: torch.optim.Optimizer
    batch: Batch
    device: torch.device
    amp_dtype: torch.dtype | None
    text_len: int


def model_config(args) -> Config:
    """The preset with the benchmark's overrides (image size, depth, vocabulary)."""
    over = {}
    if args.image_size:
        over["image_size"] = args.image_size
    if args.layers:
        over.update(vision_layers=args.layers, text_layers=args.layers, fusion_layers=args.layers)
    if args.vocab_size:
        over["vocab_size"] = args.vocab_size
    return dataclasses.replace(RECIPES[args.preset].model, **over)


def synthetic_batch(cfg: Config, batch: int, text_len: int, seed: int = 0, pad_fraction: float = 0.0) -> Batch:
    """A pre-training Batch of random pixels and full-length random texts (no padding) that start
    with the start token, round(0.15 x the real tokens after it) masked positions, bucketed as the
    data loader buckets them (data.mlm_positions), and ITM negatives. pad_fraction > 0: every
    other text is cut short so that this fraction of the positions are pads (at most 0.5)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, cfg.vocab_size, (batch, text_len), generator=gen)  # [B, L]
    ids[:, 0] = cfg.bos_token_id
    short = text_len - round(2 * pad_fraction * text_len)
    if not 1 <= short <= text_len:
        raise SystemExit(f"--pad-fraction {pad_fraction}: expected 0 <= it < 0.5")
    mask = torch.ones_like(ids)
    mask[1::2, short:] = 0  # [B, L]
    ids = ids.masked_fill(mask == 0, cfg.pad_token_id)
    maskable = mask.clone()
    maskable[:, 0] = 0  # the start token is never masked
    real = maskable.flatten().nonzero().squeeze(1)
    where = real[torch.randperm(len(real), generator=gen)[:round(0.15 * len(real))]]
    labels = torch.full((batch * text_len,), -100, dtype=torch.long)
    labels[where] = ids.flatten()[where]
    labels = labels.view(batch, text_len)  # [B, L]
    itm_index, itm_labels = itm_pairs(batch, gen)
    return Batch(ids=[str(i) for i in range(batch)],
                 pixel_values=torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=gen),
                 input_ids=ids, attention_mask=mask,
                 mlm_input_ids=ids.masked_fill(labels != -100, 4), mlm_labels=labels,
                 mlm_positions=mlm_positions(labels),
                 itm_image_index=itm_index, itm_labels=itm_labels)


def build_setup(args, batch: int | None = None) -> Setup:
    """The model (seed 0, train mode), its optimizer (train.make_optimizer) and a synthetic batch of
    `batch` pairs (default args.batch) for one benchmark run."""
    device = torch.device(args.device)
    if device.type == "cuda":  # as runtime.setup_runtime
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp = {"auto": torch.bfloat16 if device.type == "cuda" else None, "fp32": None,
           "bf16": torch.bfloat16}[args.dtype]
    cfg = model_config(args)
    torch.manual_seed(0)
    model = PTUnifier(cfg).to(device).train()
    tcfg = train.TrainConfig(preset=args.preset).resolved()
    optimizer = train.make_optimizer(model, tcfg, device)
    text_len = args.text_len or cfg.max_text_len
    pairs = synthetic_batch(cfg, batch or args.batch, text_len, pad_fraction=args.pad_fraction).to(device)
    return Setup(cfg, model, optimizer, pairs, device, amp, text_len)


def setup_flops(s: Setup, reuse: bool = True) -> dict:
    """step_flops of the setup's batch (its text length and MLM positions per text)."""
    return step_flops(s.cfg, len(s.batch), s.text_len, reuse, s.batch.mlm_positions.shape[1])


def step_fn(s: Setup, module):
    """One optimisation step as train.py runs it (no accumulation, bf16 needs no scaler)."""
    def run():
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs (reduce-overhead)
        with torch.autocast(s.device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
            out = module(s.batch)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(s.model.parameters(), 1.0)
        s.optimizer.step()
        s.optimizer.zero_grad(set_to_none=True)
    return run


def forward_backward_fn(s: Setup, module):
    def run():
        with torch.autocast(s.device.type, dtype=s.amp_dtype, enabled=s.amp_dtype is not None):
            out = module(s.batch)
        out.total.backward()
        s.model.zero_grad(set_to_none=True)
    return run


def losses_of(s: Setup, module) -> dict[str, float]:
    """The four loss values of `module` on the setup's batch in eval mode (no dropout, no step)."""
    s.model.eval()
    with torch.no_grad(), torch.autocast(s.device.type, dtype=s.amp_dtype,
                                         enabled=s.amp_dtype is not None):
        out = module(s.batch)
    s.model.train()
    parts = {f.name: getattr(out.losses, f.name).item() for f in dataclasses.fields(out.losses)}
    return parts | {"total": out.total.item()}


def variant_row(s: Setup, name: str, times: list[float], flops: dict, peak: float | None,
                module, compiled: bool = False) -> dict:
    """Step time statistics, throughput, FLOPs, MFU and memory of one measured variant (the saved
    activations only for an eager module: a compiled graph saves its tensors out of sight)."""
    med = statistics.median(times)
    params = list(s.model.parameters())
    act = None if compiled else saved_activation_bytes(forward_backward_fn(s, module), params)
    cuda_peak = peak_allocated(step_fn(s, module), s.device)
    return {"variant": name, "step_s": med, "min_s": min(times), "max_s": max(times),
            "samples_per_s": len(s.batch) / med, "tflop_per_step": flops["total"] / 1e12,
            "achieved_tflops": flops["total"] / med / 1e12,
            "mfu": flops["total"] / med / peak if peak else None,
            "saved_activations_gb": act / 1e9 if act is not None else None,
            "peak_allocated_gb": cuda_peak / 1e9 if cuda_peak is not None else None}


# ----------------------------------------------------------------------------- subcommands

def rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def gpu_target_row() -> dict:
    """The GPU row of the issue's targets with its analytic FLOPs; never an estimate of speed."""
    cfg = dataclasses.replace(RECIPES[GPU_TARGET["preset"]].model, image_size=GPU_TARGET["image_size"])
    flops = step_flops(cfg, GPU_TARGET["batch"], cfg.max_text_len)
    return {"variant": f"base cuda bf16 {GPU_TARGET['image_size']}px B={GPU_TARGET['batch']}",
            "step_s": "not yet measured", "samples_per_s": "not yet measured",
            "tflop_per_step": flops["total"] / 1e12, "achieved_tflops": "not yet measured",
            "mfu": "not yet measured (target >= 40%)",
            "peak_allocated_gb": "not yet measured (target < 40 GB)"}


# torch.compile mode of each variant of `step` (None: eager). "cudagraphs" replays the compiled
# forward and backward as CUDA graphs (CUDA only); AdamW and the gradient clipping stay eager.
VARIANTS = {"eager": None, "compile": "default", "cudagraphs": "reduce-overhead"}


def bench_step(args) -> dict:
    """Each variant at each batch size: step time, samples/s, FLOPs, MFU, memory, and for compiled
    variants the first call (compiling forward and backward) timed apart as the compile time and
    the losses against eager's. The variants of one batch size run interleaved."""
    rows, result = [], {"times_s": {}, "compile_s": {}, "max_loss_diff": {}}
    for batch in args.batches:
        torch._dynamo.reset()  # each batch size compiles anew: every compile time is a first compile
        s = build_setup(args, batch)
        peak, result["peak_source"] = resolve_peak(args.peak_flops, s.device, s.amp_dtype or torch.float32)
        result["peak_flops"], flops = peak, setup_flops(s)
        modules = {}
        eager = PretrainStep(s.model, LossWeights())
        for name in args.variants:
            key = f"{name} B={batch}"
            if VARIANTS[name] is None:
                modules[name] = eager
                continue
            module = torch.compile(PretrainStep(s.model, LossWeights()), fullgraph=True, mode=VARIANTS[name])
            try:
                result["compile_s"][key] = seconds(step_fn(s, module), s.device)  # compiles fwd + bwd
            except Exception as err:  # report an environment that cannot compile instead of crashing
                rows.append({"variant": key, "step_s": f"compile failed: {one_line(err)}"})
                continue
            modules[name] = module
            if args.check_losses:
                result["max_loss_diff"][key] = max_loss_diff(losses_of(s, eager), losses_of(s, module))
        times = interleaved({n: step_fn(s, m) for n, m in modules.items()}, args.repeats, args.warmup, s.device)
        for name, module in modules.items():
            key = f"{name} B={batch}"
            result["times_s"][key] = times[name]
            rows.append(variant_row(s, key, times[name], flops, peak, module, compiled=module is not eager)
                        | {"compile_s": result["compile_s"].get(key)})
        del s, modules, eager
    return result | {"rows": rows, "process_peak_rss_gb": rss_gb()}


def one_line(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"


def max_loss_diff(a: dict[str, float], b: dict[str, float]) -> float:
    """The largest difference between two modules' losses (losses_of)."""
    return max(abs(a[k] - b[k]) for k in a)


def bench_reuse(args) -> dict:
    """The step's speed mechanisms (step.fast_passes: encoder reuse, the MLM pass fused where its
    head reads) against the plain passes: their losses (equal) and their speed."""
    s = build_setup(args)
    peak, peak_source = resolve_peak(args.peak_flops, s.device, s.amp_dtype or torch.float32)
    steps = {name: PretrainStep(s.model, LossWeights(), reuse=name == "fast") for name in ("fast", "plain")}
    losses = {name: losses_of(s, m) for name, m in steps.items()}
    times = interleaved({n: step_fn(s, m) for n, m in steps.items()}, args.repeats, args.warmup, s.device)
    rows = [variant_row(s, name, times[name], setup_flops(s, name == "fast"), peak, steps[name])
            for name in ("fast", "plain")]
    ratio = statistics.median(p / f for p, f in zip(times["plain"], times["fast"]))
    flop_ratio = rows[1]["tflop_per_step"] / rows[0]["tflop_per_step"]
    return {"rows": rows, "losses": losses, "max_loss_diff": max_loss_diff(losses["fast"], losses["plain"]),
            "speed_ratio_plain_over_fast": ratio, "flop_ratio_plain_over_fast": flop_ratio,
            "peak_flops": peak, "peak_source": peak_source, "times_s": times, "process_peak_rss_gb": rss_gb()}


def loader_samples_per_s(dataset, batch: int, workers: int, batches: int) -> dict:
    """Decoded, transformed, collated samples/s of the training stream with `workers` workers.

    The first 1 + 4 x workers batches (worker start-up and the prefetch queue filled meanwhile)
    are not timed, so the rate is the workers' steady production rate.
    """
    loader = make_train_stream(dataset, batch, seed=0, num_workers=workers)
    stream = iter(loader)
    start = time.perf_counter()
    for _ in range(1 + 4 * workers):
        next(stream)
    ready = time.perf_counter()
    for _ in range(batches):
        next(stream)
    elapsed = time.perf_counter() - ready
    del stream, loader  # shuts the workers down
    rate = batches * batch / elapsed
    return {"workers": workers, "startup_s": ready - start, "samples_per_s": rate,
            "per_worker": rate / max(workers, 1)}


def bench_data(args) -> dict:
    """The training loader's samples/s with each worker count against what the step consumes.
    --render N: N synthetic cases rendered as PNG files at the model's image size (288 px for
    `base`) into a temporary folder, so that decoding and resizing cost what real files cost."""
    consumed, times = args.step_samples_per_s, None
    if not consumed:
        s = build_setup(args)
        times = interleaved({"step": step_fn(s, PretrainStep(s.model, LossWeights()))}, args.repeats,
                            args.warmup, s.device)["step"]
        consumed = len(s.batch) / statistics.median(times)
        del s
    cfg = model_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        folder, tokenizer = Path(args.data), Path(args.tokenizer)
        if args.render:
            synth.main(["--out", tmp, "--train", str(args.render), "--val", "8", "--test", "8",
                        "--image-size", str(cfg.image_size), "--workers", str(max(1, min(8, args.workers[-1])))])
            folder, tokenizer = Path(tmp) / "pretrain", Path(tmp) / "tokenizer.json"
        dataset = PretrainDataset(folder, "train", Tokenizer.load(tokenizer), cfg.image_size,
                                  args.text_len or cfg.max_text_len, train=True, seed=0)
        rows = [{"source": f"step consumes ({args.device}, {args.preset}, B={args.batch})",
                 "samples_per_s": consumed, "per_worker": None, "vs_step": 1.0, "startup_s": None}]
        for w in args.workers:
            r = loader_samples_per_s(dataset, args.batch, w, args.data_batches)
            rows.append({"source": f"loader, {w} workers, {cfg.image_size} px files", **r,
                         "vs_step": r["samples_per_s"] / consumed})
    real = real_source_rows(args) if getattr(args, "real_size", 0) else {}
    return {"rows": rows, **real, "step_times_s": times, "process_peak_rss_gb": rss_gb()}


def big_sources(folder: Path, n: int, size: int) -> dict[str, list[Path]]:
    """n full-size films (a synthetic radiograph upscaled to 2,544 x 3,056, film-like noise) as JPEG
    (quality 95) and as 12-bit DICOM (with a window), and their prepared copies (copies.py, `size` px)."""
    rng, paths = np.random.default_rng(0), {"jpeg": [], "dicom": []}
    for i in range(n):
        film = Image.fromarray(synth.render(synth.sample_case(rng), 640, rng)).resize((2544, 3056), Image.BICUBIC)
        film = np.clip(np.asarray(film, np.float32) + rng.normal(0, 6, (3056, 2544)), 0, 255)
        paths["jpeg"].append(folder / f"film{i}.jpg")
        Image.fromarray(film.astype(np.uint8)).save(paths["jpeg"][-1], quality=95)
        paths["dicom"].append(folder / f"film{i}.dcm")
        dicom.write_dicom(paths["dicom"][-1], (film * 16).astype(np.uint16), WindowCenter=2048, WindowWidth=4096)
    rels = [p.name for p in paths["jpeg"]]
    copies.make_copies(str(folder), rels, str(folder / "copies"), size, workers=1)
    return {"2544x3056 JPEG q95": paths["jpeg"], "2544x3056 DICOM 12-bit": paths["dicom"],
            f"prepared {size}-px copy (TIFF)": [folder / "copies" / copies.copy_name(r) for r in rels]}


def real_source_rows(args) -> dict:
    """Samples/s per worker core (load_image + the train transform at the `base` step's 288 px) from
    each big_sources kind, rounds interleaved, and the cores per GPU that step needs at 40% MFU; and
    the first copy against a full decode + the same resize (the cost of draft mode)."""
    base = dataclasses.replace(RECIPES[GPU_TARGET["preset"]].model, image_size=GPU_TARGET["image_size"])
    per_sample = step_flops(base, GPU_TARGET["batch"], base.max_text_len)["total"] / GPU_TARGET["batch"]
    with tempfile.TemporaryDirectory() as tmp:
        sources = big_sources(Path(tmp), args.real_size, args.prepared_size)
        gen = torch.Generator().manual_seed(0)

        def read(paths):  # one worker's work per sample: decode, random-resized crop, normalise
            return lambda: [image_to_tensor(load_image(p, keep_grey=True), base.image_size, True, gen)
                            for p in paths]
        times = {k: statistics.median(t) for k, t in interleaved(
            {k: read(v) for k, v in sources.items()}, args.repeats, args.warmup, torch.device("cpu")).items()}
        kinds = list(sources.values())  # [JPEGs, DICOMs, copies of the JPEGs]
        full = np.asarray(copies.shrink(load_image(kinds[0][0], keep_grey=True), args.prepared_size), np.float64)
        diff = np.abs(np.asarray(load_image(kinds[-1][0], keep_grey=True), np.float64) - full)
        quality = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean()),
                   "psnr_db": float(10 * np.log10(255 ** 2 / (diff ** 2).mean()))}
    rows, original = [], next(iter(times.values()))
    for name, seconds_ in times.items():
        rate = len(sources[name]) / seconds_
        cores = {f"cores_{gpu}": GPU_TARGET["mfu"] * PEAK_FLOPS[gpu] / per_sample / rate for gpu in ("a100", "h100")}
        rows.append({"source": f"{name} -> {base.image_size} px", "per_core": rate,
                     "vs_jpeg": original / seconds_, **cores})
    return {"real_rows": rows, "copy_vs_full_decode": quality}


def bench_gpu(args) -> dict:
    """What to measure when a GPU is lent for a few minutes, in one table: the eager step at each of
    --batches, the compiled step and the CUDA-graph step at --compiled-batch (each compile timed),
    then the loader with --workers on --render files at the model's image size against the
    fastest step. Results are saved after each part, so a run cut short keeps what it measured."""
    steps = bench_step(argparse.Namespace(**vars(args) | {"variants": ["eager"]}))
    save("gpu", steps)
    if args.compiled_batch:
        compiled = bench_step(argparse.Namespace(**vars(args) | {
            "variants": ["compile", "cudagraphs"] if args.device.startswith("cuda") else ["compile"],
            "batches": [args.compiled_batch]}))
        steps = steps | {k: steps[k] | compiled[k] for k in ("times_s", "compile_s", "max_loss_diff")} | {
            "rows": steps["rows"] + compiled["rows"]}
        save("gpu", steps)
    fastest = max((r for r in steps["rows"] if isinstance(r.get("samples_per_s"), float)),
                  key=lambda r: r["samples_per_s"])
    data = bench_data(argparse.Namespace(**vars(args) | {"step_samples_per_s": fastest["samples_per_s"],
                                                         "batch": int(fastest["variant"].split("B=")[1])}))
    data["rows"][0]["source"] = f"fastest step: {fastest['variant']}"
    return steps | {"data_rows": data["rows"], "rows": steps["rows"]}


def bench_flops(args) -> dict:
    cfg = model_config(args)
    text_len = args.text_len or cfg.max_text_len
    counts = {name: step_flops(cfg, args.batch, text_len, reuse)
              for name, reuse in (("reuse", True), ("naive", False))}
    rows = [{"component": k, "reuse_tflop": counts["reuse"][k] / 1e12,
             "naive_tflop": counts["naive"][k] / 1e12,
             "reuse_share": counts["reuse"][k] / counts["reuse"]["total"]}
            for k in counts["reuse"] if k != "forward"]
    return {"rows": rows, "counts": counts, "config": dataclasses.asdict(cfg), "text_len": text_len}


# ----------------------------------------------------------------------------- encoders (transformers parity of speed)

def fwd_bwd_seconds(run) -> float:
    """Wall time of one forward + backward of `run()` (a scalar-returning closure)."""
    start = time.perf_counter()
    run().backward()
    return time.perf_counter() - start


def interleaved_medians(cases: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per case; every repeat runs each case once, in turn, so drift is shared."""
    for _ in range(warmup):
        for run in cases.values():
            fwd_bwd_seconds(run)
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            times[name].append(fwd_bwd_seconds(run))
    return {name: statistics.median(t) for name, t in times.items()}


def build_encoder_pair(args, folder: Path):
    """transformers models and our PTUnifier with the same encoder weights, both in train mode."""
    import transformers  # benchmark-only reference library

    width = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=args.layers)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        **width, image_size=args.image_size, patch_size=16, hidden_act="quick_gelu"))
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        **width, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
        add_pooling_layer=False)
    clip.save_pretrained(folder / "clip")
    roberta.save_pretrained(folder / "roberta")
    cfg = config_from_hf(vision=folder / "clip", text=folder / "roberta",
                         image_size=args.image_size, fusion_layers=1)
    ours = PTUnifier(cfg)
    load_hf_encoders(ours, vision=folder / "clip", text=folder / "roberta")
    return clip.train(), roberta.train(), ours.train()


def bench_encoders(args) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        clip, roberta, ours = build_encoder_pair(args, Path(tmp))
    pixels = torch.randn(args.vision_batch, 3, args.image_size, args.image_size)
    ids = torch.randint(5, 50265, (args.text_batch, args.text_len))
    full = torch.ones_like(ids)
    padded = full.clone()
    for b in range(args.text_batch):  # lengths spread between half and full length
        padded[b, args.text_len // 2 + b % (args.text_len // 2):] = 0
    ids_padded = ids.masked_fill(padded == 0, 1)

    def hf_vision():
        return clip.post_layernorm(clip(pixel_values=pixels).last_hidden_state).square().mean()

    cases = {
        "vision/transformers": hf_vision,
        "vision/ours": lambda: ours.encode_image(pixels).states.square().mean(),
        "text/transformers": lambda: roberta(
            input_ids=ids, attention_mask=full).last_hidden_state.square().mean(),
        "text/ours": lambda: ours.encode_text(ids, full).states.square().mean(),
        "text_padded/transformers": lambda: roberta(
            input_ids=ids_padded, attention_mask=padded).last_hidden_state.square().mean(),
        "text_padded/ours": lambda: ours.encode_text(ids_padded, padded).states.square().mean(),
    }
    medians = interleaved_medians(cases, args.repeats, args.warmup)
    rows = []
    for name in ("vision", "text", "text_padded"):
        theirs, mine = medians[f"{name}/transformers"], medians[f"{name}/ours"]
        rows.append({"encoder": name, "transformers_s": theirs, "ours_s": mine,
                     "ratio": theirs / mine})
    return {"rows": rows, "settings": vars(args) | {"threads": torch.get_num_threads()}}


def print_table(rows: list[dict]) -> None:
    print(f"{'encoder':<12} {'transformers (s)':>17} {'ours (s)':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r['encoder']:<12} {r['transformers_s']:>17.4f} {r['ours_s']:>10.4f} "
              f"{r['ratio']:>7.2f}")




# ----------------------------------------------------------------------------- output and CLI

COLUMNS = {  # command -> (key, header, format) of its table
    "step": [("variant", "variant", "<36"), ("step_s", "step s", ">9.4f"),
             ("samples_per_s", "samples/s", ">9.1f"), ("tflop_per_step", "TFLOP/step", ">10.4f"),
             ("achieved_tflops", "TFLOP/s", ">8.3f"), ("mfu", "MFU", ">7.1%"),
             ("saved_activations_gb", "act GB", ">7.3f"), ("peak_allocated_gb", "peak GB", ">8.2f")],
    "data": [("source", "source", "<44"), ("samples_per_s", "samples/s", ">9.1f"),
             ("per_worker", "per worker", ">10.1f"), ("vs_step", "vs step", ">8.2f"),
             ("startup_s", "startup s", ">9.2f")],
    "real": [("source", "full-size source -> train crop", "<44"), ("per_core", "samples/s/core", ">14.1f"),
             ("vs_jpeg", "vs JPEG", ">8.1f"), ("cores_a100", "cores/A100", ">10.1f"),
             ("cores_h100", "cores/H100", ">10.1f")],
    "flops": [("component", "component", "<16"), ("reuse_tflop", "reuse TFLOP", ">12.4f"),
              ("naive_tflop", "naive TFLOP", ">12.4f"), ("reuse_share", "share", ">7.1%")],
}
COLUMNS["step"].append(("compile_s", "compile s", ">9.1f"))
COLUMNS["reuse"] = COLUMNS["gpu"] = COLUMNS["step"]


def print_rows(rows: list[dict], columns) -> None:
    """A fixed-width table; missing values print as n/a, strings (e.g. 'not yet measured') as is."""
    def cell(value, fmt):
        width = "".join(ch for ch in fmt.split(".")[0] if ch.isdigit())
        align = "<" if fmt.startswith("<") else ">"
        if value is None:
            return f"{'n/a':{align}{width}}"
        if isinstance(value, str):
            return f"{value:{align}{width}}"
        return f"{value:{fmt}}"
    print(" ".join(cell(h, f) for _, h, f in columns))
    for r in rows:
        print(" ".join(cell(r.get(k), f) for k, _, f in columns))


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                             "machine": platform.machine(), "threads": torch.get_num_threads(),
                             "note": "shared machine: timings are noisy, ratios are paired"}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path


def add_common(p: argparse.ArgumentParser) -> None:
    """Flags shared by step, reuse, compile, data and flops."""
    p.add_argument("--preset", choices=sorted(RECIPES), default=None, help="model preset (tiny; gpu: base)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="autocast dtype; auto = bf16 on CUDA (as train.py), fp32 on CPU")
    p.add_argument("--batch", type=int, default=0,
                   help="pairs per step (0: 64 for tiny, 32 for base); lower it if out of memory")
    p.add_argument("--text-len", type=int, default=0, help="tokens per text (0: preset max_text_len)")
    p.add_argument("--pad-fraction", type=float, default=0.0,
                   help="share of the batch's text positions that are pads (every other text cut "
                        "short; about 0.4 in the synthetic benchmark)")
    p.add_argument("--image-size", type=int, default=0, help="image side (0: the preset's)")
    p.add_argument("--layers", type=int, default=0,
                   help="set every stack (ViT, text, fusion) to this depth for quick sanity runs "
                        "(0: the preset's)")
    p.add_argument("--vocab-size", type=int, default=0,
                   help="0: the preset's; train.py takes it from the tokenizer (synthetic: 1148)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2,
                   help="torch intra-op threads (the shared CPU machine has 2 cores)")
    p.add_argument("--peak-flops", default="auto",
                   help="device peak FLOP/s for MFU: a number, a100 | h100 | h200 (bf16 dense), "
                        "gemm (measure this device's matmul rate), auto (from the GPU name; "
                        "none on CPU)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {"step": "pre-training step, eager / compiled / CUDA graphs at several batch sizes: "
                     "samples/s, memory, analytic FLOPs, MFU, compile time",
             "reuse": "the step's speed mechanisms (step.fast_passes) vs the plain passes: losses and speed",
             "data": "training loader samples/s per worker count vs what a step consumes",
             "flops": "analytic FLOPs per component (no timing)",
             "gpu": "one command for a lent GPU (at most 5 minutes): step rows and loader rows, one table"}
    for name, text in helps.items():
        add_common(sub.add_parser(name, help=text))
    for name in ("step", "gpu"):
        p = sub.choices[name]
        p.add_argument("--batches", type=int, nargs="+", default=None,
                       help="batch sizes to measure (default: --batch; gpu: 32 64 96)")
        p.add_argument("--check-losses", action=argparse.BooleanOptionalAction, default=name == "step",
                       help="compare a compiled variant's losses with eager's (compiles an eval graph too)")
    sub.choices["step"].add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["eager"],
                                     help="eager, compile (torch.compile), cudagraphs (reduce-overhead, CUDA)")
    sub.choices["gpu"].add_argument("--compiled-batch", type=int, default=64,
                                    help="the batch of the compiled and CUDA-graph rows (0: none)")
    for name in ("data", "gpu"):
        p = sub.choices[name]
        p.add_argument("--data", default="data/synth/pretrain", help="pretrain task folder")
        p.add_argument("--tokenizer", default="data/synth/tokenizer.json", help="tokenizer file")
        p.add_argument("--render", type=int, default=0 if name == "data" else 512,
                       help="render this many synthetic cases as PNG files at the model's image size "
                            "into a temporary folder and read those instead of --data")
        p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2] if name == "data" else [4, 8, 16],
                       help="worker counts to measure")
        p.add_argument("--data-batches", type=int, default=20, help="timed batches per worker count")
        p.add_argument("--step-samples-per-s", type=float, default=0.0,
                       help="what the step consumes, if measured elsewhere (0: time the eager step)")
    sub.choices["data"].add_argument("--real-size", type=int, default=0,
                                     help="also time this many full-size (2,544 x 3,056) JPEGs, DICOMs and their "
                                          "prepared copies per core, and the cores per GPU each needs (0: skip)")
    sub.choices["data"].add_argument("--prepared-size", type=int, default=512, help="shorter side of those copies")
    enc = sub.add_parser("encoders", help="our ViT/text encoders vs transformers, fwd+bwd time")
    enc.add_argument("--layers", type=int, default=2,
                     help="encoder depth at base widths (the paper uses 12; 2 keeps CPU runs short)")
    enc.add_argument("--image-size", type=int, default=224, help="ViT input side (patch 16)")
    enc.add_argument("--vision-batch", type=int, default=4, help="images per step")
    enc.add_argument("--text-batch", type=int, default=16, help="texts per step")
    enc.add_argument("--text-len", type=int, default=48, help="tokens per text (paper: 48)")
    enc.add_argument("--repeats", type=int, default=6, help="timed rounds (median reported)")
    enc.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    enc.add_argument("--threads", type=int, default=None,
                     help="torch threads (default: torch's choice, usually the core count)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "encoders":
        result = bench_encoders(args)
        print_table(result["rows"])
        print(f"saved {save('encoders', result)}")
        return
    args.preset = args.preset or ("base" if args.command == "gpu" else "tiny")
    if args.command == "gpu" and args.device == "cpu" and torch.cuda.is_available():
        args.device = "cuda"
    args.batch = args.batch or (64 if args.preset == "tiny" else 32)
    args.batches = getattr(args, "batches", None) or ([32, 64, 96] if args.command == "gpu" else [args.batch])
    run = {"step": bench_step, "reuse": bench_reuse, "data": bench_data, "flops": bench_flops,
           "gpu": bench_gpu}[args.command]
    result = run(args)
    if args.command == "step" and args.device == "cpu":  # what the GPU row would be judged against
        result["rows"].append(gpu_target_row())
    result["settings"] = vars(args)
    print_rows(result["rows"], COLUMNS[args.command])
    if "data_rows" in result:
        print_rows(result["data_rows"], COLUMNS["data"])
    if result.get("real_rows"):  # cores per GPU: the base step at 288 px, 40% MFU of bf16 peak
        print_rows(result["real_rows"], COLUMNS["real"])
        quality = result["copy_vs_full_decode"].items()
        print("prepared copy vs full decode + resize: " + ", ".join(f"{k} {v:.2f}" for k, v in quality))
    for key in ("max_loss_diff", "speed_ratio_plain_over_fast", "flop_ratio_plain_over_fast",
                "peak_source", "error"):
        if result.get(key):
            print(f"{key}: {result[key]}")
    name = "gpu" if args.command == "gpu" else f"{args.command}_{args.preset}_{args.device.replace(':', '')}"
    print(f"saved {save(name, result)}")


if __name__ == "__main__":
    main()
