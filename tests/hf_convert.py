"""What the Hugging Face conversion tests share: ``transformers`` and ``safetensors`` (the
importing test module is skipped without them), ``tools/convert_checkpoint.py`` as a
module, and the check of a model read back."""

import importlib
import os
import sys

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face round trip needs transformers and safetensors "
                           "(pip install -e '.[test]')")
pytest.importorskip("safetensors", reason="the Hugging Face round trip needs safetensors")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
convert = importlib.import_module("convert_checkpoint")


def assert_same_model(back, model, tokens: torch.Tensor) -> None:
    """``back`` (a transformers model read from converted files) holds ``model``'s state dict
    tensor for tensor, and gives its logits for ``tokens``."""
    expected, got = model.state_dict(), back.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, model(tokens).logits)
