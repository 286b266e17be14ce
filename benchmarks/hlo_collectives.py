"""Bytes moved by the collectives of a compiled XLA program, read from its HLO text.

    from hlo_collectives import collective_bytes
    collective_bytes(compiled.as_text())  # {"all-gather": {"count": .., "operand_bytes": .., "moved_bytes": ..,
                                          #                 "largest_operand_bytes": ..}, ...}

Per device and per execution of the program. Each collective's operand shapes are summed, and
counted as many times as it runs: an instruction inside a while loop counts trip-count times, nested
loops multiply. The trip count is the loop's `known_trip_count` where XLA prints one (XLA:CPU);
otherwise it is read from the loop's condition, `counter < N`, with the counter's initial value from
the loop's operand and its step from the body's `counter + step`. TPU programs print no trip counts:
the scan over layers, and the windowed einsums whose collective-permute rings stand for an FSDP
all-gather or reduce-scatter, would count once each. `moved_bytes` estimates what
one device receives, given the group size n of its replica groups: all-gather operand * (n - 1),
reduce-scatter and all-to-all operand * (n - 1) / n, all-reduce 2 * operand * (n - 1) / n (a ring's
reduce-scatter + all-gather), collective-permute its operand. TPU programs write some reduce-scatters
as an all-reduce inside an `all-reduce-scatter` fusion, which keeps one shard: those count as
reduce-scatters. Async pairs count once (the -start op).
A ragged all-to-all moves as many rows as the routing decides at run time, which the HLO cannot
tell: a device sends at most its input and receives at most its output buffer, so its operand is
the smaller of the two (not the offsets), and its moved bytes operand * (n - 1) / n are what
crosses devices when every device sends and receives that many rows, spread evenly (balanced
routing with worst-case buffers: the dispatch sends its M * k rows, the return trip as many).
"""

import collections
import re

DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
OPCODE = re.compile(r"\s(" + "|".join(sorted(KINDS, key=len, reverse=True)) + r")(-start)?\(")
SHAPE = re.compile(r"\b(" + "|".join(DTYPE_BYTES) + r")\[([\d,]*)\]")
COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
CALLEE = re.compile(r"\b(body|condition|calls|to_apply)=%?([\w.\-]+)|\b(branch|called)_computations=\{([^}]*)\}")
DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s[a-z][\w\-]*\(")
OPERAND = re.compile(r"%([\w.\-]+)")
INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s")
END = re.compile(r"^\}(?:,\s*execution_thread=\S+)?\s*$")
TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
WHILE = re.compile(r"\swhile\(%?([\w.\-]+)\).*\bcondition=%?([\w.\-]+),\s*body=%?([\w.\-]+)")
COUNTER = re.compile(r"compare\(%?([\w.\-]+),\s*%?([\w.\-]+)\),\s*direction=(LT|GT)")
CONSTANT = re.compile(r"\sconstant\((-?\d+)\)")
GET_INDEX = re.compile(r"get-tuple-element\(%?[\w.\-]+\),\s*index=(\d+)")


def _bytes(text: str) -> int:
    total = 0
    for dtype, dims in SHAPE.findall(text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * DTYPE_BYTES[dtype]
    return total


def _operands(line: str, start: int) -> str:
    """The text between the opcode's parentheses (operands with their shapes)."""
    depth = 0
    for i in range(start, len(line)):
        depth += {"(": 1, ")": -1}.get(line[i], 0)
        if depth == 0:
            return line[start + 1 : i]
    return line[start + 1 :]


def _group_size(line: str) -> int:
    # mesh['data'=1,'expert'=8,...] {'expert'}: the product of the listed axes; a mesh whose devices
    # are in another order prints `device_ids=([2,4]T(1,0))` between the two
    named = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if named:
        sizes = dict(re.findall(r"'([^']+)'=(\d+)", named.group(1)))
        n = 1
        for axis in re.findall(r"'([^']+)'", named.group(2)):
            n *= int(sizes[axis])
        return n
    iota = re.search(r"replica_groups=\[(\d+),(\d+)\]", line)
    if iota:
        return int(iota.group(2))
    listed = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if listed:
        return len(listed.group(1).split(","))
    pairs = re.search(r"source_target_pairs=\{([^}]*)\}", line)
    return 2 if pairs else 1


def _computations(hlo_text: str) -> tuple[dict, str | None]:
    """-> ({computation name: its instruction lines}, the entry's name). An instruction whose
    attributes span lines (a Pallas kernel's metadata JSON) is joined into one line, so that a
    continuation line starting with "}" does not end its computation."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        head = COMPUTATION.match(line)
        if head and not line.startswith(" "):
            current = head.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and END.match(line):
            current = None
        elif current is not None and (INSTRUCTION.match(line) or not computations[current]):
            computations[current].append(line)
        elif current is not None:
            computations[current][-1] += line
    return computations, entry


def collective_bytes(hlo_text: str) -> dict:
    computations, entry = _computations(hlo_text)

    # how many times each computation runs per program execution: trip counts of enclosing loops
    edges = collections.defaultdict(list)
    for name, lines in computations.items():
        for line in lines:
            trip = TRIP.search(line)
            trip = int(trip.group(1)) if trip else _trip_from_condition(line, lines, computations)
            for role, single, _, listed in CALLEE.findall(line):
                factor = trip if role in ("body", "condition") else 1
                for callee in [single] if single else listed.replace("%", "").replace(" ", "").split(","):
                    if callee in computations:
                        edges[name].append((callee, factor))
    runs = _runs(entry, edges)

    out = {}
    for name, lines in computations.items():
        # compiled HLO names operands without their shapes: look them up where they are defined
        shapes = {d.group(1): d.group(2) for d in map(DEFINITION.match, lines) if d}
        for line in lines:
            op = OPCODE.search(line)
            if not op or runs[name] == 0:
                continue
            kind = op.group(1)
            if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
                # TPU's reduce-scatter: an all-reduce in a fusion that keeps one device's shard of it
                kind = "reduce-scatter"
            operands = _operands(line, op.end() - 1)
            refs = OPERAND.findall(operands)
            if kind == "ragged-all-to-all":  # (input, output buffer, offsets, sizes): the smaller buffer bounds it
                operand = min(_bytes(shapes.get(ref, "")) for ref in refs[:2])
            else:
                operand = sum(_bytes(shapes.get(ref, "")) for ref in refs) or _bytes(operands)
            n = _group_size(line)
            moved = {
                "all-gather": operand * (n - 1),
                "reduce-scatter": operand * (n - 1) / n,
                "all-to-all": operand * (n - 1) / n,
                "ragged-all-to-all": operand * (n - 1) / n,
                "all-reduce": 2 * operand * (n - 1) / n,
                "collective-permute": operand,
            }[kind]
            row = out.setdefault(kind, {"count": 0, "operand_bytes": 0, "moved_bytes": 0, "largest_operand_bytes": 0})
            row["largest_operand_bytes"] = max(row["largest_operand_bytes"], operand)
            row["count"] += runs[name]
            row["operand_bytes"] += runs[name] * operand
            row["moved_bytes"] += round(runs[name] * moved)
    return out


def _definitions(lines: list[str]) -> dict:
    """{instruction name: its defining line} of one computation."""
    return {d.group(1): line for line in lines if (d := DEFINITION.match(line))}


def _tuple_operand(definition: str, i: int) -> str:
    """The name of element i of a `tuple(...)` instruction, '' for another instruction."""
    if " tuple(" not in definition:
        return ""
    operands = re.sub(r"/\*[^*]*\*/", "", _operands(definition, definition.index(" tuple(") + 6)).split(",")
    return operands[i].strip().lstrip("%") if i < len(operands) else ""


def _constant(definitions: dict, name: str) -> int | None:
    value = CONSTANT.search(definitions.get(name, ""))
    return int(value.group(1)) if value else None


def _trip_from_condition(line: str, lines: list[str], computations: dict) -> int:
    """A while loop's trip count from its condition `get-tuple-element(param, i) < constant(N)`:
    (N - start) / step, start the counter's initial value (element i of the loop's operand tuple,
    where that is a constant, else 0) and step what the body adds to it (`counter + constant`, as
    the windowed einsums' loops add 2; else 1). 1 for an instruction that is no while loop or a
    condition of another form."""
    loop = WHILE.search(line)
    if not loop or loop.group(2) not in computations or loop.group(3) not in computations:
        return 1
    condition = _definitions(computations[loop.group(2)])
    root = next((ln for ln in condition.values() if ln.lstrip().startswith("ROOT")), "")
    compare = COUNTER.search(root)
    if not compare:
        return 1
    counter, bound = compare.group(1, 2) if compare.group(3) == "LT" else compare.group(2, 1)
    index, limit = GET_INDEX.search(condition.get(counter, "")), CONSTANT.search(condition.get(bound, ""))
    if not index or not limit:
        return 1
    i, defined = int(index.group(1)), _definitions(lines)
    start = _constant(defined, _tuple_operand(defined.get(loop.group(1), ""), i)) or 0
    body = _definitions(computations[loop.group(3)])
    root = next((ln for ln in body.values() if ln.lstrip().startswith("ROOT")), "")
    step = 1
    update = re.search(r"\sadd\(%?([\w.\-]+),\s*%?([\w.\-]+)\)", body.get(_tuple_operand(root, i), ""))
    if update:
        for counter, increment in (update.group(1, 2), update.group(2, 1)):
            got = GET_INDEX.search(body.get(counter, ""))
            if got and int(got.group(1)) == i and _constant(body, increment):
                step = _constant(body, increment)
    return max(-(-(int(limit.group(1)) - start) // step), 0)


def _runs(entry: str, edges) -> collections.Counter:
    """Executions of each computation reachable from entry, callers summed before their callees."""
    reachable, stack = {entry}, [entry]
    while stack:
        for callee, _ in edges[stack.pop()]:
            if callee not in reachable:
                reachable.add(callee)
                stack.append(callee)
    indegree = collections.Counter(callee for name in reachable for callee, _ in edges[name])
    runs, ready = collections.Counter({entry: 1}), [entry]
    while ready:
        name = ready.pop()
        for callee, factor in edges[name]:
            runs[callee] += runs[name] * factor
            indegree[callee] -= 1
            if indegree[callee] == 0:
                ready.append(callee)
    return runs


def summary_gib(table: dict) -> dict:
    """{kind: moved GiB} plus the total, rounded for printing."""
    out = {kind: round(row["moved_bytes"] / 2**30, 3) for kind, row in sorted(table.items())}
    out["total"] = round(sum(row["moved_bytes"] for row in table.values()) / 2**30, 3)
    return out
