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
# # Lab 1: Prompt pools that learn (paper section 3.2, Eq. 3-4)
#
# PTUnifier feeds a fusion encoder image-only or text-only inputs by filling the missing modality
# with *soft prompts*: vectors chosen, per input, from a learnable pool. The query q is the mean of
# the present modality's embeddings; each pool row w_i gets the score s_i = w_i^T q (Eq. 3); the k
# best rows, best first, become the missing modality's input (Eq. 4).
#
# The top-k choice is not differentiable, so the scores carry no gradient. The *chosen rows*,
# however, are ordinary inputs of the fusion encoder, and a loss on its output can reach them, if
# they are taken from the pool parameter itself. The authors' code selects under `torch.no_grad()`,
# so its pools never change: every prompt stays at its random initial value.
#
# Code: `prompts.pool_scores`, `prompts.select_top_k`, `prompts.PromptPool`,
# `model.PTUnifier.prompt_image` / `prompt_text`.

# %% tags=["setup"]
# Find the project: Jupyter starts the kernel in this notebook's folder (labs/NN-slug/ of a clone).
import sys
from pathlib import Path

labs = next((p / "labs" for p in (Path.cwd(), *Path.cwd().parents) if (p / "labs" / "common.py").is_file()), None)
assert labs, f"{Path.cwd()} is not inside the project: open this notebook from a clone's labs/ folder"
sys.path.insert(0, str(labs))
import lab_notebook  # noqa: E402

lab = lab_notebook.Lab(1)

# %% [markdown]
# ## Exercise (15 min)
#
# Fill in `scores` and `select` in `student.py`, then
#
#     LABS_IMPL=student python -m pytest -q labs/01-prompt-pools
#
# The tests check the scores against a hand computation, the order of the chosen rows, that a loss
# on the prompts puts gradient on exactly the chosen rows and nowhere else, and that no gradient
# reaches the query through the scores. `python -m pytest -q labs/01-prompt-pools` runs the same
# tests on the reference answer (`reference.py`, which uses the project's functions).

# %% [markdown]
# *In this notebook:* the next cell holds the functions to write (those of `student.py`); the cell after it runs the lab's own tests (`test_lab01.py`) on the functions this notebook defines, and fails until they are right.

# %% tags=["exercise", "reference"]
from prompts import pool_scores as scores  # noqa: F401  (the answers)
from prompts import select_top_k as select  # noqa: F401

# %% tags=["grade"]
lab.grade(globals())  # test_lab01.py on the functions above

# %% [markdown]
# ## Predict before you run

# %% [markdown]
# 1. A loss on one image-only pass of 64 images: how many of the 64 textual-pool rows get a
#    gradient with our selection (k = 16 per image)? With the official no-grad selection?

# %% [markdown] tags=["answer"]
# **Answer.** With our selection, every row that at least one of the 64 images puts in its top 16: at
# least 16, at most 64. At initialisation the images' queries are alike, so their top-k
# sets overlap a lot: 35 rows (seeds 0-2: 33 to 36). With the official selection, 0: the
# rows are gathered under `torch.no_grad()`, so they enter the encoder as constants.

# %% [markdown]
# 2. After 120 ITC-only steps, by how much (relative norm) has each pool moved in the two cases?

# %% [markdown] tags=["answer"]
# **Answer.** Ours moves by 22% of its norm (relative change, the mean of the two pools); the official
# pools by exactly 0: no gradient ever reaches them, and AdamW skips a parameter without
# a gradient, weight decay included.

# %% [markdown]
# 3. Does the official selection retrieve worse? (The pools are random, but every other weight
#    learns.)

# %% [markdown] tags=["answer"]
# **Answer.** No, not this early: R@10 4.7% ours and 4.9% official (chance 1.0%), ITC 3.39 and
# 3.40, each within the other's seed spread. The other weights learn to read fixed random
# prompts, and the official selection still depends on the input (the scores are computed,
# only not learned).

# %% [markdown]
# ## Measure
#
#     python labs/check.py 1
#
# runs `measure.py`: the gradient count at initialisation, then two ITC-only pre-trainings of 120
# steps (`train.py`, same seed), ours and the official selection (the lab swaps
# `prompts.select_top_k` for a no-grad copy). It prints one table and writes
# `runs/labs/01-prompt-pools/seed0/selection.png`: for the test images with each finding (and
# those with none), how often each textual-pool entry was selected after our pre-training.
#
# Measured 2026-12-08 with torch 2.13.0+cpu, 2 thread(s), seeds 0, 1, 2; about 5.8 min per seed. `python labs/check.py 1` passes when every number lies in its band (mean +- max(3 std, floor)).
#
# | number | mean | std | band |
# |---|---|---|---|
# | `rows_with_gradient_ours` | 34.67 | 1.528 | [30.08, 39.25] |
# | `rows_with_gradient_official` | 0 | 0 | [0, 0] |
# | `pool_change_ours` | 0.2177 | 0.001744 | [0.1677, 0.2677] |
# | `pool_change_official` | 0 | 0 | [-1.000e-06, 1.000e-06] |
# | `itc_final_ours` | 3.393 | 0.08659 | [3.133, 3.653] |
# | `itc_final_official` | 3.399 | 0.1161 | [3.05, 3.747] |
# | `r10_ours` | 0.04733 | 0.004537 | [0.01733, 0.07733] |
# | `r10_official` | 0.04883 | 0.003329 | [0.01883, 0.07883] |
# | `textual_used_ours` | 38 | 2 | [30, 46] |
# | `textual_used_official` | 38.33 | 4.509 | [24.81, 51.86] |

# %% tags=["measure"]
values = lab.measure(seed=0)  # measure.py (about 5.8 min on 2 cores): its table prints below

# %% tags=["measure"]
lab.compare(values)  # each number beside its band, from expected.json

# %% tags=["measure"]
lab.picture()

# %% [markdown]
# ## What to look for
#
# - With our selection about 35 of the 64 rows get gradient (the union of the 64 images'
#   top 16); with the official one, none: `pool_change_official` is exactly 0, while our pool
#   moves about 22% of its norm in 120 steps.
# - The ITC loss and R@10 after 120 steps are the same within the seed spread (ITC
#   3.39 +- 0.09 ours, 3.40 +- 0.12 official; R@10 4.7% and 4.9%): this
#   early, the rest of the model learns to read fixed random prompts as well as trained ones. Do
#   not claim more than the numbers show.
# - The picture: about a dozen entries serve every finding; images with a device, and images with
#   no finding, shift their share between them. Selection depends on the input, but weakly.
# - Try: `k_textual` larger than the pool's useful entries (`train.py --k-textual 32`); what
#   happens to the number of entries used?
