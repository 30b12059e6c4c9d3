"""What a compiled step does, read from its optimised HLO text (`compiled.as_text()`).

XLA's own cost analysis is not available for a GPU executable compiled without a GPU
(`compiled.cost_analysis()` is None there) and counts cuDNN's fused attention as free, so the
plan reads the per-device program itself:

* **matmuls**: every `dot` and cuBLAS GEMM (`__cublas$...` custom calls), 2 FLOPs per
  multiply-add, by operand dtype and by the named scope they come from (`jax.named_scope`s of
  jaxmusic.nn / models: `attention`, `mlp`, `lm_head`, `loss`, ...);
* **fused attention**: cuDNN's `__cudnn$fmha...` calls, counted analytically from their
  `[B, N, T, S]` score shape and head width: forward 2 matmuls (4 B N T S H FLOPs), backward
  5 (QK^T recomputed, dV, dP, dQ, dK: 10 B N T S H), half of it under a causal mask;
* **collectives**: all-gather, reduce-scatter, all-reduce, all-to-all and collective-permute,
  with the bytes each device sends and the device groups they run over.

Every instruction counts as often as it runs: loops multiply by their trip count (XLA's
`known_trip_count`, else the bound in the loop's condition), and the bodies of fusions,
calls, branches and async wrappers are followed.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "token": 0}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%(\S+) ")
_INSTR = re.compile(r"^\s+(?:ROOT )?%(\S+) = ")
_CALLS = re.compile(r"\b(?:calls|body|to_apply)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str       # result type text, e.g. "bf16[4,8]{1,0}" or a tuple "(f32[2], u8[0])"
    opcode: str
    args: str        # the text between the opcode's parentheses
    attrs: str       # everything after them

    @property
    def operands(self) -> list[str]:
        return re.findall(r"%([\w.\-]+)", self.args)


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at `text[start]`."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    return len(text)


def _parse_instr(line: str) -> Instr | None:
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    end = _balanced(rest, 0) if rest.startswith("(") else rest.index(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    paren = rest.find("(")
    opcode = rest[:paren]
    close = _balanced(rest, paren)
    return Instr(m.group(1), shape, opcode, rest[paren + 1:close - 1], rest[close:])


def parse(text: str) -> tuple[dict[str, list[Instr]], str]:
    """`({computation: [instructions]}, entry computation name)`; a computation's ROOT comes last."""
    comps: dict[str, list[Instr]] = {}
    entry, current, root = None, None, None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header and line.rstrip().endswith("{"):
            current = header.group(2)
            comps[current] = []
            if header.group(1):
                entry = current
        elif current is not None and line.startswith("}"):
            comps[current].append(root)
            current = None
        elif current is not None:
            instr = _parse_instr(line)
            if instr and line.lstrip().startswith("ROOT "):
                root = instr
            elif instr:
                comps[current].append(instr)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """The arrays of a (possibly tuple) type text: `[(dtype, dims), ...]`."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape)]


def nbytes(shape: str) -> int:
    return sum(DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in arrays(shape))


def _backend_config(instr: Instr) -> dict:
    i = instr.attrs.find("backend_config=")
    if i < 0:
        return {}
    start = i + len("backend_config=")
    try:
        return json.loads(instr.attrs[start:_balanced(instr.attrs, start)])
    except ValueError:
        return {}


def _constant(name: str, instrs: dict[str, Instr]) -> int | None:
    """The integer a scalar instruction holds, seen through copies and bitcasts."""
    instr = instrs.get(name)
    while instr is not None and instr.opcode in ("copy", "bitcast", "convert") and instr.operands:
        instr = instrs.get(instr.operands[0])
    if instr is not None and instr.opcode == "constant" and instr.args.lstrip("-").isdigit():
        return int(instr.args)
    return None


def _root(comp: list[Instr]) -> Instr:
    return comp[-1]  # `parse` puts it last


def _loop_step(body: list[Instr], index: int, comps: dict[str, list[Instr]]) -> int:
    """What the loop body adds to its induction variable (tuple element `index` of its root)."""
    by_name = {i.name: i for i in body}
    add = by_name.get(_root(body).operands[index])
    if add is not None and add.opcode == "fusion":
        fused = comps[_CALLS.findall(add.attrs)[0]]
        add, by_name = _root(fused), {i.name: i for i in fused}
    steps = [_constant(op, by_name) for op in (add.operands if add is not None and add.opcode == "add" else [])]
    return next((c for c in steps if c is not None), 1)


def _trip_count(instr: Instr, comps: dict[str, list[Instr]], caller: dict[str, Instr]) -> int:
    config = _backend_config(instr)
    known = config.get("known_trip_count", {}).get("n")
    if known is not None:
        return int(known)
    # a scan's condition `compare(i, constant(N)), direction=LT` (possibly inside a fusion it
    # calls), with i's start in the loop's initial tuple and its step in the body's root
    index = int(config.get("known_induction_variable", {}).get("tuple_index", 0))
    init = caller.get(instr.operands[0])
    start = _constant(init.operands[index], caller) if init is not None and init.opcode == "tuple" else None
    body = comps[re.search(r"body=%([\w.\-]+)", instr.attrs).group(1)]
    todo = [re.search(r"condition=%([\w.\-]+)", instr.attrs).group(1)]
    while todo:
        cond = comps[todo.pop()]
        by_name = {i.name: i for i in cond}
        for i in cond:
            bounds = [b for b in (_constant(op, by_name) for op in i.operands) if b is not None]
            if i.opcode == "compare" and "direction=LT" in i.attrs and bounds:
                return max(0, -(-(bounds[0] - (start or 0)) // _loop_step(body, index, comps)))
            todo += _CALLS.findall(i.attrs) if i.opcode == "fusion" else []
    raise ValueError(f"cannot tell how often loop {instr.name} runs")


def multiplicities(comps: dict[str, list[Instr]], entry: str) -> dict[str, int]:
    """How often each computation runs per execution of the entry computation."""
    counts: dict[str, int] = collections.defaultdict(int)

    def visit(comp: str, times: int) -> None:
        counts[comp] += times
        by_name = {i.name: i for i in comps[comp]}
        for instr in comps[comp]:
            if instr.opcode == "while":
                n = _trip_count(instr, comps, by_name)
                visit(re.search(r"body=%([\w.\-]+)", instr.attrs).group(1), times * n)
            elif instr.opcode in ("fusion", "call", "async-start"):
                for callee in _CALLS.findall(instr.attrs):
                    visit(callee, times)
            elif instr.opcode == "conditional":
                for callee in re.findall(r"%([\w.\-]+)", _BRANCHES.search(instr.attrs).group(1)):
                    visit(callee, times)

    visit(entry, 1)
    return counts


# --------------------------------------------------------------------------------- the analysis

@dataclasses.dataclass
class Collective:
    kind: str             # all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute
    groups: list[list[int]]
    count: int            # executions per step
    data_bytes: int       # per execution: the gathered / reduced buffer on one device
    sent_bytes: float     # per execution: what one device sends (ring algorithms)
    scope: str            # the named scope it serves (`_scope`)


@dataclasses.dataclass
class Analysis:
    matmul_flops: dict[str, float]     # by operand dtype
    matmul_by_scope: dict[tuple[str, str], float]  # (dtype, innermost named scope) -> FLOPs
    attention_flops: float
    attention_calls: dict[str, int]    # "target layer" (e.g. "__cudnn$fmhaSoftmax encoder_layer") -> executions
    collectives: list[Collective]

    @property
    def flops(self) -> float:
        return sum(self.matmul_flops.values()) + self.attention_flops


def _iota(dims: list[int], perm: str | None) -> np.ndarray:
    ids = np.arange(math.prod(dims)).reshape(dims)
    return ids.transpose([int(p) for p in perm.split(",")]) if perm else ids


def replica_groups(attrs: str) -> list[list[int]]:
    """A collective's device groups as lists of ids, from any of XLA's three spellings:
    `{{0,1},{2,3}}`, the iota form `[G,S]<=[dims]T(perm)`, and the mesh form
    `mesh['axis_0'=8,'axis_1'=2], device_ids=([2,8]T(1,0)) {'axis_0'}` (groups run along
    the named axes of a mesh of device ids)."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? \{([^}]*)\}",
                  attrs)
    if m:
        axes = re.findall(r"'(\w+)'=(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        ids = _iota([int(d) for d in m.group(2).split(",")] if m.group(2) else sizes, m.group(3)).reshape(sizes)
        along = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(4))]
        rest = [i for i in range(len(names)) if i not in along]
        return ids.transpose(rest + along).reshape(-1, math.prod(sizes[i] for i in along)).tolist()
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        ids = _iota([int(d) for d in m.group(3).split(",")], m.group(4))
        return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
    for key in ("replica_groups={", "source_target_pairs={"):
        i = attrs.find(key)
        if i >= 0:
            start = i + len(key) - 1
            inner = attrs[start + 1:_balanced(attrs, start) - 1]
            return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", inner)]
    return []


_GENERIC = {"while", "body", "cond", "closed_call", "checkpoint", "rematted_computation", "remat", ""}


def _scope(attrs: str) -> str:
    """The innermost named scope of an instruction's `op_name` (`.../jvp(jit(log_mel_jax))/dot_general`
    -> `log_mel_jax`), transformation wrappers and loop plumbing removed."""
    m = re.search(r'op_name="([^"]*)"', attrs)
    if not m:
        return "?"
    parts = []
    for part in m.group(1).split("/"):
        while re.fullmatch(r"[\w.]+\((.*)\)", part):
            part = re.fullmatch(r"[\w.]+\((.*)\)", part).group(1)
        if part not in _GENERIC:
            parts.append(part)
    return parts[-2] if len(parts) >= 2 else (parts[-1] if parts else "?")


def _matmul_flops(instr: Instr, shapes: dict[str, str]) -> tuple[str, float] | None:
    """`(lhs dtype, FLOPs)` of a dot or cuBLAS GEMM."""
    if instr.opcode == "dot":
        contracting = [int(d) for d in re.search(r"lhs_contracting_dims=\{([\d,]*)\}", instr.attrs)
                       .group(1).split(",") if d]
    elif instr.opcode == "custom-call" and '"__cublas$' in instr.attrs:
        dims = _backend_config(instr).get("gemm_backend_config", {}).get("dot_dimension_numbers", {})
        contracting = [int(d) for d in dims.get("lhs_contracting_dimensions", [])]
    else:
        return None
    lhs_dtype, lhs_dims = arrays(shapes[instr.operands[0]])[0]
    _, out_dims = arrays(instr.shape)[0]
    return lhs_dtype, 2.0 * math.prod(out_dims) * math.prod(lhs_dims[d] for d in contracting)


def _attention_flops(instr: Instr) -> float:
    config = _backend_config(instr).get("cudnn_fmha_backend_config", {})
    b, n, t, s = (int(d) for d in config["intermediate_tensor_shape"]["dimensions"])
    head = arrays(instr.shape)[0][1][-1]
    matmuls = 5 if "Backward" in instr.attrs.split("custom_call_target=")[1].split(",")[0] else 2
    causal = 0.5 if "CAUSAL" in config.get("mask_type", "") else 1.0
    return matmuls * 2.0 * b * n * t * s * head * causal


def _collective(instr: Instr, shapes: dict[str, str], times: int, devices: int) -> Collective:
    kind = instr.opcode.removesuffix("-start")
    groups = replica_groups(instr.attrs) or [list(range(devices))]  # `{}`: every device
    n = max((len(g) for g in groups), default=1)
    data_in = sum(nbytes(shapes[o]) for o in instr.operands if o in shapes)
    if kind == "all-gather":
        data, sent = data_in * n, data_in * (n - 1)
    elif kind == "all-reduce":
        data, sent = data_in, 2 * data_in * (n - 1) / n
    elif kind == "collective-permute":
        data, sent = data_in, data_in
    else:  # reduce-scatter, all-to-all
        data, sent = data_in, data_in * (n - 1) / n
    return Collective(kind, groups, times, data, sent, _scope(instr.attrs))


def analyse(text: str) -> Analysis:
    """Matmul and attention FLOPs and the collectives of one device's program, per step."""
    comps, entry = parse(text)
    runs = multiplicities(comps, entry)
    partitions = re.search(r"num_partitions=(\d+)", text.split("\n", 1)[0])
    devices = int(partitions.group(1)) if partitions else 1
    flops: dict[str, float] = collections.defaultdict(float)
    by_scope: dict[tuple[str, str], float] = collections.defaultdict(float)
    attention, calls, found = 0.0, collections.Counter(), []
    for comp, times in runs.items():
        shapes = {i.name: i.shape for i in comps[comp]}
        for instr in comps[comp]:
            mm = _matmul_flops(instr, shapes)
            if mm:
                flops[mm[0]] += times * mm[1]
                by_scope[(mm[0], _scope(instr.attrs))] += times * mm[1]
            elif instr.opcode == "custom-call" and '"__cudnn$fmha' in instr.attrs:
                attention += times * _attention_flops(instr)
                target = re.search(r'custom_call_target="([^"]+)"', instr.attrs).group(1)
                layer = re.search(r"(encoder_layer|decoder_layer)", instr.attrs)
                calls[f"{target} {layer.group(1) if layer else '?'}"] += times
            elif instr.opcode in COLLECTIVES or instr.opcode.removesuffix("-start") in COLLECTIVES:
                found.append(_collective(instr, shapes, times, devices))
    return Analysis(dict(flops), dict(by_scope), attention, dict(calls), _merge(found))


def _merge(found: list[Collective]) -> list[Collective]:
    """One entry per (kind, groups, size): the same collective in several loop copies adds up."""
    merged: dict[tuple, Collective] = {}
    for c in found:
        key = (c.kind, str(c.groups), c.data_bytes, c.scope)
        if key in merged:
            merged[key].count += c.count
        else:
            merged[key] = dataclasses.replace(c)
    return list(merged.values())
