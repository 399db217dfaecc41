"""segshare: 3D medical image segmentation with a kernel-sharing U-Net (Keras 3).

Importing the package makes segshare's Keras layers (``segshare.models``) registered whenever Keras
is imported, before or after segshare, so ``import segshare`` is all a plain
``keras.models.load_model("model.keras")`` needs. Keras itself is not imported until something
needs it: apps and worker processes that never touch a model (evaluation, preprocessing) start
without TensorFlow.
"""

import os as _os

import wrapt as _wrapt

__version__ = "0.2.0"

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter


def _register_layers(_keras) -> None:
    """Register segshare's serialisable layers with Keras (run once Keras is imported)."""
    import segshare.models  # noqa: F401


_wrapt.register_post_import_hook(_register_layers, "keras")
