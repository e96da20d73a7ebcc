"""Lab 6 measurements: image classification with 1%, 10% and 100% of the training labels, from
the pre-trained checkpoint (the default run of seed SEED) and from scratch (the same architecture,
randomly initialised): the columns of the paper's Table 3.

`finetune.py --task ic --train-fraction F` trains on a seeded, label-stratified subset (30, 300 and
3,000 of the 3,000 training images); every run is selected on the whole validation split and
tested once on the 1,000 test images (macro AUROC). Fewer labels get more epochs, so that every
run takes enough optimisation steps: EPOCHS below.
"""
from pathlib import Path

import common
import finetune

PICTURE = "data_efficiency.png"
EPOCHS = {0.01: 12, 0.1: 6, 1.0: 3}
FLOORS = {f"{init}_{int(f * 100)}pct": 0.03 for init in ("pretrained", "scratch") for f in EPOCHS}


def run(seed: int, out: Path) -> dict[str, float]:
    checkpoint = common.pretrained(seed)
    values = {}
    for init in ("pretrained", "scratch"):
        for fraction, epochs in EPOCHS.items():
            name = f"{init}_{int(fraction * 100)}pct"
            result = finetune.finetune(finetune.FinetuneConfig(
                task="ic", data=str(common.ROOT / "data" / "synth" / "ic"), out=str(out / name),
                init=str(checkpoint) if init == "pretrained" else None, preset="tiny",
                train_fraction=fraction, epochs=epochs, seed=seed, workers=1))
            values[name] = result["test"]["macro_auroc"]
    common.print_table([dict(labels=f"{int(f * 100)}%", epochs=e, pretrained=values[f"pretrained_{int(f * 100)}pct"],
                             scratch=values[f"scratch_{int(f * 100)}pct"]) for f, e in EPOCHS.items()],
                       ["labels", "epochs", "pretrained", "scratch"])
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for init in ("pretrained", "scratch"):
        ax.plot([100 * f for f in EPOCHS], [values[f"{init}_{int(f * 100)}pct"] for f in EPOCHS], marker="o",
                label={"pretrained": "pre-trained (default run)", "scratch": "from scratch"}[init])
    ax.set_xscale("log")
    ax.set_xticks([1, 10, 100], ["1%", "10%", "100%"])
    ax.set_xlabel("training labels")
    ax.set_ylabel("test macro AUROC")
    ax.axhline(0.5, color="black", ls="--", lw=0.8)
    ax.legend()
    ax.set_title(f"image classification, data efficiency (seed {seed})")
    common.save_figure(fig, out / PICTURE)
    return values
