"""Quantisation recipes: data files (configs/recipes/*.yaml) mapping module paths to bits."""

from __future__ import annotations

import ast
import fnmatch
import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ConvertError

RECIPE_DIR = Path(__file__).resolve().parents[1] / "configs" / "recipes"
MLX_BITS = (2, 3, 4, 5, 6, 8)
MLX_GROUP_SIZES = (128, 64, 32)


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int


@dataclass(frozen=True)
class Rule:
    match: str
    bits: str | int | None
    group_size: int | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[Rule, ...]
    text: str  # the file's content: part of a conversion's identity

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def spec(self, module: str, shape: tuple[int, ...], d: int, group_size: int) -> QuantSpec | None:
        """bits and group size for a quantisable module's weight of `shape`, or None to keep it."""
        for rule in self.rules:
            if fnmatch.fnmatchcase(module, rule.match):
                if rule.bits is None:
                    return None
                group = fit_group_size(rule.group_size or group_size, shape[-1])
                if group is None:
                    return None
                return QuantSpec(round_bits(evaluate_bits(rule.bits, d, self.name)), group)
        return None


def round_bits(bits: int) -> int:
    if bits < MLX_BITS[0]:
        raise ConvertError(f"{bits}-bit quantisation is not supported (at least {MLX_BITS[0]})")
    return next((b for b in MLX_BITS if b >= bits), MLX_BITS[-1])


def fit_group_size(group_size: int, in_dim: int) -> int | None:
    """The requested group size, else the largest smaller one MLX supports that divides in_dim."""
    for g in (group_size, *[g for g in MLX_GROUP_SIZES if g < group_size]):
        if in_dim % g == 0:
            return g
    return None


_ALLOWED = (ast.Expression, ast.BinOp, ast.Add, ast.Sub, ast.Mult, ast.Call, ast.Name, ast.Constant, ast.Load,
            ast.UnaryOp, ast.USub)


def evaluate_bits(expr, d: int, recipe: str = "recipe") -> int:
    """An int, or an expression in d using + - * min max (`d+2`, `min(d+3, 8)`)."""
    if isinstance(expr, bool):
        raise ConvertError(f"{recipe}: bits must be a number or an expression in d, not {expr!r}")
    if isinstance(expr, int):
        return expr
    try:
        tree = ast.parse(str(expr), mode="eval")
    except SyntaxError:
        raise ConvertError(f"{recipe}: cannot parse bits expression {expr!r}") from None
    for node in ast.walk(tree):
        ok = isinstance(node, _ALLOWED)
        if isinstance(node, ast.Name):
            ok = node.id in ("d", "min", "max")
        if isinstance(node, ast.Call):
            ok = isinstance(node.func, ast.Name) and node.func.id in ("min", "max")
        if isinstance(node, ast.Constant):
            ok = isinstance(node.value, int)
        if not ok:
            raise ConvertError(f"{recipe}: bits expression {expr!r} may use only d, integers, + - *, min, max")
    value = eval(compile(tree, "<bits>", "eval"), {"__builtins__": {}}, {"d": d, "min": min, "max": max})
    return int(value)


def parse_recipe(text: str, source: str) -> Recipe:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConvertError(f"{source}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rules"), list) or not data["rules"]:
        raise ConvertError(f"{source}: a recipe needs a non-empty `rules` list")
    rules = []
    for i, r in enumerate(data["rules"]):
        if not isinstance(r, dict) or "match" not in r or "bits" not in r:
            raise ConvertError(f"{source}: rule {i + 1} needs `match` and `bits`")
        unknown = set(r) - {"match", "bits", "group_size"}
        if unknown:
            raise ConvertError(f"{source}: rule {i + 1} has unknown key {sorted(unknown)[0]!r}")
        bits = None if r["bits"] in (None, "none") else r["bits"]
        if bits is not None:
            round_bits(evaluate_bits(bits, 4, source))  # fail now, not mid-conversion
        group = r.get("group_size")
        if group is not None and group not in MLX_GROUP_SIZES:
            raise ConvertError(f"{source}: rule {i + 1}: group_size must be one of {MLX_GROUP_SIZES}")
        rules.append(Rule(str(r["match"]), bits, group))
    return Recipe(str(data.get("name") or Path(source).stem), tuple(rules), text)


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name (unsloth, uniform) or a user's YAML file."""
    path = Path(name_or_path)
    if not path.suffix and (RECIPE_DIR / f"{name_or_path}.yaml").exists():
        path = RECIPE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConvertError(f"unknown recipe {str(name_or_path)!r}: not a file, and not one of "
                           f"{', '.join(builtin_recipes())}")
    return parse_recipe(path.read_text(), str(path))
