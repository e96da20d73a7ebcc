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
# # Lab 4: Pre-training (paper sections 3.3 and 5.3)
#
# The default run, `python train.py`: the tiny model (a ViT with an early-convolution stem, a
# RoBERTa-style text encoder and one co-attention fusion layer, 1.38M parameters) pre-trained from
# scratch on the 3,000 training pairs of the synthetic benchmark, 64 pairs per step. The first 45%
# of the steps train ITC alone ("align before fuse"); then MLM, ITM and ITC run together at the
# official weights 1 / 0.5 / 0.1 (Eq. 1). At the end, zero-shot retrieval on the 1,000 test pairs:
# each test image ranks the 1,000 test reports by the cosine of their ITC embeddings, and the other
# way round.
#
# Code: `train.py` (`train`, `train_step`, `PretrainStep`), `recipes.py` (the tiny recipe, each
# choice measured in docs/NOTES.md section 4), `zeroshot.zero_shot_retrieval`.

# %% tags=["setup"]
# Find the project: Jupyter starts the kernel in this notebook's folder (labs/NN-slug/ of a clone).
import sys
from pathlib import Path

labs = next((p / "labs" for p in (Path.cwd(), *Path.cwd().parents) if (p / "labs" / "common.py").is_file()), None)
assert labs, f"{Path.cwd()} is not inside the project: open this notebook from a clone's labs/ folder"
sys.path.insert(0, str(labs))
import lab_notebook  # noqa: E402

lab = lab_notebook.Lab(4)

# %% [markdown]
# ## Predict before you run

# %% [markdown]
# 1. Chance for each loss: MLM ln V (V = 1,148 tokens), ITM ln 2, ITC ln 64. Which will end
#    furthest below its chance?

# %% [markdown] tags=["answer"]
# **Answer.** It depends on the measure. In loss units MLM falls furthest: 3.82 against ln V = 7.05
# (3.2 below). Relative to chance ITC does: 1.29 against ln 64 = 4.16, 31% of it.
# ITM ends at 0.51 against ln 2 = 0.69, and varies most between seeds (std 0.10).

# %% [markdown]
# 2. Chance R@1 on 1,000 pairs is 0.1%. A model that knew every attribute the renderer draws would
#    reach 57%. Where will a 5-minute CPU run land?

# %% [markdown] tags=["answer"]
# **Answer.** R@1 about 10.4% image-to-text and 10.9% text-to-image, R@10 about 51%: a hundred
# times chance, and far below the ceiling.

# %% [markdown]
# 3. The pools hold 64 entries; each image selects 16 textual prompts, each text 16 visual ones. How
#    many distinct entries will the test split use?

# %% [markdown] tags=["answer"]
# **Answer.** Fewer than the pools hold: 42 of the 64 textual entries and 26 of the visual ones (means
# over three seeds; both vary between seeds by several entries).

# %% [markdown]
# ## Run
#
#     python labs/check.py 4
#
# re-runs the default pre-training (`train.py --seed 0 --out runs/labs/pretrain-seed0`, about 5
# minutes on 2 cores; `--reuse` keeps a finished one) and reads its `metrics.jsonl` and
# `result.json`. Labs 5 and 6 fine-tune the checkpoint it leaves. Picture:
# `runs/labs/04-pretraining/seed0/pretraining.png`, the three loss curves against their chance
# levels, with the step where MLM and ITM join.
#
# Measured 2026-12-05 with torch 2.13.0+cpu, 1 thread(s), seeds 0, 1, 2; about 5.8 min per seed. `python labs/check.py 4` passes when every number lies in its band (mean +- max(3 std, floor)).
#
# | number | mean | std | band |
# |---|---|---|---|
# | `i2t_r1` | 0.1037 | 0.01607 | [0.05545, 0.1519] |
# | `t2i_r1` | 0.1093 | 0.01401 | [0.0673, 0.1514] |
# | `i2t_r10` | 0.51 | 0.03387 | [0.4084, 0.6116] |
# | `t2i_r10` | 0.5183 | 0.02409 | [0.4461, 0.5906] |
# | `mlm_final` | 3.816 | 0.02627 | [3.516, 4.116] |
# | `itm_final` | 0.512 | 0.1048 | [0.1976, 0.8264] |
# | `itc_final` | 1.294 | 0.1441 | [0.862, 1.727] |
# | `itc_only_steps` | 252 | 0 | [212, 292] |
# | `textual_used` | 42 | 3 | [33, 51] |
# | `visual_used` | 25.67 | 7.234 | [3.964, 47.37] |
#
# (`*_final`: the mean over the last 50 steps; `itc_only_steps`: when MLM and ITM joined;
# `*_used`: distinct pool entries the test split selects.)

# %% tags=["measure"]
values = lab.measure(seed=0)  # measure.py (about 5.8 min on 2 cores): its table prints below

# %% tags=["measure"]
lab.compare(values)  # each number beside its band, from expected.json

# %% tags=["measure"]
lab.picture()

# %% [markdown]
# ## What to look for
#
# - ITC falls from ln 64 during the ITC-only start; when MLM and ITM join it flattens for about 100
#   steps (its weight is now the smallest, in a sum that MLM dominates), then falls again as the rates decay.
# - ITM stays at ln 2 for about 150 steps after it joins, then falls: the fusion layer first has to
#   learn to compare the two streams; ITC has already aligned them.
# - Retrieval (R@1 10.4% / 10.9%) is far above chance (0.1%) and far below the
#   ceiling of question 2: a longer run keeps improving (docs/NOTES.md section 4).
# - The test split selects 42 of the 64 textual and 26 of the visual entries (means over the
#   seeds, which differ by up to 6 and 13): a pool settles on a part of its entries.
