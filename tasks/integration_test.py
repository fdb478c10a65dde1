"""Stage ``integration_test``: held-out images (clean, noisy, random) against the live endpoint."""
from mlflowctl.config import Setting
from mlflowctl.pipeline import Stage

INTEGRATION_TEST = Stage(
    name="integration_test",
    command=("python", "integration_test.py"),
    code=("integration_test.py", "endpoint_client.py", "common.py"),
    inputs=(("MNIST_DATA_DIR", "data"), ("ENDPOINT_DIR", "deploy")),
    output="OUTPUT_DIR",
    settings={
        "min_accuracy": Setting(float, 0.8, "accuracy floor on clean held-out images: below it the version is not "
                                            "promoted", min=0, max=1),
        "samples": Setting(int, 1000, "held-out images sent to the endpoint", min=1),
        "batch_size": Setting(int, 100, "images per request", min=1),
        "noise": Setting(float, 0.5, "std-dev of the Gaussian noise added for the out-of-distribution part", min=0),
        "timeout": Setting(float, 30.0, "seconds per request", min=0.001, max=86400),
        "transport": Setting(str, "rest", "how the test talks to the endpoint: rest (its predict_url) or grpc (TF "
                                          "Serving's gRPC PredictionService, e.g. serving.local.grpc_port)",
                             choices=("rest", "grpc")),
        "seed": Setting(int, 0, "seed of the sample choice and the noise", min=0, max=2**32 - 1),
    },
    doc="test the live endpoint: accuracy on clean images, drift flagged on noisy ones",
)
