"""Bytes moved by the collectives of a compiled XLA program, read from its HLO text.

    from hlo_collectives import collective_bytes
    collective_bytes(compiled.as_text())  # {"all-gather": {"count": .., "operand_bytes": .., "moved_bytes": ..}, ...}

Per device and per execution of the program. Each collective's operand shapes are summed, and
counted as many times as it runs: an instruction inside a while loop with a known trip count
(scanned layers) counts trip-count times, nested loops multiply. `moved_bytes` estimates what
one device receives, given the group size n of its replica groups: all-gather operand * (n - 1),
reduce-scatter and all-to-all operand * (n - 1) / n, all-reduce 2 * operand * (n - 1) / n (a ring's
reduce-scatter + all-gather), collective-permute its operand. Async pairs count once (the -start op).
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
TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


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
    named = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line)
    if named:  # mesh['data'=1,'expert'=8,...] {'expert'}: the product of the listed axes
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


def collective_bytes(hlo_text: str) -> dict:
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        head = COMPUTATION.match(line)
        if head and not line.startswith(" "):
            current = head.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif line.startswith("}"):
            current = None
        elif current is not None:
            computations[current].append(line)

    # how many times each computation runs per program execution: trip counts of enclosing loops
    edges = collections.defaultdict(list)
    for name, lines in computations.items():
        for line in lines:
            trip = TRIP.search(line)
            for role, single, _, listed in CALLEE.findall(line):
                factor = int(trip.group(1)) if trip and role in ("body", "condition") else 1
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
            row = out.setdefault(kind, {"count": 0, "operand_bytes": 0, "moved_bytes": 0})
            row["count"] += runs[name]
            row["operand_bytes"] += runs[name] * operand
            row["moved_bytes"] += round(runs[name] * moved)
    return out


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
