"""The gate: R² of the live endpoint on the held-out points, over TF Serving's REST API (report.json)."""
import json
import os
import urllib.request
from pathlib import Path

import numpy as np

points, endpoint_dir, out = (Path(os.environ[k]) for k in ("POINTS_DIR", "ENDPOINT_DIR", "CHECK_DIR"))
floor, timeout = float(os.environ["MIN_R2"]), float(os.environ["TIMEOUT"])
url = json.loads((endpoint_dir / "endpoint.json").read_text())["predict_url"]
data = np.load(points / "holdout.npz")
x, y = data["x"], data["y"].astype(np.float64)
predicted = []
for start in range(0, len(x), 32):
    body = json.dumps({"instances": x[start:start + 32].tolist()}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        predicted += [float(np.ravel(p)[0]) if isinstance(p, list) else float(p)
                      for p in json.loads(response.read())["predictions"]]
residual = y - np.array(predicted)
r2 = 1.0 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
report = {"passed": r2 >= floor, "accuracy": r2, "min_accuracy": floor, "samples": len(y), "metric": "r2"}
(out / "report.json").write_text(json.dumps(report))
print(f"R² {r2:.4f} on {len(y)} held-out points over HTTP (floor {floor})", flush=True)
