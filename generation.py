"""Text generation for the downstream TS and ITG tasks (paper section 5.2): a Transformer decoder
initialised from the pre-trained text encoder, reading the fused streams, and greedy / beam search.

"A Transformer decoder initialised from the pre-trained text encoder except its cross-attention
layers; memory = the fused image and text streams." Each DecoderLayer is a TextLayer (same
parameter names, so the encoder's weights copy over one to one) plus a cross-attention block:
  causal self-attention -> residual + LN; cross-attention to memory -> residual + LN;
  FFN -> residual + LN.
One code path serves teacher forcing and incremental decoding: `step` runs T new tokens after P
cached ones; `forward` is `step` over the whole sequence with an empty cache.

Search (`generate`): greedy, or deterministic beam search (no sampling, unlike the official
code). A finished hypothesis of n generated tokens (its end token included, the start token
not; a hypothesis cut at max_len without an end token has n = max_len) scores
    sum of its token log-probabilities / n ** length_penalty.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import (Config, CrossAttention, FusionOutput, PTUnifier, TextLayer, attend, bert_init,
                   key_padding_mask)



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
        self.norm = nn.LayerNorm(D, eps=cfg.text_ln_eps)  # MLMHead's eps: it is copied from it
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
        bert_init(self)
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
