"""What the Hugging Face conversion tests share: ``transformers`` and ``safetensors`` (the
importing test module is skipped without them) and ``tools/convert_checkpoint.py`` as a
module."""

import importlib
import os
import sys

import pytest

transformers = pytest.importorskip(
    "transformers", reason="the Hugging Face round trip needs transformers and safetensors "
                           "(pip install -e '.[test]')")
pytest.importorskip("safetensors", reason="the Hugging Face round trip needs safetensors")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
convert = importlib.import_module("convert_checkpoint")
