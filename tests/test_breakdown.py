"""benchmarks/_breakdown.py: which category a profiled operator's time is charged to."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _breakdown  # noqa: E402


def _event(name, parent=None, us=1000.0, shapes=()):
    return SimpleNamespace(name=name, cpu_parent=parent, self_cpu_time_total=us, input_shapes=list(shapes))


def test_each_operator_goes_to_its_nearest_category_and_the_optimizer_takes_all_it_calls():
    matmul = _event("_Matmul4bit")
    step = _event("Optimizer.step#PagedAdamW8bit.step")
    events = [
        matmul, _event("aten::mm", matmul, 3000, [[512, 64], [64, 128]]),  # a GEMM inside: gemm
        _event("aten::copy_", matmul),  # inside the 4-bit matmul: dequantization
        _event("bitsandbytes::dequantize_4bit"),
        step, _event("bitsandbytes::quantize_blockwise", step, 5000),  # the 8-bit state: optimizer
        _event("aten::mul_", _event("bitsandbytes::optimizer_update_8bit_blockwise", step)),
        _event("qlora::dropout"), _event("aten::add"),
    ]
    b = _breakdown.breakdown(events)
    assert b["seconds"] == pytest.approx({"gemm": 0.003, "dequantization": 0.003, "dropout": 0.001,
                                          "attention": 0.0, "optimizer": 0.007, "other": 0.001})
    assert b["gemm_flops"] == 2 * 512 * 64 * 128


def test_bench_rounds_pair_each_round_and_take_medians_of_speed_and_maxima_of_memory():
    import bench

    def run(stack, rnd, tok_s, peak):
        return {"stack": stack, "shape": "s", "round": rnd, "params": 10**9, "load_s": 1.0,
                "load_peak_gb": peak, "run_peak_gb": peak, "tok_s": tok_s, "tok_s_best": tok_s,
                "probe_bf16_flops": 1e12, "step_s": [1.0], "page_faults": [10], "losses": [2.0]}

    # round 1's machine was slow for both: its pair still says 2x; the pooled medians (90 / 47)
    # would say 1.91x
    results = [run("ours", 0, 100.0, 1.0), run("reference", 0, 50.0, 2.0),
               run("reference", 1, 30.0, 2.5), run("ours", 1, 60.0, 1.2),
               run("ours", 2, 90.0, 1.1), run("reference", 2, 47.0, 2.2)]
    ours = [r for r in results if r["stack"] == "ours"]
    ref = [r for r in results if r["stack"] == "reference"]
    assert bench.pair_ratios(ours, ref) == pytest.approx([2.0, 2.0, 90 / 47])
    merged = bench.merge_rounds(ours)
    assert merged["tok_s"] == 90.0 and merged["run_peak_gb"] == 1.2 and merged["step_s"] == [1.0] * 3
    text = bench.table(results, 1e12)
    assert "| **ours/ref** | 1.00x | 0.48x | 2.00x (1.91-2.00, 3 pairs) |" in text
    assert "| s | 1.00B | ours | 1.00 | 1.20 | 90.0 |" in text
