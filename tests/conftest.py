import json
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "demos" / "samples"


def load_script(path: str):
    """A script of the repository (e.g. ``demos/mic_chat.py``) as a module, to call its main()
    or parser in the test's process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session", autouse=True)
def _tiny_cache(tmp_path_factory):
    """Tiny checkpoints are written once per test session into a private folder."""
    import os

    os.environ["ZOO_TINY_DIR"] = str(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models are overhead-bound: one torch thread avoids OpenMP contention on a busy machine
    (a module opts in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_folders(_tiny_cache):
    from zoo.mini_omni.random_weights import tiny_checkpoint

    return tiny_checkpoint(seed=0)


@pytest.fixture(scope="session")
def tiny64(tiny_folders):
    """The tiny Mini-Omni in float64 on CPU (how parity is checked)."""
    import zoo

    return zoo.load("mini-omni", device="cpu", dtype="float64", checkpoint=tiny_folders.checkpoint, codec=tiny_folders.codec)


@pytest.fixture(scope="session")
def question_wav():
    path = SAMPLES / "01.wav"
    audio, rate = sf.read(path, dtype="float32")
    return path, audio, rate


@pytest.fixture(scope="session")
def transcripts():
    return json.loads((SAMPLES / "transcripts.json").read_text())


def snr_db(reference: np.ndarray, test: np.ndarray) -> float:
    noise = np.sum((reference - test) ** 2)
    return float("inf") if noise == 0 else 10 * np.log10(np.sum(reference**2) / noise)


class Deliveries:
    """What each of ``n`` scheduler sessions received (``to(i)`` is session i's callback), with a
    semaphore released at every delivery."""

    def __init__(self, n: int) -> None:
        self.got: list[list] = [[] for _ in range(n)]
        self.arrived = threading.Semaphore(0)

    def to(self, i: int):
        def deliver(item) -> None:
            self.got[i].append(item)
            self.arrived.release()
        return deliver
