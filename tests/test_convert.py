"""convert.py against the authors' code: the official model's outputs (tests/fixtures/official, made
by make_official_fixture.py running github.com/zhjohnchan/PTUnifier), METER naming, the files
finetune.py / train.py / predict.py take, and every refusal (nothing written)."""
import dataclasses
import json
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import convert
import finetune
import train
from checkpoint import load_pretrained
from convert import ConvertError, convert_file, convert_state, key_map
from model import ClassifierHead, PTUnifier
from predict import Predictor
from recipes import RECIPES
from tokenizer import Tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "official"
TOL = 1e-5


@pytest.fixture(scope="module")
def official():
    """(official state dict, hyper_parameters config, text encoder settings, inputs, outputs)."""
    meta = json.loads((FIXTURE / "config.json").read_text())
    return (load_file(FIXTURE / "state_dict.safetensors"), meta["hyper_parameters"]["config"],
            meta["text_encoder"], load_file(FIXTURE / "inputs.safetensors"),
            load_file(FIXTURE / "outputs.safetensors"))


def our_outputs(model: PTUnifier, x: dict) -> tuple[dict, dict]:
    """The fixture's outputs, computed by our model (eval), and the prompt indices selected."""
    model.eval()
    out, picked = {}, {}
    text = dict(input_ids=x["input_ids"], attention_mask=x["attention_mask"])
    with torch.no_grad():
        for name, kw in (("pair", dict(pixel_values=x["pixel_values"], **text)),
                         ("image_only", dict(pixel_values=x["pixel_values"])), ("text_only", text)):
            o = model(**kw)
            out |= {f"{name}.text": o.text, f"{name}.image": o.image, f"{name}.joint": o.joint}
            if name != "pair":
                picked[name] = o.text_prompt_indices if name == "image_only" else o.image_prompt_indices
        out["pair.itm_logits"] = model.itm_head(out["pair.joint"])
        out["pair.mlm_logits"] = model.mlm_head(out["pair.text"])
        out["itc.image"] = model.itc_image(out["image_only.joint"])
        out["itc.text"] = model.itc_text(out["text_only.joint"])
    return out, picked


def test_converted_model_computes_what_the_official_model_computes(official):
    """Pairs (fused streams, joint, ITM, MLM), image-only with textual prompts, text-only with
    visual prompts, ITC embeddings: every official output within 1e-5, row by row."""
    state, hp, text, x, expected = official
    model, head, notes = convert_state(state, hp, text_heads=text["num_attention_heads"])
    got, picked = our_outputs(model, x)
    worst = {k: (got[k] - expected[k]).abs().max().item() for k in got}
    print("worst |ours - official| per output:", {k: f"{v:.1e}" for k, v in worst.items()})
    assert {k: got[k].shape for k in got} == {k: expected[k].shape for k in got}
    assert max(worst.values()) <= TOL, worst
    # the inputs select different prompt sets, so the order and choice of prompts are tested
    for rows in picked.values():
        assert len({tuple(sorted(r.tolist())) for r in rows}) == len(rows)
    # the official classifier head (.0 Linear, .1 LayerNorm, .3 Linear) is our ClassifierHead
    assert head["name"] == "cls_head"
    cls = ClassifierHead(2 * model.config.hidden_size, head["fc2.weight"].shape[0])
    cls.load_state_dict({k: v for k, v in head.items() if k != "name"})
    torch.testing.assert_close(cls(got["pair.joint"]), expected["pair.cls_logits"], atol=TOL, rtol=0)
    assert any("unused keys (7)" in n and "language_encoder.pooler.dense.weight" in n for n in notes)


def meter_naming(state: dict) -> dict:
    """The fixture in METER's naming, without pools and ITC heads (as meter.ckpt)."""
    out = {}
    for key, value in state.items():
        if key.startswith(("pseudo_", "itc_head.")):
            continue
        for old, new in convert.METER_PREFIXES:
            if key.startswith(new):
                key = old + key[len(new):]
                break
        out[key] = value
    return out


def test_meter_naming_converts_and_the_missing_parts_start_fresh(official):
    state, hp, text, x, expected = official
    model, _, notes = convert_state(meter_naming(state), hp, text_heads=text["num_attention_heads"])
    got, _ = our_outputs(model, x)
    for key in ("pair.text", "pair.image", "pair.joint", "pair.mlm_logits", "pair.itm_logits"):
        assert (got[key] - expected[key]).abs().max().item() <= TOL, key
    assert any("freshly initialised" in n and "itc_image" in n and "visual_prompts" in n for n in notes)
    assert any("METER naming" in n for n in notes)


# -- files: a Lightning checkpoint in, our checkpoint out --------------------------------------


def lightning_file(path: Path, state: dict, hp: dict | None = None, **extra) -> Path:
    """A file as Lightning writes it: state_dict, and hyper_parameters in its AttributeDict."""
    module = types.ModuleType("pytorch_lightning.utilities.parsing")
    AttributeDict = type("AttributeDict", (dict,), {"__module__": module.__name__})
    module.AttributeDict = AttributeDict
    saved = {name: sys.modules.get(name) for name in ("pytorch_lightning", "pytorch_lightning.utilities",
                                                      module.__name__)}
    sys.modules.update({"pytorch_lightning": types.ModuleType("pytorch_lightning"),
                        "pytorch_lightning.utilities": types.ModuleType("pytorch_lightning.utilities"),
                        module.__name__: module})
    try:
        ckpt = {"epoch": 3, "state_dict": state, **extra}
        if hp is not None:
            ckpt["hyper_parameters"] = AttributeDict(config=hp)
        torch.save(ckpt, path)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name)
            else:
                sys.modules[name] = old
    return path


def official_layout(model: PTUnifier) -> dict:
    """Our model's weights in the official naming (the key map inverted)."""
    ours = model.state_dict()
    out = {}
    for dst, srcs in key_map(model.config).items():
        for src, part in zip(srcs, ours[dst].chunk(len(srcs))):
            out[src] = part.clone()
    return out


def test_cli_writes_a_checkpoint_that_train_finetune_and_predict_take(bench, tmp_path, capsys):
    """An official-layout file of a small model on the benchmark's vocabulary: convert.py reads it
    (hyper_parameters in Lightning's AttributeDict), the weights come back exactly, and
    train.py --init, finetune.py --init and predict.py take the result as it is."""
    tok = Tokenizer.load(bench / "tokenizer.json")
    torch.manual_seed(0)
    cfg = dataclasses.replace(RECIPES["tiny"].model, vocab_size=tok.vocab_size, pad_token_id=tok.pad_id,
                              bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, vision_stem="patch",
                              pooling="cls", itc_batch_norm=False, vision_heads=2, text_heads=2,
                              fusion_heads=2, text_dropout=0.1, fusion_dropout=0.1)
    source = PTUnifier(cfg)
    hp = dict(num_heads=2, num_pseudo_vision_tokens=cfg.k_visual, num_pseudo_langauge_tokens=cfg.k_textual,
              cl_temp=0.1, max_text_len=cfg.max_text_len, drop_rate=0.1, tokenizer="roberta-base")
    ckpt = lightning_file(tmp_path / "ptunifier.ckpt", official_layout(source), hp)
    out = tmp_path / "converted.safetensors"
    convert.main([str(ckpt), "--out", str(out), "--tokenizer", str(bench / "tokenizer.json")])
    printed = capsys.readouterr().out
    assert "from hyper_parameters: num_pseudo_vision_tokens=16" in printed and "num_heads=2" in printed
    model, meta, _ = load_pretrained(out)
    assert model.config == cfg
    for k, v in source.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    # predict.py: the tokenizer recorded by --tokenizer is found without a flag
    emb = Predictor.load(out, device="cpu").embed_texts(["small left effusion"])
    assert emb.vectors.shape == (1, cfg.embed_dim)
    # train.py --init continues pre-training from it
    train.main(["--data", str(bench / "pretrain"), "--out", str(tmp_path / "pre"), "--init", str(out),
                "--steps", "2", "--batch-size", "8", "--workers", "0", "--save-every", "1000",
                "--itc-warmup", "0"])
    trained, _, _ = load_pretrained(tmp_path / "pre" / "checkpoint.safetensors")
    assert trained.config == cfg
    # finetune.py --init takes it (the preset recorded: base)
    finetune.main(["--task", "ic", "--data", str(bench / "ic"), "--init", str(out), "--out",
                   str(tmp_path / "ft"), "--epochs", "1", "--batch-size", "8", "--workers", "0"])
    assert (tmp_path / "ft" / "best.safetensors").exists()


# -- refusals: the file and the problem named, nothing written ---------------------------------


class NotData:
    """A class a pickle would have to execute."""


def refusals(tmp_path: Path, state: dict, hp: dict) -> dict[str, tuple[Path, str]]:
    good = lightning_file(tmp_path / "good.ckpt", state)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": state, "callbacks": NotData()}, pickled)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2, 2)}}, other)
    missing = lightning_file(tmp_path / "missing.ckpt", {
        k: v for k, v in state.items() if k != "multi_modal_vision_layers.1.output.dense.weight"}, hp)
    return {"pickled": (pickled, "pickled object of class tests.test_convert.NotData|test_convert.NotData"),
            "truncated": (truncated, "truncated"),
            "other model": (other, "missing key 'vision_encoder.visual.conv1.weight'"),
            "missing key": (missing, "missing key 'multi_modal_vision_layers.1.output.dense.weight'")}


def test_refused_files_name_the_file_and_the_problem_and_write_nothing(official, tmp_path):
    for case, (path, problem) in refusals(tmp_path, official[0], official[1]).items():
        out = tmp_path / f"{case}.safetensors"
        with pytest.raises(ConvertError, match=str(path)) as err:
            convert_file(path, out)
        assert any(p in str(err.value) for p in problem.split("|")), (case, str(err.value))
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*")), case


def test_the_pickled_object_is_never_run(tmp_path, official, monkeypatch):
    """A global that would run on unpickling is refused before it runs."""
    ran = []
    monkeypatch.setattr(NotData, "__reduce__", lambda self: (ran.append, ("ran",)), raising=False)
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        torch.save({"state_dict": {"x": torch.zeros(1)}, "x": NotData()}, f, pickle_module=pickle)
    with pytest.raises(ConvertError, match="pickled object"):
        convert_file(path, tmp_path / "out.safetensors")
    assert ran == [] and not (tmp_path / "out.safetensors").exists()
