"""Lab 4 measurements: the default run (`python train.py --seed SEED`), its loss curves, zero-shot
retrieval on the 1,000 synthetic test pairs, and the prompt pools' usage.

The run is made afresh into runs/labs/pretrain-seedSEED (about 5 minutes on 2 cores); labs 5 and 6
fine-tune the checkpoint it leaves there.
"""
import json
import math
from pathlib import Path

import common

PICTURE = "pretraining.png"
FLOORS = {"i2t_r1": 0.03, "t2i_r1": 0.03, "i2t_r10": 0.05, "t2i_r10": 0.05, "mlm_final": 0.3,
          "itm_final": 0.1, "itc_final": 0.2, "itc_only_steps": 40.0, "textual_used": 8.0,
          "visual_used": 8.0}


def run(seed: int, out: Path) -> dict[str, float]:
    checkpoint = common.pretrained(seed, rerun=True)
    folder = checkpoint.parent
    result = json.loads((folder / "result.json").read_text())
    rows = common.run_log(folder)
    final = common.final_losses(rows)
    config = json.loads((folder / "config.json").read_text())
    vocab, batch = config["model"]["vocab_size"], config["train"]["batch_size"]
    values = {k: result[k] for k in ("i2t_r1", "t2i_r1", "i2t_r10", "t2i_r10")}
    values.update(mlm_final=final["mlm"], itm_final=final["itm"], itc_final=final["itc"],
                  itc_only_steps=float(result["itc_only_steps"]),
                  textual_used=float(result["textual_prompts_used"]), visual_used=float(result["visual_prompts_used"]))
    chance = {"mlm": math.log(vocab), "itm": math.log(2), "itc": math.log(batch)}
    common.print_table([dict(loss=k, chance=chance[k], final=final[k]) for k in ("mlm", "itm", "itc")],
                       ["loss", "chance", "final"])
    common.print_table([dict(direction=d, r1=result[f"{d}_r1"], r5=result[f"{d}_r5"], r10=result[f"{d}_r10"])
                        for d in ("i2t", "t2i")], ["direction", "r1", "r5", "r10"])
    print(f"ITC alone for the first {result['itc_only_steps']} steps; the test split selects "
          f"{result['textual_prompts_used']} textual and {result['visual_prompts_used']} visual prompts")
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, k in zip(axes, ("mlm", "itm", "itc")):
        points = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*points), lw=1)
        ax.axhline(chance[k], color="black", ls="--", lw=0.8, label=f"chance {chance[k]:.2f}")
        ax.axvline(result["itc_only_steps"], color="grey", ls=":", lw=0.8, label="MLM and ITM join")
        ax.set_title(f"{k.upper()} loss")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.suptitle(f"the default run, seed {seed}: zero-shot R@1 {result['i2t_r1']:.1%} / {result['t2i_r1']:.1%}")
    common.save_figure(fig, out / PICTURE)
    return values
