"""A/B of one EfficientNet-Lite0 adapter step: through the boundary, by plain autograd, and by the owner's own
forward code without the boundary's autograd node. Run: .venv/bin/python scripts/boundary_ab.py
"""

import torch, time, statistics
import torch.nn.functional as F
from graytune.bench.cases import CASES, _pixels, _pixel_adapter
from graytune.backbones import load_backbone
b, p = CASES["efficientnet-lite0"].boundary(), CASES["efficientnet-lite0"].plain()
bb = load_backbone("efficientnet-lite0"); x, y = _pixels(); conv = _pixel_adapter()
opt = torch.optim.AdamW(conv.parameters(), lr=1e-4)
def direct():
    opt.zero_grad(); F.cross_entropy(bb.run({"image.pixels": conv(x)}, {}, {}, ["logits"], [])["logits"], y).backward(); opt.step()
fns = {"boundary": b, "plain": p, "direct": direct}
for f in fns.values(): f(); f()
times = {k: [] for k in fns}
for r in range(14):
    order = list(fns.items()); order = order[r % 3:] + order[:r % 3]
    for k, f in order:
        t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
for k, v in times.items(): print(k, round(statistics.median(v), 4))

# the boundary's finiteness check of the pixels, the old way and the one it uses now
from graytune.access.checks import all_finite
def per_call(f, n=50):
    f(); t = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - t) / n
print("isfinite(x).all() ms", round(1e3 * per_call(lambda: bool(torch.isfinite(x).all())), 2),
      "all_finite(x) ms", round(1e3 * per_call(lambda: all_finite(x)), 2))
