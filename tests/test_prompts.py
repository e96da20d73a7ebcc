"""Prompt pools (paper Eq. 3-4, section 3.2.1): selection against a brute-force sort, gradient
reach (exactly the selected rows), the static variant, and gradient flow through the model."""

import dataclasses

import pytest
import torch

from model import PTUnifier
from recipes import RECIPES
from prompts import PromptPool, StaticPrompts, build_prompts


def test_selection_matches_brute_force_sort():
    torch.manual_seed(0)
    pool = PromptPool(size=50, dim=16, k=7)
    query = torch.randn(5, 16)
    prompts, indices = pool.select(query)
    assert prompts.shape == (5, 7, 16) and indices.shape == (5, 7)
    for b in range(5):
        scores = [float(pool.weight.detach()[i] @ query[b]) for i in range(50)]  # w_i^T q, one at a time
        expected = sorted(range(50), key=lambda i: -scores[i])[:7]
        assert indices[b].tolist() == expected
        assert torch.equal(prompts[b], pool.weight.detach()[expected])


def test_gradient_reaches_exactly_the_selected_rows():
    torch.manual_seed(1)
    pool = PromptPool(size=40, dim=8, k=5)
    query = torch.randn(3, 8, requires_grad=True)
    prompts, indices = pool.select(query)
    (prompts * torch.randn_like(prompts)).sum().backward()
    selected = set(indices.flatten().tolist())
    nonzero = {i for i in range(40) if pool.weight.grad[i].abs().sum() > 0}
    assert nonzero == selected
    assert query.grad is None  # the hard top-k passes no gradient to the query


def test_static_prompts_ignore_the_query():
    torch.manual_seed(2)
    static = StaticPrompts(k=4, dim=8)
    a, ia = static.select(torch.randn(3, 8))
    b, ib = static.select(torch.randn(3, 8) * 100)
    assert torch.equal(a, b) and a.shape == (3, 4, 8)
    assert ia.tolist() == [[0, 1, 2, 3]] * 3 and torch.equal(ia, ib)
    assert torch.equal(a[1], static.weight.detach())


def test_pool_init_and_argument_checks():
    torch.manual_seed(3)
    pool = PromptPool(size=2048, dim=64, k=4)
    assert abs(pool.weight.std().item() - 0.02) < 0.001
    with pytest.raises(ValueError, match="k <= size"):
        PromptPool(size=4, dim=8, k=5)
    with pytest.raises(ValueError, match="one of"):
        build_prompts("dynamic", 8, 8, 2)
    assert isinstance(build_prompts("static", 8, 8, 2), StaticPrompts)


def test_text_only_pass_trains_exactly_the_selected_visual_rows():
    torch.manual_seed(4)
    model = PTUnifier(RECIPES["tiny"].model).eval()
    ids = torch.randint(5, 4096, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    out = model(input_ids=ids, attention_mask=mask)
    out.joint.pow(2).sum().backward()
    grad = model.visual_prompts.weight.grad
    nonzero = set(grad.abs().sum(dim=1).nonzero().flatten().tolist())
    assert nonzero == set(out.image_prompt_indices.flatten().tolist())
    assert model.textual_prompts.weight.grad is None  # the text was present: no textual prompts


def test_image_only_pass_trains_exactly_the_selected_textual_rows():
    torch.manual_seed(5)
    model = PTUnifier(RECIPES["tiny"].model).eval()
    out = model(pixel_values=torch.randn(2, 3, 64, 64))
    out.joint.sum().backward()
    grad = model.textual_prompts.weight.grad
    nonzero = set(grad.abs().sum(dim=1).nonzero().flatten().tolist())
    assert nonzero == set(out.text_prompt_indices.flatten().tolist())


def test_static_mode_in_the_model():
    torch.manual_seed(6)
    cfg = dataclasses.replace(RECIPES["tiny"].model, prompt_mode="static", text_width=64, text_heads=4,
                              tie_mlm_decoder=False)
    model = PTUnifier(cfg).eval()
    out = model(input_ids=torch.randint(5, 4096, (2, 6)))
    assert out.image.shape == (2, 1 + cfg.k_visual, cfg.hidden_size)
    assert out.image_prompt_indices.tolist() == [list(range(cfg.k_visual))] * 2


def test_no_prompts_leave_only_the_class_token_and_the_start_token():
    """prompt_mode "none" (Table 4's "without prompt pools"): a missing image is [CLS] alone, a
    missing text <s> alone (as in the official code); no prompt parameters, no indices."""
    torch.manual_seed(7)
    cfg = dataclasses.replace(RECIPES["tiny"].model, prompt_mode="none")
    model = PTUnifier(cfg).eval()
    assert not [n for n, _ in model.named_parameters() if "prompts" in n]
    text_only = model(input_ids=torch.randint(5, 4096, (2, 6)))
    image_only = model(pixel_values=torch.randn(2, 3, 64, 64))
    assert text_only.image.shape == (2, 1, cfg.hidden_size)
    assert image_only.text.shape == (2, 1, cfg.hidden_size) and image_only.text_mask.tolist() == [[1]] * 2
    assert text_only.image_prompt_indices.shape == (2, 0) and image_only.text_prompt_indices.shape == (2, 0)
    # the missing text is what the explicit one-token text <s> gives
    pixels = torch.randn(2, 3, 64, 64)
    start = torch.tensor([[cfg.bos_token_id]] * 2)
    torch.testing.assert_close(model(pixel_values=pixels).joint, model(pixel_values=pixels, input_ids=start).joint)


@pytest.mark.parametrize("mode", ["pool", "pool_frozen"])
def test_frozen_pools_never_learn(mode):
    """prompt_mode "pool_frozen" (the official code): after optimizer steps on uni-modal passes the
    pools hold their initial values and took no gradient; with "pool" the selected rows move."""
    torch.manual_seed(8)
    model = PTUnifier(dataclasses.replace(RECIPES["tiny"].model, prompt_mode=mode,
                                          itc_batch_norm=False))
    pools = {n: t.clone() for n, t in model.state_dict().items() if "prompts" in n}
    optimizer = torch.optim.AdamW(model.param_groups())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for _ in range(2):
        optimizer.zero_grad()
        image_only = model(pixel_values=torch.randn(2, 3, 64, 64))
        text_only = model(input_ids=torch.randint(5, 4096, (2, 6)))
        (image_only.joint.square().sum() + text_only.joint.square().sum()).backward()
        optimizer.step()
    for name in ("visual_prompts.weight", "textual_prompts.weight"):
        param = model.get_parameter(name)
        if mode == "pool_frozen":
            assert param.grad is None and id(param) not in in_optimizer
            assert torch.equal(param.detach(), pools[name])
        else:
            assert id(param) in in_optimizer and not torch.equal(param.detach(), pools[name])
