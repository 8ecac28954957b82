"""Benchmark helpers: profile_trace.py's device-time summary of a Perfetto trace, and the mesh
and scaling bookkeeping of train_throughput.py."""

import gzip
import importlib.util
import json
import os

import pytest


def _load(name="profile_trace"):
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_summary_counts_busy_idle_and_ops(tmp_path):
  mod = _load()
  meta = lambda pid, name: {"ph": "M", "pid": pid, "name": "process_name", "args": {"name": name}}
  x = lambda pid, ts, dur, name, op=None: {"ph": "X", "pid": pid, "tid": 1, "ts": ts, "dur": dur,
                                           "name": name, "args": {"hlo_op": op} if op else {}}
  events = [meta(1, "/device:GPU:0"), meta(2, "/host:CPU"),
            x(1, 0, 10, "sm90_xmma_gemm_bf16", "dot.1"),      # matmul
            x(1, 5, 10, "retention_fwd", "custom-call.2"),    # overlaps the first: busy 0..15
            x(1, 20, 5, "loop_fusion", "fusion.3"),           # idle 15..20
            x(1, 30, 10, "sm90_xmma_gemm_bf16", "dot.1"),     # idle 25..30
            x(2, 0, 1000, "host work")]                        # host lane: ignored
  path = tmp_path / "t.trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  s = mod.summarize(str(path))
  assert s["span_us"] == 40 and s["busy_us"] == 30 and s["kernels"] == 4
  assert s["idle_share"] == pytest.approx(0.25)
  assert s["top_ops"][0] == {"op": "sm90_xmma_gemm_bf16", "kind": "matmul", "us": 20, "count": 2,
                             "share": pytest.approx(20 / 35)}
  assert s["by_kind_us"] == {"matmul": 20, "pallas": 10, "other": 5}
  assert "idle 25%" in mod.format_summary(s)


def test_summary_without_device_events_says_so(tmp_path):
  mod = _load()
  path = tmp_path / "cpu.json"
  path.write_text(json.dumps([{"ph": "X", "pid": 1, "ts": 0, "dur": 1, "name": "a"}]))
  with pytest.raises(ValueError, match="no device events"):
    mod.summarize(str(path))


def test_train_throughput_mesh_parsing_and_scaling_efficiency():
  tt = _load("train_throughput")
  assert tt.parse_mesh("fsdp=-1") == {"data": 1, "fsdp": -1, "tensor": 1}
  assert tt.parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(SystemExit, match="expected AXIS=SIZE"):
    tt.parse_mesh("pipeline=2")
  rows = [{"config": "a", "devices": 1, "tokens_per_s_per_device": 100.0},
          {"config": "a", "devices": 2, "tokens_per_s_per_device": 95.0},
          {"config": "b", "devices": 2, "tokens_per_s_per_device": 50.0},  # no 1-device row
          {"config": "a", "error": "does not fit"}]
  tt.add_scaling(rows)
  assert [r.get("scaling_efficiency") for r in rows] == [1.0, 0.95, None, None]
