"""--model: a zoo name, an export directory or a Python file, installed once per run and never silently swapped."""
from __future__ import annotations

import json

import pytest

from coordinator.model import sources
from coordinator.model.sources import ModelSourceError

MODEL = '''
from torch import nn
from coordinator.model.block_model import BlockModel


def build(width={width}):
    return BlockModel("tiny", input_shape=(1, 4, 4), num_classes=3,
                      blocks=[[nn.Sequential(nn.Flatten(), nn.Linear(16, width), nn.ReLU())], [nn.Linear(width, 8)]],
                      heads=[nn.Linear(width, 3), nn.Linear(8, 3)])


not_a_model = 42
'''


def _write(path, width=6, comment=""):
    path.write_text(comment + MODEL.format(width=width))
    return path


def test_a_python_file_is_exported_into_the_workdir_and_kept_across_starts(tmp_path):
    f = _write(tmp_path / "tiny.py")
    manifest = sources.install(f"{f}:build", tmp_path / "run" / "model")
    assert json.loads(manifest.read_text())["model"] == "tiny"
    note = json.loads((tmp_path / "run/model/source.json").read_text())
    assert note["kind"] == "python" and note["attr"] == "build"
    # no --model: the run's model; the same file edited in a comment only: the same model, kept
    assert sources.install("", tmp_path / "run" / "model") == manifest
    _write(f, comment="# tuned the docs\n")
    assert sources.install(f"{f}:build", tmp_path / "run" / "model") == manifest
    # an export directory of it is the same model too
    assert sources.install(str(tmp_path / "run" / "model"), tmp_path / "run2" / "model").exists()


def test_another_model_is_refused_unless_replacing_and_a_bad_one_loses_nothing(tmp_path):
    f = _write(tmp_path / "tiny.py")
    model_dir = tmp_path / "run" / "model"
    sources.install(f"{f}:build", model_dir)
    before = (model_dir / "manifest.json").read_text()
    _write(f, width=7)                           # another architecture in the same file
    with pytest.raises(ModelSourceError, match="holds a run of .*tiny.py:build.*another model.*--fresh"):
        sources.install(f"{f}:build", model_dir)
    assert (model_dir / "manifest.json").read_text() == before
    with pytest.raises(ModelSourceError, match="not_a_model is a int, not a BlockModel"):
        sources.install(f"{f}:not_a_model", model_dir, replace=True)
    assert (model_dir / "manifest.json").read_text() == before     # the failed replacement touched nothing
    sources.install(f"{f}:build", model_dir, replace=True)
    assert json.loads((model_dir / "manifest.json").read_text())["layers"][0]["output_shape"] == [7]


@pytest.mark.parametrize("spec, message", [
    ("nothing_like_it", "unknown model 'nothing_like_it': give a zoo name \\(cifar_fedin, fmnist_cnn"),
    ("{d}/missing.py", "model file .*missing.py does not exist"),
    ("{d}/tiny.py:absent", "has no 'absent'; it defines \\['build'\\]"),
    ("{d}/broken.py", "importing .*broken.py failed: SyntaxError"),
    ("{d}", "is a directory without manifest.json"),
    ("no_such_package.models:build", "no module named 'no_such_package'"),
])
def test_what_cannot_be_a_model_is_refused_naming_what_would_be(tmp_path, spec, message):
    _write(tmp_path / "tiny.py")
    (tmp_path / "broken.py").write_text("def build(:\n")
    with pytest.raises(ModelSourceError, match=message):
        sources.install(spec.format(d=tmp_path), tmp_path / "run" / "model")
    assert not (tmp_path / "run" / "model").exists()


def test_a_damaged_export_is_refused_before_it_is_copied(tmp_path):
    f = _write(tmp_path / "tiny.py")
    export_dir = tmp_path / "exported"
    sources.install(f"{f}:build", export_dir)
    graph = next((export_dir / "graphs").glob("*.onnx"))
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(ModelSourceError, match="is damaged.*export it again"):
        sources.install(str(export_dir), tmp_path / "run" / "model")
    assert not (tmp_path / "run" / "model").exists()
