"""The package's structure, checked from the source: import graph, layering, file sizes, internals in one place."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY, HARNESS = "hf_lorax", "hf_lorax_paper"
PRIVATE_NAMES = ("_register_custom_module", "_maybe_include_all_linear_layers", "_check_target_module_exists",
                 "_ExcludedModule", "_prepare_model", "LOSS_MAPPING", "_loss_function")
# Outside hf_lorax/integrations, peft and transformers are imported from their top level only, plus two documented
# public modules transformers does not re-export from its top level (Conv1D's, and the model output classes').
PUBLIC_IMPORTS = {"peft", "transformers", "transformers.pytorch_utils", "transformers.pytorch_utils.Conv1D",
                  "transformers.modeling_outputs", "transformers.modeling_outputs.CausalLMOutputWithPast"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at module level or inside functions, resolved to absolute names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x` imports module x
    return found


def _graph(package: str) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in files and m != name} for name, path in files.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_the_library_or_the_harness():
    for package in (LIBRARY, HARNESS):
        assert _cycles(_graph(package)) == [], package


def test_library_never_imports_the_harness_or_its_own_root():
    for path in (ROOT / LIBRARY).rglob("*.py"):
        imports = _imports(path)
        assert not [m for m in imports if m == HARNESS or m.startswith(HARNESS + ".")], path
        if path.name != "__init__.py" or path.parent.name != LIBRARY:
            assert LIBRARY not in imports, f"{path} imports the package root"


def test_config_depends_only_on_leaf_modules():
    graph = _graph(LIBRARY)
    assert graph["hf_lorax.config"] <= {"hf_lorax._version", "hf_lorax.rank_map", "hf_lorax.slices"}
    for leaf in ("hf_lorax._version", "hf_lorax.rank_map", "hf_lorax.slices", "hf_lorax.task_types"):
        assert graph[leaf] == set(), leaf


def test_harness_uses_only_the_public_api():
    public = {"hf_lorax", "hf_lorax.adapter_files"}
    for path in (ROOT / HARNESS).rglob("*.py"):
        used = {m for m in _imports(path) if m.split(".")[0] == LIBRARY and m.count(".") <= 1}
        modules = {m for m in used if m in public or m.rpartition(".")[0] in public}
        assert used == modules, f"{path}: {used - modules}"


def test_peft_and_transformers_internals_are_touched_in_one_place():
    for path in (ROOT / LIBRARY).rglob("*.py"):
        if path.parent.name == "integrations":
            continue
        text = path.read_text()
        used = _identifiers(ast.parse(text))
        for name in PRIVATE_NAMES:
            assert name not in used, f"{path} uses {name} outside hf_lorax/integrations"
        for module in _imports(path):
            root, _, rest = module.partition(".")
            if root in ("peft", "transformers") and rest:
                parent = module.rpartition(".")[0]
                assert module in PUBLIC_IMPORTS or parent in PUBLIC_IMPORTS, f"{path} imports {module}"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Assign):  # no monkey-patching of another library's attributes
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                        assert target.value.id not in {"peft", "transformers", "LoraModel", "PeftModel",
                                                        "PeftConfigMixin", "CallbackHandler"}, path


def _identifiers(tree: ast.AST) -> set[str]:
    """Names the code uses (attributes, variables, imported names, string keys of getattr): not docstrings."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.name.split(".")[-1])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
            names.update(a.value for a in node.args[1:2] if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


def _code_lines(text: str) -> int:
    """Lines holding code: not blank, not comments, not docstrings (as ``../shared/tools/sloc.py`` counts)."""
    import io
    import tokenize

    docs = set()
    for node in ast.walk(ast.parse(text)):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            docs.update(range(body[0].lineno, body[0].end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    return len(lines - docs)


def test_every_file_is_at_most_300_code_lines():
    for package in (LIBRARY, HARNESS):
        for path in (ROOT / package).rglob("*.py"):
            assert _code_lines(path.read_text()) <= 300, path
