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
# # Lab 3: Global negatives under DDP (paper Eq. 9-10, the official code's ITC defect)
#
# ITC (Eq. 9-10) contrasts every image with every text of the batch. Under data parallelism each
# process holds only its share of the batch, so the embeddings are gathered from all processes and
# each process scores its own rows against all of them. The gather must carry gradients back: the
# loss of process A depends on process B's rows, and B must receive that part of the gradient.
# `torch.distributed.all_gather` does not; the official code's ITC never ran at all.
#
# Code: `losses.gather_with_grad` (forward: all_gather; backward: all_reduce, then this rank's
# slice), `losses.itc_loss`, and `tests/test_losses.py`, which checks the same equality with the
# project's loss.

# %% tags=["setup"]
# Find the project: Jupyter starts the kernel in this notebook's folder (labs/NN-slug/ of a clone).
import sys
from pathlib import Path

labs = next((p / "labs" for p in (Path.cwd(), *Path.cwd().parents) if (p / "labs" / "common.py").is_file()), None)
assert labs, f"{Path.cwd()} is not inside the project: open this notebook from a clone's labs/ folder"
sys.path.insert(0, str(labs))
import lab_notebook  # noqa: E402

lab = lab_notebook.Lab(3)

# %% [markdown]
# ## Exercise (25 min)
#
# Fill in `all_gather_rows` and `contrastive_loss` in `student.py`, then
#
#     LABS_IMPL=student python -m pytest -q labs/03-global-negatives
#
# The tests start two gloo processes on the CPU (nothing to install) and compare the loss and the
# gradients with one process on the concatenated batch.

# %% [markdown]
# *In this notebook:* the next cell holds the functions to write (those of `student.py`); the cell after it runs the lab's own tests (`test_lab03.py`) on the functions this notebook defines, and fails until they are right.

# %% tags=["exercise", "reference"]
import torch

from losses import gather_with_grad, itc_loss


def all_gather_rows(local: torch.Tensor) -> torch.Tensor:
    return gather_with_grad(local)[0]


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
    return itc_loss(image, text, scale)


# %% tags=["grade"]
lab.grade(globals())  # test_lab03.py on the functions above

# %% [markdown]
# ## Predict before you run

# %% [markdown]
# 1. Two processes, 16 pairs each. With a gather that drops gradients, which part of the true
#    gradient does each process miss? Will the averaged gradient point in roughly the right
#    direction?

# %% [markdown] tags=["answer"]
# **Answer.** The gradient that the *other* process's loss sends to this process's rows: there, these rows
# are negatives, gathered as constants, so that part never comes back. Each process keeps the
# gradient of its own loss only. The direction stays close (cosine 0.990, relative error
# 15%, norm ratio 0.96): training still works, a little worse, and nobody notices.

# %% [markdown]
# 2. The second classic mistake: every rank scores all 32 rows, and the gather's backward keeps
#    only the local slice. DDP then averages over 2 ranks. By what factor is the gradient off, and
#    does its direction change?

# %% [markdown] tags=["answer"]
# **Answer.** By 1/W = 1/2: every rank computes the whole loss, the backward keeps only its own slice of the
# gradient, and DDP's average then divides by W once too often (norm ratio 0.50). The
# direction is exact (cosine 1.00): Adam divides the scale out; with SGD the learning rate
# is halved.

# %% [markdown]
# ## Measure
#
#     python labs/check.py 3
#
# runs `measure.py` (seconds): a small float64 dual encoder, two gloo processes, three gathers. For
# each: the relative error of the averaged gradient against the single process, the ratio of
# their norms and their cosine; and `runs/labs/03-global-negatives/seed0/gradients.png`.
#
# Measured 2026-11-29 with torch 2.13.0+cpu, 2 thread(s), seeds 0, 1, 2; about 2 s per seed. `python labs/check.py 3` passes when every number lies in its band (mean +- max(3 std, floor)).
#
# | number | mean | std | band |
# |---|---|---|---|
# | `correct_rel_error` | 2.377e-16 | 1.372e-17 | [-0.01, 0.01] |
# | `correct_norm_ratio` | 1 | 6.410e-17 | [0.99, 1.01] |
# | `correct_cosine` | 1 | 1.282e-16 | [0.99, 1.01] |
# | `no_grad_rel_error` | 0.1465 | 0.02139 | [0.08238, 0.2107] |
# | `no_grad_norm_ratio` | 0.9612 | 0.008921 | [0.9344, 0.9879] |
# | `no_grad_cosine` | 0.9895 | 0.003496 | [0.979, 1] |
# | `scaled_rel_error` | 0.5 | 6.410e-17 | [0.49, 0.51] |
# | `scaled_norm_ratio` | 0.5 | 0 | [0.49, 0.51] |
# | `scaled_cosine` | 1 | 1.282e-16 | [0.99, 1.01] |
# | `loss_difference` | 0 | 0 | [-1.000e-09, 1.000e-09] |

# %% tags=["measure"]
values = lab.measure(seed=0)  # measure.py (about 2 s on 2 cores): its table prints below

# %% tags=["measure"]
lab.compare(values)  # each number beside its band, from expected.json

# %% tags=["measure"]
lab.picture()

# %% [markdown]
# ## What to look for
#
# - The correct gather equals one process to rounding (relative error about 2e-16 in float64).
# - Dropping gradients loses the other rank's losses' share: an error of about 15% here, and the
#   direction is still close (cosine about 0.99), which is why the bug goes unnoticed in training
#   curves.
# - The scaled variant's direction is exact (cosine 1.00) and its size is half (1/W; norm ratio
#   0.50): with Adam, which divides out the scale, it hides; with SGD it halves the learning
#   rate.
