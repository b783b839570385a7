"""Static int8 quantisation of the convolutional networks for the CPU (PyTorch FX, x86 backend).

The x86 backend (FBGEMM/oneDNN) runs int8 convolutions with VNNI/AVX2 integer units, which
every CPU this project targets has even where bf16 is emulated. Activation ranges come from
calibration images: a network is quantised lazily on its first input, so a VO run calibrates
on its first frame(s).
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def quantize_static(net: nn.Module, calibration: list[torch.Tensor]) -> nn.Module:
    """An int8 copy of ``net`` (eval mode, float in and out) calibrated on ``calibration`` inputs."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():   # torch.ao.quantization announces its move to torchao
        warnings.simplefilter("ignore")
        prepared = prepare_fx(copy.deepcopy(net).eval().float(), get_default_qconfig_mapping("x86"),
                              (calibration[0],))
        with torch.inference_mode():
            for images in calibration:
                prepared(images)
        return convert_fx(prepared)
