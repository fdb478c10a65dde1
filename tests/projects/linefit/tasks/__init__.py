"""linefit: noisy points on a plane, a least-squares fit served as a tiny SavedModel, gated on R² over HTTP.

The whole pipeline in one declaration (``STAGES``); the light steps are mlflowctl's own actions.
"""
from mlflowctl.config import Setting
from mlflowctl.pipeline import Registration, Stage
from mlflowctl.stages import deploy_stage, promote_stage, register_stage

POINTS = Stage(
    name="points",
    command=("python", "points.py"),
    code=("points.py",),
    output="POINTS_DIR",
    settings={
        "count": Setting(int, 200, "points generated (a fifth held out)", min=10, max=100_000),
        "features": Setting(int, 3, "coordinates per point", min=1, max=64),
        "spread": Setting(float, 0.05, "std-dev of the noise on y", min=0, max=100, env="NOISE_SPREAD"),
        "seed": Setting(int, 7, "generator seed", min=0, max=2**32 - 1),
    },
    doc="generate noisy points of a random plane: fit.npz and holdout.npz",
)

FIT = Stage(
    name="fit",
    command=("python", "fit.py"),
    code=("fit.py",),
    inputs=(("POINTS_DIR", "points"),),
    output="FIT_DIR",
    settings={"ridge": Setting(float, 0.0, "L2 penalty of the least-squares fit", min=0, max=1e9)},
    doc="least squares with numpy, exported as a SavedModel of a tf.Module",
)

REGISTER = register_stage(Registration(servable=("FIT_DIR", "plane"), metrics={"metrics": ("FIT_DIR", "fit.json")}),
                          inputs=(("FIT_DIR", "fit"),), doc="the fitted plane becomes the next version")
DEPLOY = deploy_stage(doc="serve it beside the stable version")

CHECK = Stage(
    name="check",
    command=("python", "check.py"),
    code=("check.py",),
    inputs=(("POINTS_DIR", "points"), ("ENDPOINT_DIR", "deploy")),
    output="CHECK_DIR",
    settings={
        "min_r2": Setting(float, 0.9, "R² floor on the held-out points, asked over HTTP", min=0, max=1),
        "timeout": Setting(float, 20.0, "seconds per request", min=0.1, max=600),
    },
    doc="R² of the live endpoint on the held-out points",
)

PROMOTE = promote_stage(gate="check", doc="stable if it passed the check")

STAGES = (POINTS, FIT, REGISTER, DEPLOY, CHECK, PROMOTE)
