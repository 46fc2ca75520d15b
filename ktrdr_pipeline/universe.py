"""The pipeline's universe file: which symbols to keep, how, and at which timeframes.

``KTRDR_DATA_DIR/universe.yaml`` (or the path in ``KTRDR_UNIVERSE``)::

    symbols:
      - AAPL                                  # a bare symbol: discovered CASH → STK → FUT
      - symbol: ES
        contract: ES:FUT:CME:USD              # the explicit form skips the guessing
        timeframes: [1h, 1d]                  # default: every enabled timeframe
      - symbol: SPY
        rth: false                            # all hours for this stock

An invalid entry is reported and skipped; the others still apply.

The file is the one source of truth for the symbol universe: ``symbols add/remove`` edit it
(and the ``symbols`` partitions at once), the symbols sensor applies it and adopts the
partitions added in the Dagster UI into it. :func:`add_entries` and :func:`remove_entries`
edit it in place (comments, layout and the other entries stay), write it atomically, and
fall back to rewriting it whole (comments lost, entries never) when an edit cannot be made
in place; callers hold :func:`universe_lock` across reading the file, editing it and
changing the partitions, so the CLI and the sensor take turns.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .domain.symbols import SymbolError, parse_symbol
from .domain.timeframes import get_timeframe
from .locking import exclusive_file_lock

log = logging.getLogger(__name__)

_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class UniverseEntry:
    key: str  # the storage key and partition key
    contract: str  # what to resolve at IB (the explicit form when given)
    timeframes: tuple[str, ...] | None = None
    rth: bool | None = None


@dataclass
class Universe:
    entries: list[UniverseEntry]
    errors: list[str]
    #: The file exists but could not be read as a universe at all (YAML error, no
    #: 'symbols' list): its symbols are unknown, which is not the same as none.
    unreadable: bool = False
    #: Keys of entries skipped for a bad option (``timeframes: [1M]``): still listed, so
    #: the symbol is neither removed nor adopted again while the user fixes the entry.
    invalid_keys: list[str] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    @property
    def listed(self) -> set[str]:
        """Every symbol the file names, its valid entries and the skipped ones alike."""
        return set(self.keys) | set(self.invalid_keys)

    def rth_overrides(self) -> dict[str, bool]:
        return {e.key: e.rth for e in self.entries if e.rth is not None}

    def wants(self, key: str, timeframe: str) -> bool:
        """Whether ``key``'s entry asks for ``timeframe`` (an unlisted symbol: yes). A dict
        lookup: the sensors and schedules ask once per symbol and timeframe."""
        if key not in self._timeframes_by_key:
            return True
        wanted = self._timeframes_by_key[key]
        return wanted is None or timeframe in wanted

    @functools.cached_property
    def _timeframes_by_key(self) -> dict[str, tuple[str, ...] | None]:
        """Each key's timeframes (its first entry's; ``entries`` are not changed after
        the file is loaded)."""
        found: dict[str, tuple[str, ...] | None] = {}
        for e in self.entries:
            found.setdefault(e.key, e.timeframes)
        return found


def _entry(raw: Any) -> UniverseEntry:
    if isinstance(raw, str):
        return UniverseEntry(parse_symbol(raw).key, raw)
    if not isinstance(raw, dict) or "symbol" not in raw:
        raise ValueError(f"entry {raw!r} must be a symbol or a mapping with 'symbol'")
    unknown = set(raw) - {"symbol", "contract", "timeframes", "rth"}
    if unknown:
        raise ValueError(f"entry {raw['symbol']!r} has unknown fields {sorted(unknown)}; allowed: "
                         "symbol, contract, timeframes, rth")
    contract = str(raw.get("contract") or raw["symbol"])
    key = parse_symbol(str(raw["symbol"])).key
    parse_symbol(contract)
    tfs = raw.get("timeframes")
    if tfs is not None:
        if not isinstance(tfs, list):
            raise ValueError(f"entry {key}: timeframes must be a list")
        tfs = tuple(get_timeframe(str(t)).name for t in tfs)
    rth = raw.get("rth")
    if rth is not None and not isinstance(rth, bool):
        raise ValueError(f"entry {key}: rth must be true or false")
    return UniverseEntry(key, contract, tfs, rth)


def load_universe(path: Path) -> Universe:
    """Read the universe file; a missing file is an empty universe."""
    if not path.exists():
        return Universe([], [])
    try:
        # libyaml's loader when built in: 2,000 entries parse in ~25 ms instead of ~250 ms
        # (the tail-fill sensor loads the file on every evaluation)
        raw = yaml.load(path.read_text(), Loader=_SAFE_LOADER) or {}
    except (OSError, yaml.YAMLError) as exc:
        return Universe([], [f"cannot read {path}: {exc}"], unreadable=True)
    items = raw.get("symbols", []) if isinstance(raw, dict) else None
    if items is None and isinstance(raw, dict):
        items = []  # "symbols:" with no entry left
    if not isinstance(items, list):
        return Universe([], [f"{path}: expected a mapping with a 'symbols' list"],
                        unreadable=True)
    entries, errors, seen, invalid = [], [], set(), []
    for item in items:
        try:
            entry = _entry(item)
        except (SymbolError, ValueError) as exc:
            errors.append(f"{path}: skipped {item!r}: {exc}")
            named = _named_key(item)
            if named is not None:
                invalid.append(named)
            continue
        if entry.key in seen:
            errors.append(f"{path}: skipped duplicate symbol {entry.key}")
            continue
        seen.add(entry.key)
        entries.append(entry)
    return Universe(entries, errors, invalid_keys=invalid)


class UniverseFileError(ValueError):
    """The universe file cannot be edited (not a mapping with a 'symbols' list)."""


@contextlib.contextmanager
def universe_lock(path: Path) -> Iterator[None]:
    """Hold the universe file's lock (``.<name>.lock`` beside it) for the block: whoever
    reads the file, edits it and changes the partitions to match does so in one turn.
    Not re-entrant: take it once per process and call the editing functions inside."""
    with exclusive_file_lock(path.parent / f".{path.name}.lock"):
        yield


def entry_text(key: str, contract: str | None = None) -> str:
    """A universe entry as YAML text: the bare symbol, or ``{symbol: KEY, contract: ...}``
    when the contract was given in the explicit form (``ES:FUT:CME``)."""
    if contract is None or ":" not in contract:
        return _scalar(key)
    return f"{{symbol: {_scalar(key)}, contract: {json.dumps(contract.strip())}}}"


def _scalar(text: str) -> str:
    """``text`` as a plain YAML scalar when it reads back as the same string, else quoted."""
    try:
        plain = yaml.safe_load(text) == text and "#" not in text
    except yaml.YAMLError:
        plain = False
    return text if plain else json.dumps(text)


def _entry_key(raw: Any) -> str | None:
    """The key an entry lists: that of a valid entry, or the symbol a skipped one names."""
    try:
        return _entry(raw).key
    except (SymbolError, ValueError):
        return _named_key(raw)


def _named_key(raw: Any) -> str | None:
    """The storage key of the symbol an entry names, even when another option is bad."""
    text = raw.get("symbol") if isinstance(raw, dict) else raw
    try:
        return parse_symbol(str(text)).key if text is not None else None
    except (SymbolError, ValueError):
        return None


def add_entries(path: Path, entries: Sequence[tuple[str, str | None]]) -> list[str]:
    """Append ``(key, contract)`` entries the file does not list yet (creating the file if
    missing); returns the keys appended. Call it holding :func:`universe_lock`."""
    text = path.read_text() if path.exists() else ""
    data, items = _parse(path, text)
    listed = {_entry_key(item) for item in items}
    new, seen = [], set()
    for key, contract in entries:
        if key not in listed and key not in seen:
            seen.add(key)
            new.append((key, entry_text(key, contract)))
    if not new:
        return []
    lines = [line for _, line in new]
    expected = [*items, *(yaml.safe_load(line) for line in lines)]
    edited = _append_in_place(text, lines)
    _write(path, data, expected, edited)
    log.info("%s: added %s", path, [k for k, _ in new])
    return [k for k, _ in new]


def remove_entries(path: Path, keys: Sequence[str]) -> list[str]:
    """Remove the entries of ``keys`` from the file; returns the keys it listed. Call it
    holding :func:`universe_lock`."""
    if not path.exists():
        return []
    text = path.read_text()
    data, items = _parse(path, text)
    drop = [i for i, item in enumerate(items) if _entry_key(item) in set(keys)]
    if not drop:
        return []
    removed = list(dict.fromkeys(_entry_key(items[i]) for i in drop))
    expected = [item for i, item in enumerate(items) if i not in set(drop)]
    edited = _remove_in_place(text, drop)
    _write(path, data, expected, edited)
    log.info("%s: removed %s", path, removed)
    return [k for k in removed if k is not None]


def _parse(path: Path, text: str) -> tuple[dict[str, Any], list[Any]]:
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise UniverseFileError(f"cannot edit {path}: {exc}") from exc
    data = {} if data is None else data
    items = data.get("symbols") if isinstance(data, dict) else None
    if not isinstance(data, dict) or not isinstance(items, list | None):
        raise UniverseFileError(f"cannot edit {path}: expected a mapping with a 'symbols' list")
    return data, list(items or [])


def _symbols_node(text: str) -> tuple[yaml.Node, yaml.Node] | None:
    """The key and value nodes of the top-level 'symbols' (positions in ``text``)."""
    root = yaml.compose(text) if text.strip() else None
    if not isinstance(root, yaml.MappingNode):
        return None
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "symbols":
            return key, value
    return None


def _last_line(node: yaml.Node) -> int:
    """The last line (0-based) holding ``node``'s text: where its last scalar or flow
    collection ends (a block collection's own end mark lies on the next item's line)."""
    while isinstance(node, yaml.CollectionNode) and not node.flow_style and node.value:
        last = node.value[-1]
        node = last[1] if isinstance(last, tuple) else last
    end = node.end_mark
    return end.line if end.column > 0 else end.line - 1


def _append_in_place(text: str, lines: list[str]) -> str | None:
    """``text`` with ``lines`` appended to its 'symbols' list, keeping everything else;
    None when the layout is not one this knows how to extend."""
    if not text.strip():
        return "# The symbols to keep (see the README's Automation section).\nsymbols:\n" + \
            "".join(f"  - {line}\n" for line in lines)
    found = _symbols_node(text)
    block = "".join(f"  - {line}\n" for line in lines)
    if found is None:
        return text + ("" if text.endswith("\n") else "\n") + "symbols:\n" + block
    key, node = found
    if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null") and not node.value:
        source = text.splitlines(keepends=True)  # "symbols:" with no entry yet
        at = key.end_mark.line
        if not source[at].endswith("\n"):
            source[at] += "\n"
        return "".join(source[:at + 1] + [block] + source[at + 1:])
    if not isinstance(node, yaml.SequenceNode):
        return None
    if node.flow_style:
        close = node.end_mark.index - 1
        if text[close] != "]":
            return None
        joined = ", ".join(lines)
        return text[:close] + (", " + joined if node.value else joined) + text[close:]
    source = text.splitlines(keepends=True)
    first = node.value[0]
    prefix = source[first.start_mark.line][:first.start_mark.column]
    if prefix.strip() != "-":
        return None
    after = _last_line(node.value[-1]) + 1
    if after > 0 and not source[after - 1].endswith("\n"):
        source[after - 1] += "\n"
    return "".join(source[:after] + [f"{prefix}{line}\n" for line in lines] + source[after:])


def _remove_in_place(text: str, drop: list[int]) -> str | None:
    """``text`` without the 'symbols' items at ``drop``; None when it cannot tell which
    characters belong to them."""
    found = _symbols_node(text)
    node = found[1] if found else None
    if not isinstance(node, yaml.SequenceNode):
        return None
    if node.flow_style:
        for i in sorted(drop, reverse=True):
            item = node.value[i]
            start, end = item.start_mark.index, item.end_mark.index
            rest = text[end:]
            comma = len(rest) - len(rest.lstrip(" \t"))
            if rest[comma:comma + 1] == ",":  # the item and the comma after it
                rest = rest[comma + 1:].lstrip(" \t")
                text = text[:start] + rest
            else:  # the last item: the comma before it
                head = text[:start].rstrip(" \t")
                text = (head[:-1] if head.endswith(",") else head) + text[end:]
        return text
    source = text.splitlines(keepends=True)
    for i in sorted(drop, reverse=True):
        item = node.value[i]
        first, last = item.start_mark.line, _last_line(item)
        if source[first][:item.start_mark.column].strip() != "-":
            return None
        del source[first:last + 1]
    return "".join(source)


def _write(path: Path, data: dict[str, Any], expected: list[Any], edited: str | None) -> None:
    """Write ``edited`` when it reads back as ``data`` with ``expected`` symbols, else the
    whole file again from ``data`` (comments lost, never an entry); atomically."""
    want = {**data, "symbols": expected}
    if edited is not None:
        try:
            back = yaml.safe_load(edited) or {}
        except yaml.YAMLError:
            back = None
        if isinstance(back, dict) and {**back, "symbols": back.get("symbols") or []} == want:
            _write_atomically(path, edited)
            return
    log.warning("%s: cannot edit it in place; rewriting it (its comments are lost)", path)
    _write_atomically(path, "# Rewritten by ktrdr-pipeline (comments could not be kept).\n"
                      + yaml.safe_dump(want, sort_keys=False, default_flow_style=False))


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
