import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))  # ablate, analyze, bench, gpu_check
torch.set_num_threads(min(2, os.cpu_count() or 1))

TEXT = """ACT I. SCENE I. A room in the castle.
Enter HAMLET and HORATIO.
HAMLET. The air bites shrewdly; it is very cold. What hour now?
HORATIO. I think it lacks of twelve. No, it is struck. Indeed? I heard it not.
It then draws near the season wherein the spirit held his wont to walk.
"""


@pytest.fixture(scope="session")
def tiny_corpus_dir(tmp_path_factory):
    """A small folder of .txt documents (varied text so that snippets differ)."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        words = TEXT.split()
        body = " ".join(words[(i * 7 + j) % len(words)] for j in range(4000))
        (d / f"doc{i}.txt").write_text(f"Document {i}.\n{body}\n")
    return str(d)


@pytest.fixture(scope="session")
def tiny_corpus(tiny_corpus_dir):
    import data
    return data.load_corpus(tiny_corpus_dir)
