import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))  # scripts and packages import from the repo root


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): runs
    compared with == then do their float sums in the same order, and on a busy machine a second
    thread mostly waits."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads((SHARED / "golden" / "seed_compat_5000.json").read_text())


@pytest.fixture(scope="session")
def llama3_tokenizer_file() -> Path:
    """The real Llama 3 tokenizer.model (128,000 ranks), as the llama-models package ships it."""
    import llama_models
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


@pytest.fixture(scope="session")
def extended_tokenizer(tmp_path_factory, llama3_tokenizer_file):
    """Factory: the real Llama 3 tokenizer extended by this project's code, cached per (N, modality)."""
    from data.tokenizer import Tokenizer, extended_tokenizer_bytes, read_bpe_file

    base = llama3_tokenizer_file.read_bytes()
    n_base = len(read_bpe_file(llama3_tokenizer_file))
    cache = {}

    def make(n_dsus: int = 5000, modality_tokens: bool = True) -> Tokenizer:
        if (n_dsus, modality_tokens) not in cache:
            path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
            path.write_bytes(extended_tokenizer_bytes(base, n_base, n_dsus, modality_tokens))
            cache[n_dsus, modality_tokens] = Tokenizer(path)
        return cache[n_dsus, modality_tokens]

    return make
