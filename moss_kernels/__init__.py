"""moss-kernels: fused modality-routed LoRA / ConvLoRA for MOSS (arXiv 2407.03604).

    plan = RoutingPlan.from_spans(route, images, kernel_size=2, causal=True)
    y = moss_linear(x, weight, bias, plan, text_A, text_B, image_A, image_B,
                    text_scale, image_scale, backend=None)
"""

from .backends import BackendUnavailableError, available_backends
from .linear import moss_linear
from .routing import ROUTE_IMAGE, ROUTE_PAD, ROUTE_TEXT, RoutingPlan

__version__ = "0.1.0"

__all__ = [
    "RoutingPlan", "moss_linear", "available_backends", "BackendUnavailableError",
    "ROUTE_PAD", "ROUTE_TEXT", "ROUTE_IMAGE", "__version__",
]
