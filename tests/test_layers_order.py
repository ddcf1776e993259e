"""The package's layers: each module imports only from its own layer and those below, at module top.

README.md's "Layout" and ``minipeft/__init__.py`` state the order, bottom up:
the core (backend, validate, autograd, nn, optim, io, data, peft, memory),
then the workflows (train, evaluation, base, finetune, compare, forgetting,
quant_eval), then the tools (cli, bench, interop, docs, lessons), which may
import anything below them. Every module under ``minipeft/`` is parsed with
``ast`` and every import, relative ones and those inside functions included,
is resolved to the module it names.

Imports sit at module top. Inside a function only two kinds are allowed: an
optional dependency (a GPU, plotting, docs or Hugging Face library the core
never needs, or a platform module), and the few imports of the package's own
modules listed in :data:`FUNCTION_LEVEL`, each with the reason it cannot move.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "minipeft"

#: the layers, bottom up (README's Layout): a module may import its own layer and those before it
LAYERS = (
    "backend", "validate", "autograd", "nn", "optim", "io", "data", "peft", "memory",
    "workflows.train", "workflows.evaluation", "workflows.base", "workflows.finetune",
    "workflows.compare", "workflows.forgetting", "workflows.quant_eval",
    "tools",
)

#: top-level names of the dependencies a function may import where it needs them:
#: optional extras (gpu, lessons, docs, hf, dev) and a module missing on some platforms
OPTIONAL = {
    "cupy", "cupyx",                                            # gpu
    "matplotlib", "IPython",                                    # lessons, plots
    "pygments", "latex2mathml", "mistune", "nbformat", "nbconvert", "nbclient",  # docs
    "torch", "transformers", "peft", "tokenizers",              # hf
    "threadpoolctl",                                            # dev (bench)
    "fcntl",                                                    # POSIX only
}

#: (file, module) -> why the package's own module is imported inside a function there
FUNCTION_LEVEL = {
    ("minipeft/autograd/tensor.py", "minipeft.autograd.ops"):
        "Tensor.astype is an op, and ops imports Tensor: the cycle is broken in the method",
    ("minipeft/autograd/tensor.py", "minipeft.autograd.function"):
        "an in-place check reads the grad mode, and function imports Tensor: the same cycle",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    """Index in :data:`LAYERS` of a package module (None: in no layer).

    A package's ``__init__`` (``minipeft``, ``minipeft.workflows``) may
    re-export every layer under it, so it counts as the highest of them;
    ``minipeft.__main__`` runs the CLI, a tool.
    """
    rest = module.split(".")[1:]
    if rest == ["__main__"]:
        rest = ["tools"]
    found = [i for i, name in enumerate(LAYERS)
             if rest[:len(name.split("."))] == name.split(".")
             or name.split(".")[:len(rest)] == rest]
    return max(found) if found else None


def resolve(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement in ``module`` names (``from x import sub`` -> ``x.sub``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports(module: str, source: str, is_package: bool = False):
    """(line, target module, inside a function) of every import in ``source``."""
    tree = ast.parse(source)
    found = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((child.lineno, t, in_function)
                             for t in resolve(module, is_package, child))
            walk(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(tree, False)
    return found


def violations(module: str, file: str, source: str, is_package: bool = False) -> list[str]:
    """Every import of ``source`` that breaks the layer order or the module-top rule."""
    own = layer_of(module)
    if own is None:
        return [f"{file}: {module} is in no layer; place it in LAYERS (and README's Layout)"]
    out = []
    for line, target, in_function in imports(module, source, is_package):
        if target == "minipeft" or target.startswith("minipeft."):
            theirs = layer_of(target)
            if theirs is None:
                out.append(f"{file}:{line}: imports {target}, which is no module of the package")
            elif theirs > own:
                out.append(f"{file}:{line}: {module} ({LAYERS[own]}) imports {target} "
                           f"({LAYERS[theirs]}), a layer above its own; a layer imports only "
                           "from itself and the layers before it (README, Layout)")
            elif in_function and (file, target) not in FUNCTION_LEVEL:
                out.append(f"{file}:{line}: {target} imported inside a function; import it at "
                           "module top (or, for a genuine cycle, list it in FUNCTION_LEVEL "
                           "with the cycle)")
        elif in_function and target.split(".")[0] not in OPTIONAL:
            out.append(f"{file}:{line}: {target} imported inside a function; only optional "
                       "dependencies (OPTIONAL) may be, the rest at module top")
    return out


def test_every_module_imports_only_from_below_and_at_module_top():
    problems = []
    for module, path in MODULES.items():
        file = path.relative_to(ROOT).as_posix()
        problems += violations(module, file, path.read_text(encoding="utf-8"),
                               path.name == "__init__.py")
    assert not problems, "\n".join(problems)


def test_every_listed_exception_is_still_needed():
    present = set()
    for module, path in MODULES.items():
        file = path.relative_to(ROOT).as_posix()
        present |= {(file, t) for _, t, in_function in
                    imports(module, path.read_text(encoding="utf-8"), path.name == "__init__.py")
                    if in_function}
    stale = [f"{f}: {m}" for f, m in FUNCTION_LEVEL if (f, m) not in present]
    assert not stale, f"FUNCTION_LEVEL lists imports that are gone: {stale}"


def test_the_check_finds_an_import_from_above_a_lazy_one_and_a_relative_one():
    src = ("import json\n"
           "from ..workflows import compare\n"
           "def f():\n"
           "    from ..peft.model import PeftModel\n"
           "    from . import layers\n"
           "    import os\n"
           "    import torch\n")
    found = violations("minipeft.nn.quant", "minipeft/nn/quant.py", src)
    assert len(found) == 4, found
    assert "minipeft/nn/quant.py:2: minipeft.nn.quant (nn) imports minipeft.workflows.compare " \
           "(workflows.compare), a layer above its own" in found[0]
    assert found[1].startswith("minipeft/nn/quant.py:4: minipeft.nn.quant (nn) imports "
                               "minipeft.peft.model (peft)")
    assert found[2].startswith("minipeft/nn/quant.py:5: minipeft.nn.layers imported inside a function")
    assert found[3].startswith("minipeft/nn/quant.py:6: os imported inside a function")
    # a workflow may import the core and the workflows before it, not those after it
    assert not violations("minipeft.workflows.finetune", "f.py", "from ..peft.config import LR_GRID\n")
    assert violations("minipeft.workflows.finetune", "f.py", "from .compare import build_method\n")
    assert violations("minipeft.newthing", "minipeft/newthing.py", "")
