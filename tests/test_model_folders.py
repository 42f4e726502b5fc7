"""A user's own model folders (issue 32), as the lab's tiny checkpoint copied and altered, each run as
`aopd distill` / `aopd eval` / `aopd warmup` in a subprocess: a folder that cannot serve is one line naming
the file, what was found and what to do, with a non-zero exit, no traceback and no output folder or MLflow
run; a cached warm-up edited after it was written is set aside, named, and trained again."""

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import distill_args, run_aopd
from safetensors.torch import load_file

from aopd_cli.tracking.store import connect

pytestmark = pytest.mark.slow


def runs(work: Path) -> list:
    if not (work / "mlflow.db").is_file():
        return []
    client = connect(f"sqlite:///{work}/mlflow.db")
    found = client.get_experiment_by_name("aopd")
    return list(client.search_runs([found.experiment_id])) if found else []


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def no_template(folder: Path) -> None:
    (folder / "chat_template.jinja").unlink()
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())


def pickled(folder: Path) -> None:
    """Weights as a pickle that also holds a Python object: weights-only loading refuses it."""
    weights = load_file(str(folder / "model.safetensors"))
    torch.save({**weights, "args": argparse.Namespace(lr=1e-5)}, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


@pytest.fixture
def folders(tmp_path, tiny_checkpoint):
    """The tiny checkpoint, copied and altered as the issue's table says."""
    for name, alter in (("nochat", no_template), ("vocab", lambda f: edit_config(f, vocab_size=143)),
                        ("small_vocab", lambda f: edit_config(f, vocab_size=120)), ("pickled", pickled)):
        shutil.copytree(tiny_checkpoint, tmp_path / name)
        alter(tmp_path / name)
    (tmp_path / "broken.jinja").write_text("{{ messages[0]['content'] ")
    return tmp_path


CASES = [  # (name, the command after `aopd`, exit code, the one line, in part)
    ("no chat template", ["student.path=nochat"], 1,
     ("student.path=nochat: its tokenizer has no chat template (no chat_template in tokenizer_config.json, no "
      "chat_template.jinja), and every prompt is formatted with one: name one with student.chat_template=chatml")),
    ("no chat template, eval", ["eval", "student.path=nochat"], 1, "student.path=nochat: its tokenizer has no chat"),
    ("a template that cannot format", ["student.path=nochat", "student.chat_template=broken.jinja"], 1,
     ("student.chat_template=broken.jinja: the chat template cannot format a conversation "
      "(TemplateSyntaxError")),
    ("a template file missing", ["student.path=nochat", "student.chat_template=nowhere.jinja"], 2,
     "student.chat_template: no chat template file at 'nowhere.jinja'"),
    ("student config vocabulary", ["student.path=vocab"], 1,
     ("student.path=vocab: config.json disagrees with the weights: vocab_size 143 in config.json, but "
      "model.embed_tokens.weight in model.safetensors is [133, 64]")),
    ("teacher config vocabulary smaller", ["teacher.path=small_vocab"], 1,
     ("teacher.path=small_vocab: config.json disagrees with the weights: vocab_size 120 in config.json, but "
      "model.embed_tokens.weight in model.safetensors is [133, 64]")),
    ("pickle weights-only refuses", ["student.path=pickled"], 1,
     ("student.path=pickled: pytorch_model.bin is a pickle that weights-only loading refuses (it holds "
      "argparse.Namespace, not only tensors); aopd loads safetensors")),
]


def test_a_folder_that_cannot_serve_is_one_line_before_any_folder_or_run(folders, tiny_checkpoint, lab_cache):
    failed = []
    for name, args, code, text in CASES:
        if args[0] == "eval":
            command = ["eval", *args[1:], "eval.limit=2", "eval.n=1", "eval.k=[1]", "output_dir=out"]
        else:
            command = [*distill_args(tiny_checkpoint, "out", "train.steps=1"), *args]
        result = run_aopd(*command, cwd=folders, cache=lab_cache, timeout=300)
        lines = [line for line in result.stderr.splitlines() if line.startswith("aopd:")]
        if result.returncode != code or text not in result.stderr or "Traceback" in result.stderr \
                or len(lines) != 1 or (folders / "out").exists() or runs(folders):
            failed.append(f"{name}: exit {result.returncode}, {len(runs(folders))} runs, stderr {result.stderr[-600:]!r}")
    assert not failed, "\n".join(failed)


def test_a_named_chat_template_serves_a_folder_without_one(folders, tiny_checkpoint, lab_cache):
    result = run_aopd(*distill_args(tiny_checkpoint, "out", "train.steps=1"), "student.path=nochat",
                      "student.chat_template=chatml", cwd=folders, cache=lab_cache)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = folders / "out/checkpoint/chat_template.jinja"  # kept with the checkpoint: later stages need no key
    assert saved.is_file() and "<|im_start|>" in saved.read_text()


def test_an_edited_cached_warmup_is_set_aside_and_trained_again(tmp_path):
    """In a cache of its own: the session's is shared by the tests of this worker, which must not meet the
    edited checkpoint or the one set aside."""
    lab_cache = tmp_path / "cache"
    args = ["warmup", "student=lab_student", "train.steps=3", "train.batch_size=4", "train.micro_batch_size=4",
            "eval.benchmarks=[]", "reuse_cached=true", "tracking.enabled=false"]
    first = run_aopd(*args, "output_dir=one", cwd=tmp_path, cache=lab_cache)
    assert first.returncode == 0, first.stderr[-2000:]
    cached = (tmp_path / "one/checkpoint").resolve()
    subprocess.run(["cp", "-a", "one/checkpoint", "mine"], cwd=tmp_path, check=True)  # copies the link
    edit_config(tmp_path / "mine", vocab_size=143)
    (tmp_path / "mine/chat_template.jinja").unlink()

    again = run_aopd(*args, "output_dir=one", cwd=tmp_path, cache=lab_cache)  # the same folder, then another
    other = run_aopd(*args, "output_dir=two", cwd=tmp_path, cache=lab_cache)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-2000:]
    assert f"warning: the cached warm-up {cached} is not as it was written (chat_template.jinja was removed): it " \
           f"is kept as {cached}.changed-" in again.stdout and "trained again" in again.stdout
    assert "already finished" not in again.stdout and "reusing the cached" not in again.stdout
    assert other.returncode == 0 and "reusing the cached warm-up checkpoint" in other.stdout  # rebuilt, sealed
    aside = next(cached.parent.glob(f"{cached.name}.changed-*"))
    assert json.loads((aside / "config.json").read_text())["vocab_size"] == 143  # the edits are kept
    assert (cached / "chat_template.jinja").is_file() and json.loads((cached / "config.json").read_text()) \
        ["vocab_size"] == 133
    (cached / ".aopd_files.json").unlink()  # as an earlier aopd left its caches: taken as they are, and recorded
    older = run_aopd(*args, "output_dir=three", cwd=tmp_path, cache=lab_cache)
    assert older.returncode == 0 and f"note: the cached warm-up {cached} has no record of its files" in older.stdout
    assert "reusing the cached warm-up checkpoint" in older.stdout and (cached / ".aopd_files.json").is_file()
