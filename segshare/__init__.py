"""segshare: 3D medical image segmentation with a kernel-sharing U-Net (Keras 3).

Importing the package registers segshare's Keras layers (``segshare.models``), so that
``import segshare`` is all a plain ``keras.models.load_model("model.keras")`` needs. The worker
processes of segshare's own pools (validation, caching, evaluation) skip it: they never load a
model, and importing Keras there would cost each worker seconds.
"""

import multiprocessing as _mp
import os as _os

__version__ = "0.2.0"

if _mp.parent_process() is None:  # not a worker process
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    from segshare import models as _models  # noqa: F401  (registers the layers with Keras)
