"""The Python model class ``seldon-core-microservice MlflowctlModel`` serves (Seldon Core v1's wrapper).

The seeds' shape (``__init__(**parameters)``, ``load()``, ``predict(X, features_names, meta)``): the
classifier is one registry version's SavedModel, loaded with the TensorFlow of the wrapper's own
environment (seldon-core 1.18 pins clash with the project's TensorFlow 2.21: ``make seldon`` installs
tensorflow-cpu 2.15 beside it). Parameters (``--parameters`` JSON): ``model_dir`` (the version folder),
``signature`` (default ``serving_default``). No mlflowctl import: this file runs in that environment.
"""
from __future__ import annotations

import os


class MlflowctlModel:
    def __init__(self, model_dir: str = "", signature: str = "serving_default") -> None:
        self.model_dir = model_dir
        self.signature = signature
        self.ready = False
        self.error = ""
        self._fn = None

    def load(self) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        try:
            fn = tf.saved_model.load(self.model_dir).signatures[self.signature]
        except Exception as exc:  # noqa: BLE001 - kept, and told by health_status (the target fails fast)
            self.error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            return
        ((self._input, spec),) = fn.structured_input_signature[1].items()
        self._dtype = spec.dtype
        self._shape = spec.shape
        self._outputs = sorted(fn.structured_outputs)
        self._fn = fn
        self.ready = True

    def predict(self, X, features_names=None, meta=None):  # noqa: N803 - Seldon's signature
        import numpy as np
        import tensorflow as tf
        from seldon_core.flask_utils import SeldonMicroserviceException

        if not self.ready:
            self.load()
        if not self.ready:
            raise SeldonMicroserviceException(f"cannot load the model {self.model_dir}: {self.error}",
                                              status_code=500, reason="MICROSERVICE_INTERNAL_ERROR")
        try:
            x = tf.constant(np.asarray(X), dtype=self._dtype)
            if not self._shape.is_compatible_with(x.shape):  # a signature call does not check it
                raise ValueError(f"shape {x.shape.as_list()} does not fit the signature's {self._shape.as_list()}")
            out = self._fn(**{self._input: x})
        except (ValueError, TypeError, tf.errors.InvalidArgumentError) as exc:
            message = " ".join(str(exc).split())[:300]
            raise SeldonMicroserviceException(f"bad input for {self._input}: {message}", status_code=400,
                                              reason="MICROSERVICE_BAD_DATA") from None
        return out[self._outputs[0]].numpy()

    def health_status(self):
        from seldon_core.flask_utils import SeldonMicroserviceException

        if self.error:
            raise SeldonMicroserviceException(f"cannot load the model {self.model_dir}: {self.error}",
                                              status_code=500, reason="MICROSERVICE_INTERNAL_ERROR")
        if not self.ready:
            raise SeldonMicroserviceException("model not loaded yet", status_code=503)
        return {"ready": True, "model_dir": self.model_dir}

    def init_metadata(self):
        return {"name": os.path.basename(os.path.dirname(self.model_dir.rstrip("/"))),
                "versions": [os.path.basename(self.model_dir.rstrip("/"))], "platform": "tensorflow"}
