"""The kernel-sharing U-Net: banks and shared convs, the encoder, the network builder."""

from segshare.models.encoder import SHARING_SCHEMES, SharedEncoder
from segshare.models.layers import KernelBank, SharedConv, TemplateBank
from segshare.models.unet import (
    build_unet,
    check_patch_size,
    count_unique_params,
    format_parameter_report,
    parameter_report,
)

__all__ = [
    "SHARING_SCHEMES",
    "KernelBank",
    "SharedConv",
    "SharedEncoder",
    "TemplateBank",
    "build_unet",
    "check_patch_size",
    "count_unique_params",
    "format_parameter_report",
    "parameter_report",
]
