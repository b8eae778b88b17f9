"""The stage runner: manifest records, resume at the first unfinished stage, failures kept."""
import json

import pytest

from cutler.pipeline.stages import Manifest, Stage, describe_plan, run_stages


def _stages(tmp_path, calls, fail_at=None):
    def make(name, out):
        def run():
            calls.append(name)
            if name == fail_at:
                raise RuntimeError(f"boom in {name}")
            (tmp_path / out).write_text(name)
            return {"n": len(calls)}
        return run

    a = Stage("a", make("a", "a.txt"), outputs={"out": str(tmp_path / "a.txt")}, description="first")
    b = Stage("b", make("b", "b.txt"), inputs={"a": str(tmp_path / "a.txt")}, outputs={"out": str(tmp_path / "b.txt")})
    c = Stage("c", make("c", "c.txt"), inputs={"b": str(tmp_path / "b.txt")}, outputs={"out": str(tmp_path / "c.txt")})
    return [a, b, c]


def test_resume_after_failure_starts_at_first_unfinished(tmp_path):
    calls = []
    with pytest.raises(RuntimeError, match="boom in b"):
        run_stages(_stages(tmp_path, calls, fail_at="b"), tmp_path)
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["stages"]["a"]["status"] == "done" and m["stages"]["b"]["status"] == "failed"
    assert "boom in b" in m["stages"]["b"]["error"] and "c" not in m["stages"]
    calls.clear()
    data = run_stages(_stages(tmp_path, calls), tmp_path)
    assert calls == ["b", "c"]
    assert all(data["stages"][s]["status"] == "done" for s in "abc")
    assert data["stages"]["b"]["attempts"] == 2 and data["stages"]["c"]["seconds"] >= 0


def test_deleted_output_reruns_that_stage_and_the_ones_after_it(tmp_path):
    calls = []
    run_stages(_stages(tmp_path, calls), tmp_path)
    (tmp_path / "b.txt").unlink()
    plan = describe_plan(_stages(tmp_path, []), Manifest(tmp_path))
    assert "skip" in plan[0] and "run" in plan[1] and "run" in plan[2]
    calls.clear()
    run_stages(_stages(tmp_path, calls), tmp_path)
    assert calls == ["b", "c"]


def test_stage_left_running_by_a_killed_process_is_redone(tmp_path):
    calls = []
    run_stages(_stages(tmp_path, calls), tmp_path)
    m = Manifest(tmp_path)
    m.stage("c")["status"] = "running"
    m.save()
    calls.clear()
    run_stages(_stages(tmp_path, calls), tmp_path)
    assert calls == ["c"] and Manifest(tmp_path).data["stages"]["c"]["attempts"] == 2


def test_only_and_force_and_missing_inputs(tmp_path):
    calls = []
    with pytest.raises(FileNotFoundError, match="stage 'b' needs inputs"):
        run_stages(_stages(tmp_path, calls), tmp_path, only=["b"])
    run_stages(_stages(tmp_path, calls), tmp_path)
    calls.clear()
    run_stages(_stages(tmp_path, calls), tmp_path, force=["b"])
    assert calls == ["b", "c"]
    calls.clear()
    run_stages(_stages(tmp_path, calls), tmp_path, only=["a"], force=["a"])
    assert calls == ["a"]
    with pytest.raises(KeyError, match="unknown stage"):
        run_stages(_stages(tmp_path, calls), tmp_path, only=["zz"])


def test_stage_without_its_outputs_fails(tmp_path):
    st = Stage("x", lambda: None, outputs={"o": str(tmp_path / "never")})
    with pytest.raises(RuntimeError, match="without writing"):
        run_stages([st], tmp_path)
    assert Manifest(tmp_path).data["stages"]["x"]["status"] == "failed"
