"""Each supported backbone at its published dimensions, built on the meta device (no memory, no
download), with MOSS injected as a user with the real checkpoint would: the layers adapted,
the image tokens and grid found, and the adapter parameter count, against the numbers
README.md documents ("Supported backbones"), and against the closed form of the ConvLoRA
variant: per adapted ``d_in -> d_out`` layer ``r (d_in + d_out)`` (text LoRA) plus ``r d_in K^2
+ r d_out`` (image ConvLoRA), i.e. ``r (5 d_in + 2 d_out)`` at K 2."""

from pathlib import Path

import pytest
import torch
from transformers import (
    ChameleonConfig,
    ChameleonForConditionalGeneration,
    Emu3Config,
    Emu3ForConditionalGeneration,
    JanusConfig,
    JanusForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
)

from moss import MossConfig, get_moss_model
from moss.backbones import spec_for
from moss.layer import MossLinear

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def chameleon_7b():
    """facebook/chameleon-7b (and Anole-7B, its weights): ChameleonConfig's defaults are the 7B
    dimensions; a vocabulary map of the real layout (8192 VQ codes at ids 4..8195)."""
    letters = str.maketrans("0123456789", "ABCDEFGHIJ")
    vmap = {f"IMGIMG{str(c).translate(letters)}Z": 4 + c for c in range(8192)}
    vmap.update({"<image>": 8711, "<racm3:break>": 16385, "<eoss>": 16384})
    return ChameleonForConditionalGeneration(ChameleonConfig(vocabulary_map=vmap))


def llama_3_8b():
    return LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=14336,
                                        num_hidden_layers=32, num_attention_heads=32,
                                        num_key_value_heads=8, vocab_size=128256))


def llama_33b():
    """LLaMA-33B, the language model Emu2 is built on."""
    return LlamaForCausalLM(LlamaConfig(hidden_size=6656, intermediate_size=17920,
                                        num_hidden_layers=60, num_attention_heads=52,
                                        num_key_value_heads=52, vocab_size=32000))


def emu3_8b():
    """BAAI/Emu3-Gen's dimensions (Emu3Config's VQ defaults are Emu3's VQ-VAE); a vocabulary
    map of the real layout (32768 visual tokens after the text vocabulary)."""
    vmap = {f"<|visual token {i:06d}|>": 151854 + i for i in range(32768)}
    vmap.update({"<|extra_200|>": 151850, "<image>": 151852})
    text = dict(vocab_size=184622, hidden_size=4096, intermediate_size=14336,
                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                max_position_embeddings=9216, pad_token_id=151643, bos_token_id=151849,
                eos_token_id=151850)
    return Emu3ForConditionalGeneration(Emu3Config(text_config=text, vocabulary_map=vmap))


def janus_pro_7b():
    """deepseek-ai/Janus-Pro-7B: DeepSeek-LLM-7B as its language model (untied output head),
    JanusVisionConfig's defaults (SigLIP-L at 384 px: 24 x 24 image tokens) and VQ defaults
    (16384 codes), the aligners projecting to the language model's 4096."""
    text = dict(model_type="llama", vocab_size=102400, hidden_size=4096, intermediate_size=11008,
                num_hidden_layers=30, num_attention_heads=32, num_key_value_heads=32,
                max_position_embeddings=16384)
    return JanusForConditionalGeneration(JanusConfig(
        text_config=text, vision_config=dict(projection_dim=4096),
        vq_config=dict(projection_dim=4096, image_token_embed_dim=4096),
        tie_word_embeddings=False))


#: name in README -> (builder, base parameters, {rank: adapter parameters at K 2})
CASES = {
    "Chameleon-7B / Anole-7B": (chameleon_7b, 7_043_090_432,
                                {16: 134_610_944, 256: 2_153_775_104}),
    "Emu3-8B": (emu3_8b, 8_762_751_807, {16: 143_654_912, 256: 2_298_478_592}),
    "Llama-3-8B": (llama_3_8b, 8_030_261_248, {16: 143_654_912, 256: 2_298_478_592}),
    "Janus-Pro-7B": (janus_pro_7b, 7_407_773_323, {16: 126_197_760, 256: 2_019_164_160}),
    "LLaMA-33B (Emu2's language model)": (llama_33b, 32_528_943_616,
                                          {16: 410_419_200, 256: 6_566_707_200}),
}


def closed_form(model, r: int) -> int:
    """``r (5 d_in + 2 d_out)`` summed over the target layers, read from the unwrapped model
    (not under the spec's ``never_wrap``: a VQ-VAE, Janus's vision tower)."""
    skip = set(spec_for(model).never_wrap)
    return sum(r * (5 * m.in_features + 2 * m.out_features) for name, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS
               and not skip & set(name.split(".")))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("rank", [16, 256])
def test_published_sizes_get_the_documented_adapters(name, rank):
    build, base_params, adapters = CASES[name]
    with torch.device("meta"):
        model = build()
    assert sum(p.numel() for p in model.parameters()) == base_params
    want = closed_form(model, rank)
    moss = get_moss_model(model, MossConfig(r_text=rank, r_image=rank))
    trainable = sum(p.numel() for p in moss.parameters() if p.requires_grad)
    assert trainable == adapters[rank] == want
    wrapped = [n for n, m in moss.named_modules() if isinstance(m, MossLinear)]
    layers = model.config.get_text_config().num_hidden_layers
    assert len(wrapped) == 7 * layers and {n.rsplit(".", 1)[-1] for n in wrapped} == TARGETS
    assert not any({"vqmodel", "vision_model"} & set(n.split(".")) for n in wrapped)
    assert all(p.device.type == "meta" for p in moss.parameters())  # nothing was materialised
    if name.startswith("Chameleon"):  # the image tokens and grid found in the config
        assert len(moss.image_token_ids) == 8192 + 1 and moss.image_grid == (32, 32)
    if name.startswith("Emu3"):  # visual tokens and the row end; sizes from the sequence
        assert len(moss.image_token_ids) == 32768 and moss.row_end_ids == [151850]
        assert moss.image_grid is None
    if name.startswith("Janus"):  # embedding-fed: no image ids; the grid from the vision config
        assert moss.image_token_ids is None and moss.image_grid == (24, 24)
    # What README.md promises for this model and rank.
    row = next(line for line in README.splitlines() if line.startswith(f"| {name} |"))
    assert f"{base_params / 1e9:.2f} B" in row and f"{adapters[rank]:,}" in row
