"""The recipes: every default of a run, per model preset, in one table.

A recipe is the model Config of a preset, the defaults of its pre-training run (train.py's
TrainConfig fields) and of its fine-tuning runs per task (finetune.py's FinetuneConfig fields).
A run's config leaves a field at None ("not set") to take the recipe's value; `python train.py
--help` and `python finetune.py --task ic --help` print the values resolved for the flags given.

- `base`: the paper's model and recipe (sections 5.2-5.3): CLIP ViT-B/16 at 288 px + RoBERTa-base
  + 6 co-attention layers, pre-trained encoders loaded from Hugging Face folders, 100k steps of
  256 pairs, encoders at 1e-5 and the rest at 5e-5, one random sentence per access, all three
  objectives from the first step, ITC temperature fixed at 0.1.
- `tiny`: the synthetic benchmark on 2 CPU cores, trained from scratch. Every departure from the
  paper is measured in docs/NOTES.md ("Learning from scratch") and listed in the README
  ("Choices where the paper is silent": docs/CHOICES.md).
"""
import dataclasses
from dataclasses import dataclass

from hf import config_from_hf, hf_text_fields, hf_vision_fields, load_hf_encoders
from model import Config, PTUnifier


@dataclass(frozen=True)
class Recipe:
    """What a preset sets: the model, the pre-training run, the fine-tuning run of each task."""

    model: Config
    pretrain: dict  # TrainConfig field -> value
    finetune: dict  # task -> {FinetuneConfig field -> value}


PAPER_FINETUNE_LR = dict(lr_backbone=5e-6, lr_task=2.5e-4)  # paper 5.2: backbone / task layers
# The tiny backbone is barely pre-trained: it needs a far higher backbone rate than 5e-6 to move in
# a few epochs. Epochs per task: the generation decoder 15 (it needs them to write the findings it
# reads), the text tasks 10, image classification and VQA 12 (after 6 the best validation epoch
# was still the last); retrieval continues ITC at the pre-training rates (docs/NOTES.md 4.13).
TINY_FINETUNE_LR = dict(lr_backbone=2e-4, lr_task=5e-4)
TINY_PRETRAIN_LR = dict(lr_encoder=5e-4, lr_other=7e-4)  # the encoders / the rest

RECIPES = {
    "base": Recipe(
        model=Config(),  # the dataclass defaults are the paper's model
        pretrain=dict(steps=100_000, batch_size=256, lr_encoder=1e-5, lr_other=5e-5,
                      lr_temperature=5e-5, warmup=0.1, decay_from=0.0, text_unit="sentence",
                      itc_warmup=0.0, itc_escape=0.0, cache_images=False),
        finetune={"ic": dict(epochs=10, batch_size=64, **PAPER_FINETUNE_LR),
                  "tc": dict(epochs=10, batch_size=32, **PAPER_FINETUNE_LR),
                  "vqa": dict(epochs=50, batch_size=32, **PAPER_FINETUNE_LR),
                  "ts": dict(epochs=10, batch_size=32, **PAPER_FINETUNE_LR),
                  "itg": dict(epochs=10, batch_size=32, **PAPER_FINETUNE_LR),
                  "retrieval": dict(epochs=10, batch_size=128, **PAPER_FINETUNE_LR)},
    ),
    "tiny": Recipe(
        # vocab_size/pad/bos/eos are placeholders that build_model takes from the tokenizer.
        # Every choice below was measured against its alternatives in docs/NOTES.md (sections 1, 4).
        model=Config(
            image_size=64, vision_width=128, vision_layers=2, vision_heads=4, vocab_size=4096,
            text_width=128, text_layers=2, text_heads=4, max_positions=128, max_text_len=64,
            hidden_size=128, fusion_layers=1, fusion_heads=4, pool_size=64, k_visual=16, k_textual=16,
            embed_dim=128,
            # Each image selects 16 of the 64 textual prompts, not 8: better zero-shot retrieval over
            # three seeds (docs/NOTES.md 4.11, 4.13).
            # Early convolutions (four stride-2 conv layers) to the 4x4 grid of 16 px patches: a
            # ViT that learns from scratch; MLP ratio 2 instead of 4: as good, a quarter cheaper.
            vision_stem="conv", patch_size=16, vision_mlp=256, text_mlp=256, fusion_mlp=256,
            # The poolers read the mean of each fused stream instead of token 0: ITC and ITM learn
            # from scratch, where token 0 barely varies across inputs.
            pooling="mean",
            # From scratch, dropout drowns the small across-batch variation of the pooled features
            # that ITC has to grow. 64 tokens hold a whole synthetic findings section at the median.
            text_dropout=0.0, fusion_dropout=0.0,
            # Every input's ITC embedding starts as nearly the same vector (the collapse); batch-
            # normalising the embeddings removes that common part. The temperature is the paper's.
            itc_batch_norm=True, temperature=0.1, learnable_temperature=False,
        ),
        # ITC alone for the first 45% of the steps ("align before fuse"), then all three objectives
        # at the official weights; the rates hold at their peak until 70% of the steps, so that ITM
        # still learns after it joins; the fusion, pools and heads at 7e-4, the encoders at 5e-4.
        pretrain=dict(steps=560, batch_size=64, **TINY_PRETRAIN_LR, warmup=0.05,
                      decay_from=0.7, text_unit="text", itc_warmup=0.45, itc_escape=0.0,
                      cache_images=True),
        finetune={"ic": dict(epochs=12, batch_size=64, **TINY_FINETUNE_LR),
                  "tc": dict(epochs=10, batch_size=64, **TINY_FINETUNE_LR),
                  "vqa": dict(epochs=12, batch_size=64, **TINY_FINETUNE_LR),
                  "ts": dict(epochs=10, batch_size=64, no_repeat_ngram=3, **TINY_FINETUNE_LR),
                  "itg": dict(epochs=15, batch_size=64, **TINY_FINETUNE_LR),
                  "retrieval": dict(epochs=12, batch_size=64, lr_backbone=TINY_PRETRAIN_LR["lr_encoder"],
                                    lr_task=TINY_PRETRAIN_LR["lr_other"])},
    ),
}


def recipe(preset: str) -> Recipe:
    """The recipe of a preset, with an error that lists the presets."""
    if preset not in RECIPES:
        raise SystemExit(f"preset {preset!r}: expected one of {sorted(RECIPES)}")
    return RECIPES[preset]


def with_defaults(config, defaults: dict):
    """`config` (a run's dataclass) with every field that is None taken from `defaults`."""
    return dataclasses.replace(config, **{k: v for k, v in defaults.items()
                                          if getattr(config, k) is None})


def build_model(preset: str, tokenizer, vision_init=None, text_init=None, **overrides) -> PTUnifier:
    """The preset's model with the vocabulary and special ids of `tokenizer` and `overrides`
    (e.g. image_size, max_text_len); the encoder fields of the Hugging Face folders given replace
    the preset's, and their weights are loaded."""
    fields = dataclasses.asdict(recipe(preset).model)
    fields.update(vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                  bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **overrides)
    if vision_init is None and text_init is None:
        return PTUnifier(Config(**fields))
    from_folders = set()
    if vision_init:
        from_folders |= set(hf_vision_fields(vision_init))
    if text_init:
        from_folders |= set(hf_text_fields(text_init, with_special_ids=True))
    tokenizer_fields = {"vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", *overrides}
    rest = {k: v for k, v in fields.items() if k not in from_folders or k in tokenizer_fields}
    model = PTUnifier(config_from_hf(vision=vision_init, text=text_init, **rest))
    load_hf_encoders(model, vision=vision_init, text=text_init)
    return model
