"""Lab 2 measurements: the three objectives at initialisation against chance, then one batch
overfitted, and the image-text similarity matrix before and after.

The tiny preset's model (seeded) and the first 16 training pairs of the synthetic benchmark; the
pre-training step of train.py (step.PretrainStep): 40 ITC-only steps, then 60 steps of all three
objectives at their official weights, AdamW at the recipe's rate. Similarities are the cosines of
the image-only and text-only passes' ITC embeddings (eval mode), as zero-shot retrieval uses them.
"""
import math
from pathlib import Path

import torch

import common
import synth
from data import PretrainDataset, make_train_stream
from losses import LossWeights
from recipes import RECIPES, build_model
from runtime import seed_everything
from step import PretrainStep
from tokenizer import Tokenizer

PICTURE = "similarity.png"
PAIRS, ITC_ONLY, FULL = 16, 40, 60
DATA = common.ROOT / "data" / "synth"
FLOORS = {"mlm_init": 0.05, "itm_init": 0.01, "itc_init": 0.05, "mlm_final": 0.3, "itm_final": 0.1,
          "itc_final": 0.15, "top1_before": 0.15, "top1_after": 0.1}


def similarity(model, batch) -> torch.Tensor:
    """Cosines [B, B] between the image-only and the text-only passes' ITC embeddings."""
    model.eval()
    with torch.no_grad():
        image = model.itc_image(model(pixel_values=batch.pixel_values).joint)
        text = model.itc_text(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).joint)
    model.train()
    return image @ text.T


def top1(sim: torch.Tensor) -> float:
    """Share of images whose own text is the most similar of the batch."""
    return (sim.argmax(dim=1) == torch.arange(len(sim))).float().mean().item()


def run(seed: int, out: Path) -> dict[str, float]:
    synth.ensure(DATA)
    tokenizer = Tokenizer.load(DATA / "tokenizer.json")
    seed_everything(seed)
    model = build_model("tiny", tokenizer).train()
    cfg = model.config
    dataset = PretrainDataset(DATA / "pretrain", "train", tokenizer, cfg.image_size, cfg.max_text_len,
                              train=True, seed=seed, text_unit="text")
    batch = next(iter(make_train_stream(dataset, PAIRS, seed, num_workers=0)))
    step = PretrainStep(model, LossWeights())
    lr = RECIPES["tiny"].pretrain["lr_other"]
    optimizer = torch.optim.AdamW(model.param_groups(lr, lr, 0.01, RECIPES["tiny"].pretrain.get("lr_temperature")))
    before = similarity(model, batch)
    with torch.no_grad():
        init = step(batch).losses
    for i in range(ITC_ONLY + FULL):
        out_step = step(batch, itc_only=i < ITC_ONLY)
        optimizer.zero_grad()
        out_step.total.backward()
        optimizer.step()
    with torch.no_grad():
        final = step(batch).losses
    after = similarity(model, batch)
    chance = {"mlm": math.log(cfg.vocab_size), "itm": math.log(2), "itc": math.log(PAIRS)}
    values = {f"{k}_{when}": getattr(losses, k).item() for when, losses in (("init", init), ("final", final))
              for k in ("mlm", "itm", "itc")}
    values.update(top1_before=top1(before), top1_after=top1(after))
    common.print_table([dict(objective=k, chance=chance[k], init=values[f"{k}_init"], final=values[f"{k}_final"])
                        for k in ("mlm", "itm", "itc")], ["objective", "chance", "init", "final"])
    print(f"own text ranked first among {PAIRS}: {values['top1_before']:.0%} before, {values['top1_after']:.0%} after")
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, (title, sim) in zip(axes, (("at initialisation", before), (f"after {ITC_ONLY + FULL} steps", after))):
        image = ax.imshow(sim.numpy(), cmap="viridis")
        ax.set_title(f"{title}: top-1 {top1(sim):.0%}")
        ax.set_xlabel("text")
        ax.set_ylabel("image")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.suptitle(f"image-text cosine similarity, {PAIRS} training pairs (seed {seed})")
    common.save_figure(fig, out / PICTURE)
    return values
