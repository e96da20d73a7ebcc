"""One pre-training step of PTUnifier: four fusion passes and the weighted sum of their objectives
(paper section 3.3, Eq. 1, 5-10).

One optimisation step runs four fusion passes over a batch of B image-text pairs (`PretrainStep`):
  1. MLM (Eq. 5-6): masked text + its image          -> predict the masked tokens from the text stream
  2. ITM (Eq. 7-8): text + its image or another one  -> matched or not, from the joint feature
  3. image-only  : image + textual prompts (Eq. 3-4) -> ITC image embedding
  4. text-only   : text + visual prompts  (Eq. 3-4)  -> ITC text embedding; ITC (Eq. 9-10) contrasts 3 and 4
and returns the weighted sum of the three losses (Eq. 1). A pass whose objective has weight 0
does not run (the ablations of the paper's Table 3).

`plain_passes` is the paper's path: each pass encodes its own text and fuses every position (the
batch's images are encoded once in both paths: the ViT has no dropout, and its batch statistics
stay those of the true images). The step's speed lives here and nowhere else; `fast_passes`, the
default, equals the plain path in train and eval mode (tests/test_step.py), and `python bench.py
reuse` measures its gain: without text dropout (the tiny preset, or eval mode) the true texts are
encoded once for passes 2 and 4, and the MLM pass fuses only the rows its head reads
(`Fusion.forward`'s text_rows: the text stream of the last layer at the masked positions).

In one process the step never reads a value back from the device (under DDP each global gather of
`losses.gather_with_grad` first exchanges the ranks' row counts, one read each), and its shapes
depend only on (B, L, P): the batch's text length and its number of MLM positions per text, both
chosen on the host by the data loader (data.PretrainCollate pads L and P to a few bucket
lengths). So `torch.compile` takes the whole step as one graph and CUDA graphs can replay it
(tests/test_step.py counts the syncs, tests/test_compile.py compiles the step).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from data import Batch
from losses import LossParts, LossWeights, itc_loss, itm_loss, mlm_loss, total_loss
from model import Encoded, FusionOutput, PTUnifier, gather_rows


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
        p = (fast_passes if self.reuse else plain_passes)(self.model, batch, run)
        m, parts = self.model, LossParts()
        if "mlm" in run:
            targets = batch.mlm_labels.gather(1, batch.mlm_positions)            # [B, P], -100: none
            parts.mlm = mlm_loss(m.mlm_head(p.mlm).flatten(0, 1), targets.flatten())  # Eq. 5-6
        if "itm" in run:
            parts.itm = itm_loss(m.itm_head(p.itm.joint), batch.itm_labels)     # Eq. 7-8
        textual = visual = None
        if "itc" in run:
            parts.itc = itc_loss(m.itc_image(p.image_only.joint), m.itc_text(p.text_only.joint),
                                 m.logit_scale())                                 # Eq. 9-10
            textual, visual = p.image_only.text_prompt_indices, p.text_only.image_prompt_indices
        return StepOutput(parts, total_loss(parts, self.weights), textual, visual)  # Eq. 1


@dataclass
class Passes:
    """The fusion passes of one step; None for an objective that does not run."""
    mlm: torch.Tensor | None = None           # [B, P, H] fused text of the masked texts at the MLM positions
    itm: FusionOutput | None = None           # text i with image itm_image_index[i]
    image_only: FusionOutput | None = None    # image + textual prompts (ITC)
    text_only: FusionOutput | None = None     # text + visual prompts (ITC)


def plain_passes(m: PTUnifier, batch: Batch, run: set[str]) -> Passes:
    """The passes as the paper draws them: each encodes its own text and fuses every position. The
    batch's images are encoded once (an ITM pair's image is a row of them), so that batch
    statistics (the tiny stem's BatchNorm) are those of the true images, as in `fast_passes`."""
    image = m.encode_image(batch.pixel_values)                           # [B, 1 + N, Dv]
    ids, mask = batch.input_ids, batch.attention_mask
    p = Passes()
    if "mlm" in run:
        fused = m.fuse_encoded(image, m.encode_text(batch.mlm_input_ids, mask))
        p.mlm = gather_rows(fused.text, batch.mlm_positions)            # [B, P, H]
    if "itm" in run:
        p.itm = m.fuse_encoded(image.rows(batch.itm_image_index), m.encode_text(ids, mask))
    if "itc" in run:
        p.image_only, p.text_only = m.fuse_encoded(image, None), m.fuse_encoded(None, m.encode_text(ids, mask))
    return p


def fast_passes(m: PTUnifier, batch: Batch, run: set[str]) -> Passes:
    """The same passes as `plain_passes`, with the true texts encoded once for ITM and the
    text-only pass (without text dropout) and the MLM pass fused only at the rows its head reads
    (Fusion's text_rows)."""
    def true_text() -> Encoded:
        return m.encode_text(batch.input_ids, batch.attention_mask)     # [B, L, Dt], query [B, Dt]

    image = m.encode_image(batch.pixel_values)                         # [B, 1 + N, Dv], query [B, Dv]
    share_text = {"itm", "itc"} <= run and (m.config.text_dropout == 0 or not m.training)
    text = true_text() if share_text else None
    p = Passes()
    if "mlm" in run:  # 1. the masked text with its image
        masked = m.encode_text(batch.mlm_input_ids, batch.attention_mask)
        p.mlm = m.fuse_encoded(image, masked, text_rows=batch.mlm_positions).text  # [B, P, H]
    if "itm" in run:  # 2. text i with image itm_image_index[i] (itself or another image)
        p.itm = m.fuse_encoded(image.rows(batch.itm_image_index), text if share_text else true_text())
    if "itc" in run:  # 3-4. image-only pass (textual prompts), text-only pass (visual prompts)
        p.image_only = m.fuse_encoded(image, None)
        p.text_only = m.fuse_encoded(None, text if share_text else true_text())
    return p
