"""Peak tensor memory of one training step, measured in a fresh process per mode.

``python -m graytune.bench.memory CASE MODE`` prints one JSON line. The torch
profiler records every tensor allocation and free of the first step (so
gradients and the optimizer's state, created then, count); the running sum's
maximum is the step's peak. The backbone's weights are resident in every mode
and are reported beside it. Exact for tensors, unlike RSS, which the C
allocator's caching blurs by tens of MB.
"""

from __future__ import annotations

import json
import sys

import torch

from graytune.eval.profiling import peak_tensor_mb


def weights_mb(case: str) -> float:
    from graytune.access import open_backbone

    module = open_backbone(case, access="white-box").module()
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20


def measure(case: str, mode: str) -> dict[str, float]:
    from graytune.bench.cases import CASES

    torch.manual_seed(0)
    step = getattr(CASES[case], mode)()
    return {"step_peak_mb": peak_tensor_mb(step), "weights_mb": weights_mb(case)}


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
