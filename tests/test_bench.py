"""bench.py's plumbing: the command a person lent a GPU runs once must not fail on its first try.
(Nothing is timed here; the numbers are bench.py's to print.)"""
import json

import bench


def test_the_gpu_command_runs_end_to_end_on_the_cpu(tmp_path, monkeypatch, capsys):
    """`bench.py gpu` with the tiny preset on the CPU, two batch sizes, no compiled rows: the step
    rows, the loader rows on freshly rendered PNG files, one table, the JSON."""
    monkeypatch.chdir(tmp_path)
    bench.main(["gpu", "--device", "cpu", "--preset", "tiny", "--batches", "4", "8", "--compiled-batch", "0",
                "--render", "16", "--workers", "0", "--data-batches", "2", "--repeats", "1", "--warmup", "0"])
    result = json.loads((tmp_path / "bench_results" / "gpu.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["eager B=4", "eager B=8"]
    assert [r["source"] for r in result["data_rows"]][1:] == ["loader, 0 workers, 64 px files"]
    assert result["data_rows"][0]["source"].startswith("fastest step: eager B=")
    assert "samples/s" in capsys.readouterr().out


def test_the_gpu_command_runs_its_compiled_row(tmp_path, monkeypatch):
    """The compiled row of `bench.py gpu` (the CPU gets no CUDA-graph row): the step through
    torch.compile(fullgraph=True), its compile timed apart, the same losses as eager. The
    aot_eager backend makes the same TorchDynamo graph and AOTAutograd split without generating
    code (inductor's code generation: test_compile.py)."""
    import functools

    import torch
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    bench.main(["gpu", "--device", "cpu", "--preset", "tiny", "--batches", "4", "--compiled-batch", "4",
                "--render", "8", "--workers", "0", "--data-batches", "1", "--repeats", "1", "--warmup", "0",
                "--check-losses"])
    result = json.loads((tmp_path / "bench_results" / "gpu.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["eager B=4", "compile B=4"]
    compiled = result["rows"][1]
    assert compiled["compile_s"] > 0 and compiled["samples_per_s"] > 0
    assert result["compile_s"]["compile B=4"] == compiled["compile_s"]
    assert result["max_loss_diff"]["compile B=4"] < 1e-4  # against the eager step on the same batch


def test_the_real_size_rows_run_and_count_cores(tmp_path, monkeypatch, capsys):
    """`bench.py data --real-size 1`: one full-size JPEG, DICOM and prepared copy, timed once each;
    a row per source with its cores per A100 / H100."""
    monkeypatch.chdir(tmp_path)
    bench.main(["data", "--batch", "8", "--render", "16", "--workers", "0", "--data-batches", "1", "--repeats", "1", "--warmup", "0",
                "--real-size", "1", "--prepared-size", "256"])
    rows = json.loads((tmp_path / "bench_results" / "data_tiny_cpu.json").read_text())["real_rows"]
    assert [r["source"] for r in rows] == ["2544x3056 JPEG q95 -> 288 px", "2544x3056 DICOM 12-bit -> 288 px",
                                           "prepared 256-px copy (TIFF) -> 288 px"]
    assert rows[0]["vs_jpeg"] == 1.0 and all(r["cores_h100"] > r["cores_a100"] > 0 for r in rows)
    out = json.loads((tmp_path / "bench_results" / "data_tiny_cpu.json").read_text())["copy_vs_full_decode"]
    assert out["max_abs"] <= 2 and "cores/H100" in capsys.readouterr().out
