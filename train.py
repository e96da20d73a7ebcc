"""Pre-training PTUnifier: MLM + ITM + ITC over prompt-completed inputs (paper section 3.3, Eq. 1, 5-10).

    python train.py                                   # tiny preset, synthetic benchmark, CPU
    torchrun --nproc_per_node=8 train.py --preset base --data data/pretrain \
        --vision-init weights/clip-vit-base-patch16 --text-init weights/roberta-base

One optimisation step (step.PretrainStep) runs four fusion passes over a batch of B image-text
pairs, MLM, ITM and the image-only and text-only passes of ITC, and minimises the weighted sum of
the three losses (Eq. 1). In one process the step reads nothing back from the device (step.py says
what DDP adds): the loop reads its losses once per step, at its end, for the finiteness guard
(`runtime.guarded_step`), and writes them to metrics.jsonl every --log-every steps. `--compile` (default on CUDA) compiles the step whole.

From scratch (the tiny preset), the run starts with passes 3-4 only (ITC alone, "align before
fuse"): with MLM from the first step, the pooled features that ITC and ITM read stay identical
across the batch and both losses sit at chance for the whole run (docs/NOTES.md, "Learning from
scratch"). When ITC leaves chance varies from run to run, so the start ends once a moving average
of the ITC loss is `itc_escape` nats below ln B, and after `itc_warmup` of the steps at the latest.

Everything about a run lives in its folder (--out): config.json (resolved configuration),
metrics.jsonl (one line per logged step), checkpoint.safetensors (model, optimizer, scaler, step and
data position, written atomically every --save-every steps or --save-every-minutes, at the end and
on SIGTERM / SIGINT; `--resume` continues exactly from it: the random state of a step is a function
of (seed, rank, step) and the data stream of (seed, epoch, position), so the step and the data
position restore them; `--resume auto` does when it exists and starts fresh otherwise, so that the
same command serves a first launch and every relaunch, docs/CLUSTER.md) and result.json (zero-shot
retrieval and prompt usage at the end).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import synth
from checkpoint import load_checkpoint, load_pretrained, read_metadata, save_checkpoint
from data import DeviceCopy, PretrainDataset, SkipTracker, check_image_size, make_train_stream
from losses import LossWeights
from model import PTUnifier
from recipes import build_model, recipe, with_defaults
from runtime import (Runtime, SaveClock, StopSignal, adamw, barrier, check_resume_mode, cleanup, dataclass_cli,
                     guarded_step, lr_factor, print0, resume_point, save_on_rank0, seed_everything, seed_step,
                     set_lr, setup_runtime, wrap_ddp, write_run_config)
from step import PretrainStep, StepOutput
from tokenizer import Tokenizer, locate_tokenizer
from zeroshot import zero_shot_retrieval

DEFAULT_DATA = "data/synth/pretrain"  # created on first use by the default run


@dataclass
class TrainConfig:
    """Everything that defines a pre-training run besides the architecture (saved in each checkpoint).
    None: not set, the preset's recipe decides (recipes.py); `resolved()` fills those fields."""
    data: str = DEFAULT_DATA           # task folder with manifest.jsonl + meta.json (task "pretrain")
    out: str = "runs/pretrain"         # run folder: config.json, metrics.jsonl, checkpoint.safetensors
    preset: str = "tiny"               # model preset and recipe in recipes.RECIPES
    tokenizer: str | None = None       # tokenizer.json / folder; default: beside the data, or --text-init
    vision_init: str | None = None     # HF CLIP (vision) folder to initialise the ViT from
    text_init: str | None = None       # HF RoBERTa/BERT folder to initialise the text encoder from
    init: str | None = None            # continue pre-training from a checkpoint's model (its Config
                                       # and weights; ours, or the authors' through convert.py)
    steps: int | None = None           # optimisation steps
    batch_size: int | None = None      # global batch per optimisation step
    micro_batch: int | None = None     # per-process batch per forward (None: batch / processes)
    lr_encoder: float | None = None    # ViT and text encoder
    lr_other: float | None = None      # fusion, projections, prompt pools, heads
    lr_temperature: float | None = None  # a learnable ITC temperature
    weight_decay: float = 0.01         # AdamW decay of the weight matrices (paper 5.3)
    warmup: float | None = None        # fraction of steps with linear warm-up
    decay_from: float | None = None    # fraction of steps at which the linear decay to 0 begins (the
                                       # rate holds at its peak from the warm-up until then; paper: 0)
    clip_grad: float = 1.0             # max global gradient norm (0: off)
    mlm_weight: float = 1.0            # MLM loss weight (Eq. 1); official config: MLM 1, ITM 0.5, ITC 0.1;
                                       # a weight of 0 turns the objective's pass off
    itm_weight: float = 0.5            # ITM loss weight (Eq. 1)
    itc_weight: float = 0.1            # ITC loss weight (Eq. 1)
    itc_warmup: float | None = None    # most steps, as a fraction, trained on ITC alone at the start
    itc_escape: float | None = None    # the ITC-only start ends once the ITC moving average is this
                                       # many nats below ln B (0: it runs all its steps)
    mlm_prob: float = 0.15             # share of real text tokens that MLM masks (80/10/10)
    text_unit: str | None = None       # "sentence" (official: one random sentence) | "text" (whole)
    image_size: int | None = None      # image side in pixels (None: the preset's)
    max_text_len: int | None = None    # longest tokenised text (None: the preset's)
    prompt_mode: str | None = None     # "pool" (Eq. 3-4), "pool_frozen" (the official code: pools
                                       # never learn), "static" (k fixed prompts) or "none" (a missing
                                       # modality keeps only [CLS] / <s>); None: preset's
    pool_size: int | None = None       # entries per prompt pool (None: the preset's)
    k_visual: int | None = None        # visual prompts per missing image (None: the preset's)
    k_textual: int | None = None       # textual prompts per missing text (None: the preset's)
    workers: int | None = None         # DataLoader workers per rank (None: 1 on CPU, 8 on CUDA)
    cache_images: bool | None = None   # keep the decoded training images in memory (small datasets)
    seed: int = 0                      # initial weights, data order, augmentation, masking
    log_every: int = 10                # steps between lines of metrics.jsonl
    save_every: int = 200              # steps between checkpoints (also saved at the end and on SIGTERM)
    save_every_minutes: float = 30.0   # wall-clock minutes between checkpoints (0: off): the most work a
                                       # preempted run loses, whatever its step time
    max_bad_steps: int = 20            # consecutive non-finite losses before the run stops
    max_bad_images: float = 0.01       # fraction of unreadable images in the split before the run stops
    eval_batch: int = 128              # batch of the zero-shot evaluation at the end
    device: str = "auto"               # auto | cpu | cuda
    compile: bool | None = None        # torch.compile the step whole (None: on CUDA, not on the CPU)
    compile_mode: str = "default"      # torch.compile mode: "default", "reduce-overhead" (CUDA graphs),
                                       # "max-autotune"
    resume: str | None = None          # continue from out/checkpoint.safetensors: a bare --resume (it
                                       # must exist) or --resume auto (when it exists, else start fresh)

    def resolved(self) -> "TrainConfig":
        """The preset's recipe in every field that is not set."""
        check_resume_mode(self.resume)
        cfg = with_defaults(self, recipe(self.preset).pretrain)
        if cfg.itc_warmup > 0 and cfg.itc_weight <= 0:
            raise SystemExit("--itc-weight 0 leaves nothing to train in the ITC-only start: add --itc-warmup 0")
        if min(cfg.mlm_weight, cfg.itm_weight, cfg.itc_weight) < 0 or not any(
                (cfg.mlm_weight, cfg.itm_weight, cfg.itc_weight)):
            raise SystemExit("loss weights must be >= 0 and at least one positive (0 turns an objective off)")
        return cfg

    def model_overrides(self) -> dict:
        """The model Config fields that this run sets (None: the preset's)."""
        names = ("image_size", "max_text_len", "prompt_mode", "pool_size", "k_visual", "k_textual")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    def itc_only_steps(self) -> int:
        """The longest ITC-only start, in steps (resolved configs only)."""
        return round(self.itc_warmup * self.steps)


# ----------------------------------------------------------------------------- one step

def end_itc_start(state: dict, itc: float, chance: float, margin: float, decay: float = 0.9) -> bool:
    """Adaptive end of the ITC-only start, after each of its steps: the moving average
    a <- decay a + (1 - decay) ITC starts at chance (ln B); once a <= ln B - margin, the start ends
    with the step just taken. The average lives in `state`, so a resumed run decides the same."""
    state["itc_average"] = decay * state["itc_average"] + (1 - decay) * itc
    if state["itc_average"] <= chance - margin:
        state["itc_only_until"] = state["step"]
        return True
    return False


# ----------------------------------------------------------------------------- a run

def make_optimizer(model: PTUnifier, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW (paper 5.3) over the model's groups: encoders at lr_encoder, a learnable temperature at
    lr_temperature, the rest at lr_other, no decay on biases, norms, embeddings and prompt pools
    (decay would pull the pool entries that a batch does not select towards zero)."""
    return adamw(model.param_groups(cfg.lr_encoder, cfg.lr_other, cfg.weight_decay, cfg.lr_temperature),
                 device)


@dataclass
class Run:
    """A pre-training run in progress: what the loop reads and updates."""
    cfg: TrainConfig
    rt: Runtime
    tokenizer: Tokenizer
    model: PTUnifier
    runner: nn.Module | None   # the PretrainStep, wrapped by DDP / torch.compile when asked (None once torn down)
    optimizer: torch.optim.AdamW
    scaler: torch.amp.GradScaler
    batches: object            # endless iterator of micro-batches (micro_batches)
    accum: int                 # micro-batches per step
    chance: float              # ITC at chance: ln of the columns of one step's global micro-batch
    state: dict                # step, data position, bad steps, ITC-only start; saved in checkpoints
    usage: PromptUsage
    bad_images: SkipTracker
    clock: SaveClock           # --save-every-minutes


def init_model(cfg: TrainConfig, tokenizer: Tokenizer) -> PTUnifier:
    """The model of --init: the checkpoint's own Config and weights; its vocabulary must be the
    tokenizer's, and no flag may change its architecture."""
    given = [f"--{k.replace('_', '-')}" for k in ("vision_init", "text_init") if getattr(cfg, k)]
    given += [f"--{k.replace('_', '-')}" for k in cfg.model_overrides()]
    if given:
        raise SystemExit(f"--init {cfg.init} gives the model (its Config and weights); drop {', '.join(given)}")
    model, _, _ = load_pretrained(cfg.init)
    c = model.config
    if (c.vocab_size, c.pad_token_id) != (tokenizer.vocab_size, tokenizer.pad_id):
        raise SystemExit(f"--init {cfg.init}: its vocab_size={c.vocab_size} (pad id {c.pad_token_id}) does "
                         f"not match the tokenizer's {tokenizer.vocab_size} (pad id {tokenizer.pad_id}); "
                         "pass the tokenizer it was trained with (--tokenizer)")
    return model


def start_run(cfg: TrainConfig, rt: Runtime) -> Run:
    """Build the model, the data stream and the optimiser; restore them with --resume."""
    out = Path(cfg.out)
    resume = resume_point(out / "checkpoint.safetensors", cfg.resume, rt)
    if resume:  # the first line says where the run continues from
        print0(rt, f"resuming from {resume} at step {read_metadata(resume)['state']['step']}")
    seed_everything(cfg.seed)  # the same initial weights on every rank
    tokenizer = Tokenizer.load(locate_tokenizer(cfg.data, cfg.tokenizer, cfg.text_init))
    model = (init_model(cfg, tokenizer) if cfg.init else build_model(
        cfg.preset, tokenizer, cfg.vision_init, cfg.text_init, **cfg.model_overrides())).to(rt.device)
    mcfg = model.config
    micro = cfg.micro_batch or cfg.batch_size // rt.world
    accum = cfg.batch_size // (micro * rt.world)
    if accum < 1 or accum * micro * rt.world != cfg.batch_size:
        raise SystemExit(f"--batch-size {cfg.batch_size} must be a multiple of micro batch {micro} "
                         f"x {rt.world} processes")
    check_image_size(cfg.data, mcfg.image_size)
    dataset = PretrainDataset(cfg.data, "train", tokenizer, mcfg.image_size, mcfg.max_text_len,
                              train=True, mlm_prob=cfg.mlm_prob, seed=cfg.seed, text_unit=cfg.text_unit)
    if cfg.cache_images:
        dataset.keep_decoded_images()
    optimizer = make_optimizer(model, cfg, rt.device)
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.amp_dtype == torch.float16)
    runner = PretrainStep(model, LossWeights(cfg.mlm_weight, cfg.itm_weight, cfg.itc_weight))
    # an ITC-only start leaves the MLM and ITM heads without gradients
    runner = wrap_ddp(runner, rt, gradient_as_bucket_view=True, bucket_cap_mb=100,
                      find_unused_parameters=cfg.itc_warmup > 0)
    if cfg.compile:  # one graph (fullgraph) without DDP; DDP's gradient hooks split it into buckets
        runner = torch.compile(runner, fullgraph=rt.world == 1, mode=cfg.compile_mode)
    chance = math.log(micro * rt.world)
    state = dict(step=0, epoch=0, batch_in_epoch=0, bad_steps=0, skipped_steps=0,
                 itc_only_until=cfg.itc_only_steps(), itc_average=chance)
    if resume:
        state.update(load_checkpoint(resume, model, optimizer, scaler, expect_train=cfg))
    write_run_config(out, rt, train=dataclasses.asdict(cfg), model=dataclasses.asdict(mcfg), world_size=rt.world,
                     micro_batch=micro, grad_accum=accum)
    if rt.master:
        drop_rows_after(out / "metrics.jsonl", state["step"])  # the steps this run takes (again)
    print0(rt, f"model {cfg.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; "
               f"{len(dataset)} training pairs; global batch {cfg.batch_size} = {rt.world} x {micro} "
               f"x {accum} accumulation; {cfg.steps} steps on {rt.device}")
    return Run(cfg, rt, tokenizer, model, runner, optimizer, scaler,
               micro_batches(dataset, micro, cfg, state, rt.device), accum, chance, state,
               PromptUsage(mcfg.pool_size, rt.device),
               SkipTracker(len(dataset) // rt.world, cfg.max_bad_images, "train"),  # this rank's shard
               SaveClock(cfg.save_every_minutes))


def train_step(run: Run, stop: StopSignal) -> tuple[dict[str, torch.Tensor], int, bool, bool]:
    """One guarded optimisation step (runtime.guarded_step); returns (mean losses, samples seen here,
    stopping, a save by wall time is due), the last two decided alike on every rank."""
    cfg, rt, state = run.cfg, run.rt, run.state
    set_lr(run.optimizer, lr_factor(state["step"], cfg.steps, cfg.warmup, cfg.decay_from))
    seed_step(cfg.seed, rt.rank, state["step"])
    itc_only = state["step"] < state["itc_only_until"]
    seen = []
    losses, bad, (stopping, timed), means = guarded_step(
        run, readable_batches(run, seen), run.accum, lambda runner, batch: pretrain_losses(run, runner, batch, itc_only),
        [stop.received is not None, run.clock.due()])
    state["bad_steps"] = state["bad_steps"] + 1 if bad else 0
    state["skipped_steps"] += bad
    if state["bad_steps"] >= cfg.max_bad_steps:
        save(run)
        raise SystemExit(f"{state['bad_steps']} consecutive steps had a non-finite loss (last at step "
                         f"{state['step']}); the parameters from before the first one are saved in "
                         f"{Path(cfg.out) / 'checkpoint.safetensors'}. Lower the learning rate or check the data.")
    state["step"] += 1
    if itc_only and not bad and cfg.itc_escape > 0:
        check_itc_start(run, means.get("itc", 0.0))
    return losses, sum(seen), stopping, timed


def compiled_graphs(cfg: TrainConfig) -> int:
    """Graphs that torch.compile has made in this process so far (TorchDynamo's counter); 0
    without --compile."""
    if not cfg.compile:
        return 0
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def readable_batches(run: Run, seen: list[int]):
    """The next micro-batches of the stream, each with at least one readable image (a micro-batch
    whose every image was unreadable is passed over); appends each one's size to `seen`."""
    while True:
        batch = next(run.batches)
        run.bad_images.update(batch)
        if len(batch):
            seen.append(len(batch.ids))
            yield batch


def pretrain_losses(run: Run, runner: nn.Module, batch, itc_only: bool) -> dict[str, torch.Tensor]:
    """One micro-batch through the pre-training step: the losses that ran ("loss": Eq. 1's sum)."""
    if run.cfg.compile and run.cfg.compile_mode == "reduce-overhead":
        torch.compiler.cudagraph_mark_step_begin()  # the last replay's outputs are consumed: reuse them
    out = runner(batch, itc_only)
    run.usage.add(out)
    named = dict(loss=out.total, mlm=out.losses.mlm, itm=out.losses.itm, itc=out.losses.itc)
    return {k: v for k, v in named.items() if v is not None}


def check_itc_start(run: Run, itc: float) -> None:
    """After an ITC-only step: end the start once ITC has left chance, or warn when it ends by the
    step limit with ITC still at chance."""
    state, margin, chance = run.state, run.cfg.itc_escape, run.chance
    if end_itc_start(state, itc, chance, margin):
        print0(run.rt, f"\nstep {state['step']}: ITC left chance (moving average {state['itc_average']:.3f} "
                       f"<= ln B - {margin} = {chance - margin:.3f}); MLM and ITM join")
    elif state["step"] == state["itc_only_until"]:
        print0(run.rt, f"\nwarning: the ITC-only start ended at step {state['step']} with ITC still near "
                       f"chance (moving average {state['itc_average']:.3f}, ln B = {chance:.3f}); retrieval "
                       "will stay near chance (try another --seed)")


def micro_batches(dataset, micro: int, cfg: TrainConfig, state: dict, device: torch.device):
    """Endless stream of micro-batches on `device` from the saved data position. It keeps
    state["epoch"] and state["batch_in_epoch"] current, counting the batches it has handed out
    (all a checkpoint needs to replay the stream exactly, data.SeededBatches), and sends each batch
    to the device while the one before it is in use (data.DeviceCopy)."""
    loader = make_train_stream(dataset, micro, cfg.seed, state["epoch"], state["batch_in_epoch"],
                               cfg.workers)
    per_epoch = loader.batch_sampler.batches_per_epoch
    copy, pending = DeviceCopy(device), None
    for batch in loader:
        sent = copy.start(batch)  # travels while the step of the pending batch runs
        if pending is not None:
            state["batch_in_epoch"] += 1
            if state["batch_in_epoch"] == per_epoch:
                state["epoch"], state["batch_in_epoch"] = state["epoch"] + 1, 0
            yield copy.ready(pending)
        pending = sent


class PromptUsage:
    """How often each pool entry is selected, counted on the device (no host sync per step)."""

    def __init__(self, pool_size: int, device: torch.device):
        self.textual = torch.zeros(pool_size, dtype=torch.long, device=device)
        self.visual = torch.zeros(pool_size, dtype=torch.long, device=device)

    def add(self, out: StepOutput) -> None:
        if out.textual_prompts is not None:  # the ITC passes ran
            for counts, chosen in ((self.textual, out.textual_prompts), (self.visual, out.visual_prompts)):
                chosen = chosen.flatten()  # [B * k]; a fixed-size count (bincount sizes itself on the host)
                counts.index_add_(0, chosen, torch.ones_like(chosen))

    def summary(self) -> dict:
        return dict(train_textual_prompts_used=int((self.textual > 0).sum()),
                    train_visual_prompts_used=int((self.visual > 0).sum()))


def save(run: Run) -> None:
    save_on_rank0(lambda: save_checkpoint(Path(run.cfg.out) / "checkpoint.safetensors", run.model, run.optimizer,
                                          run.scaler, run.state, run.model.config, run.cfg), run.rt, run.clock)


def drop_rows_after(log: Path, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step`, where the run starts (a resumed run logs the
    later steps again; a line cut short by a crash goes too): one line per logged step."""
    if not log.is_file():
        return
    lines = log.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    if kept != lines:
        log.with_name(log.name + ".tmp").write_text("".join(kept))
        log.with_name(log.name + ".tmp").replace(log)


def skipped_report(tracker: SkipTracker) -> str:
    """End-of-run line naming the unreadable training images that were skipped."""
    if not tracker.paths:
        return "all training images were readable"
    return f"{len(tracker.paths)} unreadable training images skipped: " + ", ".join(sorted(tracker.paths)[:20])


def final_evaluation(run: Run) -> dict:
    """Zero-shot retrieval on the retrieval task beside the data (test split) by ITC similarity."""
    folder = Path(run.cfg.data).parent / "retrieval"
    if not (folder / "manifest.jsonl").exists():
        return {}
    res = zero_shot_retrieval(run.model, folder, "test", run.tokenizer, run.rt.device, run.cfg.eval_batch)
    print(f"zero-shot retrieval on {res['n']} test pairs (chance R@1 = {1 / res['n']:.2%}):")
    for direction in ("i2t", "t2i"):
        print("  {}: R@1 {:.2%}  R@5 {:.2%}  R@10 {:.2%}".format(
            direction, *(res[f"{direction}_r{k}"] for k in (1, 5, 10))))
    pool = run.model.config.pool_size
    print(f"prompt-pool usage: {res['textual_prompts_used']} of {pool} textual prompts and "
          f"{res['visual_prompts_used']} of {pool} visual prompts selected", flush=True)
    return res


def finish_run(run: Run) -> dict:
    """Report skipped images and prompt usage; rank 0 evaluates and writes result.json."""
    rt, state = run.rt, run.state
    if rt.master or run.bad_images.paths:  # each rank reads (and reports) its own shard
        print(f"[rank {rt.rank}] " * (rt.world > 1) + skipped_report(run.bad_images), flush=True)
    result = dict(step=state["step"], skipped_steps=state["skipped_steps"],
                  itc_only_steps=min(state["itc_only_until"], run.cfg.steps), **run.usage.summary())
    print0(rt, "prompts selected at least once during training (this process, this session): "
               f"{result['train_textual_prompts_used']} textual and {result['train_visual_prompts_used']} "
               f"visual of {run.model.config.pool_size} each")
    if rt.master:
        result.update(final_evaluation(run))
        (Path(run.cfg.out) / "result.json").write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig) -> dict:
    """Pre-train; returns result.json's dict, or {"stopped": True, "step": n} after a signal."""
    cfg = cfg.resolved()
    rt = setup_runtime(cfg.device)
    if cfg.data == DEFAULT_DATA and rt.master:  # the default run creates the benchmark on first use
        synth.ensure(Path(DEFAULT_DATA).parent)
    barrier(rt)
    on_cuda = rt.device.type == "cuda"
    cfg = dataclasses.replace(cfg, workers=(8 if on_cuda else 1) if cfg.workers is None else cfg.workers,
                              compile=on_cuda if cfg.compile is None else cfg.compile)
    run = start_run(cfg, rt)
    stop = StopSignal()
    log = open(Path(cfg.out) / "metrics.jsonl", "a") if rt.master else None
    bar = tqdm(total=cfg.steps, initial=run.state["step"], disable=not rt.master, dynamic_ncols=True)
    run.model.train()
    try:
        t_last, samples_since = time.perf_counter(), 0
        while run.state["step"] < cfg.steps:
            graphs, started = compiled_graphs(cfg), time.perf_counter()
            losses, n_samples, stopping, timed = train_step(run, stop)
            if compiled_graphs(cfg) > graphs:  # the first step, the first full step, a new text shape
                print0(rt, f"\nstep {run.state['step']}: compiled the step in {time.perf_counter() - started:.1f} s "
                           f"(graph {compiled_graphs(cfg)})")
            samples_since += n_samples * rt.world
            bar.update(1)
            step = run.state["step"]
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                row = dict(step=step, **{k: v.item() for k, v in losses.items()},
                           lr=cfg.lr_other * lr_factor(step - 1, cfg.steps, cfg.warmup, cfg.decay_from),
                           samples_per_s=samples_since / (now - t_last),
                           skipped_steps=run.state["skipped_steps"])
                t_last, samples_since = now, 0
                bar.set_postfix(**{k: f"{row[k]:.3f}" for k in ("loss", "mlm", "itm", "itc") if k in row},
                                sps=f"{row['samples_per_s']:.0f}")
                if log:
                    log.write(json.dumps(row) + "\n")
                    log.flush()
            if stopping:
                save(run)
                bar.close()
                print0(rt, f"stopped by {stop.received or 'a signal on another rank'} at step {step}; "
                           f"checkpoint saved; continue with --resume (or --resume auto)")
                run.runner = None  # the DDP wrapper goes before its process group (runtime.cleanup)
                cleanup(rt)
                return dict(stopped=True, step=step)
            if timed or step % cfg.save_every == 0 or step == cfg.steps:
                save(run)
        bar.close()
        result = finish_run(run)
        run.runner = None
        cleanup(rt)
        return result
    finally:
        stop.restore()
        if log:
            log.close()


def parse_args(argv=None) -> TrainConfig:
    return dataclass_cli(TrainConfig, argv, __doc__.split("\n")[0], bare={"resume": "strict"}, helps={
        "preset": "model preset and recipe (recipes.py): tiny (synthetic, CPU) or base (the paper)",
        "steps": "optimisation steps",
        "batch_size": "global batch per optimisation step (split over processes, accumulation fills the rest)",
        "micro_batch": "per-process batch per forward; lower it (32, 16, 8) if you run out of memory "
                       "(None: the whole per-process batch)",
        "workers": "DataLoader workers per process; 0 loads in the main process (None: 1 on CPU, 8 on CUDA)",
        "init": "continue pre-training from the model of a checkpoint (ours, or convert.py's of the authors' "
                "weights): its Config and weights; the recipe is --preset's",
        "resume": "continue exactly from OUT/checkpoint.safetensors, which must exist; '--resume auto': "
                  "continue when it exists, else start fresh (one command for a first launch and every relaunch)",
        "compile": "torch.compile the step whole (default on CUDA; off on the CPU, where compiling the tiny "
                   "step takes minutes and the compiled step is no faster: docs/NOTES.md 7.3)",
        "compile_mode": "torch.compile mode; reduce-overhead replays the step as CUDA graphs",
        "itc_warmup": "most steps, as a fraction, at the start that train ITC alone; lets a from-scratch "
                      "model align before MLM and ITM join",
        "itc_escape": "MLM and ITM join as soon as the ITC moving average is this many nats below ln B "
                      "(chance); 0: the ITC-only start runs all its steps",
        "text_unit": "pre-training text per access: 'sentence' (official) or 'text' (a whole text)",
    })


def main(argv=None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
