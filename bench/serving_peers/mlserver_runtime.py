"""MLServer custom runtime for ``bench/bench_serving.py``: the peer under test.

Runs inside ``bench/.cache/mlserver-venv`` (mlserver + tensorflow-cpu 2.21), never in the
project venv. ``model-settings.json`` names ``mlserver_runtime.MnistRuntime`` with
``parameters.uri`` = the registry version folder (``<registry>/models/mnist/1``); the bench
writes it and ``settings.json`` (``parallel_workers: 0``: inference in the server process)
into a temporary folder and puts this folder on ``PYTHONPATH``.

Per request it does the same work as mlflowctl's server: the classifier SavedModel
(``serving_default``: ``images`` -> ``probabilities``) and the concept autoencoder at
``<uri>/concept/`` (``images`` -> ``reconstruction_error``), whose errors are compared with
``threshold.json``'s threshold and counted (drift scoring). TensorFlow threading:
``PEER_TF_THREADS`` (default 1: 1 intra-op and 1 inter-op thread, as mlflowctl's server sets,
and faster under load on 2 cores than TF's defaults; 0 keeps TF's defaults).
"""
import json
import os

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class MnistRuntime(MLModel):
    async def load(self) -> bool:
        import tensorflow as tf

        threads = int(os.environ.get("PEER_TF_THREADS", "1"))
        if threads > 0:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:
                pass
        uri = self.settings.parameters.uri if self.settings.parameters else None
        if not uri:
            raise ValueError("model-settings.json: parameters.uri (the SavedModel folder) is required")
        self._tf = tf
        self._clf_obj = tf.saved_model.load(uri)
        self._clf = self._clf_obj.signatures["serving_default"]
        concept_dir = os.path.join(uri, "concept")
        self._concept_obj = tf.saved_model.load(concept_dir)
        self._concept = self._concept_obj.signatures["serving_default"]
        with open(os.path.join(concept_dir, "threshold.json"), encoding="utf-8") as fh:
            self.threshold = float(json.load(fh)["threshold"])
        self.predictions = self.scored = self.outliers = 0
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        arr = NumpyCodec.decode_input(payload.inputs[0])
        x = self._tf.constant(np.asarray(arr, dtype=np.float32).reshape(-1, 784))
        probs = self._clf(images=x)["probabilities"].numpy()
        errors = self._concept(images=x)["reconstruction_error"].numpy().reshape(-1)
        self.predictions += probs.shape[0]
        self.scored += errors.size
        self.outliers += int(np.count_nonzero(errors > self.threshold))
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output("probabilities", probs)],
        )
