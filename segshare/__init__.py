"""segshare: 3D medical image segmentation with a kernel-sharing U-Net (Keras 3)."""

__version__ = "0.1.0"
