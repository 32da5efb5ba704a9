"""Every test (and every process a test starts) writes converted corpora into a temporary
cache, never into ~/.cache/nanostoney."""
import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def corpus_cache(tmp_path_factory):
    old = os.environ.get("NANOSTONEY_CACHE")
    os.environ["NANOSTONEY_CACHE"] = str(tmp_path_factory.mktemp("nanostoney_cache"))
    yield os.environ["NANOSTONEY_CACHE"]
    if old is None:
        os.environ.pop("NANOSTONEY_CACHE", None)
    else:
        os.environ["NANOSTONEY_CACHE"] = old
