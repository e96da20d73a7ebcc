"""Benchmarks of the PTUnifier implementation (not timed tests). Results go to bench_results/.

Subcommands (one per measurement; add new ones with `add_parser` in `main`):
    python bench.py encoders   # our ViT / text encoder vs transformers, forward + backward

`encoders` builds transformers' CLIPVisionModel and RobertaModel at base widths (768, 12 heads,
MLP 3072) with reduced depth, loads the same weights into our encoders through our Hugging Face
loader, then times forward + backward of both side by side (interleaved repeats, median).
Ratio = transformers time / our time: >= 1.0 means ours is at least as fast. Takes about a
minute on 2 CPU cores with the defaults.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from model import Config, PTUnifier

RESULTS = Path("bench_results")


def fwd_bwd_seconds(run) -> float:
    """Wall time of one forward + backward of `run()` (a scalar-returning closure)."""
    start = time.perf_counter()
    run().backward()
    return time.perf_counter() - start


def interleaved_medians(cases: dict, repeats: int, warmup: int) -> dict[str, float]:
    """Median seconds per case; every repeat runs each case once, in turn, so drift is shared."""
    for _ in range(warmup):
        for run in cases.values():
            fwd_bwd_seconds(run)
    times = {name: [] for name in cases}
    for _ in range(repeats):
        for name, run in cases.items():
            times[name].append(fwd_bwd_seconds(run))
    return {name: statistics.median(t) for name, t in times.items()}


def build_encoder_pair(args, folder: Path):
    """transformers models and our PTUnifier with the same encoder weights, both in train mode."""
    import transformers  # benchmark-only reference library

    width = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=args.layers)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        **width, image_size=args.image_size, patch_size=16, hidden_act="quick_gelu"))
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        **width, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5),
        add_pooling_layer=False)
    clip.save_pretrained(folder / "clip")
    roberta.save_pretrained(folder / "roberta")
    cfg = Config.from_hf(vision=folder / "clip", text=folder / "roberta",
                         image_size=args.image_size, fusion_layers=1)
    ours = PTUnifier(cfg)
    ours.load_hf_encoders(vision=folder / "clip", text=folder / "roberta")
    return clip.train(), roberta.train(), ours.train()


def bench_encoders(args) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        clip, roberta, ours = build_encoder_pair(args, Path(tmp))
    pixels = torch.randn(args.vision_batch, 3, args.image_size, args.image_size)
    ids = torch.randint(5, 50265, (args.text_batch, args.text_len))
    full = torch.ones_like(ids)
    padded = full.clone()
    for b in range(args.text_batch):  # lengths spread between half and full length
        padded[b, args.text_len // 2 + b % (args.text_len // 2):] = 0
    ids_padded = ids.masked_fill(padded == 0, 1)

    def hf_vision():
        return clip.post_layernorm(clip(pixel_values=pixels).last_hidden_state).square().mean()

    cases = {
        "vision/transformers": hf_vision,
        "vision/ours": lambda: ours.encode_image(pixels).square().mean(),
        "text/transformers": lambda: roberta(
            input_ids=ids, attention_mask=full).last_hidden_state.square().mean(),
        "text/ours": lambda: ours.encode_text(ids, full).square().mean(),
        "text_padded/transformers": lambda: roberta(
            input_ids=ids_padded, attention_mask=padded).last_hidden_state.square().mean(),
        "text_padded/ours": lambda: ours.encode_text(ids_padded, padded).square().mean(),
    }
    medians = interleaved_medians(cases, args.repeats, args.warmup)
    rows = []
    for name in ("vision", "text", "text_padded"):
        theirs, mine = medians[f"{name}/transformers"], medians[f"{name}/ours"]
        rows.append({"encoder": name, "transformers_s": theirs, "ours_s": mine,
                     "ratio": theirs / mine})
    return {"rows": rows, "settings": vars(args) | {"threads": torch.get_num_threads()}}


def print_table(rows: list[dict]) -> None:
    print(f"{'encoder':<12} {'transformers (s)':>17} {'ours (s)':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r['encoder']:<12} {r['transformers_s']:>17.4f} {r['ours_s']:>10.4f} "
              f"{r['ratio']:>7.2f}")


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    result["environment"] = {"torch": torch.__version__, "python": platform.python_version(),
                             "machine": platform.machine()}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encoders", help="our ViT/text encoders vs transformers, fwd+bwd time")
    enc.add_argument("--layers", type=int, default=2,
                     help="encoder depth at base widths (the paper uses 12; 2 keeps CPU runs short)")
    enc.add_argument("--image-size", type=int, default=224, help="ViT input side (patch 16)")
    enc.add_argument("--vision-batch", type=int, default=4, help="images per step")
    enc.add_argument("--text-batch", type=int, default=16, help="texts per step")
    enc.add_argument("--text-len", type=int, default=48, help="tokens per text (paper: 48)")
    enc.add_argument("--repeats", type=int, default=6, help="timed rounds (median reported)")
    enc.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    enc.add_argument("--threads", type=int, default=None,
                     help="torch threads (default: torch's choice, usually the core count)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "encoders":
        result = bench_encoders(args)
        print_table(result["rows"])
        print(f"saved {save('encoders', result)}")


if __name__ == "__main__":
    main()
