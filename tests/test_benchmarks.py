"""The benchmark scripts' own logic (their timings are never asserted)."""
import importlib.util
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

_spec = importlib.util.spec_from_file_location(
    "train_throughput", Path(__file__).resolve().parents[1] / "benchmarks/train_throughput.py")
train_throughput = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_throughput)


def test_copies_are_charged_to_the_op_that_asked_for_them():
    """A reshape of a transposed tensor copies through clone -> copy_: the copy is charged to
    the reshape, past the copy ops in between, with the copied tensor's shape."""
    x = torch.randn(256, 512)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        x.t().reshape(-1)
        x.t().contiguous()
    found = {(op, shape): sec for op, shape, sec in
             train_throughput.copy_sources(prof.events(), on_cuda=False)}
    assert set(found) == {("aten::reshape", "[512, 256]"), ("(top level)", "[512, 256]")}
