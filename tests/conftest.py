"""Session fixtures: an isolated MESHPIPE_HOME, the real default model, a tiny random Llama."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, save_random_llama, start_auto

DEFAULT_MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session", autouse=True)
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every process the tests start keeps its files here, never in the user's dirs."""
    path = tmp_path_factory.mktemp("meshpipe-home")
    os.environ["MESHPIPE_HOME"] = str(path)
    return path


@pytest.fixture(scope="session")
def default_model(home: Path) -> Path:
    """SmolLM2-135M-Instruct, pulled and converted once per session (or reused from
    $MESHPIPE_TEST_MODEL_DIR to save minutes when iterating locally)."""
    reuse = os.environ.get("MESHPIPE_TEST_MODEL_DIR")
    if reuse:
        return Path(reuse)
    from meshpipe.models.catalog import pull

    return pull(DEFAULT_MODEL, progress=False)


@pytest.fixture(scope="session")
def tiny_model(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 4-layer Llama with GQA and the default model's tokenizer, saved by transformers."""
    path = save_random_llama(
        tmp_path_factory.mktemp("tiny-llama"),
        default_model,
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    config_json = json.loads((path / "config.json").read_text())
    assert config_json["num_hidden_layers"] == 4
    return path


@pytest.fixture(scope="session")
def shared_cluster(default_model: Path) -> Iterator[Cluster]:
    """`meshpipe auto` on the default model, two stages, shared by the API tests."""
    running = start_auto(default_model, 2, "--verbose")
    yield running
    running.process.stop()
    artifacts = Path(__file__).resolve().parent.parent / "artifacts"
    artifacts.mkdir(exist_ok=True)
    (artifacts / "cluster.log").write_text(running.process.output())


@pytest.fixture()
def cluster(shared_cluster: Cluster) -> Cluster:
    """The shared cluster, once its route is whole again: on a loaded machine a worker may have
    been judged silent and rejoined, and the gateway re-plans its two stages meanwhile."""
    deadline = time.monotonic() + 60
    while True:
        pipeline = shared_cluster.status()["pipeline"]
        if pipeline["ready"] and len(pipeline["stages"]) == 2:
            return shared_cluster
        if time.monotonic() > deadline:
            raise TimeoutError(f"the shared cluster did not recover: {pipeline}")
        time.sleep(0.2)
