import os

import pytest
import torch

# Without CUDA the Triton kernels run under the interpreter. This must be set before anything
# imports triton (transformers may), or triton's own jit helpers are built for compilation.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
