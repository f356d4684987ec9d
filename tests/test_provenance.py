"""Parameter lookup behind the fingerprint works on wrapped models."""

from torch import nn

from safety_peft.provenance import find_parameter, model_fingerprint
from tiny import make_llama


class Wrapper(nn.Module):
    """Shape of a PEFT tuner layer added without PEFT's prefix (``add_adapter``)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_layer = base


def test_lookup_through_a_tuner_layer_without_prefix():
    model = make_llama()
    name = "model.layers.0.self_attn.q_proj.weight"
    before = model_fingerprint(model, [name])
    linear = model.model.layers[0].self_attn.q_proj
    model.model.layers[0].self_attn.q_proj = Wrapper(linear)
    assert find_parameter(model, name) is linear.weight
    assert model_fingerprint(model, [name]) == before
    assert find_parameter(model, "model.layers.0.self_attn.nope.weight") is None
