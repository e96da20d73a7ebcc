"""bench.step_flops: the analytic FLOP count of a pre-training step (bench.py docstring convention).

1. A hand count for a one-layer configuration small enough to check every term with pencil and
   paper (written out below, independent of bench.py's helper functions).
2. A cross-check against torch.utils.flop_counter.FlopCounterMode on real forwards (one fusion
   pass, and the whole four-pass step). The counter counts matmuls, convolutions and batched
   matmuls only; so does step_flops (elementwise ops, LayerNorm, softmax, embeddings are left out
   by both), so the two agree EXACTLY. On CPU, scaled_dot_product_attention dispatches to a fused
   kernel that the counter does not see; the MATH backend is forced so attention appears as the
   two bmm calls (QK^T and AV) it is.
3. Forward + backward under the counter: 3 x forward (the convention) minus what autograd never
   computes: the input gradient of the patch convolution (pixels need none), the backward of the
   detached prompt scoring (step_flops counts it once already), and the backward of the MLM
   pass's last image-stream fusion layer and both poolers, whose outputs no loss reads.
"""
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
from bench import step_flops, synthetic_batch
from losses import LossWeights
from model import PTUnifier
from recipes import RECIPES
from step import PretrainStep

# Every width 8, MLP 16, one layer per stack; 8 px images of 4 px patches: N = 4 patches.
SMALL = dataclasses.replace(
    RECIPES["tiny"].model, image_size=8, patch_size=4, vision_width=8, vision_layers=1, vision_heads=2,
    vision_mlp=16, vocab_size=32, text_width=8, text_layers=1, text_heads=2, text_mlp=16,
    max_positions=16, max_text_len=6, hidden_size=8, fusion_layers=1, fusion_heads=2,
    fusion_mlp=16, pool_size=4, k_visual=2, k_textual=2, embed_dim=4, vision_stem="patch")
B, L = 2, 6  # 2 pairs, 6 tokens each
P = 6  # MLM positions per text: 2 masked tokens, the bucket of 8 capped at L (data.mlm_positions)
ROWS = B * P  # the rows the MLM head reads


def hand_count_forward(reuse: bool) -> dict:
    """Forward FLOPs of one step of SMALL, B = 2, L = 6, term by term (multiply-add = 2 FLOPs).

    Block (D = 8, M = 16) per token: q/k/v/out 4*8*8 = 256 MACs + MLP 2*8*16 = 256 MACs -> 1024
    FLOPs. Attention per sample: QK^T and AV, 2 * (2 * Lq * Lk * 8) FLOPs.
    """
    block = lambda tokens: B * tokens * 2 * (4 * 8 * 8 + 2 * 8 * 16)      # noqa: E731
    attention = lambda lq, lk: B * 2 * 2 * lq * lk * 8                      # noqa: E731
    # ViT on the true images: patch conv (4 patches x 3*4*4 inputs x 8 outputs) + 5 tokens.
    vit_images = B * 4 * 2 * (3 * 4 * 4) * 8 + block(5) + attention(5, 5)  # 6144 + 10240 + 1600
    vit_prompts = block(3) + attention(3, 3)                               # [CLS, 2 prompts]
    text = block(6) + attention(6, 6)                                      # a 6-token text
    text_prompts = block(4) + attention(4, 4)                              # [<s>, 2 prompts, </s>]

    def fusion(lt, li):
        proj = B * 2 * (lt + li) * 8 * 8  # text_proj and image_proj
        # per stream: own tokens pass q/k/v/out of self-attention (4*64), q/out of
        # cross-attention (2*64) and the FFN (2*8*16); the other stream's tokens pass k/v (2*64)
        text_stream = B * 2 * (lt * (6 * 64 + 2 * 8 * 16) + li * 2 * 64)
        image_stream = B * 2 * (li * (6 * 64 + 2 * 8 * 16) + lt * 2 * 64)
        attn = attention(lt, lt) + attention(lt, li) + attention(li, li) + attention(li, lt)
        poolers = 2 * B * 2 * 8 * 8
        return proj + text_stream + image_stream + attn + poolers

    # With reuse the MLM pass fuses only its 12 position rows in its (last) layer: the text
    # stream's self-attention on all 6 tokens, cross-attention k/v once per image (5 tokens), then
    # queries, out and FFN of the 12 rows, each attending to 5 keys; no image stream, no poolers.
    mlm_rows = (B * 2 * (6 + 5) * 8 * 8 + B * 6 * 2 * 4 * 64 + attention(6, 6) + B * 5 * 2 * 2 * 64
                + ROWS * 2 * (2 * 64 + 2 * 8 * 16) + ROWS * 2 * 2 * 5 * 8)  # = 24960
    return {
        "vision": vit_images + vit_prompts,  # the true images once in both paths
        # MLM's masked texts, ITM's and text-only's texts (one encoding with reuse: SMALL has no
        # dropout); the textual prompts
        "text": (2 if reuse else 3) * text + text_prompts,
        # MLM, ITM; image-only; text-only
        "fusion": (mlm_rows if reuse else fusion(6, 5)) + fusion(6, 5) + fusion(4, 5) + fusion(6, 3),
        "prompt_scoring": 2 * (B * 2 * 4 * 8),  # [2, 8] @ [8, 4] for each of the two pools
        "mlm_head": ROWS * 2 * (8 * 8 + 8 * 32),  # 12 position rows: dense 8x8, decoder 8x32
        "itm_head": B * 2 * 16 * 2,  # joint 16 -> 2
        "itc_head": 2 * (B * 2 * 16 * 4) + 2 * (2 * B * B * 4),  # two projections; logits both ways
    }


@pytest.mark.parametrize("reuse", [True, False])
def test_step_flops_matches_hand_count(reuse):
    fwd = hand_count_forward(reuse)
    assert fwd["vision"] == 17984 + 6720  # spot values for the reader
    assert fwd["fusion"] == (24960 if reuse else 44864) + 44864 + 2 * 35648
    got = step_flops(SMALL, B, L, reuse=reuse, positions=P)
    for key, value in fwd.items():
        assert got["forward"][key] == value, key
        assert got[key] == (value if key == "prompt_scoring" else 3 * value), key
    assert got["forward"]["total"] == sum(fwd.values())
    assert got["total"] == 3 * sum(fwd.values()) - 2 * fwd["prompt_scoring"]


def test_reuse_saves_one_text_pass_and_most_of_the_mlm_fusion():
    with_reuse, naive = step_flops(SMALL, B, L, True, P), step_flops(SMALL, B, L, False, P)
    # text: 2*6*1024 + 2304; the MLM fusion of the 12 position rows: 44864 - 24960
    assert naive["total"] - with_reuse["total"] == 3 * (14592 + 44864 - 24960)
    dropout = dataclasses.replace(SMALL, text_dropout=0.1)  # the texts differ per pass in training
    assert (step_flops(dropout, B, L, False, P)["total"] - step_flops(dropout, B, L, True, P)["total"]
            == 3 * (44864 - 24960))


def counted(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return PTUnifier(SMALL).eval()


def test_one_text_only_pass_matches_flop_counter(small_model):
    """Text + visual prompts: text encoder, pool scoring, ViT on [CLS, prompts], fusion (6, 3)."""
    batch = synthetic_batch(SMALL, B, L)
    got = counted(lambda: small_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask))
    text, vit_prompts = 2 * 6 * 1024 + B * 4 * 36 * 8, 2 * 3 * 1024 + B * 4 * 9 * 8
    assert got == text + B * 2 * 4 * 8 + vit_prompts + 35648  # fusion (6, 3)


@pytest.mark.parametrize("reuse", [True, False])
def test_step_forward_matches_flop_counter(small_model, reuse):
    batch = synthetic_batch(SMALL, B, L)
    assert batch.mlm_positions.shape == (B, P)
    step = PretrainStep(small_model, LossWeights(), reuse=reuse)
    assert counted(lambda: step(batch)) == step_flops(SMALL, B, L, reuse, P)["forward"]["total"]


def test_texts_are_encoded_per_pass_under_dropout_in_training():
    """With text dropout, passes 2 and 4 see different dropout draws, so the step encodes twice."""
    cfg = dataclasses.replace(SMALL, text_dropout=0.1)
    torch.manual_seed(0)
    step = PretrainStep(PTUnifier(cfg).train(), LossWeights(), reuse=True)
    batch = synthetic_batch(cfg, B, L)
    assert counted(lambda: step(batch)) == step_flops(cfg, B, L, True, P)["forward"]["total"]
    assert step_flops(cfg, B, L, True, P)["forward"]["text"] == 3 * 14592 + 2 * 4 * 1024 + 2 * 2 * 2 * 4 * 4 * 8


@pytest.mark.parametrize("reuse", [True, False])
def test_step_forward_backward_is_three_forwards(small_model, reuse):
    batch = synthetic_batch(SMALL, B, L)
    step = PretrainStep(small_model, LossWeights(), reuse=reuse)
    got = counted(lambda: step(batch).total.backward())
    conv_input_grad = B * 4 * 2 * (3 * 4 * 4) * 8  # pixels need no gradient (one ViT pass either way)
    # The naive MLM pass (Lt = 6, Li = 5) computes what no loss reads: the image stream of its only
    # fusion layer (own tokens 5 x (6*64 + 2*8*16) MACs, other tokens 6 x 2*64 MACs, attention to
    # 5 + 6 keys) and the two poolers. With reuse that pass runs only what MLM reads.
    dead_forward = 0 if reuse else (B * 2 * (5 * (6 * 64 + 2 * 8 * 16) + 6 * 2 * 64)
                                    + B * 4 * (5 * 5 + 5 * 6) * 8 + 2 * B * 2 * 8 * 8)
    assert got == step_flops(SMALL, B, L, reuse, P)["total"] - conv_input_grad - 2 * dead_forward


def test_conv_stem_flops_match_hand_count_and_counter():
    """The tiny preset's early convolutions on SMALL (8 px, patch 4): two stride-2 3x3 layers of
    min(width 8, 16 * 2^i) = 8 channels, 8 -> 4 -> 2 px, then a 1x1 conv: BatchNorm is not counted."""
    cfg = dataclasses.replace(SMALL, vision_stem="conv")
    hand = 2 * B * (4 * 4 * 9 * 3 * 8 + 2 * 2 * 9 * 8 * 8 + 2 * 2 * 8 * 8)  # 13824 + 9216 + 1024
    assert bench.stem_flops(cfg, B) == hand == 24064
    torch.manual_seed(0)
    step = PretrainStep(PTUnifier(cfg).eval(), LossWeights())
    batch = synthetic_batch(cfg, B, L)
    assert counted(lambda: step(batch)) == step_flops(cfg, B, L, positions=P)["forward"]["total"]
    assert step_flops(cfg, B, L, positions=P)["forward"]["vision"] - step_flops(SMALL, B, L, positions=P)["forward"]["vision"] == hand - 6144
