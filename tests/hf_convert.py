"""What the Hugging Face conversion tests share: ``transformers`` and ``safetensors`` (the
importing test module is skipped without them), ``tools/convert_checkpoint.py`` as a
module, converting a directory to mp, an mp checkpoint's logits at a layout, and the checks
of a model read back and of two checkpoints alike."""

import importlib
import os
import sys

import pytest
import torch

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, load_global_model, read_checkpoint_info
from mp.model import GPTModel, TransformerConfig
from mp.tensor_parallel import gather_from_tensor_model_parallel_region

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


def assert_same_checkpoint(path, other) -> None:
    """The mp checkpoints ``path`` and ``other`` hold the same config and weights, tensor
    for tensor."""
    (first, info), (second, info2) = map(load_global_model, (path, other))
    assert info.model_config == info2.model_config
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def to_mp(hf_dir, mp_dir, tp: int) -> None:
    """``hf-to-mp`` of ``hf_dir``, the vocabulary padded to a multiple of 16 x ``tp``."""
    convert.main(["hf-to-mp", "--input", str(hf_dir), "--output", str(mp_dir),
                  "--tensor-model-parallel-size", str(tp), "--make-vocab-size-divisible-by",
                  "16"])


def mp_logits(path: str, tp: int, ep: int, tokens: torch.Tensor, vocab: int,
              **model) -> torch.Tensor:
    """The logits ``[b, s, vocab]`` of the mp checkpoint ``path`` at TP ``tp`` x EP ``ep``
    (run on ``tp x ep`` ranks), the padding rows cut off; ``model``: config fields to
    override (``attention_backend``, ...)."""
    saved = read_checkpoint_info(path).model_config
    ps.initialize_model_parallel(tp, expert_model_parallel_size=ep)
    model = GPTModel(TransformerConfig(**{**saved, "tensor_model_parallel_size": tp,
                                          "expert_model_parallel_size": ep, **model})).eval()
    load_checkpoint(path, model)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(tokens))
    return logits[..., :vocab]
