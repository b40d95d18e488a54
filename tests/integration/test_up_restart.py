"""`rollproof up` starts a coordinator that exits again (its trainer and nodes ride out the gap
under their retry policy), a bounded number of times (issue 17)."""

from pathlib import Path

from rollproof.launcher import MAX_COORDINATOR_RESTARTS, Launcher, UpOptions


def test_an_exited_coordinator_is_started_again_with_its_arguments(tmp_path):
    launcher = Launcher(
        UpOptions(model=Path("unused"), task="addition", num_nodes=1, num_steps=1, run_dir=tmp_path / "run")
    )
    first = launcher._spawn("coordinator", ["version"], {"ROLLPROOF_TEST_MARK": "1"})
    first.popen.wait(timeout=120)
    try:
        assert launcher.revive_coordinator()
        revived = launcher.child("coordinator")
        assert revived is not first and revived.popen.pid != first.popen.pid
        assert (revived.args, revived.env) == (["version"], {"ROLLPROOF_TEST_MARK": "1"})
        assert [c.name for c in launcher.children] == ["coordinator"]
        revived.popen.wait(timeout=120)
        assert "rollproof" in revived.log_path.read_text()

        launcher.num_coordinator_restarts = MAX_COORDINATOR_RESTARTS
        assert not launcher.revive_coordinator()
        assert launcher.child("coordinator") is revived
    finally:
        launcher.stop()
