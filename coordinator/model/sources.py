"""Where a run's model comes from: a zoo name, an export directory, or a Python file that builds a BlockModel.

A run trains one model export, kept in WORKDIR/model with a note of where it came from
(source.json). The first start installs it there; later starts keep it, a model given again
must be the same one (else the start is refused, naming both), and `--fresh` keeps it unless
another model is named. So a run never silently changes its model, and never falls back to
the zoo's default once it was started with the user's own.

    --model fmnist_cnn              a zoo model (coordinator/model/zoo.py)
    --model exported/mine           a directory export.export() or `edge-coordinator export` wrote
    --model mine.py                 a Python file whose `model` is a BlockModel or a function returning one
    --model mine.py:build           ... whose `build` is
    --model mypackage.models:build  an importable module's attribute
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_runtime.errors import EdgeRuntimeError
from edge_runtime.store import atomic_write_text, read_verified, sha256_file

log = logging.getLogger(__name__)

DEFAULT_MODEL = "fmnist_cnn"
SOURCE_NOTE = "source.json"
FORMS = ("a zoo name ({zoo}), an export directory (with manifest.json), a Python file FILE.py[:NAME] "
         "whose NAME (default: model) is a BlockModel or a function returning one, or MODULE:NAME")


class ModelSourceError(EdgeRuntimeError, ValueError):
    """The model named cannot be used: the message says what was expected."""


@dataclass(frozen=True)
class ModelSource:
    """A resolved --model: what it is, and what identifies it across restarts."""
    kind: str          # zoo | export | python
    spec: str          # as the user gave it
    identity: str      # zoo: its name; export: its manifest's sha256; python: FILE's sha256 and NAME
    location: str = ""   # the export directory or Python file (absolute), or the module; "" for the zoo
    attr: str = ""       # python: the attribute that builds the model

    def describe(self) -> str:
        if self.kind == "zoo":
            return f"zoo model {self.spec}"
        if self.kind == "export":
            return f"the export in {self.location}"
        return f"{self.location}:{self.attr}"


def _zoo_names() -> list[str]:
    from coordinator.model import zoo
    return sorted(zoo.ZOO)


def _forms() -> str:
    return FORMS.format(zoo=", ".join(_zoo_names()))


def resolve(spec: str) -> ModelSource:
    """What `spec` names; ModelSourceError listing the accepted forms when it names nothing."""
    spec = str(spec).strip()
    if not spec:
        raise ModelSourceError(f"no model given: give {_forms()}")
    path = Path(spec).expanduser()
    if path.is_dir():
        manifest = path / "manifest.json"
        if not manifest.is_file():
            raise ModelSourceError(f"{path} is a directory without manifest.json: an export directory is what "
                                   f"`edge-coordinator export` or coordinator.model.export.export() writes")
        return ModelSource("export", spec, sha256_file(manifest), str(path.resolve()))
    file, _, attr = spec.partition(":") if not path.exists() else (spec, "", "")
    attr = attr or "model"
    if file.endswith(".py"):
        fpath = Path(file).expanduser()
        if not fpath.is_file():
            raise ModelSourceError(f"model file {fpath} does not exist")
        return ModelSource("python", spec, f"{sha256_file(fpath)}:{attr}", str(fpath.resolve()), attr)
    if ":" in spec:
        if importlib.util.find_spec(file.split(".")[0]) is None:
            raise ModelSourceError(f"--model {spec}: no module named {file.split('.')[0]!r} can be imported "
                                   f"(give a path to a .py file instead, or install the package)")
        return ModelSource("python", spec, f"{file}:{attr}", file, attr)
    if spec in _zoo_names():
        return ModelSource("zoo", spec, spec)
    raise ModelSourceError(f"unknown model {spec!r}: give {_forms()}")


def build_model(source: ModelSource, seed: int = 0):
    """The BlockModel a zoo name or Python source builds (torch's seed set first, so the init is repeatable)."""
    import torch

    from coordinator.model import zoo
    from coordinator.model.block_model import BlockModel
    if source.kind == "zoo":
        return zoo.build(source.spec, seed=seed)
    if source.kind != "python":
        raise ModelSourceError(f"{source.describe()} is an export, not a model to build")
    module = _import(source)
    if not hasattr(module, source.attr):
        found = [n for n, v in vars(module).items() if isinstance(v, BlockModel)
                 or (inspect.isfunction(v) and v.__module__ == module.__name__)]
        raise ModelSourceError(f"{source.location} has no {source.attr!r}; it defines {found or 'nothing usable'}: "
                               f"name the BlockModel or the function that returns one, e.g. --model "
                               f"{source.location}:{found[0] if found else 'build'}")
    obj = getattr(module, source.attr)
    torch.manual_seed(seed)
    if callable(obj) and not isinstance(obj, torch.nn.Module):
        try:
            obj = obj()
        except Exception as exc:
            raise ModelSourceError(f"{source.describe()}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, BlockModel):
        raise ModelSourceError(f"{source.describe()} is a {type(obj).__name__}, not a BlockModel "
                               f"(coordinator.model.block_model.BlockModel: blocks of layers, a head per block)")
    return obj


def _import(source: ModelSource):
    """The module of a Python source: a file loaded under a private name, or an importable module."""
    try:
        if not source.location.endswith(".py"):
            return importlib.import_module(source.location)
        path = Path(source.location)
        name = "edgeblock_user_model_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.parent))   # so the file may import its neighbours
        try:
            # compiled from the file as it is now, not through __pycache__: a bytecode cache is checked by the
            # source's mtime in whole seconds and its size, so an edit within the same second that keeps the size
            # (a width 6 -> 7) would load the old model (tests/test_model_sources.py failed so in CI)
            exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)
        finally:
            sys.path.remove(str(path.parent))
        return module
    except ModelSourceError:
        raise
    except Exception as exc:
        raise ModelSourceError(f"importing {source.location} failed: {type(exc).__name__}: {exc}") from exc


def _architecture(manifest) -> list[str]:
    """What makes two exports the same model whatever their initial weights: every layer's and head's graph."""
    return [layer.graph.sha256 for layer in manifest.layers] + [h.graph.sha256 for h in manifest.heads]


def _recorded(model_dir: Path) -> ModelSource:
    """Where the installed model came from (a workdir from before source.json: the zoo model it names)."""
    from edge_runtime.wire.manifest import Manifest
    note = model_dir / SOURCE_NOTE
    if note.exists():
        try:
            return ModelSource(**json.loads(note.read_text()))
        except (ValueError, TypeError) as exc:
            raise ModelSourceError(f"{note} is damaged ({exc}): move it aside to keep the run's model, "
                                   f"or start over with --fresh --model ...") from exc
    name = Manifest.load(model_dir / "manifest.json").model
    return ModelSource("zoo", name, name)


def _same_model(given: ModelSource, recorded: ModelSource, model_dir: Path, seed: int) -> bool:
    if given.kind == recorded.kind and given.identity == recorded.identity:
        return True
    if given.kind == "zoo" or recorded.kind == "zoo":
        return given.kind == recorded.kind == "zoo" and given.spec == recorded.spec
    # an edited file, another path to the same export: the same graphs are the same model
    from edge_runtime.wire.manifest import Manifest
    installed = Manifest.load(model_dir / "manifest.json")
    if given.kind == "export":
        other = Manifest.load(Path(given.location) / "manifest.json")
    else:
        scratch = model_dir.with_name(".model-compare")
        shutil.rmtree(scratch, ignore_errors=True)
        try:
            from coordinator.model import export
            other = export.export(build_model(given, seed), scratch, check_trainable=False)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return _architecture(other) == _architecture(installed)


def install(spec: str, model_dir: Path, seed: int = 0, replace: bool = False) -> Path:
    """model_dir/manifest.json of the run's model: installed from `spec` now, or the one already there.

    spec "" keeps what model_dir holds (the zoo's default in a new one). A spec naming another model
    than the installed one replaces it only with `replace` (a fresh start), and is refused otherwise:
    a run's weights, plans and profile belong to its model.
    """
    model_dir = Path(model_dir)
    manifest = model_dir / "manifest.json"
    if manifest.exists() and not spec:
        return manifest
    source = resolve(spec or DEFAULT_MODEL)
    if manifest.exists():
        recorded = _recorded(model_dir)
        if _same_model(source, recorded, model_dir, seed):
            return manifest
        if replace:
            log.info("replacing %s with %s", recorded.describe(), source.describe())
        else:
                raise ModelSourceError(f"{model_dir.parent} holds a run of {recorded.describe()}, and --model names "
                                   f"{source.describe()}, another model: use another --workdir, or --fresh to "
                                   f"start over with the new model")
    staging = model_dir.with_name(".model-staging")
    shutil.rmtree(staging, ignore_errors=True)
    if source.kind == "export":
        _copy_export(Path(source.location), staging)
    else:
        from coordinator.model import export
        log.info("exporting %s to ONNX blocks in %s", source.describe(), model_dir)
        export.export(build_model(source, seed), staging)
    atomic_write_text(staging / SOURCE_NOTE, json.dumps(asdict(source), indent=1) + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    os.replace(staging, model_dir)     # a crash leaves the old model or the whole new one, never half
    return manifest


def _copy_export(src: Path, dst: Path) -> None:
    """Copy an export, checking it is whole: its manifest parses and every file it names has its hash."""
    from edge_runtime.wire.manifest import Manifest
    try:
        m = Manifest.load(src / "manifest.json")
    except EdgeRuntimeError as exc:
        raise ModelSourceError(f"{src} is not a usable export: {exc}") from exc
    refs = [layer.graph for layer in m.layers] + [h.graph for h in m.heads] + ([m.weights] if m.weights else [])
    for ref in refs:
        path = m.graph_path(ref)
        if not path.is_file():
            raise ModelSourceError(f"{src} is not a whole export: {ref.file} is missing (export it again)")
        try:
            read_verified(path, ref.sha256, ref.file)
        except EdgeRuntimeError as exc:
            raise ModelSourceError(f"{src} is damaged: {exc} (export it again)") from exc
    if m.weights is None:
        raise ModelSourceError(f"{src} has no initial weights: export it with coordinator.model.export.export()")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(SOURCE_NOTE, "*.tmp"))
