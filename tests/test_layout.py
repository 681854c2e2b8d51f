"""The layout says which process runs what: API code and worker code never import each other,
every Redis key is spelled in hueyserve.wire, and what an older release queued is refused, never
unpickled."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import core
from hueyserve.serializer import UnreadablePayload
from hueyserve.training import TrainPlan

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hueyserve"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 300  #: longer modules must say why in their docstring

#: A train task queued by an older release (hueyserve 0.1.0 at cca7946), as Huey pickled it
#: into Redis: it names `core.train` and pickles `hueyserve.training.TrainPlan`.
OLD_TRAIN_MESSAGE = bytes.fromhex(
    "80059501010000000000008c0d687565792e7265676973747279948c074d657373616765949394288c0d6f6c"
    "642d747261696e2d6a6f62948c0a636f72652e747261696e944e4b004b004e8c0469726973948c1268756579"
    "73657276652e747261696e696e67948c09547261696e506c616e9493942981947d94288c0764617461736574"
    "9468058c09657374696d61746f72948c1652616e646f6d466f72657374436c6173736966696572948c067061"
    "72616d73947d948c0c6e5f657374696d61746f7273944b05738c06746172676574944e8c09746573745f7369"
    "7a6594473fd00000000000008c0c72616e646f6d5f7374617465944b03756286947d944e4e4e4e4e4e4b0074"
    "9481942e"
)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, absolute and relative imports alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


def side(path: Path) -> str:
    """api, worker, dev, or shared (a module at the top of the package)."""
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else "shared"


def imported_sides(path: Path) -> set[str]:
    sides = set()
    for name in imports(path):
        parts = name.split(".")
        if parts[0] == "hueyserve" and len(parts) > 1 and parts[1] in {"api", "worker", "dev"}:
            sides.add(parts[1])
        if parts[0] in {"core", "main"}:
            sides.add(parts[0])
    return sides


def test_each_module_imports_only_its_own_side_and_the_shared_modules() -> None:
    allowed = {"api": {"api"}, "worker": {"worker"}, "dev": {"dev"}, "shared": set()}
    crossings = {
        str(path.relative_to(ROOT)): sorted(imported_sides(path) - allowed[side(path)])
        for path in MODULES
    }
    assert {"api", "worker", "dev", "shared"} == {side(path) for path in MODULES}
    assert not {path: sides for path, sides in crossings.items() if sides}


def test_the_boundary_check_sees_a_crossing(tmp_path: Path) -> None:
    module = tmp_path / "bad.py"
    module.write_text("from hueyserve.worker.store import ModelStore\nimport core\n")
    assert imported_sides(module) == {"worker", "core"}


def test_long_modules_say_why() -> None:
    unexplained = []
    for path in [*MODULES, ROOT / "core.py", ROOT / "main.py"]:
        source = path.read_text()
        docstring = ast.get_docstring(ast.parse(source)) or ""
        if source.count("\n") > MAX_LINES and f"over {MAX_LINES} lines" not in docstring:
            unexplained.append(path.name)
    assert not unexplained, f"split these or say why in their docstring: {unexplained}"


def test_every_redis_key_is_spelled_in_the_wire_module() -> None:
    spelled = []
    for path in [*MODULES, ROOT / "core.py", ROOT / "main.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if re.match(r"hueyserve:\w", node.value):
                    spelled.append(f"{path.name}: {node.value}")
    assert spelled and all(entry.startswith("wire.py:") for entry in spelled), spelled


def test_a_pickled_task_from_an_older_release_is_refused_not_unpickled() -> None:
    """Releases before issue 11 pickled their messages; this one reads JSON only (the README's
    upgrade note says to let the queue drain first)."""
    with pytest.raises(UnreadablePayload):
        core.huey.deserialize_task(OLD_TRAIN_MESSAGE)
    plan = TrainPlan("iris", "RandomForestClassifier", {"n_estimators": 5}, None, 0.25, 3)
    task = core.huey.deserialize_task(core.huey.serialize_task(core.train.s("iris", plan)))
    assert task.name == core.train.name and task.args == ("iris", plan)


def test_the_hook_that_marks_jobs_running_comes_first() -> None:
    assert next(iter(core.huey._pre_execute)) == "start_jobs"
