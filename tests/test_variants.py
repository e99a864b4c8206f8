"""moss/variants.py: each adapter variant's parameters, kernel, window and count (the layer's
behaviour per variant: tests/test_moss_model.py)."""

import pytest
import torch

from moss import MossConfig, get_moss_model
from moss.variants import VARIANTS

from helpers import tiny_llama


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_variant_owns_its_parameters_kernel_and_count(name, k):
    cfg = MossConfig(r_text=3, r_image=5, kernel_size=k, image_adapter=name,
                     target_modules=["q_proj"])
    variant = cfg.variant
    moss = get_moss_model(tiny_llama(), cfg)
    layer = moss.model.model.layers[0].self_attn.q_proj
    d_in, d_out = layer.base.in_features, layer.base.out_features
    adapter = {n: p for n, p in layer.named_parameters() if p.requires_grad}
    assert tuple(adapter) == ("text_A", "text_B", *variant.params) == layer.adapter_names
    assert sum(p.numel() for p in adapter.values()) == variant.num_params(cfg, d_in, d_out)
    assert {key.rsplit(".", 1)[-1] for key in moss.adapter_state_dict()} == set(adapter)
    window = k if variant.convolves else 1
    assert variant.window(cfg) == cfg.window == layer.window == window
    assert variant.label(cfg) == (f"{name} k={k}" if variant.convolves else name)
    kernel = variant.image_kernel(layer)
    if not variant.has_image_adapter:
        assert kernel is None and not variant.params
        return
    assert kernel.shape == (5, d_in, window, window)
    taps = variant.taps(layer, torch.float64)  # tap p*K + q holds kernel[:, :, p, q]
    for p in range(window):
        for q in range(window):
            block = taps[(p * window + q) * 5:(p * window + q + 1) * 5]
            torch.testing.assert_close(block, kernel[:, :, p, q].double())
    assert not layer.image_B.any()  # a fresh adapter changes nothing


def test_conv_rank_runs_the_composed_full_width_kernel():
    cfg = MossConfig(r_text=2, r_image=3, kernel_size=2, image_adapter="conv_rank",
                     target_modules=["q_proj"])
    layer = get_moss_model(tiny_llama(), cfg).model.model.layers[0].self_attn.q_proj
    kernel = cfg.variant.image_kernel(layer)
    for p in range(2):
        for q in range(2):
            torch.testing.assert_close(kernel[:, :, p, q],
                                       layer.image_conv[:, :, p, q] @ layer.image_down)
