"""Fixtures shared by the test files, and hypothesis' profiles: "ci" (the default) draws the same examples
every run, so that a test suite passes or fails for a reason; `HYPOTHESIS_PROFILE=explore make test` draws
new ones every run to look for bugs. What exploring finds becomes an @example of its test."""

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    """Python's own Ctrl-C handler for the whole session, as in a terminal. A shell that starts the suite in the
    background (`make test &`, a CI step run so) leaves SIGINT ignored, which Python and every process it starts
    keep: the tests that send themselves a SIGINT, and training's stop flag, would see nothing."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from a second thread, and on a busy machine every parallel region of a small
    op (index_add_ in particular) can wait a whole scheduler time slice for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of real Python files (the json package) and a private token cache."""
    root = tmp_path_factory.mktemp("corpus")
    for src in sorted(Path(json.__file__).parent.glob("*.py")):
        (root / src.name).write_text(src.read_text())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSMOE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield root
