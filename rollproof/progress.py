"""The live progress view of `rollproof up`."""

from __future__ import annotations

import time

import grpc
from rich.live import Live
from rich.table import Table

from protocol.channel import open_channel
from protocol.proto import service_pb2, service_pb2_grpc
from rollproof.launcher import REFRESH_S, Launcher


def _run_status(stub, token: str) -> service_pb2.RunStatus | None:
    try:
        return stub.GetRunStatus(
            service_pb2.RunStatusRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=2
        )
    except grpc.RpcError:
        return None


def render(launcher: Launcher, status: service_pb2.RunStatus | None, started: float) -> Table:
    metrics = [m for m in launcher.metrics() if "reward_mean" in m]
    evals = launcher.eval_curve()
    nodes = launcher.node_statuses()
    table = Table(title=f"rollproof up — {launcher.run_dir}", show_header=False, min_width=70)
    table.add_row("dashboard", launcher.http_url())
    table.add_row("elapsed", f"{time.monotonic() - started:.0f}s")
    table.add_row("trainer step", str(metrics[-1]["step"]) if metrics else "waiting for rollouts")
    table.add_row("policy version", str(metrics[-1]["policy_version"]) if metrics else "-")
    table.add_row("train reward (last step)", f"{metrics[-1]['reward_mean']:.3f}" if metrics else "-")
    table.add_row(
        "held-out reward",
        " → ".join(f"{reward:.2f}" for _, _, reward in evals[-6:]) if evals else "-",
    )
    table.add_row("node tokens/s", f"{sum(n.get('tokens_per_second', 0.0) for n in nodes):.0f}")
    if status is not None:
        table.add_row("nodes online", str(status.num_nodes_online))
        table.add_row(
            "rollouts accepted / rejected", f"{status.num_rollouts_accepted} / {status.num_rollouts_rejected}"
        )
        table.add_row(
            "groups ready / consumed / stale",
            f"{status.num_groups_ready} / {status.num_groups_consumed} / {status.num_groups_stale}",
        )
    return table


class ChildExitedError(RuntimeError):
    pass


def watch(launcher: Launcher) -> None:
    """Refresh until the trainer exits (its --steps are done); a child that dies before is an error,
    but for a coordinator that exits: it is started again (Launcher.revive_coordinator)."""
    started = time.monotonic()
    channel = open_channel(launcher.address, launcher.coordinator_tls)
    stub = service_pb2_grpc.AdminServiceStub(channel)
    try:
        with Live(render(launcher, None, started), refresh_per_second=1) as live:
            while True:
                live.update(render(launcher, _run_status(stub, launcher.operator_token), started))
                trainer = launcher.child("trainer")
                if trainer.popen.poll() is not None:
                    if trainer.popen.returncode != 0:
                        raise ChildExitedError(
                            f"the trainer failed (code {trainer.popen.returncode}); see {trainer.log_path}"
                        )
                    return
                launcher.revive_coordinator()
                dead = [c for c in launcher.children if c.popen.poll() is not None]
                if dead:
                    child = dead[0]
                    raise ChildExitedError(f"{child.name} exited (code {child.popen.returncode}); see {child.log_path}")
                time.sleep(REFRESH_S)
    finally:
        channel.close()
