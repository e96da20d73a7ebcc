"""Fault injection: no run, checkpoint or data is ever lost or silently wrong.

Each test injects one fault into a tiny pre-training run on the synthetic benchmark (48 training
pairs, 64 px, batch 8) and checks what survives against an independent reference: the bytes of the
previous checkpoint, the parameters of an uninterrupted run, or the parameters from before a step.
Faults: SIGKILL / failure during a checkpoint write, SIGTERM / SIGINT (single process, and to
torchrun with 2 gloo processes), disk full / permission denied, corrupt or mismatched checkpoints
and encoder folders, broken manifests, unreadable images, odd texts, non-finite losses. A fault on
one rank of several (SIGTERM, SIGKILL and a relaunch, a NaN): tests/test_cluster.py.
"""
import errno
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import checkpoint
import data
import runtime
import step
import train
from checkpoint import CheckpointError, read_checkpoint
from hf import WeightLoadError, config_from_hf, load_hf_encoders
from model import PTUnifier
from tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
N = 4  # steps of every short run; the interrupted ones stop after step K
K = 2


# ----------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """Two intra-op threads, as on the CI machine: the resume tests compare parameters bit for bit,
    which holds at any fixed thread count (tests/test_train.py checks it where PyTorch's CPU kernels
    would otherwise accumulate in parallel)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def args(bench, out, *extra, data_dir=None):
    return ["--data", str(data_dir or bench / "pretrain"), "--tokenizer", str(bench / "tokenizer.json"),
            "--out", str(out), "--batch-size", "8", "--workers", "0", "--log-every", "1",
            "--save-every", "1000", "--steps", str(N), *extra]


def params(path) -> dict:
    return {k: v for k, v in read_checkpoint(path)[1].items() if k.startswith("model/")}


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


class SignalAt:
    """Patch train.seed_step so that the process sends itself `sig` (a real signal) when step
    index `at` begins; keeps the parameters at the start of every step in `snapshots`."""

    def __init__(self, monkeypatch, at=None, sig=signal.SIGTERM):
        self.at, self.sig, self.current, self.snapshots, self.model = at, sig, None, {}, None
        self.original = train.seed_step
        monkeypatch.setattr(train, "seed_step", self)

    def __call__(self, seed, rank, step):
        self.current = step
        if self.model is not None:
            self.snapshots[step] = {f"model/{k}": v.detach().clone() for k, v in self.model.state_dict().items()}
        if step == self.at:
            os.kill(os.getpid(), self.sig)
        self.original(seed, rank, step)


@pytest.fixture(scope="module")
def straight(bench, tmp_path_factory):
    """The reference: N steps without interruption."""
    out = tmp_path_factory.mktemp("straight")
    train.main(args(bench, out))
    return params(out / "checkpoint.safetensors")


@pytest.fixture(scope="module")
def stopped(bench, tmp_path_factory):
    """The same run stopped by a real SIGTERM arriving during step index K-1: saved at step K."""
    out = tmp_path_factory.mktemp("stopped")
    with pytest.MonkeyPatch.context() as mp:
        SignalAt(mp, at=K - 1)
        result = train.train(train.parse_args(args(bench, out)))
    assert result == dict(stopped=True, step=K)
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# ----------------------------------------------------------------------------- signals

def test_sigterm_single_process_resume_equals_uninterrupted(bench, straight, stopped, tmp_path):
    run = copy_run(stopped, tmp_path / "run")
    assert read_checkpoint(run / "checkpoint.safetensors")[0]["state"]["step"] == K
    train.main(args(bench, run, "--resume"))
    assert_same_tensors(params(run / "checkpoint.safetensors"), straight)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, N + 1))


def test_sigint_stops_like_sigterm_and_resume_is_exact(bench, straight, tmp_path, capsys):
    """Ctrl-C (a real SIGINT during step index K-1): the step ends, the run saves step K and
    returns; resuming gives the uninterrupted run's parameters."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        SignalAt(mp, at=K - 1, sig=signal.SIGINT)
        assert train.train(train.parse_args(args(bench, out))) == dict(stopped=True, step=K)
    assert f"stopped by SIGINT at step {K}" in capsys.readouterr().out
    train.main(args(bench, out, "--resume"))
    assert_same_tensors(params(out / "checkpoint.safetensors"), straight)


def test_save_every_minutes_saves_by_wall_time(bench, tmp_path, monkeypatch):
    """--save-every-minutes 1 on a clock that advances 25 s as each step begins (step index s at
    25 (s + 1) s; the clock starts at 0): a save is due in step s once 25 (s + 1) - t_last >= 60,
    so after steps 3 (75 s) and 6 (150 s), then at the end (8): what a wall-time save promises,
    whatever the step time."""
    now, saved = [0.0], []
    monkeypatch.setattr(runtime, "time", SimpleNamespace(monotonic=lambda: now[0]))
    seed_step, save_checkpoint = train.seed_step, train.save_checkpoint
    monkeypatch.setattr(train, "seed_step", lambda *a: now.__setitem__(0, now[0] + 25) or seed_step(*a))
    monkeypatch.setattr(train, "save_checkpoint", lambda path, model, opt, scaler, state, *rest: saved.append(
        state["step"]) or save_checkpoint(path, model, opt, scaler, state, *rest))
    train.main(args(bench, tmp_path, "--steps", "8", "--save-every-minutes", "1"))
    assert saved == [3, 6, 8]


# A child process that saves a checkpoint over sys.argv[1] and hangs (printing "hanging") at a moment
# of the save: in the middle of writing its temporary file, or with all of it written and fsync'ed,
# just before the rename.
SAVER = ("import sys, time, checkpoint\n"
         "from safetensors import safe_open\n"
         "from safetensors.torch import load_file\n"
         "def hang(*_):\n"
         "    print('hanging', flush=True); time.sleep(600)\n")
SAVE_UNTIL = {
    "mid-write": ("def save_file(tensors, path, metadata=None):\n"
                  "    with open(path, 'wb') as f:\n"
                  "        f.write(open(sys.argv[1], 'rb').read()[:100000]); f.flush()\n"
                  "    hang()\n"
                  "checkpoint.save_file = save_file\n"
                  "checkpoint.atomic_save(sys.argv[1], {}, {})\n"),
    "before-rename": ("checkpoint.os.replace = hang\n"
                      "with safe_open(sys.argv[1], framework='pt') as f:\n"
                      "    metadata = f.metadata()\n"
                      "checkpoint.atomic_save(sys.argv[1], load_file(sys.argv[1]), metadata)\n"),
}


@pytest.mark.parametrize("moment", list(SAVE_UNTIL))
def test_sigkill_while_saving_keeps_previous_and_resume_uses_it(bench, straight, stopped, tmp_path, moment):
    """A process saving a new checkpoint over the run's is SIGKILLed mid-write, or just before the
    rename: the target keeps the previous checkpoint byte for byte and the temporary file stays
    (partial, or complete but unused: no one is left to remove it); --resume reads the target and
    ends as the uninterrupted run; the next save removes the leftover."""
    run = copy_run(stopped, tmp_path / "run")
    target = run / "checkpoint.safetensors"
    before = target.read_bytes()
    child = subprocess.Popen([sys.executable, "-c", SAVER + SAVE_UNTIL[moment], str(target)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "hanging"
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    leftover = run / f".checkpoint.safetensors.tmp-{child.pid}"
    assert target.read_bytes() == before and temp_files(run) == [leftover.name]
    if moment == "before-rename":  # whole and readable, but never read by a resume
        assert read_checkpoint(leftover)[0] == read_checkpoint(target)[0]
    train.main(args(bench, run, "--resume"))
    assert_same_tensors(params(target), straight)
    assert temp_files(run) == []


def _half_then(error):
    def save_file_failing(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])
        raise error
    return save_file_failing


@pytest.mark.parametrize("where, error, message", [
    ("save_file", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
    ("save_file", PermissionError(errno.EACCES, os.strerror(errno.EACCES)), "Permission denied"),
    ("replace", KeyboardInterrupt(), None),  # an exception between writing and renaming
], ids=["disk-full", "permission-denied", "exception-before-rename"])
def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp(bench, stopped, tmp_path, monkeypatch,
                                                                    where, error, message):
    run = copy_run(stopped, tmp_path / "run")
    before = (run / "checkpoint.safetensors").read_bytes()
    if where == "save_file":
        monkeypatch.setattr(checkpoint, "save_file", _half_then(error))
        expected = CheckpointError
    else:
        def replace(src, dst):
            raise error
        monkeypatch.setattr(checkpoint.os, "replace", replace)
        expected = KeyboardInterrupt
    with pytest.raises(expected) as err:
        train.main(args(bench, run, "--resume"))
    if message:
        assert str(run / "checkpoint.safetensors") in str(err.value) and message in str(err.value)
    assert (run / "checkpoint.safetensors").read_bytes() == before
    assert temp_files(run) == []


def _wait_for_file(path: Path, proc, timeout=120.0) -> None:
    deadline = time.time() + timeout
    while not (path.exists() and path.read_text().strip()):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.1)


def _torchrun(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", *argv], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_ddp_sigterm_to_torchrun_stops_every_rank_and_saves(bench, tmp_path):
    """torchrun forwards SIGTERM to both workers; they stop at one step and rank 0 saves it."""
    out = tmp_path / "run"
    proc = _torchrun(str(ROOT / "train.py"), *args(bench, out, "--steps", "100000"))
    _wait_for_file(out / "metrics.jsonl", proc, timeout=240)
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert "stopped by SIGTERM at step" in stdout, stdout
    # torchrun itself exits through its SignalException; no worker may raise or be SIGKILLed.
    assert f'{ROOT / "train.py"}", line' not in stdout and "SIGKILL" not in stdout, stdout
    step = read_checkpoint(out / "checkpoint.safetensors")[0]["state"]["step"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 1 <= step < 100000 and rows[-1]["step"] == step


# A process with a live data.JobSignalSafeLoader (one persistent worker, which another process sends
# SIGTERM as it starts, before its worker_init_fn) that prints its worker's pid, reads a line, takes
# a batch and fails with the loader still alive.
LOADER_THEN_FAIL = ("import os, subprocess, sys, data\n"
                    "init = data.ignore_stop_signals\n"
                    "def early_sigterm(worker_id):\n"
                    "    subprocess.run([sys.executable, '-c', f'import os; os.kill({os.getpid()}, 15)'])\n"
                    "    init(worker_id)\n"
                    "data.ignore_stop_signals = early_sigterm\n"
                    "loader = data.JobSignalSafeLoader(list(range(100)), batch_size=2, num_workers=1,\n"
                    "                                  persistent_workers=True)\n"
                    "batches = iter(loader)\n"
                    "next(batches)\n"
                    "print(batches._workers[0].pid, flush=True)\n"
                    "sys.stdin.readline()\n"
                    "print(next(batches).tolist(), flush=True)\n"
                    "raise RuntimeError('failed with its loader alive')\n")


def test_a_dataloader_worker_lives_through_the_jobs_signals_and_ends_with_its_process():
    """SIGTERM from another process as the worker starts (it starts with SIGTERM blocked, from the
    fork), then SIGTERM and SIGINT (as SLURM signals every process of a job) leave the worker
    serving batches; the main process then fails, and its exit (which SIGTERMs its workers and
    joins them) ends with the worker gone, instead of waiting for it forever."""
    proc = subprocess.Popen([sys.executable, "-c", LOADER_THEN_FAIL], cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    worker = int(proc.stdout.readline())
    for sig in (signal.SIGTERM, signal.SIGINT):
        os.kill(worker, sig)
    proc.stdin.write("next\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "[2, 3]"  # the next batch, from the same worker
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 1 and "failed with its loader alive" in stderr
    assert not Path(f"/proc/{worker}").exists() or Path(f"/proc/{worker}/stat").read_text().split()[2] == "Z"


# ----------------------------------------------------------------------------- corrupt / mismatched files

class _Boom:
    """Unpickling this creates `marker`: proof that a file was unpickled."""
    marker = None

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_bytes(marker: Path) -> bytes:
    boom = _Boom()
    boom.marker = marker
    return pickle.dumps({"model": boom})


def _torch_save_bytes(marker: Path, tmp: Path) -> bytes:
    boom = _Boom()
    boom.marker = marker
    torch.save({"model": boom}, tmp / "zip.pt")
    return (tmp / "zip.pt").read_bytes()


@pytest.mark.parametrize("kind, problem", [
    ("missing", "does not exist"),
    ("empty", "empty or truncated"),
    ("truncated", "not a readable safetensors checkpoint"),
    ("pickle", "not a readable safetensors checkpoint"),
    ("torch-save", "not a readable safetensors checkpoint"),
    ("json", "not a readable safetensors checkpoint"),
    ("foreign-safetensors", "not a PTUnifier checkpoint"),
])
def test_resume_from_a_broken_checkpoint_names_file_and_problem(bench, stopped, tmp_path, kind, problem):
    run = copy_run(stopped, tmp_path / "run")
    target = run / "checkpoint.safetensors"
    marker = tmp_path / "unpickled"
    good = target.read_bytes()
    content = {"missing": None, "empty": b"", "truncated": good[: len(good) // 2],
               "pickle": _pickle_bytes(marker), "torch-save": _torch_save_bytes(marker, tmp_path),
               "json": b'{"model": {}}\n', "foreign-safetensors": None}[kind]
    target.unlink()
    if kind == "foreign-safetensors":
        save_file({"embeddings.weight": torch.zeros(2, 2)}, str(target))
    elif content is not None:
        target.write_bytes(content)
    with pytest.raises(CheckpointError) as err:
        train.main(args(bench, run, "--resume"))
    assert str(target) in str(err.value) and problem in str(err.value)
    assert not marker.exists()


def _rewrite_meta(path: Path, change) -> None:
    """Rewrite a checkpoint with its metadata passed through `change(meta)` (tensors kept)."""
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["ptunifier"]), {k: f.get_tensor(k) for k in f.keys()}
    change(meta)
    save_file(tensors, str(path), metadata={"ptunifier": json.dumps(meta)})


@pytest.mark.parametrize("case, expected", [
    ("preset", ["preset: checkpoint 'base' != current 'tiny'"]),
    ("seed", ["seed: checkpoint 0 != current 1"]),
    ("image-size", ["image_size: checkpoint 64 != current 32"]),
    ("vocabulary", ["vocab_size: checkpoint"]),
    ("all-at-once", ["preset: checkpoint 'base' != current 'tiny'", "seed: checkpoint 0 != current 1",
                     "image_size: checkpoint 64 != current 32", "vocab_size: checkpoint"]),
])
def test_resume_with_a_mismatched_config_names_the_fields(bench, stopped, tmp_path, case, expected):
    """One error names every field that differs, the model's and the run's together."""
    run = copy_run(stopped, tmp_path / "run")
    every = case == "all-at-once"
    extra = []
    if case == "seed" or every:
        extra += ["--seed", "1"]
    if case == "image-size" or every:
        extra += ["--image-size", "32"]
    if case == "preset" or every:
        _rewrite_meta(run / "checkpoint.safetensors",
                      lambda m: m["train_config"].update(preset="base"))
    if case == "vocabulary" or every:
        corpus = [t for r in data.read_manifest(bench / "pretrain")[0] for t in r["texts"]]
        Tokenizer.train(corpus, 300, tmp_path / "small" / "tokenizer.json")
        extra += ["--tokenizer", str(tmp_path / "small" / "tokenizer.json")]
    with pytest.raises(CheckpointError) as err:
        train.main(args(bench, run, "--resume") + extra)
    assert str(run / "checkpoint.safetensors") in str(err.value)
    for line in expected:
        assert line in str(err.value)
    assert str(err.value).count("!=") == len(expected)


BERT = dict(model_type="bert", hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
            intermediate_size=128, vocab_size=50, max_position_embeddings=24, type_vocab_size=2)
SMALL = dict(hidden_size=64, fusion_layers=1, fusion_heads=4, fusion_mlp=128, embed_dim=32, prompt_mode="static",
             k_visual=4, k_textual=4, max_text_len=16, image_size=32, vision_width=64, vision_layers=1,
             vision_heads=4, vision_mlp=128, patch_size=8)


@pytest.mark.parametrize("kind, problem", [
    ("empty", "not a readable safetensors file"),
    ("pickle", "not a readable safetensors file"),
    ("json", "not a readable safetensors file"),
    ("wrong-tensors", "does not fit the model"),
    ("wrong-config", "text_layers: Config has 1, config.json gives 2"),
])
def test_broken_encoder_folder_names_file_and_problem(tmp_path, kind, problem):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BERT))
    model = PTUnifier(config_from_hf(text=folder, **SMALL))
    marker = tmp_path / "unpickled"
    weights = folder / "model.safetensors"
    if kind == "empty":
        weights.write_bytes(b"")
    elif kind == "pickle":
        weights.write_bytes(_pickle_bytes(marker))
    elif kind == "json":
        weights.write_text('{"embeddings.word_embeddings.weight": [0]}')
    else:
        save_file({"embeddings.word_embeddings.weight": torch.zeros(7, 64)}, str(weights))
    if kind == "wrong-config":
        (folder / "config.json").write_text(json.dumps({**BERT, "num_hidden_layers": 2}))
    with pytest.raises(WeightLoadError) as err:
        load_hf_encoders(model, text=folder)
    where = folder / ("config.json" if kind == "wrong-config" else "model.safetensors")
    assert str(where) in str(err.value) and problem in str(err.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- manifests

def _pretrain_copy(bench, dst: Path, records=None, image_root=None) -> Path:
    """A pretrain task folder with its own records and (absolute) image root."""
    recs, meta = data.read_manifest(bench / "pretrain")
    dst.mkdir(parents=True)
    meta = {**meta, "image_root": str(image_root or (bench / "images"))}
    (dst / "meta.json").write_text(json.dumps(meta))
    lines = [r if isinstance(r, str) else json.dumps(r) for r in (records or recs)]
    (dst / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))
    return dst


@pytest.mark.parametrize("line3, expected", [
    ('{"id": "x", "split": "train", "image": "a.png", "texts": [', "malformed JSON"),
    ({"id": "x", "split": "train", "image": "a.png"}, "field 'texts' is missing"),
    ({"id": "x", "split": "train", "image": 7, "texts": ["three word text"]}, "field 'image' is 7"),
    ({"id": "x", "split": "train", "image": "a.png", "texts": "three word text"}, "field 'texts'"),
    ("duplicate", "duplicate"),
    ({"id": "x", "split": "train", "image": "../outside.png", "texts": ["three word text"]},
     "expected a relative path inside image_root"),
    ({"id": "x", "split": "train", "image": "/etc/passwd", "texts": ["three word text"]},
     "expected a relative path inside image_root"),
], ids=["malformed", "missing-field", "wrong-type", "wrong-list", "duplicate-id", "dotdot", "absolute"])
def test_broken_manifest_stops_training_naming_file_and_line(bench, tmp_path, line3, expected):
    recs, _ = data.read_manifest(bench / "pretrain")
    bad = {**recs[0]} if line3 == "duplicate" else line3
    folder = _pretrain_copy(bench, tmp_path / "task", [recs[0], recs[1], bad, *recs[2:]])
    with pytest.raises(data.ManifestError) as err:
        train.main(args(bench, tmp_path / "run", data_dir=folder))
    assert f"{folder / 'manifest.jsonl'}:3:" in str(err.value) and expected in str(err.value)
    assert not (tmp_path / "run" / "checkpoint.safetensors").exists()


def test_malformed_meta_names_file_and_line(bench, tmp_path):
    folder = _pretrain_copy(bench, tmp_path / "task")
    (folder / "meta.json").write_text('{\n "task": "pretrain",\n "image_root": \n}\n')
    with pytest.raises(data.ManifestError, match=rf"{folder / 'meta.json'}:4: malformed JSON"):
        train.main(args(bench, tmp_path / "run", data_dir=folder))


# ----------------------------------------------------------------------------- images

def _bomb_png(path: Path) -> None:
    """A 100-byte PNG whose header claims 20000 x 20000 pixels (400 MP)."""
    import struct
    import zlib
    Image.new("L", (8, 8)).save(path)
    raw = bytearray(path.read_bytes())
    ihdr = struct.pack(">II", 20000, 20000) + raw[24:29]
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    path.write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def bad_images(bench, tmp_path_factory):
    """A copy of the training split where 5 of 48 images are unreadable and 3 are odd but fine."""
    root = tmp_path_factory.mktemp("bad")
    images = root / "images"
    shutil.copytree(bench / "images", images)
    recs, _ = data.read_manifest(bench / "pretrain", "train")
    gray = np.asarray(Image.open(images / recs[0]["image"]).convert("L"))
    Image.fromarray(gray.astype(np.uint16) * 257).save(images / "sixteen.png")        # I;16
    Image.open(images / recs[0]["image"]).convert("CMYK").save(images / "cmyk.jpg")
    Image.open(images / recs[0]["image"]).convert("P").save(images / "palette.png")
    png = (images / recs[1]["image"]).read_bytes()
    (images / "empty.png").write_bytes(b"")
    (images / "truncated.png").write_bytes(png[: len(png) // 2])
    (images / "text.png").write_text("not an image\n")
    _bomb_png(images / "bomb.png")
    names = ["missing.png", "empty.png", "truncated.png", "text.png", "bomb.png",
             "sixteen.png", "cmyk.jpg", "palette.png"]
    for rec, name in zip(recs, names):
        rec["image"] = name
    assert Image.open(images / "sixteen.png").mode.startswith("I")
    folder = _pretrain_copy(bench, root / "task", recs, image_root=images)
    return folder, [str(images / n) for n in names[:5]]


def test_unreadable_images_are_skipped_and_reported(bench, bad_images, tmp_path, capsys):
    folder, unreadable = bad_images
    result = train.train(train.parse_args(args(bench, tmp_path / "run", "--steps", "6", "--max-bad-images",
                                               "0.2", data_dir=folder)))
    assert result["step"] == 6  # one epoch: every image was read once
    report = capsys.readouterr().out
    assert "5 unreadable training images skipped" in report
    for path in unreadable:
        assert path in report
    for readable in ("sixteen.png", "cmyk.jpg", "palette.png"):
        assert readable not in report


def test_too_many_unreadable_images_stop_the_run(bench, bad_images, tmp_path):
    folder, unreadable = bad_images
    with pytest.raises(RuntimeError, match=r"of 48 images of split 'train' are unreadable \(limit 5.0%\)"):
        train.main(args(bench, tmp_path / "run", "--steps", "6", "--max-bad-images", "0.05", data_dir=folder))


# ----------------------------------------------------------------------------- texts

ODD_TEXTS = {
    "long": "the heart is enlarged " * 200,
    "non_ascii": "Épanchement pleural gauche modéré, cœur normal. 胸腔积液 左侧 少量。 Ödem der Lunge.",
    "control": "no\x00 focal\x07 consolidation\u200b is seen\x1b[31m today.\r\n",
}


def test_odd_texts_train_without_empty_targets(bench, tmp_path):
    recs, _ = data.read_manifest(bench / "pretrain", "train")
    for rec, text in zip(recs, ODD_TEXTS.values()):
        rec["texts"] = [text]
    folder = _pretrain_copy(bench, tmp_path / "task", recs)
    tok = Tokenizer.load(bench / "tokenizer.json")
    ds = data.PretrainDataset(folder, "train", tok, 64, 40, train=True, seed=0)
    batch = ds.collate([ds[(i, i)] for i in range(len(ODD_TEXTS))])
    real = batch.attention_mask.sum(1)                          # [B] tokens incl. <s> </s>
    assert (real > 2).all() and real[0] == 40                   # none empty; the long one truncated
    assert ((batch.mlm_labels != -100).sum(1) >= 1).all()       # every row has an MLM target
    assert "\x00" not in tok.decode(batch.input_ids[2]) and "consolidation" in tok.decode(batch.input_ids[2])
    result = train.train(train.parse_args(args(bench, tmp_path / "run", "--steps", "1", data_dir=folder)))
    assert result["step"] == 1 and result["skipped_steps"] == 0


@pytest.mark.parametrize("text", ["", "   \t\n ", "\x00 \x01 \x02", "\u200b \u200b \u200b"],
                         ids=["empty", "whitespace", "control-only", "zero-width-only"])
def test_texts_empty_after_cleaning_are_refused_naming_the_line(bench, tmp_path, text):
    recs, _ = data.read_manifest(bench / "pretrain")
    recs[1]["texts"] = [text]
    folder = _pretrain_copy(bench, tmp_path / "pretrain", recs)
    with pytest.raises(data.ManifestError, match=r"manifest.jsonl:2: field 'texts'"):
        train.main(args(bench, tmp_path / "run", data_dir=folder))
    ts = [{"id": "a", "split": "train", "source": "three word source", "target": text}]
    (tmp_path / "ts").mkdir()
    (tmp_path / "ts" / "meta.json").write_text(json.dumps({"task": "ts", "name": "t"}))
    (tmp_path / "ts" / "manifest.jsonl").write_text(json.dumps(ts[0]) + "\n")
    with pytest.raises(data.ManifestError, match=r"manifest.jsonl:1: field 'target'"):
        data.read_manifest(tmp_path / "ts")


# ----------------------------------------------------------------------------- non-finite losses

def test_non_finite_losses_are_skipped_then_stop_with_the_last_good_parameters(bench, tmp_path, monkeypatch):
    """Step 1 inf (skipped, counted), step 2 fine, steps 3-4 NaN: with --max-bad-steps 2 the run
    stops and saves the parameters from the start of step 3, the first of the bad run."""
    clock = SignalAt(monkeypatch)
    poison = {1: float("inf"), 3: float("nan"), 4: float("nan")}
    make_optimizer, mlm_loss = train.make_optimizer, step.mlm_loss

    def capture_model(model, *rest):
        clock.model = model
        return make_optimizer(model, *rest)

    def poisoned_mlm_loss(*a):
        return mlm_loss(*a) * poison.get(clock.current, 1.0)

    monkeypatch.setattr(train, "make_optimizer", capture_model)
    monkeypatch.setattr(step, "mlm_loss", poisoned_mlm_loss)
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"2 consecutive steps had a non-finite loss") as err:
        train.main(args(bench, out, "--steps", "8", "--max-bad-steps", "2", "--itc-warmup", "0"))  # MLM runs
    assert str(out / "checkpoint.safetensors") in str(err.value)
    snap = clock.snapshots
    assert_same_tensors(snap[1], snap[2])                           # the inf step changed nothing
    assert not all(torch.equal(snap[2][k], snap[3][k]) for k in snap[2])  # the good step did
    meta, _ = read_checkpoint(out / "checkpoint.safetensors")
    assert meta["state"]["skipped_steps"] == 3 and meta["state"]["step"] == 4
    assert_same_tensors(snap[3], params(out / "checkpoint.safetensors"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2]
