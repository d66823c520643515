"""The package's shape: no import circles, the command line and the benchmarks' harness imported
by nobody else in the package, and runs saved before the package took its layout still resume,
evaluate and export."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
import torch

from helpers import REPO, run_entry

SRC = REPO / "src"
LEGACY_RUN = REPO / "tests" / "fixtures" / "legacy_run"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the spannorm modules it imports}, counting imports inside functions too. `from A
    import B` names the module A.B where it exists, else A."""
    modules = {module_name(path): path for path in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_the_graph_reader_sees_circles_and_imports_inside_functions():
    """The checks below can fail: a circle made of an import inside a function is found."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]
    real = import_graph()
    # cli/train.py imports the training modules inside `train` only
    assert "spannorm.training.checkpointing" in real["spannorm.cli.train"]
    assert "spannorm.data.tokenizer" in real["spannorm.data.build"]  # a relative import


def test_no_import_circle_in_the_package():
    assert circles(import_graph()) == []


@pytest.mark.parametrize("leaf", ["spannorm.cli", "spannorm.bench"])
def test_nothing_outside_the_command_line_or_the_benchmarks_imports_them(leaf):
    """The command line and the benchmarks' harness are leaves: entry scripts, scripts/ and
    tests use them, no other module of the package does."""

    def inside(module: str) -> bool:
        return module == leaf or module.startswith(f"{leaf}.")

    offenders = {
        module: sorted(m for m in imports if inside(m))
        for module, imports in import_graph().items()
        if not inside(module)
    }
    assert {module: found for module, found in offenders.items() if found} == {}


def test_the_model_is_pure_torch():
    """spannorm.model is exported verbatim into Hugging Face folders: it imports only torch and
    itself."""
    for path in (SRC / "spannorm" / "model").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom | ast.Import):
                names = (
                    [node.module]
                    if isinstance(node, ast.ImportFrom)
                    else [alias.name for alias in node.names]
                )
                for name in names:
                    root = (name or "").split(".")[0]
                    assert root in {
                        "",
                        "torch",
                        "spannorm",
                        "__future__",
                        "collections",
                        "dataclasses",
                        "enum",
                        "math",
                        "functools",
                        "typing",
                    }, f"{path.name} imports {name}"
                    if root == "spannorm":
                        assert name.startswith("spannorm.model"), f"{path.name} imports {name}"


@pytest.fixture()
def legacy_run(tmp_path) -> Path:
    """A copy of a run trained (10 steps, tiny model) by the code before the package's layout
    changed: its saved config names `spannorm.lm.LanguageModel`, `spannorm.checkpointing.*`."""
    run = tmp_path / "legacy"
    shutil.copytree(LEGACY_RUN / "run", run)
    saved = (run / ".hydra" / "config.yaml").read_text()
    assert "spannorm.lm.LanguageModel" in saved and "spannorm.checkpointing." in saved
    return run


def test_a_run_saved_before_the_move_loads_evaluates_and_exports(legacy_run, tmp_path):
    from spannorm.inference.export import export_model
    from spannorm.inference.load import load_trained

    trained = load_trained(legacy_run)
    assert trained.step == 10
    assert trained.config.model._target_ == "spannorm.training.lm.LanguageModel"
    assert trained.tokenizer.decode(trained.tokenizer.encode("ROMEO:")) == "ROMEO:"
    export_model(trained.model, trained.tokenizer, tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    result = run_entry("eval.py", f"ckpt_path={legacy_run}", "progress=false")
    assert "val/loss" in result.stdout


@pytest.mark.slow
def test_a_run_saved_before_the_move_resumes(legacy_run):
    overrides = (LEGACY_RUN / "run" / ".hydra" / "overrides.yaml").read_text()
    saved = [line.removeprefix("- ").strip() for line in overrides.splitlines() if line.strip()]
    saved = [o for o in saved if not o.startswith("trainer.max_steps=")]
    run_entry(
        "train.py", *saved, "trainer.max_steps=12", f"hydra.run.dir={legacy_run}", "resume=auto"
    )

    state = torch.load(legacy_run / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 12
