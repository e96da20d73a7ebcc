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
# # Lab 7: Learning from scratch: the collapse and its fix (docs/NOTES.md, sections 1 and 4)
#
# The paper starts from pre-trained CLIP and RoBERTa. Our tiny model starts from random weights, and
# its first contrastive runs sat at the chance loss ln B for hundreds of steps. The reason, measured
# in docs/NOTES.md: at initialisation every image's pooled ITC feature is nearly the same vector,
# so every pair looks alike and the loss gradient is tiny (the *collapse*). The fix this project
# adopted is to batch-normalise the ITC embeddings over the (global) batch before the unit norm
# (`Config.itc_batch_norm`, `model.ITCHead`): it removes the common part and keeps what differs.

# %% tags=["setup"]
# Find the project: Jupyter starts the kernel in this notebook's folder (labs/NN-slug/ of a clone).
import sys
from pathlib import Path

labs = next((p / "labs" for p in (Path.cwd(), *Path.cwd().parents) if (p / "labs" / "common.py").is_file()), None)
assert labs, f"{Path.cwd()} is not inside the project: open this notebook from a clone's labs/ folder"
sys.path.insert(0, str(labs))
import lab_notebook  # noqa: E402

lab = lab_notebook.Lab(7)

# %% [markdown]
# ## Exercise (15 min)
#
# Fill in `variance_ratio` and `batch_normalise` in `student.py`, then
#
#     LABS_IMPL=student python -m pytest -q labs/07-learning-from-scratch

# %% [markdown]
# *In this notebook:* the next cell holds the functions to write (those of `student.py`); the cell after it runs the lab's own tests (`test_lab07.py`) on the functions this notebook defines, and fails until they are right.

# %% tags=["exercise", "reference"]
import torch

from model import GlobalBatchNorm


def variance_ratio(embeddings: torch.Tensor) -> float:
    return (embeddings.var(dim=0, unbiased=False).sum() / embeddings.square().mean(dim=0).sum()).item()


def batch_normalise(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return GlobalBatchNorm(x.shape[1], eps=eps).train()(x)


# %% tags=["grade"]
lab.grade(globals())  # test_lab07.py on the functions above

# %% [markdown]
# ## Predict before you run

# %% [markdown]
# 1. The variance ratio of a batch (across-batch variance over mean square): what is it for
#    embeddings that are all the same vector? for zero-mean random ones?

# %% [markdown] tags=["answer"]
# **Answer.** All the same vector: 0 (no variance across the batch). Zero-mean random: 1 (with a zero mean,
# the variance is the mean square).

# %% [markdown]
# 2. At initialisation, will the raw ITC projection of 64 different images be closer to 0 or to 1?
#    Will batch normalisation change that number of the raw projection?

# %% [markdown] tags=["answer"]
# **Answer.** Close to 0: 0.0006 (seeds 0-2 at most 0.0012). The norm does not change it: the ratio is
# read from the raw projection, before the norm, and both runs start from the same weights
# (0.0006 without the norm).

# %% [markdown]
# 3. Without the norm, where will the ITC loss be after 150 steps, relative to ln 64 = 4.16?

# %% [markdown] tags=["answer"]
# **Answer.** At chance: 4.159 against ln 64 = 4.159, with the images still one vector (mean cosine
# 0.9998). With the norm it reaches 3.08.

# %% [markdown]
# ## Measure
#
#     python labs/check.py 7
#
# runs `measure.py` (a few minutes): two ITC-only pre-trainings of 150 steps from the same seed,
# the recipe as it is and the same model without the batch norm. Every 10 steps, on a fixed probe
# batch of 64 training images: the variance ratio of the raw ITC projection and the mean cosine
# between different images' unit embeddings. Picture:
# `runs/labs/07-learning-from-scratch/seed0/collapse.png`.
#
# Measured 2026-12-05 with torch 2.13.0+cpu, 1 thread(s), seeds 0, 1, 2; about 3.5 min per seed. `python labs/check.py 7` passes when every number lies in its band (mean +- max(3 std, floor)).
#
# | number | mean | std | band |
# |---|---|---|---|
# | `itc_final_norm` | 3.083 | 0.1341 | [2.681, 3.485] |
# | `ratio_init_norm` | 6.165e-04 | 4.829e-04 | [-0.01938, 0.02062] |
# | `ratio_final_norm` | 0.1891 | 0.05744 | [0.01677, 0.3614] |
# | `cosine_final_norm` | 0.1195 | 0.02916 | [-0.1305, 0.3695] |
# | `itc_final_plain` | 4.159 | 4.615e-05 | [4.009, 4.309] |
# | `ratio_init_plain` | 6.165e-04 | 4.829e-04 | [-0.01938, 0.02062] |
# | `ratio_final_plain` | 1.825e-04 | 2.815e-04 | [-0.04982, 0.05018] |
# | `cosine_final_plain` | 0.9998 | 2.809e-04 | [0.8998, 1.1] |

# %% tags=["measure"]
values = lab.measure(seed=0)  # measure.py (about 3.5 min on 2 cores): its table prints below

# %% tags=["measure"]
lab.compare(values)  # each number beside its band, from expected.json

# %% tags=["measure"]
lab.picture()

# %% [markdown]
# ## What to look for
#
# - The ratio starts at about 0.0006 for both (at most 0.0012 over the seeds): the 64 images are nearly
#   one vector (the collapse).
# - With the norm, ITC starts above ln 64 (it amplifies that tiny variation, noise included), crosses
#   chance after a few dozen steps and reaches about 3.1 at step 150; the images' unit embeddings
#   spread (mean cosine from nearly one to about 0.12, a number that moves with the seed and
#   the thread count).
# - Without it, the loss sits at ln 64 = 4.159 to three decimals for all 150 steps (4.159 over the
#   last ten) and the images stay one vector (cosine 0.9998): the gradient that would separate them is too
#   small to move anything.
# - Read docs/NOTES.md section 1 for the variants that did not help (dropout, temperatures, rates).
