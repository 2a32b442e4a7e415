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


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def type_name(annotation: object) -> str:
    """A field's type as written (``int``, ``tuple[int, ...]``), for errors and help."""
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def coerce_option(name: str, annotation: object, value: object) -> object:
    """``value`` (from JSON or a ``KEY=VALUE`` string) as the field's type: int, float, bool, str or tuple.

    Example:
        >>> coerce_option("lga.layers", "tuple[int, ...]", "2,4")
        (2, 4)

    Raises:
        InvalidInputError: a value that is not of that type, naming the option and the type.
    """
    from graytune.errors import InvalidInputError

    kind = type_name(annotation).replace(" ", "")
    try:
        if kind.startswith("tuple["):
            item = kind[len("tuple["):].split(",")[0].rstrip("]")
            items = value.split(",") if isinstance(value, str) else list(value)  # type: ignore[call-overload]
            return tuple(coerce_option(name, item, v.strip() if isinstance(v, str) else v)
                         for v in items if not (isinstance(v, str) and not v.strip()))
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)  # type: ignore[call-overload]
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)  # type: ignore[arg-type]
        if kind == "str":
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError):
        raise InvalidInputError(f"option {name}: {value!r} is not a {kind}; "
                                f"give e.g. {name.rsplit('.', 1)[-1]}={_example(kind)}") from None
    return value


def _example(kind: str) -> str:
    return {"bool": "true", "int": "4", "float": "0.5", "str": "text"}.get(kind, "2,4")
