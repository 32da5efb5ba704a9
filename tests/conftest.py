"""Every test (and every process a test starts) writes converted corpora into a temporary
cache, never into ~/.cache/nanostoney. And every process a test starts receives Ctrl-C, SIGQUIT
and SIGHUP: a shell without job control starts background commands with the first two ignored,
nohup ignores the third, children inherit that, and the signal tests would then see their
signals ignored (a run that never stops). A test that wants nohup's behaviour runs nohup itself."""
import os
import signal

import pytest
import torch

signal.signal(signal.SIGINT, signal.default_int_handler)  # a Python handler: SIG_DFL again after exec
signal.signal(signal.SIGQUIT, signal.SIG_DFL)
signal.signal(signal.SIGHUP, signal.SIG_DFL)


@pytest.fixture(autouse=True, scope="session")
def corpus_cache(tmp_path_factory):
    old = os.environ.get("NANOSTONEY_CACHE")
    os.environ["NANOSTONEY_CACHE"] = str(tmp_path_factory.mktemp("nanostoney_cache"))
    yield os.environ["NANOSTONEY_CACHE"]
    if old is None:
        os.environ.pop("NANOSTONEY_CACHE", None)
    else:
        os.environ["NANOSTONEY_CACHE"] = old


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine two spinning
    OpenMP threads made a tiny training 20x slower. Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
