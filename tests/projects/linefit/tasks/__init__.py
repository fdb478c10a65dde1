"""linefit: noisy points on a plane, a least-squares fit served as a tiny SavedModel, gated on R² over HTTP.

The whole pipeline in one declaration (``STAGES``); the light steps are mlflowctl's own actions.
"""
from mlflowctl.config import Setting
from mlflowctl.model_registry import drop_superseded_version, register_model
from mlflowctl.pipeline import Registration, Stage
from mlflowctl.promotion import deploy_version, deployment_holds, promote_version

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

REGISTER = Stage(
    name="register",
    action=register_model,
    inputs=(("FIT_DIR", "fit"),),
    registers=Registration(servable=("FIT_DIR", "plane"), metrics={"metrics": ("FIT_DIR", "fit.json")}),
    keys=("model_name",),
    superseded=drop_superseded_version,
    doc="the fitted plane becomes the next version",
)

DEPLOY = Stage(
    name="deploy",
    action=deploy_version,
    still_valid=deployment_holds,
    inputs=(("VERSION_DIR", "register"),),
    params="serving",
    doc="serve it beside the stable version",
)

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

PROMOTE = Stage(
    name="promote",
    action=promote_version,
    inputs=(("REPORT_DIR", "check"), ("ENDPOINT_DIR", "deploy")),
    params="check",
    doc="stable if it passed the check",
)

STAGES = (POINTS, FIT, REGISTER, DEPLOY, CHECK, PROMOTE)
