r"""PTUnifier model: CLIP ViT + BERT/RoBERTa + METER-style co-attention fusion + prompt pools.

Implements the architecture of PTUnifier (ICCV 2023), paper sections 3 and 4:

    image -> encode_image (CLIP ViT) ---------\                          /-> mlm_head  (Eq. 5)
                                                > fuse (co-attention) -> |-> itm_head  (Eq. 6-7)
    text  -> encode_text (BERT/RoBERTa) -------/                          \-> itc_image / itc_text
                                                                              (Eq. 8-10)
    A missing modality is replaced by prompts (select_prompts, Eq. 3-4, see prompts.py):
    text only  -> text query  -> visual pool  -> prompt_image -> [CLS, prompts] through the ViT
    image only -> image query -> textual pool -> prompt_text  -> [<s>, prompts, </s>] through text

Shapes: B batch, L/Lt/Li sequence lengths, N patches, Dv/Dt encoder widths, H fusion width,
k number of prompts, V vocabulary, E ITC embedding width.

Pre-trained encoders are loaded from Hugging Face format folders (config.json +
model.safetensors) with `PTUnifier.load_hf_encoders`: an explicit key map, strict shape checks,
and no pickle loading ever.
"""

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from losses import gather_with_grad
from prompts import PromptPool, StaticPrompts, build_prompts


class ConfigError(ValueError):
    """A Config whose fields do not fit together; the message names the fields."""


class WeightLoadError(RuntimeError):
    """A checkpoint that does not fit the model; the message names the file, keys and shapes."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    """Every architecture choice of PTUnifier. Saved in checkpoints; `Config(**asdict(c))` rebuilds.

    Defaults are the paper's `base` model (section 5.3); see PRESETS for smaller shapes.
    """

    # Vision encoder: CLIP ViT (pre-LN blocks, no dropout).
    image_size: int = 288  # input side in pixels; position embeddings are resized to it on load
    patch_size: int = 16  # ViT patch side; the grid is image_size // patch_size
    vision_width: int = 768  # Dv, ViT token width
    vision_layers: int = 12  # ViT blocks (all of them; the official code drops the last one)
    vision_heads: int = 12
    vision_mlp: int = 3072  # ViT MLP hidden width
    vision_act: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP) or "gelu"
    vision_ln_eps: float = 1e-5
    # Text encoder: BERT/RoBERTa (post-LN blocks, exact-erf GELU).
    vocab_size: int = 50265  # V; train.py overrides it from the tokenizer
    pad_token_id: int = 1  # padding id; RoBERTa positions also use it as padding_idx
    bos_token_id: int = 0  # <s> / [CLS]; wraps the textual prompts [<s>, prompts, </s>]
    eos_token_id: int = 2  # </s> / [SEP]
    text_width: int = 768  # Dt, text token width
    text_layers: int = 12
    text_heads: int = 12
    text_mlp: int = 3072
    text_ln_eps: float = 1e-5
    max_positions: int = 514  # rows of the text position table (RoBERTa: 514, BERT: 512)
    type_vocab_size: int = 1  # token-type rows (RoBERTa: 1, BERT: 2)
    position_style: str = "roberta"  # "roberta": start at pad_token_id + 1; "bert": start at 0
    max_text_len: int = 48  # longest tokenised text (tokenizer truncation length)
    text_dropout: float = 0.1  # dropout on embeddings, attention probabilities and sublayers
    # Fusion module: METER-style co-attention, one layer stack per stream (post-LN).
    hidden_size: int = 768  # H
    fusion_layers: int = 6  # co-attention layers per stream
    fusion_heads: int = 12
    fusion_mlp: int = 3072
    fusion_ln_eps: float = 1e-12  # BERT's value, as in METER's cross layers
    fusion_dropout: float = 0.1
    # Prompts (section 3.2): pools of pool_size vectors, top-k selection.
    prompt_mode: str = "pool"  # "pool" (Eq. 3-4) or "static" (k fixed learnable prompts)
    pool_size: int = 1024  # entries per modality pool (paper Table 4: 1024 best)
    k_visual: int = 49  # visual prompts standing in for a missing image
    k_textual: int = 32  # textual prompts standing in for a missing text
    # Heads.
    tie_mlm_decoder: bool = True  # tie the MLM decoder to the word embeddings (needs Dt == H)
    embed_dim: int = 768  # E, ITC embedding width
    temperature: float = 0.1  # ITC temperature tau; logit scale = 1 / tau
    learnable_temperature: bool = False  # learn log(1/tau), clamped to a scale <= 100
    itc_batch_norm: bool = False  # not in the paper: batch-normalise ITC embeddings (tiny preset)

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ConfigError("invalid Config:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency between fields, as readable sentences (empty when valid)."""
        out = []
        if self.image_size % self.patch_size:
            out.append(f"image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}")
        for width, heads in (("vision_width", "vision_heads"), ("text_width", "text_heads"),
                             ("hidden_size", "fusion_heads")):
            if getattr(self, width) % getattr(self, heads):
                out.append(f"{width}={getattr(self, width)} is not divisible by "
                           f"{heads}={getattr(self, heads)}")
        for name, allowed in (("vision_act", ("quick_gelu", "gelu")),
                              ("position_style", ("roberta", "bert")),
                              ("prompt_mode", ("pool", "static"))):
            if getattr(self, name) not in allowed:
                out.append(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        if self.prompt_mode == "pool":
            if self.vision_width != self.text_width:
                out.append(f"prompt_mode='pool' needs vision_width == text_width (got "
                           f"{self.vision_width} and {self.text_width}): the text query selects "
                           "from the visual pool, and the image query from the textual pool, "
                           "by raw dot product (Eq. 3); use prompt_mode='static' otherwise")
            if max(self.k_visual, self.k_textual) > self.pool_size:
                out.append(f"k_visual={self.k_visual} and k_textual={self.k_textual} must not "
                           f"exceed pool_size={self.pool_size}")
        if min(self.k_visual, self.k_textual) <= 0:
            out.append("k_visual and k_textual must be positive")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                out.append(f"{name}={getattr(self, name)} is outside vocab_size={self.vocab_size}")
        longest = max(self.max_text_len, self.k_textual + 2)
        if longest + self.position_offset > self.max_positions:
            out.append(f"max_positions={self.max_positions} is too small for texts of "
                       f"{longest} tokens ({self.position_style} positions start at "
                       f"{self.position_offset})")
        if self.tie_mlm_decoder and self.text_width != self.hidden_size:
            out.append(f"tie_mlm_decoder=True needs text_width == hidden_size (got "
                       f"{self.text_width} and {self.hidden_size}); set tie_mlm_decoder=False")
        if self.temperature <= 0:
            out.append(f"temperature={self.temperature} must be positive")
        return out

    @property
    def position_offset(self) -> int:
        """First position id of a real token: pad_token_id + 1 for RoBERTa, 0 for BERT."""
        return self.pad_token_id + 1 if self.position_style == "roberta" else 0

    @classmethod
    def from_hf(cls, vision=None, text=None, **overrides) -> "Config":
        """`base` with the encoder fields of Hugging Face folders, then `overrides`.

        vision: a CLIPModel or CLIPVisionModel folder; text: a RoBERTa or BERT folder. The image
        size stays `base`'s 288 unless overridden (position embeddings are resized on load).
        The MLM decoder is tied when text_width == hidden_size unless tie_mlm_decoder is given.
        """
        fields = dataclasses.asdict(PRESETS["base"])
        if vision is not None:
            fields.update(hf_vision_fields(vision))
        if text is not None:
            fields.update(hf_text_fields(text, with_special_ids=True))
        unknown = sorted(set(overrides) - set(fields))
        if unknown:
            raise ConfigError(f"Config.from_hf: unknown fields {unknown}")
        fields.update(overrides)
        if "tie_mlm_decoder" not in overrides:
            fields["tie_mlm_decoder"] = fields["text_width"] == fields["hidden_size"]
        return cls(**fields)


PRESETS = {
    # Paper model (section 5.3): CLIP ViT-B/16 at 288 px + RoBERTa-base + 6 fusion layers.
    "base": Config(),
    # Synthetic benchmark on 2 CPU cores: a pre-training step (four passes) at batch 64 takes
    # ~0.4 s. 16 px patches (16 tokens): trained from scratch, a ViT with 8 px patches did not
    # learn the synthetic findings within a few hundred steps, one with 16 px patches did.
    # vocab_size/pad/bos/eos are placeholders that train.py overrides from the tokenizer.
    "tiny": Config(
        image_size=64, patch_size=16, vision_width=128, vision_layers=2, vision_heads=4,
        vision_mlp=512, vocab_size=4096, text_width=128, text_layers=2, text_heads=4,
        text_mlp=512, max_positions=128, max_text_len=64, hidden_size=128, fusion_layers=1,
        fusion_heads=4, fusion_mlp=512, pool_size=64, k_visual=16, k_textual=8,
        embed_dim=128,
        # From scratch, dropout drowns the small across-batch variation of the pooled features
        # that ITC has to grow; without it ITC leaves chance 2-5x sooner (README, "Learning from
        # scratch"). 64 tokens hold a whole synthetic findings section at the median.
        text_dropout=0.0, fusion_dropout=0.0,
        # From scratch, every pass's pooled feature is nearly the same vector for every input, and
        # ITC sat at ln(B) for 80 to 400+ steps; normalising the embeddings over the batch removes
        # that common part (README, "Learning from scratch").
        itc_batch_norm=True,
        # ITC at the official fixed 0.1 stays at ln(B) longest (README, "Learning from scratch");
        # 0.5 leaves it soonest, and learning it lets the scale grow afterwards.
        temperature=0.5, learnable_temperature=True,
    ),
}


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """mask [B, L] (1 = real) -> bool [B, 1, 1, L] for SDPA (True = attend), or None if all real.

    None lets scaled_dot_product_attention pick its fused kernels. The check reads one bool from
    the device (a sync on GPU), once per text encoding and once per fusion pass.
    """
    if mask is None or bool(mask.all()):
        return None
    return mask.bool()[:, None, None, :]  # [B, 1, 1, L]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, L, D], mask [B, L] (1 = real) -> mean over real tokens [B, D]."""
    weight = mask.to(x.dtype).unsqueeze(-1)  # [B, L, 1]
    return (x * weight).sum(1) / weight.sum(1).clamp(min=1.0)


def attend(q, k, v, heads: int, mask, dropout: float) -> torch.Tensor:
    """Multi-head scaled dot-product attention: q [B, Lq, D], k/v [B, Lk, D] -> [B, Lq, D]."""
    B, Lq, D = q.shape
    q = q.view(B, Lq, heads, D // heads).transpose(1, 2)  # [B, h, Lq, D/h]
    k = k.view(B, -1, heads, D // heads).transpose(1, 2)  # [B, h, Lk, D/h]
    v = v.view(B, -1, heads, D // heads).transpose(1, 2)  # [B, h, Lk, D/h]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return out.transpose(1, 2).reshape(B, Lq, D)  # [B, Lq, D]


class SelfAttention(nn.Module):
    """Self-attention with one fused q/k/v projection."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask=None) -> torch.Tensor:
        """x [B, L, D], mask bool broadcastable to [B, h, L, L] or None -> [B, L, D]."""
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x [B, L, D]
        p = self.dropout if self.training else 0.0
        return self.out(attend(q, k, v, self.heads, mask, p))


class CrossAttention(nn.Module):
    """Queries from this stream, keys and values from the other stream."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, other, other_mask=None) -> torch.Tensor:
        """x [B, Lq, D], other [B, Lk, D], other_mask bool [B, 1, 1, Lk] or None -> [B, Lq, D]."""
        k, v = self.kv(other).chunk(2, dim=-1)  # 2 x [B, Lk, D]
        p = self.dropout if self.training else 0.0
        return self.out(attend(self.q(x), k, v, self.heads, other_mask, p))


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class VisionBlock(nn.Module):
    """CLIP pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: Config):
        super().__init__()
        D = cfg.vision_width
        self.ln1 = nn.LayerNorm(D, eps=cfg.vision_ln_eps)
        self.attn = SelfAttention(D, cfg.vision_heads)
        self.ln2 = nn.LayerNorm(D, eps=cfg.vision_ln_eps)
        self.fc1 = nn.Linear(D, cfg.vision_mlp)
        self.act = QuickGELU() if cfg.vision_act == "quick_gelu" else nn.GELU()
        self.fc2 = nn.Linear(cfg.vision_mlp, D)

    def forward(self, x):
        """x [B, L, Dv] -> [B, L, Dv]."""
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TextLayer(nn.Module):
    """BERT post-LN layer: LN(x + attn(x)), then LN(x + FFN(x)); GELU is the exact erf form.

    Reusable by a generation decoder: `attn_mask` may be any boolean mask broadcastable to
    [B, h, L, L] (True = attend), e.g. causal.
    """

    def __init__(self, width: int, heads: int, mlp: int, dropout: float, eps: float):
        super().__init__()
        self.attn = SelfAttention(width, heads, dropout)
        self.ln1 = nn.LayerNorm(width, eps=eps)
        self.fc1 = nn.Linear(width, mlp)
        self.fc2 = nn.Linear(mlp, width)
        self.ln2 = nn.LayerNorm(width, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, attn_mask=None):
        """x [B, L, D] -> [B, L, D]."""
        x = self.ln1(x + self.drop(self.attn(x, attn_mask)))
        return self.ln2(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class CrossLayer(nn.Module):
    """One METER co-attention layer of one stream (post-LN, section 4).

    self-attention -> residual + LN; cross-attention to the other stream -> residual + LN;
    FFN -> residual + LN.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        H, p, eps = cfg.hidden_size, cfg.fusion_dropout, cfg.fusion_ln_eps
        self.self_attn = SelfAttention(H, cfg.fusion_heads, p)
        self.ln1 = nn.LayerNorm(H, eps=eps)
        self.cross_attn = CrossAttention(H, cfg.fusion_heads, p)
        self.ln2 = nn.LayerNorm(H, eps=eps)
        self.fc1 = nn.Linear(H, cfg.fusion_mlp)
        self.fc2 = nn.Linear(cfg.fusion_mlp, H)
        self.ln3 = nn.LayerNorm(H, eps=eps)
        self.drop = nn.Dropout(p)

    def forward(self, x, x_mask, other, other_mask):
        """x [B, Lx, H], other [B, Lo, H]; masks bool [B, 1, 1, L] or None -> [B, Lx, H]."""
        x = self.ln1(x + self.drop(self.self_attn(x, x_mask)))
        x = self.ln2(x + self.drop(self.cross_attn(x, other, other_mask)))
        return self.ln3(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


# ---------------------------------------------------------------------------------------------
# Uni-modal encoders
# ---------------------------------------------------------------------------------------------


def resize_pos_embed(pos: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubic resize of a ViT position table: pos [1 + N, D] (N = g*g) -> [1 + M, D], M = new_grid**2.

    The class position (row 0) is kept as is; the patch grid is interpolated with
    align_corners=False. Same grid returns `pos` unchanged.
    """
    old_grid = math.isqrt(pos.shape[0] - 1)
    if old_grid * old_grid != pos.shape[0] - 1:
        raise ValueError(f"resize_pos_embed: {pos.shape[0] - 1} patch positions are not a square grid")
    if old_grid == new_grid:
        return pos
    cls_pos, grid = pos[:1], pos[1:].float()
    D = grid.shape[1]
    grid = grid.reshape(1, old_grid, old_grid, D).permute(0, 3, 1, 2)  # [1, D, g, g]
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, D)  # [M, D]
    return torch.cat([cls_pos, grid.to(pos.dtype)], dim=0)  # [1 + M, D]


class VisionEncoder(nn.Module):
    """CLIP ViT (section 4): patch conv (no bias), class token, learned positions, ln_pre,
    pre-LN blocks with QuickGELU, ln_post on all tokens. CLIP's output projection is not used."""

    def __init__(self, cfg: Config):
        super().__init__()
        D, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        self.image_size = cfg.image_size
        self.patch_embed = nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(D) * 0.02)  # [Dv]
        self.pos_embed = nn.Parameter(torch.randn(1 + grid * grid, D) * 0.02)  # [1 + N, Dv]
        self.ln_pre = nn.LayerNorm(D, eps=cfg.vision_ln_eps)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vision_layers))
        self.ln_post = nn.LayerNorm(D, eps=cfg.vision_ln_eps)

    def init_weights(self, layers: int) -> None:
        """OpenAI CLIP's from-scratch initialisation: class token std D^-0.5; q/k/v and fc2
        std D^-0.5 (2 layers)^-0.5; attention output D^-0.5; fc1 (2D)^-0.5. (Loaded CLIP weights
        replace it.) With BERT's uniform 0.02 the class token of a small ViT barely reads the
        patches at the start: its output varies across images ~70x less (in variance)."""
        D = self.class_embedding.numel()
        residual_std = D ** -0.5 * (2 * layers) ** -0.5
        with torch.no_grad():
            self.class_embedding.normal_(0, D ** -0.5)
            for block in self.blocks:
                nn.init.normal_(block.attn.qkv.weight, std=residual_std)
                nn.init.normal_(block.attn.out.weight, std=D ** -0.5)
                nn.init.normal_(block.fc1.weight, std=(2 * D) ** -0.5)
                nn.init.normal_(block.fc2.weight, std=residual_std)

    def class_token(self, batch: int) -> torch.Tensor:
        """Class token plus its position embedding: [B, 1, Dv]."""
        return (self.class_embedding + self.pos_embed[0]).expand(batch, 1, -1)

    def embed(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, 3, S, S] -> (tokens [B, 1 + N, Dv], image query [B, Dv]).

        The query (section 3.2) is the mean of the patch embeddings + positions, class token
        excluded, before ln_pre.
        """
        B, _, h, w = pixel_values.shape
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"encode_image: images are {h}x{w}, the model expects "
                             f"{self.image_size}x{self.image_size} (Config.image_size)")
        patches = self.patch_embed(pixel_values)  # [B, Dv, g, g]
        patches = patches.flatten(2).transpose(1, 2) + self.pos_embed[1:]  # [B, N, Dv]
        return torch.cat([self.class_token(B), patches], dim=1), patches.mean(dim=1)

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, Dv] -> ln_post(blocks(ln_pre(tokens))) [B, L, Dv]."""
        x = self.ln_pre(tokens)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)

    def forward(self, pixel_values, return_query: bool = False):
        """pixels [B, 3, S, S] -> states [B, 1 + N, Dv] (and the query [B, Dv] if asked)."""
        tokens, query = self.embed(pixel_values)
        states = self.run_blocks(tokens)
        return (states, query) if return_query else states

    def encode_prompts(self, prompts: torch.Tensor) -> torch.Tensor:
        """Visual prompts [B, k, Dv] -> states [B, 1 + k, Dv] of the sequence [CLS, prompts].

        The prompts take no position embedding: they are free learned vectors in the
        patch-embedding space, so any position information can be learned into them directly.
        """
        return self.run_blocks(torch.cat([self.class_token(prompts.shape[0]), prompts], dim=1))


class TextEncoder(nn.Module):
    """BERT/RoBERTa encoder (section 4): word + position + token-type embeddings, LayerNorm,
    post-LN layers. RoBERTa positions start at pad_token_id + 1 and pads keep pad_token_id;
    BERT positions start at 0."""

    def __init__(self, cfg: Config):
        super().__init__()
        D = cfg.text_width
        self.pad_token_id, self.bos_token_id, self.eos_token_id = (
            cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id)
        self.roberta_positions = cfg.position_style == "roberta"
        self.position_offset = cfg.position_offset
        self.word_embeddings = nn.Embedding(cfg.vocab_size, D)
        self.position_embeddings = nn.Embedding(cfg.max_positions, D)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, D)
        self.ln_embed = nn.LayerNorm(D, eps=cfg.text_ln_eps)
        self.drop = nn.Dropout(cfg.text_dropout)
        self.layers = nn.ModuleList(
            TextLayer(D, cfg.text_heads, cfg.text_mlp, cfg.text_dropout, cfg.text_ln_eps)
            for _ in range(cfg.text_layers))

    def position_ids(self, mask: torch.Tensor) -> torch.Tensor:
        """mask [B, L] (1 = real) -> position ids [B, L]."""
        B, L = mask.shape
        rows = self.position_embeddings.num_embeddings
        if L + self.position_offset > rows:  # a shape check: no device sync
            raise ValueError(f"encode_text: texts of {L} tokens need {L + self.position_offset} "
                             f"position rows, the table has {rows} (Config.max_positions)")
        if self.roberta_positions:
            real = mask.long()
            return real.cumsum(dim=1) * real + self.pad_token_id  # [B, L]; pads keep pad id
        return torch.arange(L, device=mask.device).expand(B, L)  # [B, L]

    def embed(self, words: torch.Tensor, mask: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        """Word vectors [B, L, Dt] -> LayerNorm(words + positions + token types) [B, L, Dt]."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(mask, dtype=torch.long)
        x = words + self.position_embeddings(self.position_ids(mask))
        return self.ln_embed(x + self.token_type_embeddings(token_type_ids))

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embedded tokens [B, L, Dt], mask [B, L] -> states [B, L, Dt]."""
        attn_mask = key_padding_mask(mask)
        x = self.drop(x)
        for layer in self.layers:
            x = layer(x, attn_mask)
        return x

    def forward(self, input_ids, attention_mask, token_type_ids=None, return_query=False):
        """ids [B, L], mask [B, L] -> states [B, L, Dt] (and the query [B, Dt] if asked).

        The text query (section 3.2) is the masked mean of the embedding-layer outputs over real
        tokens, taken before dropout so that selection does not depend on the dropout draw.
        """
        embedded = self.embed(self.word_embeddings(input_ids), attention_mask, token_type_ids)
        states = self.run_layers(embedded, attention_mask)
        return (states, masked_mean(embedded, attention_mask)) if return_query else states

    def encode_prompts(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Textual prompts [B, k, Dt] -> (states [B, k + 2, Dt], mask [B, k + 2]).

        The prompts replace word embeddings in [<s>, prompts, </s>]; positions, token types and
        LayerNorm apply as for words; every token is real.
        """
        B, k, _ = prompts.shape
        ends = self.word_embeddings.weight[[self.bos_token_id, self.eos_token_id]]  # [2, Dt]
        words = torch.cat([ends[0].expand(B, 1, -1), prompts, ends[1].expand(B, 1, -1)], dim=1)
        mask = torch.ones(B, k + 2, dtype=torch.long, device=prompts.device)  # [B, k + 2]
        return self.run_layers(self.embed(words, mask), mask), mask


# ---------------------------------------------------------------------------------------------
# Fusion and heads
# ---------------------------------------------------------------------------------------------


class Fusion(nn.Module):
    """METER co-attention fusion (section 4): projections + modality types, parallel cross
    layers per stream, poolers (token 0 -> Linear -> tanh), joint = [text pooled, image pooled]."""

    def __init__(self, cfg: Config):
        super().__init__()
        H = cfg.hidden_size
        self.text_proj = nn.Linear(cfg.text_width, H)
        self.image_proj = nn.Linear(cfg.vision_width, H)
        self.modality_type = nn.Embedding(2, H)  # row 0 text, row 1 image
        self.text_layers = nn.ModuleList(CrossLayer(cfg) for _ in range(cfg.fusion_layers))
        self.image_layers = nn.ModuleList(CrossLayer(cfg) for _ in range(cfg.fusion_layers))
        self.text_pooler = nn.Linear(H, H)
        self.image_pooler = nn.Linear(H, H)

    def forward(self, text_states, text_mask, image_states):
        """text [B, Lt, Dt], text_mask [B, Lt], image [B, Li, Dv]
        -> (text [B, Lt, H], image [B, Li, H], joint [B, 2H])."""
        t = self.text_proj(text_states) + self.modality_type.weight[0]
        v = self.image_proj(image_states) + self.modality_type.weight[1]
        t_mask = key_padding_mask(text_mask)
        for text_layer, image_layer in zip(self.text_layers, self.image_layers):
            t, v = text_layer(t, t_mask, v, None), image_layer(v, None, t, t_mask)
        pooled_text = torch.tanh(self.text_pooler(t[:, 0]))  # [B, H]
        pooled_image = torch.tanh(self.image_pooler(v[:, 0]))  # [B, H]
        return t, v, torch.cat([pooled_text, pooled_image], dim=-1)  # joint [B, 2H]


class MLMHead(nn.Module):
    """Masked language modelling head (Eq. 5): dense, GELU, LayerNorm, decoder to the vocabulary."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.fusion_ln_eps)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size)

    def forward(self, x):
        """x [..., H] -> logits [..., V]."""
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class GlobalBatchNorm(nn.Module):
    """Batch normalisation without affine parameters over the GLOBAL batch (not in the paper).

    Training: each of the E dimensions is centred by its mean and scaled by its (biased) standard
    deviation over the rows of every rank (`gather_with_grad`, so the result and its gradient are
    those of one process on the concatenated batch), and running estimates are updated exactly as
    nn.BatchNorm1d(E, affine=False) does (momentum 0.1, unbiased running variance). Eval: the
    running estimates. Without a process group this is nn.BatchNorm1d(E, affine=False).
    """

    def __init__(self, dim: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, E] (this rank's rows) -> normalised [b, E] (at least fp32)."""
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()  # statistics in fp32 under autocast
        if not self.training:
            return (x - self.running_mean) / torch.sqrt(self.running_var + self.eps)
        rows, _, n = gather_with_grad(x)  # [N, E]: every rank's rows
        if n < 2:
            raise ValueError("GlobalBatchNorm: a training batch needs at least 2 rows over all "
                             f"ranks, got {n}")
        mean, var = rows.mean(dim=0), rows.var(dim=0, unbiased=False)  # [E] each
        with torch.no_grad():
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), self.momentum)
        return (x - mean) / torch.sqrt(var + self.eps)


def _running_buffers(module: nn.Module) -> list[torch.Tensor]:
    return [b for m in module.modules() if isinstance(m, GlobalBatchNorm)
            for b in (m.running_mean, m.running_var)]


def save_running_statistics(module: nn.Module) -> list[torch.Tensor]:
    """Copies of the buffers that a training forward updates in place (GlobalBatchNorm's running
    estimates), so that a skipped step can leave the model exactly as it was."""
    return [b.clone() for b in _running_buffers(module)]


def restore_running_statistics(module: nn.Module, saved: list[torch.Tensor]) -> None:
    """Undo the running-estimate updates since `save_running_statistics` returned `saved`."""
    with torch.no_grad():
        for buffer, value in zip(_running_buffers(module), saved, strict=True):
            buffer.copy_(value)


class ITCProjection(nn.Module):
    """Contrastive projection of a joint feature (Eq. 8-10): LayerNorm, Linear, L2-normalise;
    with `batch_norm`, a GlobalBatchNorm before the L2-normalisation."""

    def __init__(self, in_dim: int, embed_dim: int, batch_norm: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, embed_dim)
        self.batch_norm = GlobalBatchNorm(embed_dim) if batch_norm else nn.Identity()

    def forward(self, joint):
        """joint [B, 2H] -> unit-norm embedding [B, E]."""
        return F.normalize(self.batch_norm(self.proj(self.norm(joint))), dim=-1)


class ClassifierHead(nn.Module):
    """Downstream head (section 5.2): Linear(in, in), LayerNorm, GELU, Linear(in, n_out)."""

    def __init__(self, in_dim: int, n_out: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, in_dim)
        self.norm = nn.LayerNorm(in_dim)
        self.fc2 = nn.Linear(in_dim, n_out)
        _init_weights(self)

    def forward(self, x):
        """x [B, in_dim] -> logits [B, n_out]."""
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


def _init_weights(root: nn.Module) -> None:
    """BERT-style init of every Linear/Conv/Embedding (normal std 0.02) and LayerNorm (1, 0)."""
    for m in root.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def split_decay(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters of `module`.

    No weight decay on biases, norms, embeddings (word, position, token type, modality type),
    prompt pools, the class token and the ViT position table; every other matrix decays.
    """
    keep_free = set()
    for m in module.modules():
        owned = list(m.parameters(recurse=False))
        if isinstance(m, (nn.Embedding, nn.LayerNorm, PromptPool, StaticPrompts, VisionEncoder)):
            keep_free.update(id(p) for p in owned)
        keep_free.update(id(p) for p in owned if p.ndim < 2)
    params = [p for p in module.parameters() if p.requires_grad]
    return ([p for p in params if id(p) not in keep_free],
            [p for p in params if id(p) in keep_free])


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@dataclass
class FusionOutput:
    """What one fusion pass returns (text mask: 1 = real token; indices None when not prompted)."""

    text: torch.Tensor  # [B, Lt, H] fused text stream (Lt = k_textual + 2 when prompted)
    image: torch.Tensor  # [B, Li, H] fused image stream (Li = 1 + k_visual when prompted)
    text_mask: torch.Tensor  # [B, Lt]
    joint: torch.Tensor  # [B, 2H] concat(text pooled, image pooled)
    text_prompt_indices: torch.Tensor | None  # [B, k_textual] textual-pool rows used
    image_prompt_indices: torch.Tensor | None  # [B, k_visual] visual-pool rows used


class PTUnifier(nn.Module):
    """PTUnifier (sections 3-4): encode_image / encode_text -> select_prompts -> fuse -> heads."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        H2 = 2 * cfg.hidden_size
        self.vision = VisionEncoder(cfg)
        self.text = TextEncoder(cfg)
        self.fusion = Fusion(cfg)
        self.mlm_head = MLMHead(cfg)
        self.itm_head = nn.Linear(H2, 2)
        self.itc_image = ITCProjection(H2, cfg.embed_dim, cfg.itc_batch_norm)
        self.itc_text = ITCProjection(H2, cfg.embed_dim, cfg.itc_batch_norm)
        _init_weights(self)
        self.vision.init_weights(cfg.vision_layers)
        # Pools are created after the init pass: PromptPool/StaticPrompts init themselves.
        self.visual_prompts = build_prompts(  # D_v vectors, queried by the text
            cfg.prompt_mode, cfg.pool_size, cfg.vision_width, cfg.k_visual)
        self.textual_prompts = build_prompts(  # D_t vectors, queried by the image
            cfg.prompt_mode, cfg.pool_size, cfg.text_width, cfg.k_textual)
        if cfg.tie_mlm_decoder:
            self.mlm_head.decoder.weight = self.text.word_embeddings.weight
        log_scale = torch.tensor(math.log(1.0 / cfg.temperature))
        if cfg.learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)

    # -- stages ----------------------------------------------------------------------------

    def encode_image(self, pixel_values, return_query: bool = False):
        """pixels [B, 3, S, S] -> states [B, 1 + N, Dv] (or (states, query [B, Dv]))."""
        return self.vision(pixel_values, return_query)

    def encode_text(self, input_ids, attention_mask, token_type_ids=None, return_query=False):
        """ids [B, L], mask [B, L] -> states [B, L, Dt] (or (states, query [B, Dt]))."""
        return self.text(input_ids, attention_mask, token_type_ids, return_query)

    def prompt_image(self, text_query):
        """Eq. 3-4 for a missing image: text query [B, Dt] -> (image states [B, 1 + k_v, Dv],
        visual-pool indices [B, k_v])."""
        prompts, indices = self.visual_prompts.select(text_query)
        return self.vision.encode_prompts(prompts), indices

    def prompt_text(self, image_query):
        """Eq. 3-4 for a missing text: image query [B, Dv] -> (text states [B, k_t + 2, Dt],
        mask [B, k_t + 2], textual-pool indices [B, k_t])."""
        prompts, indices = self.textual_prompts.select(image_query)
        states, mask = self.text.encode_prompts(prompts)
        return states, mask, indices

    def fuse(self, text_states, text_mask, image_states):
        """Co-attention fusion -> (text [B, Lt, H], image [B, Li, H], joint [B, 2H])."""
        return self.fusion(text_states, text_mask, image_states)

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None,
                image_states=None, image_query=None, text_states=None, text_query=None) -> FusionOutput:
        """One fusion pass over an image, a text, or a pair; a missing modality is prompted.

        Pass `image_states` (and `image_query` when the text is missing) from `encode_image` to
        reuse one ViT pass across several fusion passes (the ViT has no dropout); likewise
        `text_states` with `attention_mask` (and `text_query` when the image is missing) from
        `encode_text`, where the text encoder has no dropout or is in eval mode.
        """
        if pixel_values is not None and image_states is not None:
            raise ValueError("PTUnifier: pass pixel_values or image_states, not both")
        if input_ids is not None and text_states is not None:
            raise ValueError("PTUnifier: pass input_ids or text_states, not both")
        has_image = pixel_values is not None or image_states is not None
        has_text = input_ids is not None or text_states is not None
        if not (has_image or has_text):
            raise ValueError("PTUnifier: needs an image (pixel_values/image_states) or a text "
                             "(input_ids/text_states)")
        if pixel_values is not None:
            image_states, image_query = self.encode_image(pixel_values, return_query=True)
        text_indices = image_indices = None
        if input_ids is not None:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            encoded = self.encode_text(input_ids, attention_mask, return_query=not has_image)
            text_states, text_query = encoded if not has_image else (encoded, None)
        if has_text:
            if attention_mask is None:
                raise ValueError("PTUnifier: text_states needs its attention_mask")
            text_mask = attention_mask
        else:
            if image_query is None:
                raise ValueError("PTUnifier: a text-less pass needs image_query to select "
                                 "textual prompts; use encode_image(..., return_query=True)")
            text_states, text_mask, text_indices = self.prompt_text(image_query)
        if not has_image:
            if text_query is None:
                raise ValueError("PTUnifier: an image-less pass needs text_query to select "
                                 "visual prompts; use encode_text(..., return_query=True)")
            image_states, image_indices = self.prompt_image(text_query)
        text, image, joint = self.fuse(text_states, text_mask, image_states)
        return FusionOutput(text, image, text_mask, joint, text_indices, image_indices)

    # -- heads and optimisation helpers ------------------------------------------------------

    def logit_scale(self) -> torch.Tensor:
        """ITC logit scale 1 / tau as a scalar tensor (learnable: exp(log scale) clamped <= 100)."""
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def param_groups(self, encoder_lr=1e-5, other_lr=5e-5, weight_decay=0.01,
                     temperature_lr=None) -> list[dict]:
        """AdamW groups (section 5.3): encoders (ViT + text) at encoder_lr, the rest (fusion,
        projections, pools, heads) at other_lr; no decay as in `split_decay`. With
        `temperature_lr` (not 0 or None), a learnable temperature gets a group at that rate."""
        encoders = nn.ModuleList([self.vision, self.text])
        encoder_ids = {id(p) for p in encoders.parameters()}
        own = [self.log_scale] if temperature_lr and self.config.learnable_temperature else []
        decay, free = split_decay(self)
        free = [p for p in free if not any(p is q for q in own)]
        groups = []
        for name, params, wd in (("decay", decay, weight_decay), ("no_decay", free, 0.0)):
            for part, lr, wanted in (("encoder", encoder_lr, True), ("other", other_lr, False)):
                chosen = [p for p in params if (id(p) in encoder_ids) == wanted]
                if chosen:
                    groups.append({"name": f"{part}_{name}", "params": chosen, "lr": lr,
                                   "weight_decay": wd})
        if own:
            groups.append({"name": "temperature", "params": own, "lr": temperature_lr,
                           "weight_decay": 0.0})
        return groups

    # -- pre-trained encoders --------------------------------------------------------------

    def load_hf_encoders(self, vision=None, text=None) -> None:
        """Fill the ViT from a CLIP folder and/or the text encoder from a RoBERTa/BERT folder.

        Strict: the folder's config.json must match this model's Config, and every encoder
        parameter must come from the file with the right shape (WeightLoadError otherwise).
        """
        if vision is not None:
            _check_fields(self.config, hf_vision_fields(vision), vision)
            state, source = read_safetensors(vision)
            self.vision.load_state_dict(
                convert_clip_vision(state, _shapes(self.vision), source), strict=True)
        if text is not None:
            _check_fields(self.config, hf_text_fields(text), text)
            state, source = read_safetensors(text)
            self.text.load_state_dict(convert_bert(state, _shapes(self.text), source), strict=True)


# ---------------------------------------------------------------------------------------------
# Hugging Face checkpoints: config fields, safetensors reading, explicit key maps
# ---------------------------------------------------------------------------------------------

# transformers' defaults for keys a config.json may omit.
_CLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, patch_size=32,
                             hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
_TEXT_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512,
                      type_vocab_size=2, layer_norm_eps=1e-12,
                      position_embedding_type="absolute")
_TEXT_MODEL_DEFAULTS = {"bert": dict(vocab_size=30522, pad_token_id=0),
                        "roberta": dict(vocab_size=50265, pad_token_id=1, bos_token_id=0,
                                        eos_token_id=2)}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise WeightLoadError(f"{path}: not found (a Hugging Face folder needs config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise WeightLoadError(f"{path}: invalid JSON ({err})") from err


def hf_vision_fields(folder) -> dict:
    """Config fields of a CLIP / CLIP-vision folder (the image size is not one: positions are
    resized on load)."""
    path = Path(folder) / "config.json"
    raw = _read_json(path)
    kind = raw.get("model_type")
    if kind == "clip":
        raw = raw.get("vision_config") or {}
    elif kind != "clip_vision_model":
        raise WeightLoadError(f"{path}: model_type {kind!r} is not 'clip' or 'clip_vision_model'")
    c = {**_CLIP_VISION_DEFAULTS, **raw}
    if c["num_channels"] != 3:
        raise WeightLoadError(f"{path}: num_channels={c['num_channels']}, only RGB (3) is supported")
    fields = dict(vision_width=c["hidden_size"], vision_layers=c["num_hidden_layers"],
                  vision_heads=c["num_attention_heads"], vision_mlp=c["intermediate_size"],
                  patch_size=c["patch_size"], vision_act=c["hidden_act"],
                  vision_ln_eps=c["layer_norm_eps"])
    return fields


def hf_text_fields(folder, with_special_ids: bool = False) -> dict:
    """Config fields of a RoBERTa / BERT folder (bos/eos ids too when asked and known)."""
    path = Path(folder) / "config.json"
    raw = _read_json(path)
    kind = raw.get("model_type")
    if kind not in _TEXT_MODEL_DEFAULTS:
        raise WeightLoadError(f"{path}: model_type {kind!r} is not 'roberta' or 'bert'")
    c = {**_TEXT_DEFAULTS, **_TEXT_MODEL_DEFAULTS[kind], **raw}
    if c["hidden_act"] != "gelu" or c["position_embedding_type"] != "absolute":
        raise WeightLoadError(f"{path}: need hidden_act 'gelu' and absolute positions, got "
                              f"{c['hidden_act']!r} and {c['position_embedding_type']!r}")
    fields = dict(text_width=c["hidden_size"], text_layers=c["num_hidden_layers"],
                  text_heads=c["num_attention_heads"], text_mlp=c["intermediate_size"],
                  text_ln_eps=c["layer_norm_eps"], vocab_size=c["vocab_size"],
                  pad_token_id=c["pad_token_id"], max_positions=c["max_position_embeddings"],
                  type_vocab_size=c["type_vocab_size"], position_style=kind)
    if with_special_ids:
        fields.update({k: c[k] for k in ("bos_token_id", "eos_token_id") if c.get(k) is not None})
    return fields


def _check_fields(cfg: Config, fields: dict, folder) -> None:
    wrong = [f"{k}: Config has {getattr(cfg, k)!r}, config.json gives {v!r}"
             for k, v in fields.items() if getattr(cfg, k) != v]
    if wrong:
        raise WeightLoadError(f"{Path(folder) / 'config.json'} does not match the model Config "
                              "(build it with Config.from_hf):\n  " + "\n  ".join(wrong))


def read_safetensors(folder) -> tuple[dict[str, torch.Tensor], str]:
    """All tensors of `folder`/model.safetensors (or its sharded index) and a name for messages.

    Pickle checkpoints (pytorch_model.bin, *.pt) are refused, never loaded: unpickling can run
    arbitrary code.
    """
    folder = Path(folder)
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        files = sorted({folder / name for name in _read_json(index)["weight_map"].values()})
    else:
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        hint = (f" Found {pickles}: pickle checkpoints are never loaded; convert them to "
                "safetensors first (save_pretrained writes model.safetensors).") if pickles else ""
        raise WeightLoadError(f"{single}: not found.{hint}")
    state = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightLoadError(f"{file}: not a readable safetensors file (truncated, or a "
                                  f"pickle under a safetensors name?): {err}") from err
    return state, str(single if single.is_file() else index)


def _shapes(module: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _pairs(src: str, dst: str) -> dict[str, tuple[str, ...]]:
    """Weight and bias of one module: our key -> (source key,)."""
    return {f"{dst}.{n}": (f"{src}.{n}",) for n in ("weight", "bias")}


def _clip_vision_recipe(layers: int) -> dict[str, tuple[str, ...]]:
    """Our VisionEncoder key -> CLIP vision key(s) (three keys are concatenated into one)."""
    recipe = {"class_embedding": ("embeddings.class_embedding",),
              "patch_embed.weight": ("embeddings.patch_embedding.weight",),
              "pos_embed": ("embeddings.position_embedding.weight",),
              **_pairs("pre_layrnorm", "ln_pre"), **_pairs("post_layernorm", "ln_post")}
    for i in range(layers):
        src, dst = f"encoder.layers.{i}", f"blocks.{i}"
        for n in ("weight", "bias"):
            recipe[f"{dst}.attn.qkv.{n}"] = tuple(f"{src}.self_attn.{p}_proj.{n}" for p in "qkv")
        recipe.update(_pairs(f"{src}.self_attn.out_proj", f"{dst}.attn.out"))
        recipe.update(_pairs(f"{src}.layer_norm1", f"{dst}.ln1"))
        recipe.update(_pairs(f"{src}.mlp.fc1", f"{dst}.fc1"))
        recipe.update(_pairs(f"{src}.mlp.fc2", f"{dst}.fc2"))
        recipe.update(_pairs(f"{src}.layer_norm2", f"{dst}.ln2"))
    return recipe


def _bert_recipe(layers: int) -> dict[str, tuple[str, ...]]:
    """Our TextEncoder key -> BERT/RoBERTa key(s) (three keys are concatenated into one)."""
    recipe = {f"{name}.weight": (f"embeddings.{name}.weight",)
              for name in ("word_embeddings", "position_embeddings", "token_type_embeddings")}
    recipe.update(_pairs("embeddings.LayerNorm", "ln_embed"))
    for i in range(layers):
        src, dst = f"encoder.layer.{i}", f"layers.{i}"
        for n in ("weight", "bias"):
            recipe[f"{dst}.attn.qkv.{n}"] = tuple(
                f"{src}.attention.self.{p}.{n}" for p in ("query", "key", "value"))
        recipe.update(_pairs(f"{src}.attention.output.dense", f"{dst}.attn.out"))
        recipe.update(_pairs(f"{src}.attention.output.LayerNorm", f"{dst}.ln1"))
        recipe.update(_pairs(f"{src}.intermediate.dense", f"{dst}.fc1"))
        recipe.update(_pairs(f"{src}.output.dense", f"{dst}.fc2"))
        recipe.update(_pairs(f"{src}.output.LayerNorm", f"{dst}.ln2"))
    return recipe


def _strip(state: dict, prefix: str, ignored) -> dict:
    """Remove `prefix` from keys that carry it and drop keys for which `ignored(key)` is true."""
    out = {}
    for key, value in state.items():
        short = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if not ignored(key, short):
            out[short] = value
    return out


def _apply_recipe(state, recipe, target, source, flexible_rows=()) -> dict:
    """Check `state` against `recipe` and build our state dict; WeightLoadError lists all problems.

    target: our key -> shape. Keys in `flexible_rows` may differ in their first dimension.
    """
    wanted = {src: (dst, len(srcs)) for dst, srcs in recipe.items() for src in srcs}
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    wrong = []
    for src, (dst, parts) in wanted.items():
        if src in state:
            want = (target[dst][0] // parts, *target[dst][1:])
            got = tuple(state[src].shape)
            ok = got[1:] == want[1:] if dst in flexible_rows else got == want
            if not ok:
                wrong.append(f"{src}: file has {got}, model expects {want} (for {dst})")
    if missing or unexpected or wrong:
        lines = [f"missing keys ({len(missing)}): {missing}"] if missing else []
        lines += [f"unexpected keys ({len(unexpected)}): {unexpected}"] if unexpected else []
        lines += [f"wrong shapes ({len(wrong)}):"] + wrong if wrong else []
        raise WeightLoadError(f"{source}: does not fit the model:\n  " + "\n  ".join(lines))
    return {dst: torch.cat([state[s] for s in srcs]) if len(srcs) > 1 else state[srcs[0]]
            for dst, srcs in recipe.items()}


def convert_clip_vision(state: dict, target: dict, source: str = "state_dict") -> dict:
    """CLIP state dict -> VisionEncoder state dict (pure; position table resized to `target`).

    Accepts a full CLIPModel (keys under `vision_model.`; text_model.*, text_projection,
    visual_projection and logit_scale are ignored) or a CLIPVisionModel with or without the
    `vision_model.` prefix. `embeddings.position_ids` buffers are ignored.
    """
    prefixed = any(k.startswith("vision_model.") for k in state)
    clip_extras = {"text_projection.weight", "visual_projection.weight", "logit_scale"}
    state = _strip(state, "vision_model." if prefixed else "", lambda key, short: (
        short == "embeddings.position_ids" or key in clip_extras or key.startswith("text_model.")))
    layers = 1 + max((int(k.split(".")[1]) for k in target if k.startswith("blocks.")), default=-1)
    out = _apply_recipe(state, _clip_vision_recipe(layers), target, source, {"pos_embed"})
    rows = out["pos_embed"].shape[0] - 1
    if math.isqrt(rows) ** 2 != rows:
        raise WeightLoadError(f"{source}: position table has {rows} patch rows, not a square grid")
    out["pos_embed"] = resize_pos_embed(out["pos_embed"], math.isqrt(target["pos_embed"][0] - 1))
    return out


def convert_bert(state: dict, target: dict, source: str = "state_dict") -> dict:
    """BERT/RoBERTa state dict -> TextEncoder state dict (pure).

    Accepts bare models (`embeddings.`...) and MLM models (`roberta.`/`bert.` prefix; `lm_head.`
    and `cls.` keys ignored). Pooler weights and `embeddings.position_ids` buffers are ignored.
    """
    prefix = next((p for p in ("roberta.", "bert.") if any(k.startswith(p) for k in state)), "")
    state = _strip(state, prefix, lambda key, short: (
        short.startswith("pooler.") or short == "embeddings.position_ids"
        or (prefix and key.startswith(("lm_head.", "cls.")))))
    layers = 1 + max((int(k.split(".")[1]) for k in target if k.startswith("layers.")), default=-1)
    return _apply_recipe(state, _bert_recipe(layers), target, source)


# ---------------------------------------------------------------------------------------------
# Generation decoder (downstream TS and ITG, paper section 5.2)
# ---------------------------------------------------------------------------------------------
#
# "A Transformer decoder initialised from the pre-trained text encoder except its cross-attention
# layers; memory = the fused image and text streams." Each DecoderLayer is a TextLayer (same
# parameter names, so the encoder's weights copy over one to one) plus a cross-attention block:
#   causal self-attention -> residual + LN; cross-attention to memory -> residual + LN;
#   FFN -> residual + LN.
# One code path serves teacher forcing and incremental decoding: `step` runs T new tokens after P
# cached ones; `forward` is `step` over the whole sequence with an empty cache.
#
# Search (`generate`): greedy, or deterministic beam search (no sampling, unlike the official
# code). A finished hypothesis of n generated tokens (its end token included, the start token
# not; a hypothesis cut at max_len without an end token has n = max_len) scores
#     sum of its token log-probabilities / n ** length_penalty.


@dataclass
class LayerCache:
    """Keys/values of one decoder layer; rows are examples (times beams)."""

    k: torch.Tensor  # [N, P, Dt] self-attention keys of the P tokens seen so far
    v: torch.Tensor  # [N, P, Dt]
    memory_k: torch.Tensor  # [N, M, Dt] cross-attention keys of the projected memory
    memory_v: torch.Tensor  # [N, M, Dt]


@dataclass
class DecoderCache:
    """Everything `TextDecoder.step` needs from earlier steps."""

    layers: list[LayerCache]
    memory_mask: torch.Tensor | None  # bool [N, 1, 1, M] (True = attend) or None if all real
    length: int = 0  # P, tokens seen so far (the next token's position index)

    def reorder_beams(self, rows: torch.Tensor) -> None:
        """Keep self-attention rows `rows` [N] in this order (beam search survivors).

        Each row must come from the same example's group of beams: the memory keys/values are
        identical within a group, so they are not reordered.
        """
        for layer in self.layers:
            layer.k, layer.v = layer.k[rows], layer.v[rows]


class DecoderLayer(TextLayer):
    """TextLayer (attn, ln1, fc1, fc2, ln2) + cross-attention to memory (cross_attn, ln_cross)."""

    def __init__(self, cfg: Config):
        D, p, eps = cfg.text_width, cfg.text_dropout, cfg.text_ln_eps
        super().__init__(D, cfg.text_heads, cfg.text_mlp, p, eps)
        self.cross_attn = CrossAttention(D, cfg.text_heads, p)
        self.ln_cross = nn.LayerNorm(D, eps=eps)

    def forward(self, x, cache: LayerCache, causal_mask, memory_mask):
        """x [N, T, Dt] (T new tokens after cache.k's P), causal bool [T, P + T] or None,
        memory_mask bool [N, 1, 1, M] or None -> [N, T, Dt]. Appends the new keys/values."""
        p = self.attn.dropout if self.training else 0.0
        q, k, v = self.attn.qkv(x).chunk(3, dim=-1)  # 3 x [N, T, Dt]
        cache.k = torch.cat([cache.k, k], dim=1)  # [N, P + T, Dt]
        cache.v = torch.cat([cache.v, v], dim=1)  # [N, P + T, Dt]
        h = attend(q, cache.k, cache.v, self.attn.heads, causal_mask, p)
        x = self.ln1(x + self.drop(self.attn.out(h)))
        c = self.cross_attn
        h = attend(c.q(x), cache.memory_k, cache.memory_v, c.heads, memory_mask, p)
        x = self.ln_cross(x + self.drop(c.out(h)))
        return self.ln2(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


class LMHead(nn.Module):
    """Language-model head, shaped like MLMHead on width Dt: dense, GELU, LayerNorm, decoder to
    the vocabulary (the decoder weight is tied to the decoder's word embeddings)."""

    def __init__(self, cfg: Config):
        super().__init__()
        D = cfg.text_width
        self.dense = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D, eps=cfg.fusion_ln_eps)  # MLMHead's eps: it is copied from it
        self.decoder = nn.Linear(D, cfg.vocab_size)

    def forward(self, x):
        """x [..., Dt] -> logits [..., V]."""
        return self.decoder(self.norm(F.gelu(self.dense(x))))


class TextDecoder(nn.Module):
    """Autoregressive text decoder over a memory of fused states (TS and ITG heads).

    Embeddings as TextEncoder (word + position in Config.position_style + token type 0,
    LayerNorm, dropout); text_layers DecoderLayers; LMHead. Memory [B, M, H] goes through
    Linear(H -> Dt) when hidden_size != text_width (identity otherwise).
    """

    COPIED_FROM_TEXT_LAYER = ("attn", "ln1", "fc1", "fc2", "ln2")
    COPIED_FROM_TEXT_ENCODER = ("word_embeddings", "position_embeddings",
                                "token_type_embeddings", "ln_embed")

    def __init__(self, cfg: Config):
        super().__init__()
        D = cfg.text_width
        self.position_offset = cfg.position_offset
        self.max_length = cfg.max_positions - cfg.position_offset  # longest input sequence
        self.word_embeddings = nn.Embedding(cfg.vocab_size, D)
        self.position_embeddings = nn.Embedding(cfg.max_positions, D)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, D)
        self.ln_embed = nn.LayerNorm(D, eps=cfg.text_ln_eps)
        self.drop = nn.Dropout(cfg.text_dropout)
        self.memory_proj = (nn.Linear(cfg.hidden_size, D) if cfg.hidden_size != D
                            else nn.Identity())
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.text_layers))
        self.lm_head = LMHead(cfg)
        _init_weights(self)
        self.lm_head.decoder.weight = self.word_embeddings.weight

    @classmethod
    def from_encoder(cls, model: "PTUnifier") -> "TextDecoder":
        """A decoder initialised from `model`'s pre-trained text encoder (copies, not shared).

        Copied: word/position/token-type embeddings and their LayerNorm; in every layer the
        self-attention (attn), its LayerNorm (ln1), the FFN (fc1, fc2) and its LayerNorm (ln2).
        When hidden_size == text_width the MLM head's dense, norm and decoder bias are copied
        into the LM head; its decoder weight is the (copied) word-embedding matrix by tying,
        which equals the MLM decoder when Config.tie_mlm_decoder. Otherwise the LM head is new.
        New (fresh init): every cross_attn and ln_cross, and memory_proj.
        """
        cfg = model.config
        decoder = cls(cfg).to(model.text.word_embeddings.weight.device)
        for name in cls.COPIED_FROM_TEXT_ENCODER:
            getattr(decoder, name).load_state_dict(getattr(model.text, name).state_dict())
        for mine, theirs in zip(decoder.layers, model.text.layers, strict=True):
            for name in cls.COPIED_FROM_TEXT_LAYER:
                getattr(mine, name).load_state_dict(getattr(theirs, name).state_dict())
        if cfg.hidden_size == cfg.text_width:
            decoder.lm_head.dense.load_state_dict(model.mlm_head.dense.state_dict())
            decoder.lm_head.norm.load_state_dict(model.mlm_head.norm.state_dict())
            with torch.no_grad():
                decoder.lm_head.decoder.bias.copy_(model.mlm_head.decoder.bias)
        return decoder

    def start(self, memory: torch.Tensor, memory_mask: torch.Tensor) -> DecoderCache:
        """memory [N, M, H], memory_mask [N, M] (1 real, 0 pad) -> an empty cache holding the
        per-layer memory keys/values."""
        memory = self.memory_proj(memory)  # [N, M, Dt]
        empty = memory.new_zeros(memory.shape[0], 0, memory.shape[2])  # [N, 0, Dt]
        layers = [LayerCache(empty, empty, *layer.cross_attn.kv(memory).chunk(2, dim=-1))
                  for layer in self.layers]
        return DecoderCache(layers, key_padding_mask(memory_mask))

    def step(self, input_ids: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """input_ids [N, T] following cache.length earlier tokens -> logits [N, T, V].

        Causal: token i sees the P cached tokens and new tokens 0..i. Updates `cache`.
        """
        N, T = input_ids.shape
        P = cache.length
        if P + T > self.max_length:
            raise ValueError(f"TextDecoder: {P + T} tokens need {P + T + self.position_offset} "
                             f"position rows, the table has "
                             f"{self.position_embeddings.num_embeddings} (Config.max_positions)")
        positions = torch.arange(P, P + T, device=input_ids.device) + self.position_offset  # [T]
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)
             + self.token_type_embeddings.weight[0])  # [N, T, Dt]
        x = self.drop(self.ln_embed(x))
        causal = None if T == 1 else torch.ones(
            T, P + T, dtype=torch.bool, device=input_ids.device).tril(diagonal=P)  # [T, P + T]
        for layer, layer_cache in zip(self.layers, cache.layers):
            x = layer(x, layer_cache, causal, cache.memory_mask)
        cache.length = P + T
        return self.lm_head(x)

    def forward(self, input_ids, memory, memory_mask) -> torch.Tensor:
        """Teacher forcing: input_ids [B, T], memory [B, M, H], memory_mask [B, M] (1 real,
        0 pad) -> logits [B, T, V]. Target padding is left to the loss (ignore index)."""
        return self.step(input_ids, self.start(memory, memory_mask))


def generation_memory(out: FusionOutput) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder memory from one fusion pass: (concat(text, image) [B, Lt + Li, H],
    mask [B, Lt + Li] = concat(text_mask, ones))."""
    B, Li, _ = out.image.shape
    ones = torch.ones(B, Li, dtype=out.text_mask.dtype, device=out.text_mask.device)
    return (torch.cat([out.text, out.image], dim=1),  # [B, Lt + Li, H]
            torch.cat([out.text_mask, ones], dim=1))  # [B, Lt + Li]


def generate(decoder: TextDecoder, memory, memory_mask, bos_id: int, eos_id: int,
             max_len: int = 64, beams: int = 1, length_penalty: float = 1.0,
             no_repeat_ngram: int = 0) -> list[list[int]]:
    """Token ids (no bos/eos) of the best continuation of `bos_id` for each example.

    memory [B, M, H], memory_mask [B, M] (1 real). beams == 1: greedy; beams > 1: beam search
    (see `beam_search` for the score and the stopping rule). At most max_len tokens are
    generated (an end token included). no_repeat_ngram = n > 0 forbids any n-gram of generated
    tokens to occur twice (`ban_repeats`). Runs in eval mode without gradients and restores the
    decoder's training flag afterwards.
    """
    if beams < 1 or max_len < 1:
        raise ValueError(f"generate: need beams >= 1 and max_len >= 1, got {beams} and {max_len}")
    if max_len > decoder.max_length:
        raise ValueError(f"generate: max_len={max_len} exceeds the decoder's "
                         f"{decoder.max_length} positions (Config.max_positions minus the "
                         "position offset); lower max_len")
    was_training = decoder.training
    decoder.eval()
    try:
        with torch.no_grad():
            if beams == 1:
                return greedy_search(decoder, memory, memory_mask, bos_id, eos_id, max_len,
                                     no_repeat_ngram)
            return beam_search(decoder, memory, memory_mask, bos_id, eos_id, max_len, beams,
                               length_penalty, no_repeat_ngram)
    finally:
        decoder.train(was_training)


def ban_repeats(logits: torch.Tensor, histories: list[list[int]], n: int) -> torch.Tensor:
    """logits [R, V] of the next token after each row's generated tokens `histories`; every token
    that would complete an n-gram already in its row's history is set to -inf (n <= 0: none)."""
    if n <= 0:
        return logits
    for row, past in enumerate(histories):
        if len(past) < n - 1:
            continue
        prefix = past[len(past) - n + 1:]  # the last n - 1 tokens ([] for n = 1)
        banned = [past[i + n - 1] for i in range(len(past) - n + 1) if past[i:i + n - 1] == prefix]
        if banned:
            logits[row, banned] = -math.inf
    return logits


def greedy_search(decoder, memory, memory_mask, bos_id, eos_id, max_len,
                  no_repeat_ngram: int = 0) -> list[list[int]]:
    """Batched greedy decoding (argmax each step) until every example emitted eos or max_len."""
    B = memory.shape[0]
    cache = decoder.start(memory, memory_mask)
    tokens = torch.full((B, 1), bos_id, dtype=torch.long, device=memory.device)  # [B, 1]
    out = [[] for _ in range(B)]
    finished = [False] * B
    for _ in range(max_len):
        logits = ban_repeats(decoder.step(tokens, cache)[:, -1].float(), out, no_repeat_ngram)
        chosen = logits.argmax(dim=-1)  # [B]
        for b, token in enumerate(chosen.tolist()):
            if not finished[b]:
                finished[b] = token == eos_id
                if not finished[b]:
                    out[b].append(token)
        if all(finished):
            break
        tokens = chosen[:, None]  # [B, 1]
    return out


def hypothesis_score(log_prob: float, length: int, length_penalty: float) -> float:
    """Score of a finished hypothesis: sum of log-probs / length ** length_penalty."""
    return log_prob / length ** length_penalty


def _best_possible(log_prob: float, length: int, max_len: int, length_penalty: float) -> float:
    """Upper bound on the final score of a live hypothesis with `length` tokens and summed
    log-prob `log_prob` <= 0: later tokens only lower the sum, and the final length lies in
    [length + 1, max_len]; s / n ** lp is largest at n = max_len when lp > 0, else at length + 1."""
    best_length = max_len if length_penalty > 0 else length + 1
    return hypothesis_score(log_prob, best_length, length_penalty)


def beam_search(decoder, memory, memory_mask, bos_id, eos_id, max_len, beams,
                length_penalty, no_repeat_ngram: int = 0) -> list[list[int]]:
    """Deterministic batched beam search (no sampling).

    Each example keeps `beams` live hypotheses. A step expands each with log-softmax and takes
    the example's top 2 * beams (hypothesis, token) pairs by summed log-prob: an end token
    ranked among the first `beams` finishes a hypothesis (`hypothesis_score`); the first
    `beams` other pairs become the live hypotheses. At max_len tokens the live hypotheses are
    finished as they are. An example stops once it holds `beams` finished hypotheses and none of
    its live ones can still beat the worst of them (`_best_possible`); the search stops when all
    examples have stopped. Returns the best finished hypothesis of each example.
    """
    B, K = memory.shape[0], beams
    cache = decoder.start(memory.repeat_interleave(K, dim=0),  # [B * K, M, H]
                          memory_mask.repeat_interleave(K, dim=0))  # [B * K, M]
    tokens = torch.full((B * K, 1), bos_id, dtype=torch.long, device=memory.device)
    scores = torch.full((B, K), -math.inf, device=memory.device)  # summed log-probs
    scores[:, 0] = 0.0  # one live hypothesis to start from: no duplicate beams
    history = [[] for _ in range(B * K)]  # generated tokens of each row
    finished = [[] for _ in range(B)]  # (score, tokens), best first, at most K
    done = [False] * B
    for t in range(max_len):  # t tokens generated so far
        log_probs = decoder.step(tokens, cache)[:, -1].float().log_softmax(dim=-1)  # [B*K, V]
        log_probs = ban_repeats(log_probs, history, no_repeat_ngram)
        V = log_probs.shape[-1]
        total = (scores.view(B * K, 1) + log_probs).view(B, K * V)  # [B, K * V]
        top, flat = total.topk(2 * K, dim=1)  # [B, 2K]
        rows, next_tokens, next_scores, next_history = [], [], [], []
        for b in range(B):
            live = [] if done[b] else _expand(
                finished[b], top[b].tolist(), flat[b].tolist(), V, K, history[b * K:(b + 1) * K],
                eos_id, t + 1, length_penalty)
            if not done[b]:
                done[b] = _example_done(finished[b], live, K, t + 1, max_len, length_penalty)
            if done[b]:  # frozen: keep rows in place, scores -inf
                live = [(-math.inf, j, eos_id, history[b * K + j]) for j in range(K)]
            for score, j, token, tokens_so_far in live:
                rows.append(b * K + j)
                next_tokens.append(token)
                next_scores.append(score)
                next_history.append(tokens_so_far)
        if all(done):
            break
        cache.reorder_beams(torch.tensor(rows, device=memory.device))
        tokens = torch.tensor(next_tokens, device=memory.device)[:, None]  # [B * K, 1]
        scores = torch.tensor(next_scores, device=memory.device).view(B, K)
        history = next_history
    return [hyps[0][1] for hyps in finished]


def _expand(finished, top, flat, V, K, history, eos_id, length, length_penalty):
    """One example's step: record finished hypotheses (in place) and return the live ones as
    (summed log-prob, source beam, token, tokens including it) for up to K pairs."""
    live = []
    for rank, (score, index) in enumerate(zip(top, flat)):
        j, token = divmod(index, V)
        if token == eos_id:
            if rank < K:
                _add_finished(finished, hypothesis_score(score, length, length_penalty),
                              history[j], K)
        else:
            live.append((score, j, token, history[j] + [token]))
            if len(live) == K:
                break
    return live


def _add_finished(finished: list, score: float, tokens: list[int], K: int) -> None:
    """Insert (score, tokens) keeping the K best, best first (ties: the earlier stays ahead)."""
    finished.append((score, tokens))
    finished.sort(key=lambda hyp: -hyp[0])
    del finished[K:]


def _example_done(finished, live, K, length, max_len, length_penalty) -> bool:
    """Finish the live hypotheses at max_len; else True when none can beat the K-th finished."""
    if length == max_len:
        for score, _, _, tokens in live:
            _add_finished(finished, hypothesis_score(score, length, length_penalty), tokens, K)
        return True
    if len(finished) < K:
        return False
    best = max(_best_possible(score, length, max_len, length_penalty) for score, *_ in live)
    return finished[-1][0] >= best
