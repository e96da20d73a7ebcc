"""Pre-training loop: ViT reuse equivalence, exact resume, signals, DDP, prompt gradients, learning."""
import copy
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import runtime
import synth
import train
from checkpoint import read_checkpoint
from data import PretrainDataset, make_train_stream
from losses import LossWeights
from model import Config, PTUnifier
from recipes import RECIPES
from runtime import setup_runtime
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.main(["--out", str(out), "--train", "64", "--val", "8", "--test", "24", "--image-size", "64"])
    return out


def tiny_model(tokenizer, **overrides):
    torch.manual_seed(0)
    cfg = dataclasses.replace(RECIPES["tiny"].model, vocab_size=tokenizer.vocab_size, pad_token_id=tokenizer.pad_id,
                              **overrides)
    return PTUnifier(cfg)


def first_batch(synth_dir, tokenizer, model, n=8, text_unit="sentence"):
    ds = PretrainDataset(synth_dir / "pretrain", "train", tokenizer, model.config.image_size,
                         model.config.max_text_len, train=True, seed=0, text_unit=text_unit)
    return next(iter(make_train_stream(ds, n, seed=0, num_workers=0)))


def run_args(synth_dir, out, *extra):
    return ["--data", str(synth_dir / "pretrain"), "--out", str(out), "--batch-size", "8", "--workers", "0",
            "--log-every", "1", "--save-every", "1000", *extra]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_reuse_step_equals_the_plain_passes(synth_dir, mode):
    """The fast step (the true texts encoded once for ITM and ITC, the MLM pass fused at its rows
    only) gives the plain passes' losses, gradients and buffers (the conv stem's BatchNorm
    statistics), in train mode as train.py runs it and in eval mode; each tensor to float rounding
    at its own scale. The tiny preset has no dropout, so both steps are deterministic."""
    from test_compile import assert_close_per_tensor
    tok = Tokenizer.load(synth_dir / "tokenizer.json")
    model = tiny_model(tok).train(mode == "train")
    batch = first_batch(synth_dir, tok, model)
    results = []
    for reuse in (True, False):
        twin = copy.deepcopy(model)
        out = train.PretrainStep(twin, LossWeights(), reuse=reuse)(batch)
        out.total.backward()
        results.append(({f: getattr(out.losses, f).detach() for f in ("mlm", "itm", "itc")} | {"total": out.total},
                         {n: p.grad for n, p in twin.named_parameters() if p.grad is not None},
                         dict(twin.named_buffers())))
    (fast, *fast_rest), (plain, *plain_rest) = results
    assert_close_per_tensor(fast, plain, rtol=0, scaled=1e-6, floor=0, where="losses")
    for got, want, what in zip(fast_rest, plain_rest, ("gradients", "buffers")):
        assert_close_per_tensor(got, want, rtol=1e-5, scaled=1e-5, floor=0, where=what)
    if mode == "train":  # the BatchNorm statistics moved, alike
        assert any(not torch.equal(b, model.get_buffer(n)) for n, b in fast_rest[1].items() if "running" in n)


def test_gradients_reach_exactly_the_selected_prompts(synth_dir):
    tok = Tokenizer.load(synth_dir / "tokenizer.json")
    model = tiny_model(tok).eval()
    batch = first_batch(synth_dir, tok, model)
    out = train.PretrainStep(model, LossWeights())(batch)
    out.total.backward()
    for pool, chosen in ((model.textual_prompts, out.textual_prompts), (model.visual_prompts, out.visual_prompts)):
        touched = pool.weight.grad.abs().sum(dim=1) > 0           # [P] rows that received gradient
        expected = torch.zeros_like(touched)
        expected[chosen.flatten()] = True
        assert touched.any()
        assert torch.equal(touched, expected)


def count_calls(calls: dict, owner, name: str) -> None:
    """Count the calls of owner.name in calls[name] from now on."""
    method, calls[name] = getattr(owner, name), 0
    setattr(owner, name, lambda *a, **k: calls.__setitem__(name, calls[name] + 1) or method(*a, **k))


def test_itc_only_step_runs_passes_3_and_4_only(synth_dir):
    """The warm-up step: ITC alone (same value as in the full step): one ViT pass, one text
    encoding, two fusion passes (image-only, text-only: a call of Fusion.forward each), no
    MLM/ITM pass, heads untouched. The full step runs its four passes from one ViT pass."""
    tok = Tokenizer.load(synth_dir / "tokenizer.json")
    model = tiny_model(tok).eval()
    batch = first_batch(synth_dir, tok, model)
    calls = {}
    for owner, name in ((model, "encode_image"), (model, "encode_text"), (model.fusion, "forward")):
        count_calls(calls, owner, name)
    full = train.PretrainStep(model, LossWeights())(batch)
    assert calls == dict(encode_image=1, encode_text=2, forward=4)  # texts: the masked one, the true one
    calls.update(dict.fromkeys(calls, 0))
    model.zero_grad()
    warm = train.PretrainStep(model, LossWeights())(batch, itc_only=True)
    warm.total.backward()
    assert calls == dict(encode_image=1, encode_text=1, forward=2)
    assert warm.losses.mlm is None and warm.losses.itm is None
    torch.testing.assert_close(warm.losses.itc, full.losses.itc, rtol=0, atol=1e-6)
    torch.testing.assert_close(warm.total, 0.1 * full.losses.itc, rtol=0, atol=1e-6)
    heads = [*model.mlm_head.dense.parameters(), *model.mlm_head.norm.parameters(), *model.itm_head.parameters()]
    assert all(p.grad is None for p in heads)  # (the MLM decoder is tied to the word embeddings)
    assert model.itc_image.proj.weight.grad.abs().sum() > 0


def test_the_step_fits_one_batch_with_all_three_objectives(synth_dir):
    """Wiring: 40 ITC-only steps, then 40 full steps on one fixed batch of 16 pairs bring every loss
    well below its chance level (ITC ln 16 = 2.77, ITM ln 2 = 0.69; MLM starts at ln V ~ 7), at the
    tiny recipe's learning rate."""
    tok = Tokenizer.load(synth_dir / "tokenizer.json")
    model = tiny_model(tok)
    batch = first_batch(synth_dir, tok, model, n=16, text_unit="text")
    step = train.PretrainStep(model, LossWeights())
    optimizer = torch.optim.AdamW(model.parameters(), lr=RECIPES["tiny"].pretrain["lr_other"])
    for i in range(80):
        out = step(batch, itc_only=i < 40)
        optimizer.zero_grad()
        out.total.backward()
        optimizer.step()
    assert out.losses.itc.item() < 2.77 - 0.3
    assert out.losses.itm.item() < 0.3
    assert out.losses.mlm.item() < 2.0


def test_itc_warmup_covers_the_first_steps_of_tiny_only():
    tiny = train.TrainConfig(preset="tiny", steps=600).resolved()
    assert (tiny.itc_only_steps(), tiny.itc_escape) == (270, 0.0)  # 45% of the steps, no early end
    base = train.TrainConfig(preset="base", steps=1000).resolved()
    assert base.itc_only_steps() == 0 and base.text_unit == "sentence"
    assert train.TrainConfig(preset="tiny", itc_warmup=0.0).resolved().itc_only_steps() == 0


def test_itc_start_ends_when_the_moving_average_is_margin_below_chance():
    """a_t = 0.9 a_(t-1) + 0.1 ITC_t from a_0 = ln 64 = 4.1589; margin 0.2 -> end once a_t <= 3.9589.
    By hand: ITC 4.16 keeps a at 4.159; then ITC 3.0 steps a to 4.0431, 3.9388 (ends: step 3)."""
    chance = math.log(64)
    state = dict(step=0, itc_only_until=300, itc_average=chance)
    ended = []
    for itc in (4.16, 3.0, 3.0, 3.0):
        state["step"] += 1
        ended.append(train.end_itc_start(state, itc, chance, 0.2))
        if ended[-1]:
            break
    assert ended == [False, False, True]
    assert state["itc_only_until"] == 3 and state["itc_average"] == pytest.approx(3.93874, abs=1e-4)


@pytest.fixture
def two_threads():
    """Two intra-op threads, as on the CI machine: CPU kernels that accumulate with atomics in
    parallel (index_put_ with accumulate, the backward of advanced indexing) would change the last
    bits from run to run; the pre-training step must not use them."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


# Batch 16 with every objective from the first step: the ITM pass then reads 16 x 17 x 128 image
# states, above the size at which PyTorch runs an accumulating index_put_ in parallel.
DETERMINISM_ARGS = ("--batch-size", "16", "--itc-warmup", "0")


def assert_same_checkpoints(a: Path, b: Path) -> None:
    """The same tensors to the bit (model, task modules, optimizer) and the same loop state."""
    meta_a, ta = read_checkpoint(a)
    meta_b, tb = read_checkpoint(b)
    assert meta_a["state"] == meta_b["state"]
    assert ta.keys() == tb.keys()
    different = [name for name in ta if not torch.equal(ta[name], tb[name])]
    assert different == [], f"{len(different)} of {len(ta)} tensors differ, e.g. {different[:3]}"


def test_two_runs_with_two_threads_are_bit_identical(synth_dir, tmp_path, two_threads):
    for name in ("a", "b"):
        train.main(run_args(synth_dir, tmp_path / name, "--steps", "24", *DETERMINISM_ARGS))
    assert_same_checkpoints(tmp_path / "a" / "checkpoint.safetensors",
                            tmp_path / "b" / "checkpoint.safetensors")


def test_resume_is_exact(synth_dir, tmp_path, monkeypatch, two_threads):
    """N steps straight == K steps, stop (as on SIGTERM), resume, N-K steps: identical parameters,
    with two threads; the ITC-only start and its moving average (an adaptive end) survive too."""
    n, k = 6, 3
    for extra in (DETERMINISM_ARGS, ("--batch-size", "8", "--itc-escape", "0.2")):
        straight, split = tmp_path / f"straight{extra[1]}", tmp_path / f"split{extra[1]}"
        train.main(run_args(synth_dir, straight, "--steps", str(n), *extra))

        class StopAfterK(train.StopSignal):
            checks = 0

            @property
            def received(self):
                StopAfterK.checks += 1
                return "SIGTERM" if StopAfterK.checks >= k else None

            @received.setter
            def received(self, value):
                pass

        with monkeypatch.context() as patched:
            patched.setattr(train, "StopSignal", StopAfterK)
            result = train.train(train.parse_args(run_args(synth_dir, split, "--steps", str(n), *extra)))
        assert result == dict(stopped=True, step=k)
        train.main(run_args(synth_dir, split, "--steps", str(n), "--resume", *extra))
        assert_same_checkpoints(straight / "checkpoint.safetensors", split / "checkpoint.safetensors")
        rows = [json.loads(line) for line in (split / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, n + 1))
    state = read_checkpoint(straight / "checkpoint.safetensors")[0]["state"]  # the ITC-only start
    assert 0 < state["itc_only_until"] < n and state["itc_average"] != math.log(8)


def test_the_stream_counts_only_the_batches_it_hands_out(synth_dir):
    """micro_batches sends each batch to the device one ahead of its use (data.DeviceCopy), yet
    the data position it keeps counts only the batches handed out: a stream restarted from that
    position goes on with the next batch, across an epoch's end too (8 batches per epoch here)."""
    tok = Tokenizer.load(synth_dir / "tokenizer.json")
    ds = PretrainDataset(synth_dir / "pretrain", "train", tok, 64, 64, train=True, seed=0, text_unit="sentence")
    cfg, cpu = train.TrainConfig(seed=3, workers=0), torch.device("cpu")
    straight = train.micro_batches(ds, 8, cfg, dict(epoch=0, batch_in_epoch=0), cpu)
    expected = [next(straight).ids for _ in range(12)]
    assert expected == [b.ids for b, _ in zip(make_train_stream(ds, 8, seed=3, num_workers=0), range(12))]
    state = dict(epoch=0, batch_in_epoch=0)
    first = train.micro_batches(ds, 8, cfg, state, cpu)
    seen = [next(first).ids for _ in range(10)]
    assert state == dict(epoch=1, batch_in_epoch=2)
    again = train.micro_batches(ds, 8, cfg, dict(state), cpu)
    assert seen + [next(again).ids for _ in range(2)] == expected


def test_sigterm_saves_a_loadable_checkpoint(synth_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"),
                             *run_args(synth_dir, out, "--steps", "100000")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, stdout
    assert "stopped by SIGTERM" in stdout
    meta, tensors = read_checkpoint(out / "checkpoint.safetensors")
    assert 1 <= meta["state"]["step"] < 100000
    model = PTUnifier(Config(**meta["model_config"]))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model/")})


@pytest.fixture(scope="module")
def hf_folders(synth_dir, tmp_path_factory):
    """A small CLIP vision tower (patch 16 at 64 px) and RoBERTa (the synthetic tokenizer's
    vocabulary, no dropout), random weights saved as Hugging Face folders, and the live models."""
    import transformers
    tok = Tokenizer.load(synth_dir / "tokenizer.json")
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=64,
        patch_size=16, hidden_act="quick_gelu"))
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
        num_attention_heads=4, max_position_embeddings=70, type_vocab_size=1, layer_norm_eps=1e-5,
        pad_token_id=tok.pad_id, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    for name, m in (("clip", clip), ("roberta", roberta)):
        m.save_pretrained(root / name)
    return root / "clip", root / "roberta", clip, roberta


def test_train_starts_from_hugging_face_folders(synth_dir, hf_folders, tmp_path):
    """--vision-init / --text-init through train.py end to end (the tiny recipe with a CLIP ViT and
    a RoBERTa of the folders' shapes): with --lr-encoder 0 the encoders of the final checkpoint are
    the folders' weights, while the rest of the model trained."""
    clip_dir, roberta_dir, clip, roberta = hf_folders
    out = tmp_path / "run"
    train.main(run_args(synth_dir, out, "--steps", "2", "--vision-init", str(clip_dir), "--text-init",
                        str(roberta_dir), "--tokenizer", str(synth_dir / "tokenizer.json"), "--lr-encoder", "0"))
    meta, tensors = read_checkpoint(out / "checkpoint.safetensors")
    assert meta["state"]["step"] == 2
    assert (meta["model_config"]["vision_stem"], meta["model_config"]["vision_width"]) == ("patch", 64)
    hf_state = {**clip.state_dict(), **roberta.state_dict()}
    for ours, theirs in (("vision.patch_embed.weight", "embeddings.patch_embedding.weight"),
                         ("text.word_embeddings.weight", "embeddings.word_embeddings.weight")):
        assert torch.equal(tensors[f"model/{ours}"], hf_state[theirs]), ours
    fresh = tiny_model(Tokenizer.load(synth_dir / "tokenizer.json"))  # the fusion layers did move
    assert not torch.equal(tensors["model/fusion.text_layers.0.fc1.weight"], fresh.fusion.text_layers[0].fc1.weight)


def test_two_processes_train_what_one_process_does(synth_dir, hf_folders, tmp_path):
    """torchrun with 2 gloo processes x 4 pairs against 1 process x 8 pairs, the same global batch,
    one step: the same gradient to float rounding (AdamW's first moment after one step is 0.1 x the
    clipped gradient; the parameters would not compare: Adam turns the rounding noise of gradients
    that are 0, like a bias before a batch norm, into steps of the full rate), and rank 0 alone
    writes the run folder. An ITC-only step with a CLIP (patch-stem) ViT: ITC and its batch norm
    gather every rank's rows, where the tiny conv stem's BatchNorm, the ITM negatives and the MLM
    mean are per rank in DDP, so a full tiny step on 2 processes is not a 1-process step."""
    clip_dir, roberta_dir, _, _ = hf_folders
    extra = ("--steps", "1", "--itc-warmup", "1", "--vision-init", str(clip_dir), "--text-init", str(roberta_dir),
             "--tokenizer", str(synth_dir / "tokenizer.json"))
    train.main(run_args(synth_dir, tmp_path / "one", *extra))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--standalone", str(ROOT / "train.py"), *run_args(synth_dir, tmp_path / "two", *extra)],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2
    assert proc.stdout.count("zero-shot retrieval on") == 1  # rank 0 alone evaluates
    (_, one), (_, two) = (read_checkpoint(tmp_path / n / "checkpoint.safetensors") for n in ("one", "two"))
    moments = [name for name in one if name.endswith("/exp_avg")]
    largest = max(one[name].abs().max().item() for name in moments)
    assert len(moments) > 50 and largest > 0
    for name in moments:  # to 1e-5 of the largest entry (float rounding: about 1e-6 of it)
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5 * largest, msg=name)


def test_lr_schedule_warmup_then_linear_decay():
    total, warmup = 100, 0.1
    f = [train.lr_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[55] == pytest.approx(0.5)
    assert f[99] == pytest.approx(1 / 90)
    assert all(a <= b for a, b in zip(f[:10], f[1:10]))


def test_lr_schedule_holds_at_the_peak_until_decay_from():
    """The tiny recipe's shape (peak held until 70% of the steps), worked by hand for 100 steps with
    10% warm-up: (s + 1) / 10 for s < 10; 1 for 10 <= s < 70; (100 - s) / 30 from s = 70; a plateau
    shorter than the warm-up decays right after it."""
    f = [train.lr_factor(s, 100, 0.1, decay_from=0.7) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[4] == pytest.approx(0.5) and f[9] == pytest.approx(1.0)
    assert f[10:70] == [1.0] * 60
    assert f[70] == pytest.approx(1.0) and f[85] == pytest.approx(0.5) and f[99] == pytest.approx(1 / 30)
    assert [train.lr_factor(s, 100, 0.1, decay_from=0.05) for s in (9, 10, 55)] == \
        pytest.approx([1.0, 1.0, 0.5])  # decay from step 10: (100 - 55) / 90
    assert train.lr_factor(99, 100, 0.1, decay_from=0.05) == pytest.approx(1 / 90)


def test_accumulated_gradients_are_the_mean_of_the_micro_steps(synth_dir, tmp_path, monkeypatch):
    """--batch-size 8 --micro-batch 4: the gradient of one step, accumulated over its two
    micro-batches (what runtime.guarded_step hands to the update), is the mean of the two
    micro-batches' gradients computed one at a time."""
    cfg = train.parse_args(run_args(synth_dir, tmp_path, "--steps", "1", "--micro-batch", "4", "--itc-warmup", "0"))
    run = train.start_run(cfg, setup_runtime("cpu"))
    assert run.accum == 2
    micro = [next(run.batches), next(run.batches)]
    run.batches, accumulated = iter(micro), {}
    monkeypatch.setattr(runtime, "finish_step", lambda model, *rest, **kw: accumulated.update(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    stop = train.StopSignal()
    try:
        train.train_step(run, stop)
    finally:
        stop.restore()
    step, separate = train.PretrainStep(run.model, LossWeights()), []
    for batch in micro:
        run.model.zero_grad()
        step(batch).total.backward()
        separate.append({n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})
    assert accumulated.keys() == separate[0].keys() == separate[1].keys()
    for n, g in accumulated.items():
        torch.testing.assert_close(g, (separate[0][n] + separate[1][n]) / 2, rtol=1e-5, atol=1e-7, msg=n)


def test_optimizer_groups_follow_the_paper(synth_dir):
    """Encoders at lr_encoder, everything else at lr_other; pools and biases are not decayed."""
    tok = Tokenizer.load(synth_dir / "tokenizer.json")
    model = tiny_model(tok, learnable_temperature=True)
    cfg = train.TrainConfig(lr_encoder=1e-5, lr_other=5e-5, lr_temperature=5e-3)
    opt = train.make_optimizer(model, cfg, torch.device("cpu"))
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(group_of) == len(named) and "log_scale" in named
    for name, p in named.items():
        g = group_of[id(p)]
        lr = 1e-5 if name.startswith(("vision.", "text.")) else 5e-3 if name == "log_scale" else 5e-5
        assert g["base_lr"] == lr, name
        if name.endswith("bias") or "prompts" in name or "norm" in name.lower() or name == "log_scale":
            assert g["weight_decay"] == 0.0, name
    assert group_of[id(model.fusion.text_layers[0].fc1.weight)]["weight_decay"] == 0.01


@pytest.mark.parametrize("weights, passes", [((1.0, 0.5, 0.0), 2), ((0.0, 0.5, 0.1), 3), ((1.0, 0.0, 0.0), 1),
                                             ((0.0, 0.0, 0.1), 2)])
def test_an_objective_with_weight_zero_does_not_run(synth_dir, weights, passes):
    """The ablations of Table 3: a zero weight removes the objective's fusion pass(es); the losses
    that run are the full step's, the total is their weighted sum, and the other heads get no gradient."""
    tok = Tokenizer.load(synth_dir / "tokenizer.json")
    model = tiny_model(tok).eval()
    batch = first_batch(synth_dir, tok, model)
    full = train.PretrainStep(model, LossWeights())(batch)
    calls, fuse = [], model.fusion.forward
    model.fusion.forward = lambda *args: calls.append(1) or fuse(*args)  # once per fusion pass
    model.zero_grad()
    out = train.PretrainStep(model, LossWeights(*weights))(batch)
    out.total.backward()
    assert len(calls) == passes
    expected = 0.0
    for name, w in zip(("mlm", "itm", "itc"), weights):
        got = getattr(out.losses, name)
        assert (got is None) == (w == 0), name
        if got is not None:
            torch.testing.assert_close(got, getattr(full.losses, name))
            expected = expected + w * got
    torch.testing.assert_close(out.total, expected)
    assert (model.itm_head.weight.grad is None) == (weights[1] == 0)
    assert (model.itc_image.proj.weight.grad is None) == (weights[2] == 0)
    assert (out.textual_prompts is None) == (weights[2] == 0)


def test_resume_is_a_flag_or_auto():
    """A bare --resume is strict (the checkpoint must exist), --resume auto is the relaunch mode."""
    assert train.parse_args([]).resume is None
    assert train.parse_args(["--resume"]).resume == "strict"
    assert train.parse_args(["--resume", "--steps", "3"]).resume == "strict"
    assert train.parse_args(["--resume", "auto", "--steps", "3"]).resume == "auto"
    with pytest.raises(SystemExit, match="--resume 'sometimes': expected 'auto'"):
        train.parse_args(["--resume", "sometimes"])


def test_switching_itc_off_needs_no_itc_only_start():
    with pytest.raises(SystemExit, match="--itc-warmup 0"):
        train.TrainConfig(itc_weight=0.0).resolved()
    assert train.TrainConfig(itc_weight=0.0, itc_warmup=0.0).resolved().itc_only_steps() == 0
    with pytest.raises(SystemExit, match="at least one positive"):
        train.TrainConfig(mlm_weight=0.0, itm_weight=0.0, itc_weight=0.0, itc_warmup=0.0).resolved()
