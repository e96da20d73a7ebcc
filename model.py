r"""PTUnifier model: CLIP ViT + BERT/RoBERTa + METER-style co-attention fusion + prompt pools.

Implements the architecture of PTUnifier (ICCV 2023), paper sections 3 and 4, in the order of the
paper's figure; `PTUnifier.forward` reads as the four stages:

    image -> encode_image (CLIP ViT) -------\                          /-> mlm_head  (MLM, Eq. 5-6)
                                              > fuse (co-attention) -> |-> itm_head  (ITM, Eq. 7-8)
    text  -> encode_text (BERT/RoBERTa) -----/                          \-> itc_image / itc_text
                                                                            (ITC, Eq. 9-10)
    A missing modality is replaced by prompts (select_prompts, Eq. 3-4; prompts.py):
    text only  -> text query  -> visual pool  -> prompt_image -> [CLS, prompts] through the ViT
    image only -> image query -> textual pool -> prompt_text  -> [<s>, prompts, </s>] through text
    (prompts enter raw, as in the official code: no position embeddings, no LayerNorm)

`fuse_encoded` is the one entry for inputs that are already encoded (a training step encodes
the batch's images once for several fusion passes); `forward` encodes raw inputs and calls it.
The losses live in losses.py, the recipes (presets) in recipes.py, Hugging Face weight loading in
hf.py, the generation decoder in generation.py.

Shapes: B batch, L/Lt/Li sequence lengths, N patches, Dv/Dt encoder widths, H fusion width,
k number of prompts, V vocabulary, E ITC embedding width.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from losses import gather_with_grad
from prompts import PROMPT_MODES, PromptPool, StaticPrompts, build_prompts


class ConfigError(ValueError):
    """A Config whose fields do not fit together; the message names the fields."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


@dataclass
class Config:
    """Every architecture choice of PTUnifier. Saved in checkpoints; `Config(**asdict(c))` rebuilds.

    Defaults are the paper's `base` model (section 5.3) and, where the paper is silent, the
    official code's (docs/CHOICES.md); recipes.RECIPES holds the presets. The last group of fields
    (FROM_SCRATCH) holds what the tiny recipe changes to learn from scratch, which the paper does
    not do; every other field is one of the paper's or the official code's.
    """

    # Vision encoder: CLIP ViT (pre-LN blocks, no dropout).
    image_size: int = 288  # input side in pixels; position embeddings are resized to it on load
    patch_size: int = 16  # ViT patch side; the grid is image_size // patch_size
    vision_width: int = 768  # Dv, ViT token width
    vision_layers: int = 11  # ViT blocks: the official code builds CLIP's 12 - 1 = 11 (hf.py too)
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
    fusion_dropout: float = 0.1
    # Prompts (section 3.2): pools of pool_size vectors, top-k selection.
    prompt_mode: str = "pool"  # "pool" (Eq. 3-4), "pool_frozen" (the official code: pools never
    #   learn), "static" (k fixed learnable prompts) or "none"
    pool_size: int = 2048  # entries per modality pool (the official default; paper Table 4: 1024 best)
    k_visual: int = 49  # visual prompts standing in for a missing image
    k_textual: int = 32  # textual prompts standing in for a missing text
    # Heads.
    tie_mlm_decoder: bool = False  # tie the MLM decoder to the word embeddings (needs Dt == H);
    #   the official decoder is a matrix of its own
    embed_dim: int = 768  # E, ITC embedding width
    itc_bias: bool = False  # a bias in the ITC projections (the official ones have none)
    temperature: float = 0.1  # ITC temperature tau; logit scale = 1 / tau
    learnable_temperature: bool = False  # learn log(1/tau), clamped to a scale <= 100
    # Departures from the paper for training from scratch (the tiny recipe; docs/NOTES.md sections
    # 1, 4). The defaults are the paper's choices, so that `base` departs from nothing.
    vision_stem: str = "patch"  # "patch": one patch_size conv (CLIP); "conv": log2(patch_size)
    #   stride-2 3x3 conv + BatchNorm + ReLU layers and a 1x1 conv (Xiao et al. 2021)
    pooling: str = "cls"  # what each stream's pooler reads: "cls" token 0 (METER), "mean" all tokens
    itc_batch_norm: bool = False  # batch-normalise the ITC embeddings over the global batch

    FROM_SCRATCH = ("vision_stem", "pooling", "itc_batch_norm")  # the departures, in field order

    def __post_init__(self):
        problems = self.problems()
        if problems:
            raise ConfigError("invalid Config:\n  " + "\n  ".join(problems))

    def problems(self) -> list[str]:
        """Every inconsistency between fields, as readable sentences (empty when valid)."""
        out = []
        if self.vision_stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            out.append(f"vision_stem='conv' needs patch_size a power of two >= 2 (one stride-2 "
                       f"layer per halving), got {self.patch_size}")
        for name in ("vision_layers", "text_layers", "fusion_layers"):
            if getattr(self, name) < 1:
                out.append(f"{name}={getattr(self, name)} must be at least 1 (a CLIP folder of n "
                           "blocks gives n - 1, as the official code builds it)")
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
                              ("prompt_mode", PROMPT_MODES),
                              ("vision_stem", ("patch", "conv")),
                              ("pooling", ("cls", "mean"))):
            if getattr(self, name) not in allowed:
                out.append(f"{name}={getattr(self, name)!r} must be one of {allowed}")
        if self.prompt_mode in ("pool", "pool_frozen"):
            if self.vision_width != self.text_width:
                out.append(f"prompt_mode='pool' needs vision_width == text_width (got "
                           f"{self.vision_width} and {self.text_width}): the text query selects "
                           "from the visual pool, and the image query from the textual pool, "
                           "by raw dot product (Eq. 3); use prompt_mode='static' otherwise")
            if max(self.k_visual, self.k_textual) > self.pool_size:
                out.append(f"k_visual={self.k_visual} and k_textual={self.k_textual} must not "
                           f"exceed pool_size={self.pool_size}")
        if self.prompt_mode != "none" and min(self.k_visual, self.k_textual) <= 0:
            out.append("k_visual and k_textual must be positive (prompt_mode='none' uses none)")
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


# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def key_padding_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """mask [B, L] (1 = real) -> bool [B, 1, 1, L] for SDPA (True = attend); None stays None.

    Always a mask, never a check whether every token is real: such a check would read a value
    back from the device (a sync), and the shapes and kernels of a step would depend on the data.
    """
    return None if mask is None else mask.bool()[:, None, None, :]  # [B, 1, 1, L]


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
        H, p, eps = cfg.hidden_size, cfg.fusion_dropout, cfg.text_ln_eps  # official: the text eps
        self.self_attn = SelfAttention(H, cfg.fusion_heads, p)
        self.ln1 = nn.LayerNorm(H, eps=eps)
        self.cross_attn = CrossAttention(H, cfg.fusion_heads, p)
        self.ln2 = nn.LayerNorm(H, eps=eps)
        self.fc1 = nn.Linear(H, cfg.fusion_mlp)
        self.fc2 = nn.Linear(cfg.fusion_mlp, H)
        self.ln3 = nn.LayerNorm(H, eps=eps)
        self.drop = nn.Dropout(p)

    def forward(self, x, x_mask, other, other_mask, rows=None):
        """x [B, Lx, H], other [B, Lo, H]; masks bool [B, 1, 1, L] or None -> [B, Lx, H].
        rows [B, P]: after the self-attention (which reads every position) only these rows of x
        go on -> [B, P, H] (the MLM pass needs no other)."""
        x = self.ln1(x + self.drop(self.self_attn(x, x_mask)))
        if rows is not None:
            x = gather_rows(x, rows)                                        # [B, P, H]
        x = self.ln2(x + self.drop(self.cross_attn(x, other, other_mask)))
        return self.ln3(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


def gather_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, L, H] at rows [B, P] -> [B, P, H] (a fixed-shape gather: no boolean mask, no host sync)."""
    return x.gather(1, rows.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


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


def conv_stem(width: int, patch_size: int) -> nn.Sequential:
    """Early convolutions (Xiao et al. 2021, "Early Convolutions Help Transformers See Better"):
    log2(patch_size) stride-2 3x3 conv + BatchNorm + ReLU layers (16, 32, 64, ... channels, at
    most `width`), then a 1x1 conv to `width`: pixels [B, 3, S, S] -> [B, width, S/p, S/p], the
    same grid as a patch_size patchify, better conditioned when trained from scratch."""
    layers, channels = [], 3
    for i in range(int(math.log2(patch_size))):
        out = min(width, 16 * 2 ** i)
        layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out),
                   nn.ReLU(inplace=True)]
        channels = out
    return nn.Sequential(*layers, nn.Conv2d(channels, width, 1))


class VisionEncoder(nn.Module):
    """CLIP ViT (section 4): patch conv (no bias), class token, learned positions, ln_pre,
    pre-LN blocks with QuickGELU, ln_post on all tokens. CLIP's output projection is not used.
    With Config.vision_stem "conv" the patch conv is a stack of early convolutions (conv_stem)."""

    def __init__(self, cfg: Config):
        super().__init__()
        D, grid = cfg.vision_width, cfg.image_size // cfg.patch_size
        self.image_size = cfg.image_size
        self.patch_embed = (conv_stem(D, cfg.patch_size) if cfg.vision_stem == "conv" else
                            nn.Conv2d(3, D, cfg.patch_size, stride=cfg.patch_size, bias=False))
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
        for m in self.patch_embed.modules():  # a conv stem: PyTorch's (Kaiming) init for convolutions
            if isinstance(m, nn.Conv2d) and isinstance(self.patch_embed, nn.Sequential):
                m.reset_parameters()
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

    def forward(self, pixel_values) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [B, 3, S, S] -> (states [B, 1 + N, Dv], image query [B, Dv])."""
        tokens, query = self.embed(pixel_values)
        return self.run_blocks(tokens), query

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

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> position ids [B, L]; RoBERTa counts the tokens that are not pad_token_id
        (as the official code does), and pads keep pad_token_id."""
        B, L = input_ids.shape
        rows = self.position_embeddings.num_embeddings
        if L + self.position_offset > rows:  # a shape check: no device sync
            raise ValueError(f"encode_text: texts of {L} tokens need {L + self.position_offset} "
                             f"position rows, the table has {rows} (Config.max_positions)")
        if self.roberta_positions:
            real = input_ids.ne(self.pad_token_id).long()
            return real.cumsum(dim=1) * real + self.pad_token_id  # [B, L]; pads keep pad id
        return torch.arange(L, device=input_ids.device).expand(B, L)  # [B, L]

    def embed(self, words: torch.Tensor, position_ids: torch.Tensor, token_type_ids=None) -> torch.Tensor:
        """Word vectors [B, L, Dt], position ids [B, L] -> LayerNorm(words + positions + types)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(position_ids)
        x = words + self.position_embeddings(position_ids)
        return self.ln_embed(x + self.token_type_embeddings(token_type_ids))

    def run_layers(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Embedded tokens [B, L, Dt] (after dropout), mask [B, L] -> states [B, L, Dt]. Pads are
        keys no token attends to; their own states are computed and read by nothing."""
        key_mask = key_padding_mask(mask)  # [B, 1, 1, L]
        for layer in self.layers:
            x = layer(x, key_mask)
        return x

    @staticmethod
    def query(embedded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The text query (section 3.2), as the official code takes it: the mean of the embedding
        outputs over the real tokens after <s>, sum / (count + 1e-8): [B, L, Dt] -> [B, Dt]."""
        weight = mask[:, 1:].to(embedded.dtype).unsqueeze(-1)  # [B, L - 1, 1]
        return (embedded[:, 1:] * weight).sum(1) / (weight.sum(1) + 1e-8)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, L], mask [B, L] -> (states [B, L, Dt], text query [B, Dt]).

        The query is taken before dropout, so that selection does not depend on the dropout draw
        (the official code takes it after; the two agree in eval mode).
        """
        words = self.word_embeddings(input_ids)
        embedded = self.embed(words, self.position_ids(input_ids), token_type_ids)
        return self.run_layers(self.drop(embedded), attention_mask), self.query(embedded, attention_mask)

    def special_token(self, token_id: int, batch: int) -> torch.Tensor:
        """One special token embedded alone, as the official code embeds <s> and </s> around the
        prompts: LayerNorm(word + position of a first token + type 0), dropout -> [B, 1, Dt]."""
        words = self.word_embeddings.weight[token_id].expand(batch, 1, -1)  # [B, 1, Dt]
        first = torch.full((batch, 1), self.position_offset, device=words.device)
        return self.drop(self.embed(words, first))

    def encode_prompts(self, prompts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Textual prompts [B, k, Dt] -> (states [B, k + 2, Dt], mask [B, k + 2]) of the sequence
        [<s>, prompts, </s>]; with k = 0 (no prompts) the sequence is <s> alone: [B, 1, Dt].

        As in the official code, <s> and </s> are each embedded alone (`special_token`) and the
        prompts go in raw: no position, type, LayerNorm or dropout. Every token is real.
        """
        B, k, _ = prompts.shape
        tokens = [self.special_token(self.bos_token_id, B)]
        if k:
            tokens += [prompts, self.special_token(self.eos_token_id, B)]
        x = torch.cat(tokens, dim=1)  # [B, L, Dt]
        mask = torch.ones(B, x.shape[1], dtype=torch.long, device=prompts.device)  # [B, L]
        return self.run_layers(x, mask), mask


# ---------------------------------------------------------------------------------------------
# Fusion and heads
# ---------------------------------------------------------------------------------------------


class Fusion(nn.Module):
    """METER co-attention fusion (section 4): projections + modality types, parallel cross
    layers per stream, poolers (token 0 -> Linear -> tanh; with Config.pooling "mean", the mean
    over the stream's real tokens), joint = [text pooled, image pooled]."""

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
        self.pooling = cfg.pooling

    def pool(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """What a pooler reads from a fused stream x [B, L, H]: token 0, or the mean over the real
        tokens (mask [B, L], None: all real) -> [B, H]."""
        if self.pooling == "cls":
            return x[:, 0]
        return x.mean(dim=1) if mask is None else masked_mean(x, mask)

    def forward(self, text_states, text_mask, image_states, text_rows=None):
        """text [B, Lt, Dt], text_mask [B, Lt], image [B, Li, Dv]
        -> (text [B, Lt, H], image [B, Li, H], joint [B, 2H]). Both streams update in parallel,
        each attending to the other's input to the layer. text_rows [B, P]: only the fused text
        at those rows -> (text [B, P, H], None, None): the last layer keeps those rows after its
        self-attention and skips the image stream, and the poolers do not run."""
        key_mask = key_padding_mask(text_mask)                               # [B, 1, 1, Lt]
        t = self.text_proj(text_states) + self.modality_type.weight[0]       # [B, Lt, H]
        v = self.image_proj(image_states) + self.modality_type.weight[1]     # [B, Li, H]
        for i, (text_layer, image_layer) in enumerate(zip(self.text_layers, self.image_layers)):
            if text_rows is not None and i == len(self.text_layers) - 1:
                return text_layer(t, key_mask, v, None, rows=text_rows), None, None
            t, v = text_layer(t, key_mask, v, None), image_layer(v, None, t, key_mask)
        pooled_text = torch.tanh(self.text_pooler(self.pool(t, text_mask)))  # [B, H]
        pooled_image = torch.tanh(self.image_pooler(self.pool(v, None)))  # [B, H]
        return t, v, torch.cat([pooled_text, pooled_image], dim=-1)  # joint [B, 2H]


class MLMHead(nn.Module):
    """Masked language modelling head (MLM, Eq. 5-6): dense, GELU, LayerNorm, decoder to the vocabulary."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.text_ln_eps)  # official: the text eps
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


class ITCProjection(nn.Module):
    """Contrastive projection of a joint feature (ITC, Eq. 9-10): LayerNorm, Linear (without a bias
    unless `bias`, as in the official code), L2-normalise; with `batch_norm`, a GlobalBatchNorm
    before the L2-normalisation."""

    def __init__(self, in_dim: int, embed_dim: int, batch_norm: bool = False, bias: bool = False):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, embed_dim, bias=bias)
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
        bert_init(self)

    def forward(self, x):
        """x [B, in_dim] -> logits [B, n_out]."""
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


def bert_init(root: nn.Module) -> None:
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
class Encoded:
    """One modality ready for fusion: the output of its uni-modal encoder, or of prompts (Eq. 3-4)
    run through that encoder."""

    states: torch.Tensor  # [B, L, D] encoder output
    mask: torch.Tensor | None  # [B, L] 1 = real token (texts); None: every token is real
    query: torch.Tensor | None  # [B, D] selects the OTHER modality's prompts when it is missing
    prompt_indices: torch.Tensor | None = None  # [B, k] pool rows, when these states are prompts

    def rows(self, index: torch.Tensor) -> "Encoded":
        """The rows `index` [B'] of the batch (repeats allowed). index_select, not advanced
        indexing: its backward adds repeated rows in index order, where advanced indexing
        accumulates them with parallel atomic adds on the CPU (last bits then vary run to run)."""
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return Encoded(pick(self.states), pick(self.mask), pick(self.query), pick(self.prompt_indices))


@dataclass
class FusionOutput:
    """What one fusion pass returns (text mask: 1 = real token; indices None when not prompted)."""

    text: torch.Tensor  # [B, Lt, H] fused text stream (Lt = k_textual + 2 when prompted, 1 if k = 0;
                        # [B, P, H] at text_rows)
    image: torch.Tensor | None  # [B, Li, H] fused image stream (Li = 1 + k_visual when prompted)
    text_mask: torch.Tensor  # [B, Lt]
    joint: torch.Tensor | None  # [B, 2H] concat(text pooled, image pooled); None at text_rows
    text_prompt_indices: torch.Tensor | None  # [B, k_textual] textual-pool rows used
    image_prompt_indices: torch.Tensor | None  # [B, k_visual] visual-pool rows used


class PTUnifier(nn.Module):
    """PTUnifier (sections 3-4): encode_image / encode_text -> select prompts -> fuse -> heads."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        H2 = 2 * cfg.hidden_size
        self.vision = VisionEncoder(cfg)
        self.text = TextEncoder(cfg)
        self.fusion = Fusion(cfg)
        self.mlm_head = MLMHead(cfg)
        self.itm_head = nn.Linear(H2, 2)
        self.itc_image = ITCProjection(H2, cfg.embed_dim, cfg.itc_batch_norm, cfg.itc_bias)
        self.itc_text = ITCProjection(H2, cfg.embed_dim, cfg.itc_batch_norm, cfg.itc_bias)
        bert_init(self)
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

    # -- 1. encode (section 3.1) -------------------------------------------------------------

    def encode_image(self, pixel_values) -> Encoded:
        """pixels [B, 3, S, S] -> states [B, 1 + N, Dv] and the image query [B, Dv]."""
        states, query = self.vision(pixel_values)
        return Encoded(states, None, query)

    def encode_text(self, input_ids, attention_mask, token_type_ids=None) -> Encoded:
        """ids [B, L], mask [B, L] (1 = real) -> states [B, L, Dt] and the text query [B, Dt]."""
        states, query = self.text(input_ids, attention_mask, token_type_ids)
        return Encoded(states, attention_mask, query)

    # -- 2. select prompts for a missing modality (section 3.2, Eq. 3-4) ----------------------

    def prompt_image(self, text_query) -> Encoded:
        """A missing image: text query [B, Dt] -> visual prompts [B, k_v, Dv] (Eq. 3-4) run through
        the ViT as [CLS, prompts] -> states [B, 1 + k_v, Dv]."""
        prompts, indices = self.visual_prompts.select(text_query)
        return Encoded(self.vision.encode_prompts(prompts), None, None, indices)

    def prompt_text(self, image_query) -> Encoded:
        """A missing text: image query [B, Dv] -> textual prompts [B, k_t, Dt] (Eq. 3-4) run through
        the text encoder as [<s>, prompts, </s>] -> states [B, k_t + 2, Dt] (all real)."""
        prompts, indices = self.textual_prompts.select(image_query)
        states, mask = self.text.encode_prompts(prompts)
        return Encoded(states, mask, None, indices)

    # -- 3. fuse (section 4) -------------------------------------------------------------------

    def fuse(self, text: Encoded, image: Encoded, text_rows=None) -> FusionOutput:
        """Co-attention over both streams -> fused text [B, Lt, H], image [B, Li, H], joint [B, 2H];
        with text_rows [B, P], the fused text at those rows only [B, P, H] (Fusion.forward)."""
        t, v, joint = self.fusion(text.states, text.mask, image.states, text_rows)
        return FusionOutput(t, v, text.mask, joint, text.prompt_indices, image.prompt_indices)

    def fuse_encoded(self, image: Encoded | None = None, text: Encoded | None = None,
                     text_rows=None) -> FusionOutput:
        """One fusion pass over encoded inputs; the missing modality (at most one) is prompted."""
        if image is None and text is None:
            raise ValueError("PTUnifier: a fusion pass needs an image or a text")
        if image is None:
            image = self.prompt_image(text.query)
        if text is None:
            text = self.prompt_text(image.query)
        return self.fuse(text, image, text_rows)

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None) -> FusionOutput:
        """One fusion pass over an image [B, 3, S, S], a text (ids [B, L], mask [B, L]; no mask
        means every token is real), or a pair: encode what is given, prompt what is not, fuse.
        The heads (mlm_head, itm_head, itc_image / itc_text) read the returned streams."""
        image = None if pixel_values is None else self.encode_image(pixel_values)
        text = None
        if input_ids is not None:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            text = self.encode_text(input_ids, mask)
        return self.fuse_encoded(image, text)

    # -- 4. heads and optimisation -------------------------------------------------------------

    def logit_scale(self) -> torch.Tensor:
        """ITC logit scale 1 / tau as a scalar tensor (learnable: exp(log scale) clamped <= 100)."""
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    def param_groups(self, encoder_lr=1e-5, other_lr=5e-5, weight_decay=0.01,
                     temperature_lr=None) -> list[dict]:
        """AdamW groups (section 5.3): encoders (ViT + text) at encoder_lr, the rest (fusion,
        projections, pools, heads) at other_lr. With `temperature_lr` (not 0 or None), a learnable
        temperature gets a group of its own at that rate."""
        encoders = {id(p) for p in nn.ModuleList([self.vision, self.text]).parameters()}
        own = bool(temperature_lr) and self.config.learnable_temperature

        def part(p: nn.Parameter) -> tuple[str, float]:
            if own and p is self.log_scale:
                return "temperature", temperature_lr
            return ("encoder", encoder_lr) if id(p) in encoders else ("other", other_lr)
        return param_groups(self, part, weight_decay)


def param_groups(module: nn.Module, part_of, weight_decay: float) -> list[dict]:
    """AdamW groups {part} x {decay, no decay} of the trainable parameters of `module`:
    part_of(p) -> (part name, learning rate); no decay as in `split_decay`. Decayed groups come
    first, each kind in the order the parts first appear; empty groups are left out."""
    decay, free = split_decay(module)
    rates = {}
    for p in decay + free:
        name, lr = part_of(p)
        rates.setdefault(name, lr)
    groups = []
    for kind, params, wd in (("decay", decay, weight_decay), ("no_decay", free, 0.0)):
        for name, lr in rates.items():
            chosen = [p for p in params if part_of(p)[0] == name]
            if chosen:
                groups.append({"name": f"{name}_{kind}", "params": chosen, "lr": lr,
                               "weight_decay": wd})
    return groups
