"""Noisy points of a random plane y = x·w + b: ``fit.npz`` and ``holdout.npz`` in POINTS_DIR."""
import json
import os
from pathlib import Path

import numpy as np

out = Path(os.environ["POINTS_DIR"])
count, features = int(os.environ["COUNT"]), int(os.environ["FEATURES"])
rng = np.random.default_rng(int(os.environ["SEED"]))
w, b = rng.uniform(-2, 2, size=features), float(rng.uniform(-1, 1))
x = rng.uniform(-1, 1, size=(count, features)).astype(np.float32)
y = (x @ w + b + rng.normal(0, float(os.environ["NOISE_SPREAD"]), size=count)).astype(np.float32)
cut = count - count // 5
np.savez(out / "fit.npz", x=x[:cut], y=y[:cut])
np.savez(out / "holdout.npz", x=x[cut:], y=y[cut:])
(out / "plane.json").write_text(json.dumps({"w": w.tolist(), "b": b}))
print(f"{count} points with {features} coordinates", flush=True)
