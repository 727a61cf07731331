"""Why Kconfig dropped an option: a small reader of the tree's Kconfig files and an evaluator
of their expressions, only used to explain a fragment's request that did not survive."""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class _Condition:
    expr: str
    where: str  # "arch/x86/kvm/Kconfig:19"
    kind: str  # "if", "depends on", "menu depends on", "prompt if", ...


@dataclass
class _Definition:
    name: str
    where: str
    conditions: list[_Condition]
    prompt: bool = False
    choice: list[str] | None = None  # the members of the enclosing choice


@dataclass
class _Block:
    kind: str
    conditions: list[_Condition] = field(default_factory=list)
    members: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Reason:
    """Why an option is not what was asked: a sentence, a hint, the symbols it names."""

    text: str
    hint: str
    symbols: frozenset[str] = frozenset()


class KconfigIndex:
    """Where each symbol is defined in the tree's Kconfig, under which conditions (its own
    `depends on`, the enclosing `if`, menu and choice), and what selects it.

    A small reader of the Kconfig language, walked from the top-level Kconfig through `source`
    like Kconfig itself does, for x86. Only used to explain a dropped option.
    """

    def __init__(self, tree: Path, srcarch: str = "x86") -> None:
        self.tree = tree
        self.srcarch = srcarch
        self.definitions: dict[str, list[_Definition]] = {}
        self.selectors: dict[str, list[str]] = {}
        self._read(tree / "Kconfig", [], depth=0)

    def why(self, symbol: str, want: str, final: Mapping[str, str]) -> Reason:
        definitions = self.definitions.get(symbol)
        if not definitions:
            return Reason(
                f"there is no config {symbol} in this tree's Kconfig",
                "check the spelling, or whether the option was renamed or removed",
            )
        values = {k[7:]: v for k, v in final.items()}
        if want == "n":
            on = sorted({s for s in self.selectors.get(symbol, []) if values.get(s) in ("y", "m")})
            return Reason(
                f"selected by {', '.join(on)}" if on else "it cannot be turned off in this config",
                "turn those off too, or drop the line" if on else "drop the line",
                frozenset(on),
            )
        need = {"y": 2, "m": 1}.get(want, 1)
        unmet = [[c for c in d.conditions if _evaluate(c.expr, values) < need] for d in definitions]
        if all(unmet):  # no definition of the symbol is visible: that is why it was dropped
            first, rest = unmet[0][0], unmet[0][1:]
            symbols = _symbols(first.expr)
            state = ", ".join(f"{s}={values.get(s, 'n')}" for s in sorted(symbols))
            text = (
                f"unmet dependency {first.expr} ({state}; "
                f"`{first.kind} {first.expr}` at {first.where})"
            )
            if rest:
                text += "; also " + ", ".join(c.expr for c in rest)
            all_symbols = frozenset(s for c in unmet[0] for s in _symbols(c.expr))
            if len(symbols) == 1 and values.get(next(iter(symbols)), "n") == "n":
                hint = f"add CONFIG_{next(iter(symbols))}=y to the fragment"
            else:
                hint = f"set the options so that `{first.expr}` holds"
            return Reason(text, hint, all_symbols)
        if want == "m" and values.get("MODULES", "n") != "y":
            return Reason(
                "=m needs CONFIG_MODULES, which is off",
                "use =y, or add CONFIG_MODULES=y",
                frozenset({"MODULES"}),
            )
        if not any(d.prompt for d in definitions):
            selectors = sorted(set(self.selectors.get(symbol, [])))
            return Reason(
                f"{symbol} has no prompt; only a select sets it "
                f"({', '.join(selectors[:6]) or 'nothing selects it'})",
                "ask for an option that selects it instead",
                frozenset(selectors),
            )
        choice = next((d.choice for d in definitions if d.choice), None)
        if choice:
            picked = [m for m in choice if values.get(m) == "y"]
            return Reason(
                f"{symbol} is one of a choice ({', '.join(choice)}) and the final .config picked "
                f"{', '.join(picked) or 'another'}",
                f"also set `# CONFIG_{picked[0]} is not set`" if picked else "see the choice",
                frozenset(picked),
            )
        where = definitions[0].where
        return Reason(
            f"its dependencies hold, so a select or range overrode it (see {where})",
            f"inspect it with `make O=BUILD menuconfig`, then search for {symbol}",
        )

    # The reader. Kconfig is line-oriented: a keyword opens an entry, `depends on` attaches to
    # the entry above, `if`/`menu`/`choice` nest, help text is indented prose to skip.

    def _read(self, path: Path, stack: list[_Block], depth: int) -> None:
        if depth > 40 or not path.is_file():
            return
        rel = path.relative_to(self.tree)
        entry: _Definition | _Block | None = None
        help_indent: int | None = None
        in_help = False
        for number, raw in _logical_lines(path):
            if in_help:
                expanded = raw.expandtabs()
                if not expanded.strip():
                    continue
                indent = len(expanded) - len(expanded.lstrip())
                if help_indent is None:
                    help_indent = indent
                if indent >= help_indent and indent > 0:
                    continue
                in_help = False
            line = _strip_comment(raw).strip()
            if not line:
                continue
            word, _, rest = line.partition(" ")
            rest = rest.strip()
            where = f"{rel}:{number}"
            if word in ("config", "menuconfig"):
                conditions = [c for block in stack for c in block.conditions]
                choice = next((b.members for b in reversed(stack) if b.kind == "choice"), None)
                entry = _Definition(rest, where, conditions, choice=choice)
                self.definitions.setdefault(rest, []).append(entry)
                if choice is not None:
                    choice.append(rest)
            elif word in ("menu", "choice"):
                entry = _Block(word)
                stack.append(entry)
            elif word == "if":
                stack.append(_Block("if", [_Condition(rest, where, "if")]))
                entry = None
            elif word in ("endmenu", "endchoice", "endif"):
                if stack:
                    stack.pop()
                entry = None
            elif word == "comment":
                entry = _Block("comment")
            elif word in ("source", "osource", "rsource", "orsource"):
                self._source(path, word, rest, stack, depth)
                entry = None
            elif word == "depends" and rest.startswith("on "):
                condition = _Condition(rest[3:].strip(), where, "depends on")
                if isinstance(entry, _Definition):
                    entry.conditions.append(condition)
                elif isinstance(entry, _Block) and entry.kind in ("menu", "choice"):
                    condition.kind = f"{entry.kind} depends on"
                    entry.conditions.append(condition)
            elif word in ("select", "imply") and isinstance(entry, _Definition):
                target = rest.split(" if ")[0].strip()
                self.selectors.setdefault(target, []).append(entry.name)
            elif word in ("bool", "tristate", "string", "int", "hex", "prompt"):
                if isinstance(entry, _Definition) and rest.startswith(('"', "'")):
                    entry.prompt = True
                    visible = re.match(r"""(["'])(?:\\.|(?!\1).)*\1\s+if\s+(.+)""", rest)
                    if visible:
                        entry.conditions.append(_Condition(visible.group(2), where, "prompt if"))
            elif word in ("help", "---help---"):
                in_help, help_indent = True, None

    def _source(self, path: Path, word: str, rest: str, stack: list[_Block], depth: int) -> None:
        name = rest.strip().strip('"')
        name = name.replace("$(SRCARCH)", self.srcarch).replace("$(HEADER_ARCH)", self.srcarch)
        if "$(" in name:
            return
        base = path.parent if word.startswith(("rsource", "orsource")) else self.tree
        for found in sorted(glob.glob(str(base / name))):
            self._read(Path(found), stack, depth + 1)


def _logical_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number, line) with backslash continuations joined."""
    pending, start = "", 0
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield start, pending + line
        pending = ""
    if pending:
        yield start, pending


def _strip_comment(line: str) -> str:
    quote = ""
    for i, char in enumerate(line):
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char == "#":
            return line[:i]
    return line


_TOKEN = re.compile(r"""\s*(\|\||&&|!=|<=|>=|[!()=<>]|"(?:\\.|[^"])*"|'[^']*'|\$\(|[\w.+-]+)""")
_TRISTATE = {"y": 2, "m": 1, "n": 0}


def _tokens(expr: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(expr):
        match = _TOKEN.match(expr, pos)
        if not match:
            break
        token, pos = match.group(1), match.end()
        if token == "$(":  # a macro: unknowable here, so taken as true
            depth = 1
            while pos < len(expr) and depth:
                depth += {"(": 1, ")": -1}.get(expr[pos], 0)
                pos += 1
            token = "$macro"
        tokens.append(token)
    return tokens


def _symbols(expr: str) -> set[str]:
    return {t for t in _tokens(expr) if re.fullmatch(r"[A-Z][A-Z0-9_]*", t)}


def _evaluate(expr: str, values: Mapping[str, str]) -> int:
    """A Kconfig expression's tristate value (0, 1, 2) with `values` from a .config."""
    tokens = _tokens(expr)
    pos = 0

    def peek() -> str:
        return tokens[pos] if pos < len(tokens) else ""

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1] if pos <= len(tokens) else ""

    def text(token: str) -> str:
        if token[:1] in "\"'":
            return token[1:-1]
        if re.fullmatch(r"[A-Z][A-Z0-9_]*", token):
            return values.get(token, "n").strip('"')
        return token

    def tristate(token: str) -> int:
        if token == "$macro":
            return 2
        if token in _TRISTATE:
            return _TRISTATE[token]
        return _TRISTATE.get(values.get(token, "n"), 0)

    def primary() -> int:
        token = take()
        if token == "!":
            return 2 - primary()
        if token == "(":
            value = either()
            take()  # ")"
            return value
        if peek() in ("=", "!=", "<", ">", "<=", ">="):
            op, left, right = take(), text(token), text(take())
            try:
                a, b = int(left, 0), int(right, 0)
            except ValueError:
                a, b = left, right  # type: ignore[assignment]
            result = {
                "=": a == b,
                "!=": a != b,
                "<": a < b,
                ">": a > b,
                "<=": a <= b,
                ">=": a >= b,
            }[op]
            return 2 if result else 0
        return tristate(token)

    def both() -> int:
        value = primary()
        while peek() == "&&":
            take()
            value = min(value, primary())
        return value

    def either() -> int:
        value = both()
        while peek() == "||":
            take()
            value = max(value, both())
        return value

    try:
        return either()
    except (TypeError, IndexError):
        return 2  # not understood: do not blame it
