"""The bank's row table alone (regrad_jax/bank/rows.py): no TensorStore, no model."""
import numpy as np
import pytest

from regrad_jax.bank import rows

SETTINGS = {"codec": {"name": "fp32"}, "identity": {}, "fingerprint": "f",
            "lora_config": {}, "leaf_shapes": {}, "rows_per_chunk": 1}


def table(**kw) -> rows.RowTable:
  return rows.RowTable(rows.new_manifest(SETTINGS), **kw)


def reserve(t: rows.RowTable, docs, force=False) -> rows.Plan:
  """plan + append, as the chief does (docs: (id, text sha) pairs)."""
  plan = t.plan(docs, force)
  t.append(plan.ids, plan.shas)
  return plan


def marker(complete=(), refused=None, truncated=(), checksums=None) -> dict:
  """A commit marker as store.write_marker writes it (JSON keys are strings)."""
  return {"complete": list(complete),
          "refused": {str(r): why for r, why in (refused or {}).items()},
          "truncated": list(truncated),
          "checksums": {str(r): c for r, c in (checksums or {}).items()}}


def reload(t: rows.RowTable, *markers) -> rows.RowTable:
  """The table a reader gets: the manifest as written plus markers."""
  return rows.RowTable(t.to_manifest(), markers, pinned=t.pinned)


@pytest.mark.parametrize("flags", [[], [0], [1], [1, 1, 0, 1], [0, 1, 1, 0, 0, 1, 1]])
def test_ranges_round_trip(flags):
  flags = np.array(flags, bool)
  ranges = rows.to_ranges(flags)
  assert all(a < b for a, b in ranges)
  np.testing.assert_array_equal(rows.from_ranges(ranges, len(flags)), flags)
  assert rows.to_ranges(np.array([1, 1, 0, 1, 1, 1], bool)) == [[0, 2], [3, 6]]


def test_new_manifest_keeps_settings_first_and_hashes_itself():
  m = rows.new_manifest(SETTINGS)
  assert list(m)[:len(SETTINGS) + 1] == ["format_version", *SETTINGS]
  assert m["sha256"] == rows.manifest_sha(m) and m["ids"] == []
  t = rows.RowTable(m)
  assert t.num_rows == 0 and t.live == {} and t.latest == {}


def test_reserve_complete_and_refuse():
  t = table()
  plan = reserve(t, [("a", "sa"), ("b", "sb"), ("c", "sc")])
  assert (plan.ids, plan.appended, plan.replaced, plan.skipped) == (["a", "b", "c"], 3, 0, 0)
  assert t.num_rows == 3 and t.latest == {"a": 0, "b": 1, "c": 2} and t.live == {}
  pairs = [("a", "A"), ("b", "B"), ("c", "C")]
  assert t.pending(pairs) == [(0, "A"), (1, "B"), (2, "C")]

  t = reload(t, marker([0, 2], truncated=[2], checksums={0: "x", 2: "z"}),
             marker(refused={1: "non-finite"}))
  assert t.live == {"a": 0, "c": 2} and t.latest == {"a": 0, "b": 1, "c": 2}
  assert t.pending(pairs) == [] and t.refused_ids() == {"b": "non-finite"}
  assert t.committed(["a", "b", "c"]) == {"a": (0, "x"), "c": (2, "z")}
  assert t.truncated == {2} and t.expected_checksum(0) == "x"
  # The same texts again: complete and refused rows are skipped, not recomputed.
  assert reserve(t, [("a", "sa"), ("b", "sb")]).skipped == 2 and t.num_rows == 3
  # The fold writes marker rows into the manifest: a reader without markers agrees.
  m = t.to_manifest()
  assert m["complete"] == [[0, 1], [2, 3]] and m["refused"] == {"1": "non-finite"}
  assert m["truncated"] == [2] and m["checksums"] == {"0": "x", "2": "z"}
  assert rows.RowTable(m).live == t.live


def test_interrupted_reservation_is_resumed_not_reserved_again():
  t = table()
  reserve(t, [("a", "sa"), ("b", "sb")])
  t = reload(t, marker([0]))
  plan = reserve(t, [("a", "sa"), ("b", "sb")])
  assert plan.ids == [] and plan.skipped == 1 and t.num_rows == 2
  assert t.pending([("a", "A"), ("b", "B")]) == [(1, "B")]


def test_markers_of_a_newer_manifest_are_ignored():
  t = table()
  reserve(t, [("a", "sa")])
  t = reload(t, marker([0, 5], refused={7: "x"}, truncated=[6], checksums={5: "c"}))
  assert t.complete.tolist() == [True] and t.refused == {} and t.truncated == set()
  assert t.checksums == {}


def test_replace_is_copy_on_write():
  t = table()
  reserve(t, [("a", "s1"), ("b", "sb")])
  t = reload(t, marker([0, 1]))
  # A changed text (build) or force (replace): a new row; readers keep the old one.
  plan = reserve(t, [("a", "s2"), ("b", "sb")], force=True)
  assert (plan.ids, plan.replaced, plan.appended) == (["a", "b"], 2, 0)
  assert t.latest == {"a": 2, "b": 3} and t.live == {"a": 0, "b": 1}
  assert t.by_id == {"a": [0, 2], "b": [1, 3]}
  t = reload(t, marker([2]))  # Only a's new row completed so far.
  assert t.live == {"a": 2, "b": 1}
  t.fold()
  assert t.deleted == {0}  # b's old row is still the live one.
  t = reload(t, marker([3]))
  t.fold()
  assert t.deleted == {0, 1} and t.live == {"a": 2, "b": 3}
  t = rows.RowTable(t.to_manifest())
  assert t.live == {"a": 2, "b": 3} and t.latest == {"a": 2, "b": 3}
  assert t.text_sha(2) == "s2" and t.row_id(3) == "b"


def test_delete_tombstones_every_row_and_the_id_can_come_back():
  t = table()
  reserve(t, [("a", "s1"), ("b", "sb")])
  t = reload(t, marker([0, 1]))
  reserve(t, [("a", "s2")])  # Pending replacement: delete takes both rows.
  t.delete(["a", "a"])
  assert t.deleted == {0, 2} and "a" not in t.latest and t.live == {"b": 1}
  with pytest.raises(KeyError, match="not in the bank.*never"):
    t.delete(["never"])
  t = rows.RowTable(t.to_manifest())
  assert t.live == {"b": 1} and t.refused_ids() == {}
  plan = reserve(t, [("a", "s1")])
  assert plan.appended == 1 and t.latest["a"] == 3 and t.by_id["a"] == [0, 2, 3]


def test_pin_serves_other_rows_until_unpinned():
  t = table()
  reserve(t, [("a", "s1"), ("b", "sb")])
  t = reload(t, marker([0, 1], checksums={0: "x0", 1: "x1"}))
  reserve(t, [("a", "s2")])
  t = reload(t, marker([2], checksums={2: "x2"}))
  assert t.live == {"a": 2, "b": 1}
  t.pin({"a": 0}, {0: "p0"})
  assert t.live == {"a": 0} and t.expected_checksum(0) == "p0"
  assert t.expected_checksum(2) == "x2"  # Rows the pin does not name: recorded sums.
  assert t.committed(["a", "b"]) == {"a": (2, "x2"), "b": (1, "x1")}  # Own view.
  assert reload(t).live == {"a": 0}  # A refresh keeps the pin.
  with pytest.raises(rows.BankDamagedError, match="lacks the committed rows of.*'c'"):
    t.pin({"c": 9}, {})
  t.unpin()
  assert t.live == {"a": 2, "b": 1} and t.expected_checksum(0) == "x0"


def test_altered_manifest_and_unknown_format_are_refused():
  t = table()
  reserve(t, [("a", "sa"), ("b", "sb")])
  m = t.to_manifest()
  m["ids"] = ["b", "a"]  # Valid JSON, wrong content.
  with pytest.raises(rows.BankDamagedError, match=r"here/manifest.json was altered"):
    rows.RowTable(m, bank="here")
  with pytest.raises(ValueError, match="bank format 3 is not supported"):
    rows.RowTable({**m, "format_version": 3})
  # Format 1 had no hash and no checksums: read, and upgraded by the next write.
  old = {k: v for k, v in m.items() if k not in ("sha256", "checksums")}
  old["format_version"] = 1
  t = rows.RowTable(old)
  assert t.latest == {"b": 0, "a": 1} and t.expected_checksum(0) is None
  upgraded = t.to_manifest()
  assert upgraded["format_version"] == rows.FORMAT_VERSION
  assert upgraded["sha256"] == rows.manifest_sha(upgraded)
