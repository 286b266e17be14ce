"""benchmarks/hlo_collectives.py: the bytes a compiled program's collectives move, read from HLO text
written here by hand in the forms XLA prints (XLA:CPU's trip counts, TPU's loop conditions, async
pairs, a kernel's multi-line metadata)."""

from benchmarks.hlo_collectives import collective_bytes


def test_collective_parser_counts_a_ragged_all_to_all_by_its_smaller_buffer():
    """benchmarks/hlo_collectives.py: a ragged all-to-all sends at most its input and receives at
    most its output buffer; the offsets and the larger buffer are not traffic."""
    hlo = """HloModule m

ENTRY %main (p0: bf16[64,8], p1: bf16[512,8], p2: s32[16]) -> bf16[512,8] {
  %p0 = bf16[64,8]{1,0} parameter(0)
  %p1 = bf16[512,8]{1,0} parameter(1)
  %p2 = s32[16]{0} parameter(2)
  ROOT %r = bf16[512,8]{1,0} ragged-all-to-all(%p0, %p1, %p2, %p2, %p2, %p2), replica_groups={{0,1,2,3,4,5,6,7}}
}
"""
    row = collective_bytes(hlo)["ragged-all-to-all"]
    assert row["count"] == 1 and row["operand_bytes"] == 64 * 8 * 2
    assert row["moved_bytes"] == 64 * 8 * 2 * 7 / 8
    back = collective_bytes(hlo.replace("%p0, %p1", "%p1, %p0"))["ragged-all-to-all"]  # the return trip
    assert back["operand_bytes"] == 64 * 8 * 2


LOOP = """HloModule m

%cond (p: (s32[], f32[256])) -> pred[] {
  %p = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(LIMIT)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p: (s32[], f32[256])) -> (s32[], f32[256]) {
  %p = (s32[], f32[256]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[256]{0} get-tuple-element(%p), index=1
  %k = f32[256]{0} custom-call(%x), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"blocks": 8
}}, metadata={op_name="kernel"}
  %s = f32[256]{0} all-reduce-start(%k), replica_groups={{0,1,2,3}}, to_apply=%sum
  %d = f32[256]{0} all-reduce-done(%s)
  %step = s32[] constant(STEP)
  %next = s32[] add(%i, %step)
  ROOT %t = (s32[], f32[256]{0}) tuple(%next, %d)
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %c = f32[] add(%a, %b)
}

ENTRY %main (x: f32[256]) -> (s32[], f32[256]) {
  %x = f32[256]{0} parameter(0)
  %zero = s32[] constant(START)
  %init = (s32[], f32[256]{0}) tuple(%zero, %x)
  ROOT %w = (s32[], f32[256]{0}) while(%init), condition=%cond, body=%body
}
"""


def test_a_loop_without_a_printed_trip_count_counts_from_its_condition():
    """TPU programs print no known_trip_count: the count is (limit - start) / step, read from the
    condition, the loop's initial tuple and the body's increment (the windowed einsums step by 2).
    The async pair counts once; a kernel's metadata over three lines, one starting with "}", does
    not end the body early."""
    for start, limit, step, trips in ((0, 8, 1, 8), (0, 8, 2, 4), (3, 8, 1, 5), (0, 7, 2, 4)):
        hlo = LOOP.replace("LIMIT", str(limit)).replace("STEP", str(step)).replace("START", str(start))
        row = collective_bytes(hlo)["all-reduce"]
        assert row["count"] == trips, (start, limit, step)
        assert row["operand_bytes"] == trips * 256 * 4
        assert row["moved_bytes"] == trips * 2 * 256 * 4 * 3 / 4  # a ring all-reduce over 4 devices


def test_a_printed_trip_count_wins():
    hlo = LOOP.replace("LIMIT", "8").replace("STEP", "1").replace("START", "0")
    hlo = hlo.replace("body=%body", 'body=%body, backend_config={"known_trip_count":{"n":"3"}}')
    assert collective_bytes(hlo)["all-reduce"]["count"] == 3


def test_collective_parser_reads_the_group_of_a_mesh_with_reordered_devices():
    """TPU HLO names a group by mesh axes, and where the mesh's devices are in another order it prints
    their order between the axes and the group: the group is still the listed axes' product."""
    group = "replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=1,'axis_3'=2], device_ids=([2,4]T(1,0)) {'axis_0'}"
    hlo = f"""HloModule m

ENTRY %main (p0: bf16[1024,256]) -> bf16[4096,256] {{
  %p0 = bf16[1024,256]{{1,0}} parameter(0)
  ROOT %g = bf16[4096,256]{{1,0}} all-gather(%p0), channel_id=4, {group}, dimensions={{0}}, use_global_device_ids=true
}}
"""
    row = collective_bytes(hlo)["all-gather"]
    assert row["operand_bytes"] == 1024 * 256 * 2 and row["moved_bytes"] == 1024 * 256 * 2 * 3


def test_collective_parser_counts_tpus_all_reduce_scatter_fusion_as_a_reduce_scatter():
    """TPU writes a reduce-scatter as an all-reduce inside an `all-reduce-scatter` fusion that keeps
    one device's shard: it moves what a reduce-scatter does, half an all-reduce."""
    hlo = """HloModule m

%all-reduce-scatter.2.clone.1 (input.28: bf16[1024,64]) -> bf16[256,64] {
  %input.28 = bf16[1024,64]{1,0} parameter(0)
  %all-reduce.168 = bf16[1024,64]{1,0} all-reduce(%input.28), channel_id=75, replica_groups={{0,1,2,3},{4,5,6,7}}
  %id = u32[] partition-id()
  ROOT %slice = bf16[256,64]{1,0} dynamic-slice(%all-reduce.168, %id, %id), dynamic_slice_sizes={256,64}
}

ENTRY %main (p0: bf16[1024,64]) -> bf16[256,64] {
  %p0 = bf16[1024,64]{1,0} parameter(0)
  ROOT %f = bf16[256,64]{1,0} fusion(%p0), kind=kCustom, calls=%all-reduce-scatter.2.clone.1
}
"""
    rows = collective_bytes(hlo)
    assert list(rows) == ["reduce-scatter"]
    assert rows["reduce-scatter"]["moved_bytes"] == 1024 * 64 * 2 * 3 / 4
