"""Shared fixtures: an isolated lab cache per test session (the lab data are generated once)."""

import os

import pytest


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("aopd-cache")
    old = os.environ.get("AOPD_CACHE")
    os.environ["AOPD_CACHE"] = str(root)
    from aopd_cli.data.lab import ensure_lab

    ensure_lab()
    yield root
    if old is None:
        os.environ.pop("AOPD_CACHE", None)
    else:
        os.environ["AOPD_CACHE"] = old


@pytest.fixture(scope="session")
def lab_tokenizer(lab_cache):
    from transformers import AutoTokenizer

    from aopd_cli.data.lab import lab_dir

    return AutoTokenizer.from_pretrained(lab_dir() / "tokenizer")
