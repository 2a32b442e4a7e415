"""Config helpers: the docstring written under each dataclass field, reused as CLI help.

Example:
    >>> @dataclass
    ... class C:
    ...     lr: float = 1e-3
    ...     \"\"\"Peak learning rate.\"\"\"
    >>> field_docs(C)
    {'lr': 'Peak learning rate.'}
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """``{field name: the string literal right under it}`` from ``cls``'s source (empty if unavailable)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs
