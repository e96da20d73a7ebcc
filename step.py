"""One pre-training step of PTUnifier: four fusion passes and the weighted sum of their objectives
(paper section 3.3, Eq. 1, 5-10).

One optimisation step runs four fusion passes over a batch of B image-text pairs (`PretrainStep`):
  1. MLM (Eq. 5-6): masked text + its image          -> predict the masked tokens from the text stream
  2. ITM (Eq. 7-8): text + its image or another one  -> matched or not, from the joint feature
  3. image-only  : image + textual prompts (Eq. 3-4) -> ITC image embedding
  4. text-only   : text + visual prompts  (Eq. 3-4)  -> ITC text embedding; ITC (Eq. 9-10) contrasts 3 and 4
and returns the weighted sum of the three losses (Eq. 1). A pass whose objective has weight 0
does not run (the ablations of the paper's Table 3).

`plain_passes` is the paper's path: each pass calls the model on raw inputs (`PTUnifier.forward`)
and fuses every position. The speed of the step lives here and nowhere else; `fast_passes`, the
default, equals the plain path (tests/test_train.py, tests/test_step.py) and `python bench.py
reuse` measures its gain:
- encoder reuse: the ViT has no dropout, so the B true images are encoded once for passes 1-3;
  where the text encoder has no dropout either (the tiny preset, or eval mode), the true texts
  are encoded once for passes 2 and 4;
- the MLM pass fuses only what its head reads (`fused_text_at`): the text stream, in the last
  layer only at the masked positions.

The step never reads a value back from the device and its shapes depend only on (B, L, P): the
batch's text length and its number of MLM positions per text, both chosen on the host by the data
loader (data.PretrainCollate pads L and P to a few bucket lengths). So `torch.compile` takes the
whole step as one graph and CUDA graphs can replay it (tests/test_step.py counts the syncs,
tests/test_compile.py compiles the step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from data import Batch
from losses import LossParts, LossWeights, itc_loss, itm_loss, mlm_loss, total_loss
from model import Encoded, PTUnifier, key_padding_mask


@dataclass
class StepOutput:
    """What one pre-training step returns: the losses that ran (None for an objective whose weight
    is 0, and for MLM and ITM in an ITC-only step), their weighted sum (Eq. 1), and the prompts
    chosen by the ITC passes (for usage statistics and the gradient test; None without ITC)."""
    losses: LossParts
    total: torch.Tensor
    textual_prompts: torch.Tensor | None  # [B, k_t] textual-pool entries chosen for the image-only pass
    visual_prompts: torch.Tensor | None   # [B, k_v] visual-pool entries chosen for the text-only pass


class PretrainStep(nn.Module):
    """The four passes of one pre-training step as one module, so that DDP wraps a single forward
    and torch.compile sees the whole step. reuse=False runs the plain passes (the paper's path)."""

    def __init__(self, model: PTUnifier, weights: LossWeights, reuse: bool = True):
        super().__init__()
        self.model, self.weights, self.reuse = model, weights, reuse

    def objectives(self, itc_only: bool) -> set[str]:
        """The objectives this step runs: those with a positive weight; ITC alone in an ITC-only step."""
        run = {name for name in ("mlm", "itm", "itc") if getattr(self.weights, name) > 0}
        return run & {"itc"} if itc_only else run

    def forward(self, batch: Batch, itc_only: bool = False) -> StepOutput:
        run = self.objectives(itc_only)
        passes = (fast_passes if self.reuse else plain_passes)(self.model, batch, run)
        m, parts = self.model, LossParts()
        if "mlm" in run:  # passes["mlm"]: the fused text stream at the MLM positions [B, P, H]
            targets = batch.mlm_labels.gather(1, batch.mlm_positions)            # [B, P], -100: none
            parts.mlm = mlm_loss(m.mlm_head(passes["mlm"]).flatten(0, 1), targets.flatten())  # Eq. 5-6
        if "itm" in run:
            parts.itm = itm_loss(m.itm_head(passes["itm"].joint), batch.itm_labels)  # Eq. 7-8
        textual = visual = None
        if "itc" in run:
            image_only, text_only = passes["image_only"], passes["text_only"]
            parts.itc = itc_loss(m.itc_image(image_only.joint), m.itc_text(text_only.joint),
                                 m.logit_scale())                                 # Eq. 9-10
            textual, visual = image_only.text_prompt_indices, text_only.image_prompt_indices
        return StepOutput(parts, total_loss(parts, self.weights), textual, visual)  # Eq. 1


def plain_passes(m: PTUnifier, batch: Batch, run: set[str]) -> dict:
    """The fusion passes of the objectives in `run`, as the paper draws them: each encodes its own
    inputs and fuses every position. "mlm": the fused text stream at the MLM positions [B, P, H];
    "itm", "image_only", "text_only": FusionOutputs."""
    pixels, ids, mask = batch.pixel_values, batch.input_ids, batch.attention_mask
    passes = {}
    if "mlm" in run:
        passes["mlm"] = gather_positions(m(pixels, batch.mlm_input_ids, mask).text, batch.mlm_positions)
    if "itm" in run:
        passes["itm"] = m(pixels.index_select(0, batch.itm_image_index), ids, mask)
    if "itc" in run:
        passes["image_only"], passes["text_only"] = m(pixels), m(input_ids=ids, attention_mask=mask)
    return passes


def fast_passes(m: PTUnifier, batch: Batch, run: set[str]) -> dict:
    """The same passes as `plain_passes`, with the encoders' outputs shared (one ViT pass over the
    B true images; without text dropout, one encoding of the true texts) and the MLM pass fused
    only where its head reads (`fused_text_at`)."""
    def true_text() -> Encoded:
        return m.encode_text(batch.input_ids, batch.attention_mask)     # [B, L, Dt], query [B, Dt]

    image = m.encode_image(batch.pixel_values)                         # [B, 1 + N, Dv], query [B, Dv]
    share_text = {"itm", "itc"} <= run and (m.config.text_dropout == 0 or not m.training)
    text = true_text() if share_text else None
    passes = {}
    if "mlm" in run:  # 1. the masked text with its image
        masked = m.encode_text(batch.mlm_input_ids, batch.attention_mask)
        passes["mlm"] = fused_text_at(m, masked, image, batch.mlm_positions)
    if "itm" in run:  # 2. text i with image itm_image_index[i] (itself or another image)
        passes["itm"] = m.fuse_encoded(image.rows(batch.itm_image_index), text if share_text else true_text())
    if "itc" in run:  # 3-4. image-only pass (textual prompts), text-only pass (visual prompts)
        passes["image_only"] = m.fuse_encoded(image, None)
        passes["text_only"] = m.fuse_encoded(None, text if share_text else true_text())
    return passes


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x [B, L, H], positions long [B, P] -> x at those positions [B, P, H] (a fixed-shape gather:
    no boolean mask, no host sync)."""
    return x.gather(1, positions.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def fused_text_at(m: PTUnifier, text: Encoded, image: Encoded, positions: torch.Tensor) -> torch.Tensor:
    """The fused text stream of m.fuse(text, image) at `positions` [B, P] only -> [B, P, H], for
    less work: every fusion layer but the last runs in full; in the last, the text stream's
    self-attention reads every position, then only the P rows per text take the cross-attention
    and FFN (each row attends to its own example's image stream), and the image stream's last
    layer and the poolers, which the MLM head does not read, do not run."""
    fusion = m.fusion
    key_mask = key_padding_mask(text.mask)                           # [B, 1, 1, L]
    t, v = fusion.streams(text.states, image.states)                 # [B, L, H], [B, Li, H]
    *before, (last, _) = zip(fusion.text_layers, fusion.image_layers)
    for text_layer, image_layer in before:
        t, v = fusion.layer_pair(text_layer, image_layer, t, v, key_mask)
    rows = gather_positions(last.attend_self(t, key_mask), positions)  # [B, P, H]
    return last.feed_forward(last.attend_other(rows, v, None))        # [B, P, H]
