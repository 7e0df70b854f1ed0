"""Every registered model: logits and features of the right shapes from images in [0, 1], gradients reaching every
parameter, and a state dict that round-trips through weights_only loading."""

import io

import pytest
import torch

from sanitize.errors import SanitizeError
from sanitize.models import create_model, list_models


@pytest.mark.parametrize("name", list_models())
def test_registered_model_contract(name):
    torch.manual_seed(0)
    model = create_model(name, 7, (3, 32, 32))
    x = torch.rand(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 7) and model.features(x).shape == (2, model.feature_dim)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    again = create_model(name, 7, (3, 32, 32))
    again.load_state_dict(torch.load(buffer, weights_only=True))
    model.eval()
    again.eval()
    assert torch.allclose(model(x), again(x))


def test_the_convnet_without_batch_norm_has_none():
    plain = create_model("convnet_nobn", 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in create_model("convnet", 10).modules())


def test_a_mistyped_model_name_gets_the_nearest():
    with pytest.raises(SanitizeError, match=r"unknown model 'convnt' \(did you mean convnet\?\)"):
        create_model("convnt", 10)
