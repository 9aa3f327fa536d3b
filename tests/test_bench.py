"""The GPU benchmarks run correctly on a CPU: their JSON, their checks and their saved reports.

No timing is asserted (a shared CPU's timings mean nothing); what is checked is what a GPU run
relies on: the real training loop runs, the figures are filled in or honestly left empty, the
sides of the decode comparison produce the same tokens, and --out keeps the report.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import attention_cost, decode, pretrain, serve  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pretrain_bench_trains_with_the_real_loop_and_keeps_its_report(tmp_path):
    out = tmp_path / "results" / "cpu-tiny.json"
    report = pretrain.main(["--preset", "tiny", "--steps", "3", "--warmup", "1", "--batch-size", "2",
                            "--seq-len", "32", "--tokens-per-step", "128", "--out", str(out)])
    assert report["device"] == "cpu" and report["compile"] is False
    assert report["accumulation"] == 2 and report["tokens_per_step"] == 128
    assert report["tokens_per_s"] > 0 and report["step_ms_median"] > 0
    assert report["first_loss"] == pytest.approx(9.01, abs=0.3)  # ln(8192): random tokens, random model
    assert report["optimizer"] == "muon"                          # params.yaml's, as the pipeline trains
    assert report["matmul_shape"] == [2 * 32, 256, 1024] and report["matmul_flops"] > 0
    assert report["matmul_fraction"] == pytest.approx(
        report["tokens_per_s"] * report["flops_per_token"] / report["matmul_flops"], rel=1e-3)
    # No GPU: no MFU, and the report says why instead of guessing a peak.
    assert report["mfu"] is None and "CUDA" in report["note"]
    assert report["command"].endswith("--out " + str(out))
    assert json.loads(out.read_text()) == report


def test_decode_bench_compares_sides_that_produce_the_same_tokens(tmp_path):
    out = tmp_path / "decode.json"
    # --baseline times another tree's generate.py beside ours: here this tree's own, so it must agree.
    report = decode.main(["--new-tokens", "12", "--batch-sizes", "1,3", "--repeats", "1", "--out", str(out),
                          "--baseline", str(ROOT / "llm" / "generate.py")])
    for batch in ("batch_1", "batch_3"):
        row = report[batch]
        # float32 on a CPU: ours and transformers' generate agree token for token.
        assert row["tokens_match"] == {"ours": True, "baseline": True}
        assert row["ours_tokens_per_s"] > 0 and row["hf_tokens_per_s"] > 0 and row["matmul_only_tokens_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["ours_tokens_per_s"] / row["hf_tokens_per_s"], rel=0.02)
        assert row["baseline_ratio"] == pytest.approx(row["baseline_tokens_per_s"] / row["hf_tokens_per_s"], rel=0.02)
        assert set(row["cpu_us_per_token"]) == {"ours", "baseline", "hf"}
        assert all(us > 0 for us in row["cpu_us_per_token"].values())
    assert report["dtype"] == "float32" and json.loads(out.read_text()) == report


def test_serve_bench_ratios_pair_each_round_and_show_their_spread():
    # Round by round, this tree over the baseline: the median of the pairs and their range.
    ours = {8: [{"tokens_per_s": 110.0, "tokens_per_server_cpu_s": 50.0},
                {"tokens_per_s": 90.0, "tokens_per_server_cpu_s": 45.0},
                {"tokens_per_s": 200.0, "tokens_per_server_cpu_s": 60.0}]}
    baseline = {8: [{"tokens_per_s": 100.0, "tokens_per_server_cpu_s": 50.0},
                    {"tokens_per_s": 100.0, "tokens_per_server_cpu_s": 50.0},
                    {"tokens_per_s": 160.0, "tokens_per_server_cpu_s": 50.0}]}
    ratio = serve.paired_ratios(ours, baseline)["clients_8"]
    assert ratio["tokens_per_s"] == 1.1 and ratio["tokens_per_s_range"] == [0.9, 1.25]
    assert ratio["tokens_per_server_cpu_s"] == 1.0 and ratio["tokens_per_server_cpu_s_range"] == [0.9, 1.2]


def test_attention_cost_bench_finds_the_explicit_path_quadratic_in_memory_and_out_of_it_first(tmp_path):
    import subprocess

    # As a script, as the experiment runs it: its measurements fork from a fresh process, whose
    # free memory is not already resident (forked from this test process, peaks read 0).
    out = tmp_path / "attention.json"
    subprocess.run([sys.executable, str(ROOT / "bench/attention_cost.py"), "--min-length", "64", "--max-length",
                    "1024", "--memory-cap-mb", "16", "--repeats", "1", "--fit-from", "256", "--threads", "1",
                    "--out", str(out)], check=True, capture_output=True, timeout=300)
    report = json.loads(out.read_text())
    # The explicit path keeps (H, T, T) probabilities: 4 heads x 1024^2 x 4 bytes = 16 MB for one copy
    # alone, so a 16 MB cap stops it at 1024; the fused kernel's memory grows with T and fits.
    assert report["out_of_memory_at"] == {"explicit": 1024, "sdpa": None}
    explicit = {r["length"]: r for r in report["rows"] if r["path"] == "explicit"}
    sdpa = {r["length"]: r for r in report["rows"] if r["path"] == "sdpa"}
    assert sorted(sdpa) == [64, 128, 256, 512, 1024] and explicit[1024]["out_of_memory"]
    assert all(explicit[T]["peak_mb"] > sdpa[T]["peak_mb"] for T in (256, 512))
    fit = report["fit"]
    assert fit["explicit"]["memory_exponent"] > 1.4 and fit["sdpa"]["memory_exponent"] < 1.2
    assert fit["explicit"]["fit_lengths"] == [256, 512]
    assert attention_cost.fit_exponent([(1, 3.0), (2, 12.0), (4, 48.0)]) == pytest.approx(2.0)
