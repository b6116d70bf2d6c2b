"""Resolve a Diffusion Policy run config from a checkpoint without running anything the file chooses.

DP's configs compute a few values with `${eval:'...'}` (Python's `eval`, which DP's modules register as an
OmegaConf resolver) and refer to other keys with `${a.b}`. A checkpoint is someone else's file: resolving its
config through OmegaConf's process-wide resolver registry would run whatever is registered under the names it
uses - Python's `eval` itself in any process that has imported DP, `oc.env` (an environment variable, e.g. a token,
copied into our outputs), or any other resolver. Here interpolations are resolved by our own walk over a plain
copy of the config (OmegaConf's grammar parses them; the registry is never consulted): `${a.b}` looks up another
key, `${eval:...}` goes to `safe_eval` - arithmetic on literals with bounded sizes - and any other resolver is
refused by name.
"""
from __future__ import annotations

import ast
import operator
from typing import Any, Mapping

from pcm_policy.errors import CheckpointError

MAX_EXPRESSION_CHARS = 1_000  # DP's expressions are a few dozen characters
MAX_NODES = 200
MAX_INT_BITS = 64
MAX_STR_CHARS = 10_000  # any string an expression or an interpolation makes
MAX_DEPTH = 32  # interpolations that refer to interpolations

_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
               ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Not: operator.not_}
_COMPARE = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
            ast.Gt: operator.gt, ast.GtE: operator.ge}
_LITERALS = (int, float, str, type(None))


def safe_eval(expr: str) -> Any:
    """Evaluate the arithmetic/boolean expressions DP's configs put in `${eval:...}` without Python's `eval`.

    Allowed: literals (numbers, strings, True/False/None), + - * / // % ** on numbers, + on strings, string * int,
    comparisons, and/or/not, `x if c else y`. Work is bounded: at most `MAX_EXPRESSION_CHARS` characters and
    `MAX_NODES` syntax nodes, integers of at most `MAX_INT_BITS` bits, strings of at most `MAX_STR_CHARS`
    characters, exponents checked before they are computed (so `'x' * 99999999999` or `9**9**9` is refused at
    once).

    Raises:
        ValueError: anything else (names, calls, attributes, sizes over the bounds, division by zero, ...).
    """
    text = str(expr).strip()
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression of {len(text)} characters (at most {MAX_EXPRESSION_CHARS})")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an expression ({type(e).__name__})") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise ValueError(f"expression of more than {MAX_NODES} parts")
    try:
        return _evaluate(tree.body)
    except (ZeroDivisionError, OverflowError, TypeError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None


def _bounded(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError(f"integer of more than {MAX_INT_BITS} bits")
    if isinstance(value, str) and len(value) > MAX_STR_CHARS:
        raise ValueError(f"string of more than {MAX_STR_CHARS} characters")
    if not isinstance(value, _LITERALS):
        raise ValueError(f"unsupported value of type {type(value).__name__}")
    return value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float))  # bool is an int


def _binary(op: ast.operator, left: Any, right: Any) -> Any:
    """One binary operation, its size checked before it is computed."""
    kind = type(op)
    if kind not in _ARITHMETIC:
        raise ValueError(f"unsupported operator {kind.__name__}")
    if isinstance(left, str) or isinstance(right, str):
        if kind is ast.Add and isinstance(left, str) and isinstance(right, str):
            if len(left) + len(right) > MAX_STR_CHARS:
                raise ValueError(f"string of more than {MAX_STR_CHARS} characters")
        elif kind is ast.Mult and isinstance(left, str) != isinstance(right, str):
            count = right if isinstance(left, str) else left
            text = left if isinstance(left, str) else right
            if not isinstance(count, int) or len(text) * max(count, 0) > MAX_STR_CHARS:
                raise ValueError(f"string repetition beyond {MAX_STR_CHARS} characters")
        else:  # no '%' formatting (its widths make strings of any size) and nothing else on strings
            raise ValueError(f"unsupported string operation {kind.__name__}")
    elif not (_number(left) and _number(right)):
        raise ValueError(f"unsupported operands {type(left).__name__}, {type(right).__name__}")
    elif kind is ast.Pow:
        if abs(right) > MAX_INT_BITS:
            raise ValueError(f"exponent {right} (at most {MAX_INT_BITS})")
        if isinstance(left, int) and isinstance(right, int) and right > 0 and \
                max(left.bit_length(), 1) * right > 2 * MAX_INT_BITS:
            raise ValueError(f"integer of more than {MAX_INT_BITS} bits")
    elif kind is ast.Mult and isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > 2 * MAX_INT_BITS:
            raise ValueError(f"integer of more than {MAX_INT_BITS} bits")
    return _bounded(_ARITHMETIC[kind](left, right))


def _evaluate(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant):
        return _bounded(node.value)
    if isinstance(node, ast.BinOp):
        return _binary(node.op, _evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        operand = _evaluate(node.operand)
        if not isinstance(node.op, ast.Not) and not _number(operand):
            raise ValueError(f"unsupported operand {type(operand).__name__}")
        return _bounded(_UNARY[type(node.op)](operand))
    if isinstance(node, ast.BoolOp):
        values = [_evaluate(v) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.Compare) and all(type(op) in _COMPARE for op in node.ops):
        left = _evaluate(node.left)
        for op, right_node in zip(node.ops, node.comparators):
            right = _evaluate(right_node)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.IfExp):
        return _evaluate(node.body) if _evaluate(node.test) else _evaluate(node.orelse)
    raise ValueError(f"unsupported expression {type(node).__name__}")


class UnsafeInterpolation(ValueError):
    """An interpolation this module will not resolve (a resolver other than DP's `eval`, a cycle, ...)."""


def resolve_config(config: Mapping[str, Any], keys: tuple[str, ...], file: Any) -> dict[str, Any]:
    """The top-level `keys` of a plain config (OmegaConf's `to_container(resolve=False)`), every `${...}`
    resolved by our own walk: `${a.b}` (absolute key paths) and `${eval:...}` (`safe_eval`) only.

    Args:
        config: the config as plain dicts/lists/scalars, interpolations left as strings.
        keys: the top-level keys to return (others are neither resolved nor returned).
        file: the checkpoint, for messages.

    Returns:
        {key: resolved value} for the keys present.

    Raises:
        CheckpointError: naming the file and the key: a resolver other than `eval` (e.g. `oc.env`), an `eval`
            expression `safe_eval` refuses, a missing or cyclic reference, values over the size bounds.
    """
    resolver = _Resolver(config)
    out = {}
    for key in keys:
        if key in config:
            try:
                out[key] = resolver.value(config[key], key)
            except (UnsafeInterpolation, ValueError) as e:
                raise CheckpointError(f"{file}: cfg.{resolver.where or key}: {str(e).splitlines()[0][:160]}") from None
            except Exception as e:  # the grammar's own errors (a malformed ${...}) come in several types
                raise CheckpointError(f"{file}: cfg.{resolver.where or key} does not resolve ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    return out


class _Resolver:
    """One config's interpolations, resolved on a plain copy with our own callbacks (see the module)."""

    def __init__(self, config: Mapping[str, Any]):
        self.config = config
        self.cache: dict[str, Any] = {}
        self.stack: list[str] = []
        self.where = ""  # the key being resolved, for messages

    def value(self, value: Any, key: str) -> Any:
        if isinstance(value, dict):
            return {k: self.value(v, f"{key}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v, f"{key}[{i}]") for i, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:
            self.where = key
            return self.string(value)
        return value

    def string(self, text: str) -> Any:
        from omegaconf import grammar_parser
        from omegaconf.grammar_visitor import GrammarVisitor

        if len(text) > MAX_STR_CHARS:
            raise UnsafeInterpolation(f"interpolation of more than {MAX_STR_CHARS} characters")
        visitor = GrammarVisitor(node_interpolation_callback=self.node,
                                 resolver_interpolation_callback=self.resolver, memo=None)
        result = visitor.visit(grammar_parser.parse(text))
        if isinstance(result, str) and len(result) > MAX_STR_CHARS:
            raise UnsafeInterpolation(f"interpolation resolves to more than {MAX_STR_CHARS} characters")
        return result

    def node(self, inter_key: str, memo: Any) -> Any:
        """`${a.b}`: the value at the absolute key path, itself resolved (cached; cycles refused)."""
        if inter_key.startswith(".") or "[" in inter_key:
            raise UnsafeInterpolation(f"${{{inter_key}}}: only absolute key paths are supported")
        if inter_key in self.cache:
            return self.cache[inter_key]
        if inter_key in self.stack or len(self.stack) >= MAX_DEPTH:
            raise UnsafeInterpolation(f"${{{inter_key}}}: cyclic or too deeply nested interpolation")
        value: Any = self.config
        for part in inter_key.split("."):
            if not isinstance(value, dict) or part not in value:
                raise UnsafeInterpolation(f"${{{inter_key}}}: no such key")
            value = value[part]
        self.stack.append(inter_key)
        where = self.where
        try:
            resolved = self.value(value, inter_key)
        finally:
            self.stack.pop()
            self.where = where
        self.cache[inter_key] = resolved
        return resolved

    def resolver(self, name: str, args: tuple[Any, ...], args_str: tuple[str, ...]) -> Any:
        """`${name:args}`: DP's `eval` with one expression, by `safe_eval`; every other resolver is refused."""
        if name != "eval":
            raise UnsafeInterpolation(f"resolver {name!r} is not allowed (only Diffusion Policy's "
                                      "${eval:...} arithmetic is resolved)")
        if len(args) != 1:
            raise UnsafeInterpolation(f"${{eval:...}} with {len(args)} arguments (one expression expected)")
        return safe_eval(args[0])
