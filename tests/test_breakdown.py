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
