"""Lab 5 measurements: what should stand in for the modality a downstream task does not have?

Fine-tuned from the default run's checkpoint (seed SEED; lab 4 makes it, or it is made here):
image classification (an image, no text) and text classification (a sentence pair, no image),
each twice: with the prompts selected from the pre-trained pools (the paper, Eq. 3-4) and with a
blank input instead (the empty text [<s>, </s>]; a constant image), `finetune.py --missing blank`.
Test macro AUROC and accuracy; EPOCHS epochs each (the tiny recipe's other settings).
"""
from pathlib import Path

import common
import finetune

PICTURE = "missing_modality.png"
EPOCHS = 3
TASKS = {"ic": "macro_auroc", "tc": "accuracy"}
FLOORS = {f"{task}_{fill}": floor for task, floor in (("ic", 0.02), ("tc", 0.03)) for fill in ("prompts", "blank")}


def run(seed: int, out: Path) -> dict[str, float]:
    checkpoint = common.pretrained(seed)
    values, rows = {}, []
    for task, metric in TASKS.items():
        for fill in ("prompts", "blank"):
            result = finetune.finetune(finetune.FinetuneConfig(
                task=task, data=str(common.ROOT / "data" / "synth" / task), init=str(checkpoint),
                out=str(out / f"{task}-{fill}"), missing=fill, epochs=EPOCHS, seed=seed, workers=1))
            values[f"{task}_{fill}"] = result["test"][metric]
        rows.append(dict(task=task, metric=metric, prompts=values[f"{task}_prompts"], blank=values[f"{task}_blank"],
                         gain=values[f"{task}_prompts"] - values[f"{task}_blank"]))
    common.print_table(rows, ["task", "metric", "prompts", "blank", "gain"])
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for i, fill in enumerate(("prompts", "blank")):
        ax.bar([x + 0.38 * i for x in range(len(TASKS))], [values[f"{t}_{fill}"] for t in TASKS], width=0.36,
               label={"prompts": "prompts from the pools", "blank": "blank input"}[fill])
    ax.set_xticks([x + 0.19 for x in range(len(TASKS))],
                  ["image classification\n(test macro AUROC)", "text classification\n(test accuracy)"])
    ax.set_ylim(0, 1)
    ax.legend()
    ax.set_title(f"filling the missing modality at fine-tuning (seed {seed})")
    common.save_figure(fig, out / PICTURE)
    return values
