"""Generation decoder (model.py "Generation decoder" section; paper section 5.2, TS and ITG):
shapes, causality, memory padding, the key/value cache against the uncached pass, initialisation
from the text encoder (tensor by tensor, and as a function), generation_memory, greedy decoding
against a hand-rolled argmax loop, end-token and max_len stopping, and beam search on scripted
distributions whose answers are computed by hand."""

import dataclasses

import pytest
import torch
from torch import nn

from generation import TextDecoder, ban_repeats, beam_search, generate, generation_memory, greedy_search
from model import PTUnifier
from recipes import RECIPES

BOS, EOS = 0, 2


def small_config(**overrides):
    """A decoder-sized config: Dt = H = 32 (tied heads), 2 text layers, vocab 60."""
    fields = dict(image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=4,
                  vision_mlp=64, vocab_size=60, text_width=32, text_layers=2, text_heads=4,
                  text_mlp=64, max_positions=40, max_text_len=20, hidden_size=32,
                  fusion_layers=1, fusion_heads=4, fusion_mlp=64, pool_size=16, k_visual=4,
                  k_textual=4, embed_dim=32, tie_mlm_decoder=True)
    fields.update(overrides)
    return dataclasses.replace(RECIPES["tiny"].model, **fields)


def random_decoder(seed=0, **overrides) -> TextDecoder:
    torch.manual_seed(seed)
    return TextDecoder(small_config(**overrides)).eval()


def padded_memory(B=3, M=7, H=32, seed=1):
    """memory [B, M, H] and a mask whose example b has M - 2b real rows."""
    g = torch.Generator().manual_seed(seed)
    memory = torch.randn(B, M, H, generator=g)
    mask = torch.ones(B, M, dtype=torch.long)
    for b in range(B):
        mask[b, M - 2 * b:] = 0
    return memory, mask


# -- the network --------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden", [32, 48], ids=["H=Dt", "H!=Dt"])
def test_shapes_and_memory_projection(hidden):
    decoder = random_decoder(hidden_size=hidden, tie_mlm_decoder=hidden == 32)
    memory, mask = padded_memory(H=hidden)
    ids = torch.randint(0, 60, (3, 9))
    assert decoder(ids, memory, mask).shape == (3, 9, 60)
    proj = decoder.memory_proj
    assert isinstance(proj, nn.Identity) if hidden == 32 else proj.weight.shape == (32, hidden)
    assert decoder.lm_head.decoder.weight is decoder.word_embeddings.weight


def test_causal_later_tokens_do_not_change_earlier_logits():
    decoder = random_decoder()
    memory, mask = padded_memory()
    ids = torch.randint(3, 60, (3, 10))
    changed = ids.clone()
    changed[:, 6] = (ids[:, 6] + 1) % 60
    a, b = decoder(ids, memory, mask), decoder(changed, memory, mask)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:], atol=1e-3)


def test_padded_memory_rows_do_not_change_logits():
    decoder = random_decoder()
    memory, mask = padded_memory()
    ids = torch.randint(3, 60, (3, 8))
    other = torch.where(mask.bool()[..., None], memory, torch.randn_like(memory) * 10)
    assert torch.allclose(decoder(ids, memory, mask), decoder(ids, other, mask), atol=1e-6)
    real_changed = memory.clone()
    real_changed[:, 0] += 1.0
    assert not torch.allclose(decoder(ids, memory, mask), decoder(ids, real_changed, mask),
                              atol=1e-3)


def test_incremental_cache_equals_uncached_forward():
    decoder = random_decoder()
    memory, mask = padded_memory()
    ids = torch.randint(3, 60, (3, 9))
    full = decoder(ids, memory, mask)
    cache = decoder.start(memory, mask)
    pieces = [decoder.step(ids[:, :4], cache)]  # a chunk, then one token at a time
    pieces += [decoder.step(ids[:, t:t + 1], cache) for t in range(4, 9)]
    assert cache.length == 9
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)
    # Reordering rows (as beam search does within a group) follows the rows' own histories.
    cache = decoder.start(memory[[0, 0]], mask[[0, 0]])  # two beams of example 0
    decoder.step(ids[:2, :4], cache)
    cache.reorder_beams(torch.tensor([1, 0]))
    last = decoder.step(ids[[1, 0], 4:5], cache)[:, -1]
    for row, source in enumerate((1, 0)):
        alone = decoder(ids[source:source + 1, :5], memory[:1], mask[:1])[0, -1]
        assert torch.allclose(last[row], alone, atol=1e-5)


def test_position_table_limit_is_named():
    decoder = random_decoder()  # 40 rows, RoBERTa offset 2: 38 tokens at most
    memory, mask = padded_memory()
    assert decoder.max_length == 38
    decoder(torch.zeros(3, 38, dtype=torch.long), memory, mask)
    with pytest.raises(ValueError, match="Config.max_positions"):
        decoder(torch.zeros(3, 39, dtype=torch.long), memory, mask)
    with pytest.raises(ValueError, match="max_len=39"):
        generate(decoder, memory, mask, BOS, EOS, max_len=39)


# -- initialisation from the pre-trained text encoder ------------------------------------------


def copied_sources(model: PTUnifier) -> dict[str, torch.Tensor]:
    """Decoder key -> the encoder tensor it must equal (written out independently of model.py)."""
    text = model.text.state_dict()
    out = {k: v for k, v in text.items() if not k.startswith("layers.")}
    for key, value in text.items():
        if key.startswith("layers."):
            out[key] = value  # attn, ln1, fc1, fc2, ln2 keep their names in DecoderLayer
    if model.config.hidden_size == model.config.text_width:
        for part in ("dense.weight", "dense.bias", "norm.weight", "norm.bias", "decoder.bias"):
            out[f"lm_head.{part}"] = model.mlm_head.state_dict()[part]
        out["lm_head.decoder.weight"] = text["word_embeddings.weight"]
    else:
        out["lm_head.decoder.weight"] = text["word_embeddings.weight"]  # by tying only
    return out


@pytest.mark.parametrize("hidden", [32, 48], ids=["H=Dt", "H!=Dt"])
def test_from_encoder_copies_exactly_the_stated_weights(hidden):
    cfg = small_config(hidden_size=hidden, tie_mlm_decoder=hidden == 32, text_dropout=0.0)
    torch.manual_seed(0)
    model = PTUnifier(cfg)
    with torch.no_grad():  # make every encoder tensor distinct from any fresh init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    torch.manual_seed(123)
    fresh = TextDecoder(cfg)
    torch.manual_seed(123)  # from_encoder builds its decoder first: same draws as `fresh`
    decoder = TextDecoder.from_encoder(model)
    sources = copied_sources(model)
    mine, new = decoder.state_dict(), fresh.state_dict()
    for key, value in mine.items():
        if key in sources:
            assert torch.equal(value, sources[key]), key
            if key != "lm_head.decoder.weight":
                assert value.data_ptr() != sources[key].data_ptr(), f"{key} is shared, not copied"
        else:
            assert ".cross_attn." in key or ".ln_cross." in key or key.startswith(
                ("memory_proj.", "lm_head.")), f"{key} is neither copied nor documented as new"
            assert torch.equal(value, new[key]), f"{key} is not freshly initialised"
    new_keys = set(mine) - set(sources)
    assert any(".cross_attn." in k for k in new_keys) and any(".ln_cross." in k for k in new_keys)
    assert any(k.startswith("memory_proj.") for k in new_keys) == (hidden != 32)
    assert any(k.startswith("lm_head.") for k in new_keys) == (hidden != 32)


def test_from_encoder_without_cross_attention_is_the_causal_text_encoder():
    """With the new cross-attention output zeroed, the copied decoder computes the text encoder
    under a causal mask followed by the MLM head (up to ln_cross acting on normalised input)."""
    cfg = small_config(text_dropout=0.0, fusion_dropout=0.0)
    torch.manual_seed(0)
    model = PTUnifier(cfg).eval()
    decoder = TextDecoder.from_encoder(model).eval()
    with torch.no_grad():
        for layer in decoder.layers:
            layer.cross_attn.out.weight.zero_()
            layer.cross_attn.out.bias.zero_()
    ids = torch.randint(3, 60, (2, 9))
    memory, mask = padded_memory(B=2)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    x = model.text.embed(model.text.word_embeddings(ids), model.text.position_ids(ids))
    for layer in model.text.layers:
        x = layer(x, causal)
    expected = model.mlm_head(x)
    assert torch.allclose(decoder(ids, memory, mask), expected, atol=2e-4)


def test_generation_memory_concatenates_text_then_image():
    torch.manual_seed(0)
    model = PTUnifier(small_config()).eval()
    ids = torch.randint(5, 60, (2, 6))
    text_mask = torch.ones_like(ids)
    text_mask[1, 4:] = 0
    out = model(pixel_values=torch.randn(2, 3, 16, 16), input_ids=ids, attention_mask=text_mask)
    memory, mask = generation_memory(out)
    Li = out.image.shape[1]
    assert memory.shape == (2, 6 + Li, 32) and mask.shape == (2, 6 + Li)
    assert torch.equal(memory[:, :6], out.text) and torch.equal(memory[:, 6:], out.image)
    assert mask.tolist() == [[1] * (6 + Li), [1, 1, 1, 1, 0, 0] + [1] * Li]


# -- greedy decoding ----------------------------------------------------------------------------


def hand_rolled_greedy(decoder, memory, mask, max_len):
    """Per example, unpadded memory, full forward() over the whole prefix at every step."""
    out = []
    for b in range(memory.shape[0]):
        real = mask[b].bool()
        prefix = [BOS]
        for _ in range(max_len):
            logits = decoder(torch.tensor([prefix]), memory[b:b + 1, real], mask[b:b + 1, real])
            token = int(logits[0, -1].argmax())
            if token == EOS:
                break
            prefix.append(token)
        out.append(prefix[1:])
    return out


def eos_prone_decoder(seed=0) -> TextDecoder:
    """A random decoder made decisive: peaked logits (word embeddings x 20), memory that matters
    (cross-attention x 5) and an end token that competes (bias 2), so lengths vary by example."""
    decoder = random_decoder(seed)
    with torch.no_grad():
        decoder.word_embeddings.weight.mul_(20.0)
        for layer in decoder.layers:
            for p in layer.cross_attn.parameters():
                p.mul_(5.0)
        decoder.lm_head.decoder.bias[EOS] = 2.0
    return decoder


def test_greedy_is_deterministic_and_equals_an_argmax_loop_over_forward():
    decoder = eos_prone_decoder()
    memory, mask = padded_memory(B=4, M=9)
    first = generate(decoder, memory, mask, BOS, EOS, max_len=12)
    assert first == generate(decoder, memory, mask, BOS, EOS, max_len=12)
    assert first == hand_rolled_greedy(decoder, memory, mask, max_len=12)
    assert len({len(seq) for seq in first}) > 1  # some examples stop early, some do not


def test_generation_stops_at_the_end_token_and_respects_max_len():
    decoder = random_decoder()
    memory, mask = padded_memory()
    with torch.no_grad():
        decoder.lm_head.decoder.bias[EOS] = 100.0
    for beams in (1, 3):
        assert generate(decoder, memory, mask, BOS, EOS, max_len=10, beams=beams) == [[]] * 3
    with torch.no_grad():
        decoder.lm_head.decoder.bias[EOS] = 0.0
        decoder.lm_head.decoder.bias[7] = 100.0
    for beams in (1, 3):
        assert generate(decoder, memory, mask, BOS, EOS, max_len=5, beams=beams) == [[7] * 5] * 3


@pytest.mark.parametrize("n, banned", [(3, [7]), (2, [7]), (1, [5, 6, 7]), (4, [])])
def test_ban_repeats_forbids_exactly_the_tokens_that_repeat_an_ngram(n, banned):
    """History 5 6 7 5 6: a 3-gram ending the history must not repeat (5 6 7 is taken: 7 banned);
    2-grams after 6: (6 7) taken; 1-grams: every generated token; 4-grams after 7 5 6: none."""
    logits = ban_repeats(torch.zeros(2, 9), [[5, 6, 7, 5, 6], []], n)
    assert torch.isinf(logits[0]).nonzero().flatten().tolist() == banned
    assert not torch.isinf(logits[1]).any()  # an empty history bans nothing


def n_grams(seq, n):
    return [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]


@pytest.mark.parametrize("beams", [1, 3])
def test_no_repeat_ngram_generation_never_repeats_an_ngram(beams):
    """A decoder that wants token 7 forever: blocked, it still generates max_len tokens, and no
    bigram occurs twice (unblocked it repeats 7 7)."""
    decoder = random_decoder()
    memory, mask = padded_memory()
    with torch.no_grad():
        decoder.lm_head.decoder.bias[7] = 20.0
        decoder.lm_head.decoder.bias[EOS] = -100.0
    plain = generate(decoder, memory, mask, BOS, EOS, max_len=12, beams=beams)
    assert plain == [[7] * 12] * 3
    for seq in generate(decoder, memory, mask, BOS, EOS, max_len=12, beams=beams, no_repeat_ngram=2):
        assert len(seq) == 12 and len(set(n_grams(seq, 2))) == len(n_grams(seq, 2))


def test_generate_restores_training_mode():
    decoder = random_decoder().train()
    memory, mask = padded_memory()
    generate(decoder, memory, mask, BOS, EOS, max_len=3, beams=2)
    assert decoder.training


# -- scripted distributions ---------------------------------------------------------------------


class ScriptedCache:
    def __init__(self, examples):
        self.examples, self.prefixes = examples, [[] for _ in examples]

    def reorder_beams(self, rows):
        rows = rows.tolist()
        self.examples = [self.examples[r] for r in rows]
        self.prefixes = [self.prefixes[r] for r in rows]


class ScriptedDecoder(nn.Module):
    """Next-token probabilities from a table: scripts[example][prefix] = {token: prob}; the
    rest of the mass is shared equally by the other tokens; unknown prefixes are uniform. The
    example is memory[b, 0, 0]. Counts steps."""

    max_length = 100

    def __init__(self, scripts, vocab=8):
        super().__init__()
        self.scripts, self.vocab, self.steps = scripts, vocab, 0

    def start(self, memory, memory_mask):
        return ScriptedCache([int(e) for e in memory[:, 0, 0].tolist()])

    def step(self, input_ids, cache):
        self.steps += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        for row, ids in enumerate(input_ids.tolist()):
            cache.prefixes[row] = cache.prefixes[row] + ids
            table = self.scripts[cache.examples[row]].get(tuple(cache.prefixes[row][1:]), {})
            rest = (1.0 - sum(table.values())) / (self.vocab - len(table))
            probs = torch.tensor([table.get(v, rest) for v in range(self.vocab)])
            logits[row, -1] = probs.log()
        return logits


A, B_, C, D = 3, 4, 5, 6
# Greedy takes A (0.5) then ends: p([A]) = 0.5 * 0.4 = 0.20; beam search keeps B (0.4), which
# ends with 0.9: p([B]) = 0.36 (log -1.02 > log 0.20 = -1.61; per token -0.51 > -0.80).
BEAM_BEATS_GREEDY = {(): {A: 0.5, B_: 0.4, EOS: 0.1}, (A,): {EOS: 0.4, C: 0.3, D: 0.3},
                     (B_,): {EOS: 0.9}}
# Ending at once: p([]) = 0.3, n = 1. The long path: p([A, B, C]) = 0.25 * 0.9^3 = 0.18225, n = 4.
# length_penalty 0: log 0.3 = -1.204 > log 0.18225 = -1.702, so [] wins;
# length_penalty 1: -1.204 / 1 < -1.702 / 4 = -0.426, so [A, B, C] wins.
LENGTH_MATTERS = {(): {EOS: 0.3, A: 0.25}, (A,): {B_: 0.9}, (A, B_): {C: 0.9},
                  (A, B_, C): {EOS: 0.9}}


def run_scripted(scripts, examples, beams, length_penalty=1.0, max_len=6):
    decoder = ScriptedDecoder(scripts)
    memory = torch.tensor(examples, dtype=torch.float)[:, None, None].expand(-1, 2, 4)
    mask = torch.ones(len(examples), 2, dtype=torch.long)
    return generate(decoder, memory, mask, BOS, EOS, max_len, beams, length_penalty), decoder


def test_scripted_greedy_stops_at_end_token_and_max_len():
    script = [{(): {A: 0.9}, (A,): {B_: 0.9}, (A, B_): {C: 0.9}, (A, B_, C): {EOS: 0.9}}]
    out, decoder = run_scripted(script, [0], beams=1, max_len=10)
    assert out == [[A, B_, C]] and decoder.steps == 4  # no step after the end token
    out, decoder = run_scripted(script, [0], beams=1, max_len=2)
    assert out == [[A, B_]] and decoder.steps == 2


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_beam_search_finds_the_more_probable_sequence(length_penalty):
    assert run_scripted([BEAM_BEATS_GREEDY], [0], beams=1)[0] == [[A]]
    out, _ = run_scripted([BEAM_BEATS_GREEDY], [0], beams=2, length_penalty=length_penalty)
    assert out == [[B_]]


def test_length_penalty_changes_the_choice():
    assert run_scripted([LENGTH_MATTERS], [0], beams=2, length_penalty=0.0)[0] == [[]]
    assert run_scripted([LENGTH_MATTERS], [0], beams=2, length_penalty=1.0)[0] == [[A, B_, C]]


def test_beam_search_stops_once_no_live_hypothesis_can_win():
    # length_penalty 0, step 2: finished [B] (log 0.36) and [A] (log 0.20); the best live, A C
    # (log 0.15), can only lose probability, so the search ends after 2 of 6 steps.
    _, decoder = run_scripted([BEAM_BEATS_GREEDY], [0], beams=2, length_penalty=0.0)
    assert decoder.steps == 2
    # length_penalty 1: a live sum s could still reach s / 6 > -0.51, so the search runs on.
    _, decoder = run_scripted([BEAM_BEATS_GREEDY], [0], beams=2, length_penalty=1.0)
    assert decoder.steps > 2


def test_beam_search_does_not_stop_while_a_longer_hypothesis_can_still_win():
    # Step 2 finishes [A] and [B] (p 0.35, n 2: -0.525 each); the live A X has log 0.15 =
    # -1.897: judged at its next length (-1.897 / 3 = -0.632) it looks beaten, but at n = 9
    # [A, X, W x 6] + end scores (log 0.15 + 7 log 0.99) / 9 = -0.219 and wins (max_len 10).
    X, W = 5, 7
    script = {(): {A: 0.5, B_: 0.5}, (A,): {EOS: 0.7, X: 0.3}, (B_,): {EOS: 0.7, D: 0.3}}
    for k in range(6):
        script[(A, X) + (W,) * k] = {W: 0.99}
    script[(A, X) + (W,) * 6] = {EOS: 0.99}
    out, _ = run_scripted([script], [0], beams=2, length_penalty=1.0, max_len=10)
    assert out == [[A, X] + [W] * 6]


def test_scripted_one_beam_is_greedy():
    # An end token ranked second (0.3 < 0.4) is outside a 1-wide beam: greedy's [A, B]
    # (p 0.4 * 0.5 * 0.9 = 0.18 < 0.3) is what beam search with one beam must return too.
    script = {(): {A: 0.4, EOS: 0.3}, (A,): {B_: 0.5, EOS: 0.2}, (A, B_): {EOS: 0.9}}
    decoder = ScriptedDecoder([script])
    memory, mask = torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.long)
    beam = beam_search(decoder, memory, mask, BOS, EOS, 6, beams=1, length_penalty=0.0)
    assert beam == greedy_search(decoder, memory, mask, BOS, EOS, 6) == [[A, B_]]


def test_scripted_batch_equals_each_example_alone():
    scripts = [BEAM_BEATS_GREEDY, LENGTH_MATTERS]
    for beams, lp in ((2, 0.0), (2, 1.0), (3, 1.0)):
        batched = run_scripted(scripts, [0, 1, 0], beams, lp)[0]
        alone = [run_scripted(scripts, [e], beams, lp)[0][0] for e in (0, 1, 0)]
        assert batched == alone


# -- beam search on a real decoder --------------------------------------------------------------


def test_beam_search_with_one_beam_and_no_length_penalty_is_greedy():
    decoder = eos_prone_decoder(seed=3)
    memory, mask = padded_memory(B=4, M=9)
    with torch.no_grad():
        greedy = greedy_search(decoder, memory, mask, BOS, EOS, max_len=10)
        beam = beam_search(decoder, memory, mask, BOS, EOS, max_len=10, beams=1,
                           length_penalty=0.0)
    assert beam == greedy
    assert generate(decoder, memory, mask, BOS, EOS, max_len=10, beams=1) == greedy


def test_batched_beam_search_equals_per_example_beam_search():
    decoder = eos_prone_decoder(seed=1)
    memory, mask = padded_memory(B=4, M=9)
    for beams, lp in ((3, 1.0), (2, 0.0)):
        batched = generate(decoder, memory, mask, BOS, EOS, max_len=8, beams=beams,
                           length_penalty=lp)
        alone = []
        for b in range(4):
            real = mask[b].bool()
            alone += generate(decoder, memory[b:b + 1, real], mask[b:b + 1, real], BOS, EOS,
                              max_len=8, beams=beams, length_penalty=lp)
        assert batched == alone
        assert len({len(seq) for seq in batched}) > 1  # the end token matters in this case


def test_beam_search_score_is_at_least_greedy_score():
    """Invariant with length_penalty 0: the beam result is at least as probable as greedy's."""
    decoder = eos_prone_decoder(seed=2)
    memory, mask = padded_memory(B=4, M=9)

    def log_prob(seq, b):
        ids = torch.tensor([[BOS] + seq])
        target = torch.tensor(seq + ([EOS] if len(seq) < 8 else []))
        logits = decoder(ids[:, :len(target)], memory[b:b + 1], mask[b:b + 1])[0]
        return float(logits.log_softmax(-1).gather(1, target[:, None]).sum())

    greedy = generate(decoder, memory, mask, BOS, EOS, max_len=8)
    beam = generate(decoder, memory, mask, BOS, EOS, max_len=8, beams=4, length_penalty=0.0)
    with torch.no_grad():
        for b in range(4):
            assert log_prob(beam[b], b) >= log_prob(greedy[b], b) - 1e-5
        assert beam != greedy  # the search mattered somewhere
