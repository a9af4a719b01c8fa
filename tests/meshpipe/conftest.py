"""Fixtures of the QUIC link tests (test_quic.py, test_quic_fast.py)."""

from __future__ import annotations

import pytest

from meshpipe.identity import Identity, load_or_create_identity


@pytest.fixture(scope="module")
def identities(tmp_path_factory: pytest.TempPathFactory) -> tuple[Identity, Identity]:
    directory = tmp_path_factory.mktemp("quic-identities")
    return load_or_create_identity(directory, "server"), load_or_create_identity(directory, "peer")
