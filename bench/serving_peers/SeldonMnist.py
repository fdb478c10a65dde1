"""Seldon Core (Python wrapper) model class for ``bench/bench_serving.py``: the peer under test.

Runs inside ``bench/.cache/seldon-venv`` (seldon-core 1.18 + a TensorFlow that fits its pins),
never in the project venv. Started by the bench as::

    seldon-core-microservice SeldonMnist --service-type MODEL --http-port P --metrics-port P2 \
        --parameters '[{"name":"model_dir","value":"<registry>/models/mnist/1","type":"STRING"}]'

with this folder as the working directory. It does the same work per request as mlflowctl's
server: the classifier SavedModel (``serving_default``: ``images`` -> ``probabilities``) and the
concept autoencoder at ``<model_dir>/concept/`` (``images`` -> ``reconstruction_error``),
whose errors are compared with ``threshold.json``'s threshold and counted (drift scoring).
TensorFlow threading: ``PEER_TF_THREADS``
(default 1: 1 intra-op and 1 inter-op thread, as mlflowctl's server sets, and faster under
load on 2 cores than TF's defaults; 0 keeps TF's defaults).
"""
import json
import os

import numpy as np


class SeldonMnist:
    def __init__(self, model_dir=None):
        self.model_dir = model_dir or os.environ.get("MODEL_DIR", "")
        self.ready = False
        self.predictions = 0
        self.scored = 0
        self.outliers = 0

    def load(self):
        import tensorflow as tf

        threads = int(os.environ.get("PEER_TF_THREADS", "1"))
        if threads > 0:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
                tf.config.threading.set_inter_op_parallelism_threads(1)
            except RuntimeError:  # already initialised (a second load in the same process)
                pass
        self._tf = tf
        self._clf_obj = tf.saved_model.load(self.model_dir)
        self._clf = self._clf_obj.signatures["serving_default"]
        concept_dir = os.path.join(self.model_dir, "concept")
        self._concept_obj = tf.saved_model.load(concept_dir)
        self._concept = self._concept_obj.signatures["serving_default"]
        with open(os.path.join(concept_dir, "threshold.json"), encoding="utf-8") as fh:
            self.threshold = float(json.load(fh)["threshold"])
        self.ready = True

    def predict(self, X, features_names=None):
        if not self.ready:
            self.load()
        x = self._tf.constant(np.asarray(X, dtype=np.float32).reshape(-1, 784))
        probs = self._clf(images=x)["probabilities"].numpy()
        errors = self._concept(images=x)["reconstruction_error"].numpy().reshape(-1)
        self.predictions += probs.shape[0]
        self.scored += errors.size
        self.outliers += int(np.count_nonzero(errors > self.threshold))
        return probs

    def health_status(self):
        return {"ready": self.ready}
