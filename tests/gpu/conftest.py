"""Fixtures of the GPU tests: one process as the whole world, and a TP 1 model-parallel layout
set up and torn down around a test. A test module asks for them in its ``pytestmark``
(``pytest.mark.usefixtures``)."""

import pytest

from mp import parallel_state as ps
from mp.initialize import initialize_distributed


@pytest.fixture(scope="module")
def one_gpu_world():
    initialize_distributed()
    yield


@pytest.fixture
def model_parallel():
    ps.initialize_model_parallel(1)
    yield
    ps.destroy_model_parallel()
