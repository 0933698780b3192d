"""Read a lowered pipeline's HLO and check the overlapped F&B: inside one tick, no data dependency may run from
one stream's collective to the other stream's computation.

The lowering runs an overlapped F&BW's forward under the named scope FB_FORWARD and its backward under
FB_BACKWARD (`pipeline_body`), so every HLO instruction carries its stream in `metadata={op_name=...}`. For
each computation holding both streams (the F&B branches of the tick's conditional) this module builds the
def-use graph and follows every collective's users: reaching an instruction of the other stream means that
stream must wait for the collective, so the two cannot overlap. A `while`, `call`, `conditional` or fusion
counts as a collective when a computation it calls holds one; a path into a fusion continues inside it from the
parameter it enters by (after XLA's passes a fusion can hold CSE'd instructions of both streams).

Works on `jax.jit(f).lower(...).as_text(dialect="hlo", debug_info=True)` (the program as lowered) and on
`compiled.as_text()` (after XLA's passes: on a GPU, the scheduled program with async collective pairs).
"""

from __future__ import annotations

import dataclasses
import re

from seekax.lowering.pipeline_body import FB_BACKWARD, FB_FORWARD

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute",
               "ragged-all-to-all", "collective-broadcast", "all-gather-start", "all-reduce-start",
               "collective-permute-start", "all-to-all-start")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\))?\s*(?:->\s*.*)?\{\s*$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Instr:
    name: str
    opcode: str
    operands: tuple[str, ...]
    called: tuple[str, ...]
    op_name: str

    @property
    def stream(self) -> str | None:
        """"F", "B" or None (not inside an overlapped F&B's streams)."""
        if FB_FORWARD in self.op_name:
            return "F"
        if FB_BACKWARD in self.op_name:
            return "B"
        return None


@dataclasses.dataclass(frozen=True)
class StreamReport:
    """One F&B computation: its collectives and computations per stream, and the cross-stream paths found
    (each a list of instruction names from a collective to an instruction of the other stream)."""

    computation: str
    collectives: dict
    compute: dict
    paths: tuple[tuple[str, ...], ...]


def parse_hlo(text: str) -> dict[str, list[Instr]]:
    """HLO text -> {computation name: its instructions in order}."""
    comps: dict[str, list[Instr]] = {}
    current: list[Instr] | None = None
    for line in text.splitlines():
        if current is None or line.rstrip().endswith("{") and "=" not in line.split("{")[0]:
            m = _HEADER.match(line)
            if m and not line.lstrip().startswith("HloModule"):
                current = comps.setdefault(m.group(1), [])
                continue
        if line.strip() == "}":
            current = None
            continue
        if current is None:
            continue
        m = _INSTR.match(line)
        if m:
            current.append(_parse_instr(m.group(1), m.group(2)))
    return comps


def _parse_instr(name: str, rest: str) -> Instr:
    i = _skip_type(rest)
    body = rest[i:].lstrip()
    j = body.find("(")
    opcode = body[:j].strip() if j >= 0 else body.split()[0]
    operands: list[str] = []
    tail = ""
    if j >= 0:
        k, depth = j, 0
        for k in range(j, len(body)):
            depth += body[k] == "("
            depth -= body[k] == ")"
            if depth == 0:
                break
        operands = [tok.split()[-1].lstrip("%") for tok in _split_top(body[j + 1:k]) if tok.strip()]
        tail = body[k + 1:]
    called: list[str] = []
    for m in re.finditer(r"(?:to_apply|body|condition|calls|branch_computations|true_computation|"
                         r"false_computation)=(\{[^}]*\}|%?[\w.\-]+)", tail):
        called += [c.strip().lstrip("%") for c in m.group(1).strip("{}").split(",") if c.strip()]
    op = _OP_NAME.search(tail)
    return Instr(name=name, opcode=opcode, operands=tuple(operands), called=tuple(called),
                 op_name=op.group(1) if op else "")


def _skip_type(rest: str) -> int:
    """Index just past the result type: a tuple "(...)" or a shape like "f32[2,4]{1,0}"."""
    s = rest.lstrip()
    off = len(rest) - len(s)
    if s.startswith("("):
        depth = 0
        for i, ch in enumerate(s):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return off + i + 1
    return off + (s.find(" ") if " " in s else len(s))


def _split_top(text: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out


def fb_stream_reports(text: str) -> list[StreamReport]:
    """One report per computation holding instructions of both F&B streams."""
    comps = parse_hlo(text)
    holds: dict[str, bool] = {}

    streams_in: dict[str, frozenset] = {}

    def has_collective(comp: str) -> bool:
        if comp not in holds:
            holds[comp] = False
            holds[comp] = any(ins.opcode in COLLECTIVES
                              or any(has_collective(c) for c in ins.called if c in comps)
                              for ins in comps.get(comp, ()))
        return holds[comp]

    def inner_streams(comp: str) -> frozenset:
        """Streams of the instructions a called computation (a fusion, say) holds."""
        if comp not in streams_in:
            streams_in[comp] = frozenset()
            found = set()
            for ins in comps.get(comp, ()):
                found |= {ins.stream} - {None}
                for c in ins.called:
                    found |= inner_streams(c)
            streams_in[comp] = frozenset(found)
        return streams_in[comp]

    def _is_collective(ins: Instr) -> bool:
        return ins.opcode in COLLECTIVES or any(has_collective(c) for c in ins.called if c in comps)

    def touches(ins: Instr, via: str) -> frozenset:
        """The streams an instruction puts to work on its operand `via`: for a fusion, the streams of the fused
        instructions that depend on that operand's parameter (XLA fuses and CSEs across streams, so a fusion
        may hold another stream's instructions that do not read this operand); for other callers (while,
        call, conditional), their own stream and every stream inside what they call."""
        if ins.opcode == "fusion" and ins.called and ins.called[0] in comps:
            params = {i for i, op in enumerate(ins.operands) if op == via}
            return _param_streams(comps[ins.called[0]], params)
        out = {ins.stream} - {None}
        for c in ins.called:
            out |= inner_streams(c)
        return frozenset(out)

    reports = []
    for cname, instrs in comps.items():
        streams = {ins.stream for ins in instrs}
        if not {"F", "B"} <= streams or not any(ins.stream and _is_collective(ins) for ins in instrs):
            continue
        by_name = {ins.name: ins for ins in instrs}
        users: dict[str, list[str]] = {}
        for ins in instrs:
            for op in ins.operands:
                users.setdefault(op, []).append(ins.name)

        collectives = {"F": 0, "B": 0}
        compute = {"F": 0, "B": 0}
        paths = []
        for ins in instrs:
            if ins.stream is None:
                continue
            if _is_collective(ins):
                collectives[ins.stream] += 1
                path = _cross_path(ins, by_name, users, touches)
                if path:
                    paths.append(path)
            elif ins.opcode not in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast", "reshape",
                                    "broadcast", "copy"):
                compute[ins.stream] += 1
        reports.append(StreamReport(computation=cname, collectives=collectives, compute=compute,
                                    paths=tuple(paths)))
    return reports


def _param_streams(instrs: list[Instr], params: set[int]) -> frozenset:
    """Streams of the instructions of a fused computation that depend on its parameters `params`."""
    users: dict[str, list[Instr]] = {}
    for ins in instrs:
        for op in ins.operands:
            users.setdefault(op, []).append(ins)
    todo = [ins for ins in instrs if ins.opcode == "parameter" and ins.operands and ins.operands[0].isdigit()
            and int(ins.operands[0]) in params]
    seen, found = {ins.name for ins in todo}, set()
    while todo:
        ins = todo.pop()
        found |= {ins.stream} - {None}
        for u in users.get(ins.name, ()):
            if u.name not in seen:
                seen.add(u.name)
                todo.append(u)
    return frozenset(found)


def _cross_path(start: Instr, by_name: dict[str, Instr], users: dict[str, list[str]],
                touches) -> tuple[str, ...]:
    """A def-use path from `start` to an instruction of (or calling into) the other stream, or ()."""
    other = "B" if start.stream == "F" else "F"
    parent: dict[str, str | None] = {start.name: None}
    queue = [start.name]
    while queue:
        cur = queue.pop(0)
        for u in users.get(cur, ()):
            if u in parent:
                continue
            parent[u] = cur
            if other in touches(by_name[u], cur):
                path = [u]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return tuple(reversed(path))
            queue.append(u)
    return ()


@dataclasses.dataclass(frozen=True)
class AsyncWindow:
    """One asynchronous collective of an F&B stream in a scheduled program: how many instructions of the
    other stream the schedule places between its start and its done (what runs while it is in flight)."""

    computation: str
    start: str
    stream: str
    other_stream_between: int


def fb_async_windows(text: str) -> list[AsyncWindow]:
    """For a scheduled HLO module (`compiled.as_text()` on a GPU: instructions in schedule order, collectives
    split into *-start / *-done or async-start / async-done), every async collective started by an F&B stream."""
    comps = parse_hlo(text)
    out = []
    for cname, instrs in comps.items():
        if not {"F", "B"} <= {ins.stream for ins in instrs}:
            continue
        pos = {ins.name: i for i, ins in enumerate(instrs)}
        for i, ins in enumerate(instrs):
            if ins.stream is None or not (ins.opcode.endswith("-start") or ins.opcode == "async-start"):
                continue
            done = next((u for u in instrs[i + 1:] if ins.name in u.operands and u.opcode.endswith("-done")), None)
            if done is None:
                continue
            other = "B" if ins.stream == "F" else "F"
            between = sum(1 for x in instrs[i + 1:pos[done.name]] if x.stream == other)
            out.append(AsyncWindow(computation=cname, start=ins.name, stream=ins.stream,
                                   other_stream_between=between))
    return out
