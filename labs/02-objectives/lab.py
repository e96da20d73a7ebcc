# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lab 2: The three objectives (paper section 3.3, Eq. 1 and 5-10)
#
# PTUnifier pre-trains one model with three losses, summed with weights (Eq. 1; official weights
# MLM 1, ITM 0.5, ITC 0.1):
# - **MLM** (Eq. 5-6): 15% of the text tokens are masked; the fused text stream predicts them, with
#   the image in the same pass.
# - **ITM** (Eq. 7-8): half of the texts are paired with another image of the batch; a 2-way head on
#   the joint feature says "matched" or not.
# - **ITC** (Eq. 9-10): an image-only pass (the text filled by textual prompts) and a text-only pass
#   (the image filled by visual prompts) give one embedding each; the symmetric InfoNCE loss pulls a
#   pair together against every other pair of the batch.
#
# Code: `losses.mlm_loss`, `losses.itm_loss`, `losses.itc_loss`, `losses.total_loss`,
# `step.PretrainStep` (the four fusion passes of a step).

# %% tags=["setup"]
# Find the project: Jupyter starts the kernel in this notebook's folder (labs/NN-slug/ of a clone).
import sys
from pathlib import Path

labs = next((p / "labs" for p in (Path.cwd(), *Path.cwd().parents) if (p / "labs" / "common.py").is_file()), None)
assert labs, f"{Path.cwd()} is not inside the project: open this notebook from a clone's labs/ folder"
sys.path.insert(0, str(labs))
import lab_notebook  # noqa: E402

lab = lab_notebook.Lab(2)

# %% [markdown]
# ## Exercise (20 min)
#
# Fill in `mlm_loss`, `itm_loss`, `itc_loss` and `chance` in `student.py`, then
#
#     LABS_IMPL=student python -m pytest -q labs/02-objectives

# %% [markdown]
# *In this notebook:* the next cell holds the functions to write (those of `student.py`); the cell after it runs the lab's own tests (`test_lab02.py`) on the functions this notebook defines, and fails until they are right.

# %% tags=["exercise", "reference"]
import math

from losses import itc_loss, itm_loss, mlm_loss  # noqa: F401  (the answers)


def chance(vocab_size: int, batch: int) -> dict[str, float]:
    return {"mlm": math.log(vocab_size), "itm": math.log(2), "itc": math.log(batch)}


# %% tags=["grade"]
lab.grade(globals())  # test_lab02.py on the functions above

# %% [markdown]
# ## Predict before you run

# %% [markdown]
# 1. What is each loss for a model that knows nothing? (MLM: a vocabulary of V tokens; ITM: two
#    classes, balanced; ITC: a batch of B pairs.) Write the three formulas.

# %% [markdown] tags=["answer"]
# **Answer.** A model that knows nothing spreads its probability evenly: MLM ln V (V tokens), ITM ln 2 (two
# classes), ITC ln B (each of the B rows and B columns chooses among B candidates).

# %% [markdown]
# 2. The tiny model at initialisation on 16 pairs of the synthetic benchmark (V = 1,148): which of
#    the three losses will be closest to its chance value, and which furthest? Why can one start
#    *above* chance?

# %% [markdown] tags=["answer"]
# **Answer.** ITM is closest (0.6950 against ln 2 = 0.6931), MLM nearly as close (7.10 against
# ln V), ITC furthest: 3.43 against ln 16 = 2.77. A loss starts *above* chance when the
# model's guesses are confident and wrong rather than even: at initialisation every image's
# embedding is nearly the same vector, so every row prefers the same few texts, and most rows'
# true text gets less than 1/16 of the probability.

# %% [markdown]
# 3. Overfitting those 16 pairs (40 ITC-only steps, then 60 steps of all three): which loss falls
#    fastest? How often will an image's own text be the most similar of the 16 afterwards?

# %% [markdown] tags=["answer"]
# **Answer.** ITM and ITC fall to almost nothing (0.0004 and 0.0061: telling 16 pairs apart is easy
# to memorise); MLM falls slowest (0.67): it must recall the exact token at every masked place
# among V. Top-1 goes from 8% (about chance, 1/16 = 6%) to 100%.

# %% [markdown]
# ## Measure
#
#     python labs/check.py 2
#
# runs `measure.py` (about a minute): the losses of one `PretrainStep` at initialisation and after
# the 100 steps on the same batch, against their chance values, and
# `runs/labs/02-objectives/seed0/similarity.png`, the 16 x 16 image-text cosine matrix before and
# after (the diagonal holds the true pairs).
#
# Measured 2026-12-08 with torch 2.13.0+cpu, 2 thread(s), seeds 0, 1, 2; about 1.8 min per seed. `python labs/check.py 2` passes when every number lies in its band (mean +- max(3 std, floor)).
#
# | number | mean | std | band |
# |---|---|---|---|
# | `mlm_init` | 7.099 | 0.04296 | [6.97, 7.228] |
# | `itm_init` | 0.695 | 0.001453 | [0.685, 0.705] |
# | `itc_init` | 3.435 | 0.1765 | [2.905, 3.964] |
# | `mlm_final` | 0.6715 | 0.1677 | [0.1685, 1.174] |
# | `itm_final` | 4.103e-04 | 1.185e-04 | [-0.09959, 0.1004] |
# | `itc_final` | 0.006096 | 4.230e-04 | [-0.1439, 0.1561] |
# | `top1_before` | 0.08333 | 0.03608 | [-0.06667, 0.2333] |
# | `top1_after` | 1 | 0 | [0.9, 1.1] |

# %% tags=["measure"]
values = lab.measure(seed=0)  # measure.py (about 1.8 min on 2 cores): its table prints below

# %% tags=["measure"]
lab.compare(values)  # each number beside its band, from expected.json

# %% tags=["measure"]
lab.picture()

# %% [markdown]
# ## What to look for
#
# - At initialisation ITM sits at ln 2 and MLM at ln V (a random head spreads its probability
#   almost evenly), but ITC starts *above* ln 16 = 2.77 (about 3.4): every image prefers the same
#   few texts (the bright column of the left picture), so most rows bet on a wrong text. This is
#   the collapse of lab 7.
# - One batch is memorised quickly: the diagonal of the similarity matrix lights up (top-1
#   100% after). That says the losses and their gradients are wired right; it says nothing
#   about generalisation (lab 4 does).
