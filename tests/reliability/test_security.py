"""Nothing executable is ever loaded from the files users point the toolkit at.

Users merge many-gigabyte checkpoints from other people, so a file that *runs code when read* must be refused, not
read. Three ways code could sneak in, each tested by behaviour with a live payload (a control shows the payload
really runs when loaded unsafely, so a passing row is not vacuous) and, where a rule is about the source, by a scan
of the package's syntax tree:

- pickles: a ``torch.save`` pickle whose ``__reduce__`` writes a marker file, put where a task vector's
  ``task_vector.safetensors`` / ``head.safetensors`` belongs, or given to Lightning as a checkpoint;
- ``torch.load`` without ``weights_only=True`` anywhere in the package;
- Hugging Face remote code (``auto_map`` in a model folder): ``trust_remote_code`` defaults to ``False`` in every
  signature and shipped config, and a folder whose config asks for custom code loads the built-in class instead.
"""

from __future__ import annotations

import ast
import inspect
import json
import pickle
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from drm_lightning.cli import main
from drm_lightning.io.task_vector import DELTAS_FILE, HEAD_FILE, META_FILE, TaskVectorError
from drm_lightning.models.heads import EncoderHead
from tests.helpers.merge_inputs import write_task_vectors
from tests.helpers.tiny_models import HIDDEN_SIZE, make_tiny_model

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "drm_lightning"
ERROR_PREFIX = "drm-lightning: error: "


class Payload:
    """Unpickling this runs ``exec``, which writes ``marker``: the shape of a real pickle exploit, made harmless."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return exec, (f"open({self.marker!r}, 'w').write('foreign code ran')",)


def write_pickle(path: Path, marker: Path, wrap: Callable[[Payload], object] = lambda p: {"weight": p}) -> Path:
    """A ``torch.save`` pickle at ``path`` whose loading (with ``weights_only=False``) creates ``marker``."""
    torch.save(wrap(Payload(marker)), path)
    return path


@pytest.fixture(autouse=True)
def torch_weights_only_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment variables that would switch torch's safe default off must not leak into these tests."""
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.delenv("DRM_LIGHTNING_DEBUG", raising=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("security")
    bert = make_tiny_model("encoder", root / "bert")
    tvs = write_task_vectors(bert, root / "tv", 2, tasks=["alpha", "beta"])
    for folder in tvs:  # a real encoder head, so ExpertModule.from_task_vector accepts the good files
        head = EncoderHead(HIDDEN_SIZE, 2)
        save_file(head.state_dict(), str(folder / HEAD_FILE))
        meta = json.loads((folder / META_FILE).read_text())
        (folder / META_FILE).write_text(json.dumps({**meta, "head": head.config()}))
    return {"root": root, "bert": bert, "tvs": tvs}


def test_the_payload_is_live(tmp_path: Path) -> None:
    """Control: the payload runs when loaded unsafely, and torch's safe loader refuses it."""
    marker = tmp_path / "marker"
    path = write_pickle(tmp_path / "evil.pt", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    assert not marker.exists()
    torch.load(path, weights_only=False)
    assert marker.read_text() == "foreign code ran"


# ------------------------------------------------------------------------------------- pickled task vectors


def _evil_copy(world: dict, tmp: Path, filename: str) -> tuple[Path, Path]:
    """A copy of a good task vector whose ``filename`` is a pickle payload; returns (folder, marker)."""
    import shutil

    folder = tmp / "beta"
    shutil.copytree(world["tvs"][1], folder)
    marker = tmp / "marker"
    write_pickle(folder / filename, marker)
    return folder, marker


def _via_merge_cli(world: dict, folder: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> str:
    out = tmp / "merged"
    capsys.readouterr()
    code = main(["merge", "--task_vectors", f"[{world['tvs'][0]},{folder}]", "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 1, err
    assert not out.exists() and not Path(f"{out}_delta").exists()
    lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _via_expert(world: dict, folder: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """What ``validate/test --task_vector_dir`` and ``evaluate --experts`` load an expert with."""
    from drm_lightning.models.expert import ExpertModule

    with pytest.raises(TaskVectorError) as info:
        ExpertModule.from_task_vector(folder, with_task_vector=True)
    return str(info.value)


def _via_apply(world: dict, folder: Path, tmp: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The two readers under the expert: ``read_head`` (the head) and ``apply_task_vector`` (the deltas)."""
    from drm_lightning.io.task_vector import read_head
    from drm_lightning.models.backbone import load_backbone
    from drm_lightning.task_vectors.apply import apply_task_vector

    with pytest.raises(TaskVectorError) as info:
        read_head(folder)
        apply_task_vector(load_backbone(world["bert"]), folder)
    return str(info.value)


ENTRY_POINTS: dict[str, Callable[[dict, Path, Path, pytest.CaptureFixture[str]], str]] = {
    "merge CLI": _via_merge_cli,
    "ExpertModule.from_task_vector": _via_expert,
    "apply_task_vector / read_head": _via_apply,
}


@pytest.mark.parametrize("filename", [DELTAS_FILE, HEAD_FILE])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_pickle_in_place_of_safetensors_is_refused_unread(
    world: dict, tmp_path: Path, entry: str, filename: str, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, marker = _evil_copy(world, tmp_path, filename)
    message = ENTRY_POINTS[entry](world, folder, tmp_path, capsys)
    assert str(folder / filename) in message and "not a readable safetensors file" in message, message
    assert not marker.exists(), "the pickle's code ran"


# ------------------------------------------------------------------------------------- Lightning checkpoints


def _task_yaml(tmp: Path) -> Path:
    files = {}
    for split in ("train", "validation"):
        path = tmp / f"{split}.csv"
        path.write_text("text,label\n" + "".join(f"the movie is {w},{w}\n" for w in ("good", "bad") * 4))
        files[split] = str(path)
    spec = {
        "class_path": "drm_lightning.data.text.TextClassificationDataModule",
        "init_args": {"task": "ckpt", "label_names": ["bad", "good"], "data_files": files, "test_split": None},
    }
    path = tmp / "task.yaml"
    path.write_text(json.dumps({"data": spec}))
    return path


def _checkpoint_run(world: dict, tmp: Path, command: str) -> tuple[list[str], Path]:
    """argv of ``fit``/``validate`` resuming from a poisoned Lightning checkpoint; returns (argv, marker)."""
    marker = tmp / "marker"
    ckpt = write_pickle(tmp / "evil.ckpt", marker, lambda p: {"state_dict": {}, "epoch": 0, "evil": p})
    model_yaml = tmp / "model.yaml"
    model_yaml.write_text(json.dumps({"model": {"backbone": world["bert"], "pooling": "mean"}}))
    argv = [command, "--config", str(model_yaml), "--config", str(_task_yaml(tmp))]
    argv += ["--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    argv += [f"--trainer.default_root_dir={tmp / 'runs'}", "--ckpt_path", str(ckpt)]
    if command == "fit":
        argv += ["--trainer.max_steps=1", "--task_vector_dir", str(tmp / "tv")]
    return argv, marker


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_poisoned_lightning_checkpoint_is_refused_unread(world: dict, tmp_path: Path, command: str) -> None:
    """``--ckpt_path`` loads with torch's ``weights_only=True``: the pickle is refused before any of it runs."""
    argv, marker = _checkpoint_run(world, tmp_path, command)
    assert main(argv) == 1
    assert not marker.exists(), "the checkpoint's code ran"
    assert not (tmp_path / "tv").exists()


def test_poisoned_lightning_checkpoint_is_one_error_line(
    world: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, marker = _checkpoint_run(world, tmp_path, "validate")
    assert main(argv) == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1 and "evil.ckpt" in lines[0]
    assert not marker.exists()


def test_expert_load_from_checkpoint_refuses_a_pickle(world: dict, tmp_path: Path) -> None:
    from drm_lightning.models.expert import ExpertModule

    marker = tmp_path / "marker"
    ckpt = write_pickle(tmp_path / "evil.ckpt", marker, lambda p: {"state_dict": {}, "hyper_parameters": p})
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        ExpertModule.load_from_checkpoint(ckpt)
    assert not marker.exists()


# ------------------------------------------------------------------------------------- the package source


def _python_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


UNSAFE_MODULES = ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve")


def _unsafe(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, rule) for every construct that could load or run foreign code."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and all(a.name.endswith("Error") for a in node.names):
            pass  # exception classes only (to catch a refused pickle): nothing that loads
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in UNSAFE_MODULES:
                    yield node.lineno, f"imports {name}"
        if not isinstance(node, ast.Call):
            continue
        func = _dotted(node.func)
        if _is_const(_keyword(node, "weights_only"), False):
            yield node.lineno, "weights_only=False"
        if func.endswith("torch.load") and not _is_const(_keyword(node, "weights_only"), True):
            yield node.lineno, "torch.load without weights_only=True"
        if _is_const(_keyword(node, "trust_remote_code"), True):
            yield node.lineno, "trust_remote_code=True"
        if _is_const(_keyword(node, "allow_pickle"), True):
            yield node.lineno, "allow_pickle=True"
        if func in ("eval", "exec", "builtins.eval", "builtins.exec"):
            yield node.lineno, f"{func}()"


UNSAFE_SNIPPETS = {
    "imports pickle": "import pickle",
    "imports dill": "from dill import loads",
    "weights_only=False": "x = pl_load(p, weights_only=False)",
    "torch.load without weights_only=True": "x = torch.load(p)",
    "trust_remote_code=True": "AutoModel.from_pretrained(p, trust_remote_code=True)",
    "allow_pickle=True": "np.load(p, allow_pickle=True)",
    "eval()": "eval(text)",
}


@pytest.mark.parametrize("rule", list(UNSAFE_SNIPPETS))
def test_the_source_scan_catches_each_rule(rule: str) -> None:
    """The scanner below is not vacuous: each rule fires on a one-line example."""
    assert [r for _, r in _unsafe(ast.parse(UNSAFE_SNIPPETS[rule]))] == [rule]


def test_the_source_scan_allows_catching_a_refused_pickle() -> None:
    assert list(_unsafe(ast.parse("from pickle import UnpicklingError"))) == []
    assert [r for _, r in _unsafe(ast.parse("from pickle import loads"))] == ["imports pickle"]


@pytest.mark.parametrize("path", _python_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_package_loads_nothing_executable(path: Path) -> None:
    found = [f"{path.relative_to(ROOT)}:{line}: {rule}" for line, rule in _unsafe(ast.parse(path.read_text()))]
    assert found == []


def _trust_defaults(tree: ast.AST) -> Iterator[tuple[int, object]]:
    """(line, default) of every ``trust_remote_code`` parameter or dataclass field."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = node.args
            positional = [*args.posonlyargs, *args.args]
            defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
            pairs = [*zip(positional, defaults, strict=True), *zip(args.kwonlyargs, args.kw_defaults, strict=True)]
            for arg, default in pairs:
                if arg.arg == "trust_remote_code":
                    yield node.lineno, default.value if isinstance(default, ast.Constant) else default
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id == "trust_remote_code":
                yield node.lineno, node.value.value if isinstance(node.value, ast.Constant) else node.value


def test_trust_remote_code_defaults_to_false_everywhere() -> None:
    from drm_lightning.models.backbone import load_backbone
    from drm_lightning.models.expert import ExpertModule

    found = {
        f"{path.relative_to(ROOT)}:{line}": default
        for path in _python_files()
        for line, default in _trust_defaults(ast.parse(path.read_text()))
    }
    assert found, "the scan should see load_backbone's and ExpertModule's trust_remote_code"
    assert {where: d for where, d in found.items() if d is not False} == {}
    for fn in (load_backbone, ExpertModule.__init__, ExpertModule.from_task_vector):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn


def _yaml_values(data: object, key: str) -> Iterator[object]:
    if isinstance(data, dict):
        for k, v in data.items():
            if k == key:
                yield v
            yield from _yaml_values(v, key)
    elif isinstance(data, list):
        for item in data:
            yield from _yaml_values(item, key)


def test_shipped_configs_never_trust_remote_code() -> None:
    files = sorted([*ROOT.glob("configs/**/*.yaml"), *ROOT.glob("recipes/**/*.yaml")])
    assert files
    trusting = [str(f) for f in files for v in _yaml_values(yaml.safe_load(f.read_text()), "trust_remote_code") if v]
    assert trusting == []


# ------------------------------------------------------------------------------------- Hugging Face remote code


@pytest.fixture
def remote_code_folder(tmp_path: Path) -> tuple[Path, Path]:
    """A tiny BERT folder whose config and tokenizer config point (``auto_map``) at a module that writes a marker
    when imported: what a hostile hub repository looks like."""
    folder = Path(make_tiny_model("encoder", tmp_path / "bert"))
    marker = tmp_path / "marker"
    (folder / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('foreign code ran')\n"
        "from transformers import BertConfig, BertModel, BertTokenizer\n"
        "class EvilConfig(BertConfig):\n    model_type = 'bert'\n"
        "class EvilModel(BertModel):\n    config_class = EvilConfig\n"
        "class EvilTokenizer(BertTokenizer):\n    pass\n"
    )
    for name, auto_map in (
        ("config.json", {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}),
        ("tokenizer_config.json", {"AutoTokenizer": ["evil.EvilTokenizer", None]}),
    ):
        data = json.loads((folder / name).read_text())
        (folder / name).write_text(json.dumps({**data, "auto_map": auto_map}))
    return folder, marker


def test_remote_code_in_a_model_folder_is_not_run(remote_code_folder: tuple[Path, Path]) -> None:
    from transformers import BertModel, BertTokenizer

    from drm_lightning.data.text import load_tokenizer
    from drm_lightning.models.backbone import load_backbone

    folder, marker = remote_code_folder
    assert type(load_backbone(str(folder))) is BertModel
    assert type(load_tokenizer(str(folder))) is BertTokenizer
    assert not marker.exists()


def test_remote_code_folder_is_live(
    remote_code_folder: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: asked to trust it, transformers does import the folder's module (so the row above means something).

    The dynamic-module cache is redirected to ``tmp_path`` and the imported modules are dropped afterwards.
    """
    import transformers.dynamic_module_utils as dynamic

    from drm_lightning.models.backbone import load_backbone

    folder, marker = remote_code_folder
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        model = load_backbone(str(folder), trust_remote_code=True)
    finally:
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]
    assert type(model).__name__ == "EvilModel" and marker.read_text() == "foreign code ran"


def test_custom_architecture_is_refused_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder whose model type only its own code knows cannot load at all without trust: one error line."""
    folder = Path(make_tiny_model("encoder", tmp_path / "custom"))
    marker = tmp_path / "marker"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('foreign code ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil-arch", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    tvs = write_task_vectors(make_tiny_model("encoder", tmp_path / "bert"), tmp_path / "tv", 1, tasks=["alpha"])
    out = tmp_path / "merged"
    capsys.readouterr()
    assert main(["merge", "--task_vectors", f"[{tvs[0]}]", "--base", str(folder), "--output", str(out)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(lines) == 1 and "trust_remote_code" in lines[0] and "Traceback" not in err, err
    assert not marker.exists() and not out.exists()


def test_environment_does_not_disable_safe_loading() -> None:
    """``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` would make every ``torch.load`` unsafe; the package never sets it."""
    hits = [str(p) for p in _python_files() if "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in p.read_text()]
    assert hits == []
