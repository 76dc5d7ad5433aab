"""Several processes training one run (GPUs, nodes): one that is lost ends the others in one line.

Under torchrun / accelerate (WORLD_SIZE > 1), a process whose peer died (a node lost, a process killed)
gets a transport error from the collective it waits in (gloo: "Connection reset by peer", NCCL: a
watchdog error), or SIGTERM from its launcher when the launcher lost the rendezvous. Either becomes one
TrainingError line saying which process, at which step, and that rerunning the same command on every node
resumes from the last complete checkpoint (named). A lone process is left as it is.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from lib.run.errors import TrainingError, first_line
from lib.train.checkpoints import checkpoint_step, last_checkpoint

# What the collective backends say when a peer is gone (gloo, NCCL, the c10d store).
LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Connection refused", "Broken pipe",
             "Socket Timeout", "NCCL communicator was aborted", "ProcessGroupGloo", "ProcessGroupNCCL",
             "Failed to recv", "Timed out waiting")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def lost_peer(e: BaseException) -> bool:
    """Whether `e` is a distributed transport failure (a peer process or node gone), not a bug."""
    try:
        from torch.distributed import DistError
    except ImportError:  # a torch without distributed support
        DistError = ()  # noqa: N806
    text = str(e)
    return isinstance(e, DistError) or (isinstance(e, RuntimeError) and any(m in text for m in LOST_PEER))


def stopped_line(checkpoints, why: str, step: int | None) -> str:
    """The one line: who stopped, where, and how to go on."""
    ck = last_checkpoint(checkpoints)
    where = f" at step {step}" if step is not None else ""
    resume = (f"training resumes from {ck.name} (step {checkpoint_step(ck)})" if ck is not None
              else "no checkpoint had been saved yet: training starts over")
    rank = os.environ.get("RANK", "0")
    return (f"training: process {rank} of {world_size()} stopped{where}: {why}. Another node or process of this "
            f"run was lost; run the same command again on every node: {resume}")


class _Stopped(BaseException):
    """SIGTERM from the launcher, raised in the training loop (a BaseException: nothing on the way catches it)."""


@contextlib.contextmanager
def peers_lost_in_one_line(checkpoints, step=lambda: None):
    """Around trainer.train: a lost peer (or the launcher's SIGTERM) ends this process with one TrainingError
    line naming the checkpoint training resumes from. `step()`: the current global step, for the message."""
    if world_size() <= 1:
        yield
        return
    old = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise _Stopped()

        old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except _Stopped:
        raise TrainingError(stopped_line(checkpoints, "its launcher stopped it (SIGTERM)", step())) from None
    except Exception as e:
        if not lost_peer(e):
            raise
        raise TrainingError(stopped_line(checkpoints, first_line(e).split("] ")[-1].split(". ")[0][:120], step())) from None
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
