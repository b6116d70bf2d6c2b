"""The public API of `pcm_policy` is documented: every module, public class and public function or method has a
docstring, written in one markup style (Google: `Args:` / `Returns:` / `Raises:`, inline code in single backticks).

Public = a name not starting with `_`, at module level, or a method/property/nested class of a public class;
functions nested inside functions (closures) do not count. Read with `ast`, so nothing is imported.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pcm_policy"

# Markup of the other styles: reST roles and double backticks, reST field lists, NumPy section underlines.
OTHER_MARKUP = re.compile(r"``|:(?:class|meth|func|mod|data|attr|obj):`|^\s*:(?:param|type|returns?|rtype|raises?)\b"
                          r"|^\s*-{3,}\s*$", re.MULTILINE)


def _covered_modules() -> list[tuple[str, ast.Module]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        out.append((rel, ast.parse(path.read_text(), filename=str(path))))
    return out


def _public_definitions(body: list[ast.stmt], prefix: str = ""):
    """(qualified name, node) of every public class/function in `body`, descending into public classes only."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            yield prefix + node.name, node
            if isinstance(node, ast.ClassDef):
                yield from _public_definitions(node.body, f"{prefix}{node.name}.")


def _docstrings():
    """(where, docstring or None) of every covered module and public definition."""
    for rel, tree in _covered_modules():
        yield f"pcm_policy/{rel}", ast.get_docstring(tree)
        for name, node in _public_definitions(tree.body):
            yield f"pcm_policy/{rel}:{node.lineno} {name}", ast.get_docstring(node)


def test_walker_sees_the_package():
    names = {where.split(" ")[-1] for where, _ in _docstrings()}
    assert {"ChunkSampler", "ChunkSampler.sample", "picard_loop", "StepCoefficients.step_no_noise"} <= names
    assert not any("_view" in n or "map_fn" in n for n in names)  # private names and closures skipped


def test_every_public_definition_has_a_docstring():
    missing = [where for where, doc in _docstrings() if not doc]
    assert not missing, "public definitions without a docstring:\n" + "\n".join(missing)


def test_one_markup_style():
    other = [where for where, doc in _docstrings() if doc and OTHER_MARKUP.search(doc)]
    assert not other, ("docstrings with reST/NumPy markup (use Google sections and single backticks):\n"
                       + "\n".join(other))
