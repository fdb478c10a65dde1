"""Ridge least squares with numpy; the plane exported as a SavedModel (a tf.Module) in FIT_DIR/plane."""
import json
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
points, out = Path(os.environ["POINTS_DIR"]), Path(os.environ["FIT_DIR"])
ridge = float(os.environ["RIDGE"])
data = np.load(points / "fit.npz")
x, y = data["x"].astype(np.float64), data["y"].astype(np.float64)
design = np.hstack([x, np.ones((len(x), 1))])
penalty = ridge * np.eye(design.shape[1])
penalty[-1, -1] = 0.0  # the offset is not penalised
coef = np.linalg.solve(design.T @ design + penalty, design.T @ y)
w, b = coef[:-1], float(coef[-1])
residual = y - design @ coef
r2 = 1.0 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())

import tensorflow as tf  # noqa: E402 - a stage process may import TF; the orchestrator never does


class Plane(tf.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = tf.Variable(w.reshape(-1, 1).astype(np.float32))
        self.b = tf.Variable(np.float32(b))

    @tf.function(input_signature=[tf.TensorSpec([None, len(w)], tf.float32, name="x")])
    def serve(self, x):
        return {"y": tf.matmul(x, self.w)[:, 0] + self.b}


plane = Plane()
tf.saved_model.save(plane, str(out / "plane"), signatures={"serving_default": plane.serve})
(out / "fit.json").write_text(json.dumps({"r2_fit": r2, "ridge": ridge, "w": w.tolist(), "b": b}))
print(f"fitted {len(w)} weights, R² on the fitted points {r2:.4f}", flush=True)
