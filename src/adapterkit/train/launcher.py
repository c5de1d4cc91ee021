"""Local multi-process launches through torch's elastic launcher (what ``torchrun --standalone`` runs).

The launcher installs its own handlers for SIGTERM, SIGINT, SIGHUP and SIGQUIT in the launching
process (they raise its ``SignalException``); :func:`launch` puts the caller's handlers back when
it returns, and turns Ctrl-C into ``KeyboardInterrupt`` like any other interrupted call.
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from typing import Any, Callable, Sequence

from ..errors import AdapterError, ConfigError

#: the signals the elastic launcher handles (its default for TORCHELASTIC_SIGNALS_TO_HANDLE)
ELASTIC_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT"


class RankFailedError(AdapterError):
    """A process started by :func:`launch` died (an uncaught error, a signal)."""


def _handlers() -> dict[signal.Signals, Any]:
    """The current handlers of the signals the launcher will take over (main thread only: elsewhere
    it installs none)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    names = os.environ.get("TORCHELASTIC_SIGNALS_TO_HANDLE", ELASTIC_SIGNALS).split(",")
    found = [getattr(signal, name.strip(), None) for name in names]
    return {sig: signal.getsignal(sig) for sig in found if isinstance(sig, signal.Signals)}


def _restore(handlers: dict[signal.Signals, Any]) -> None:
    for sig, handler in handlers.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def launch(fn: Callable[..., Any], nproc: int, args: Sequence[Any] = ()) -> dict[int, Any]:
    """Run ``fn(*args)`` in ``nproc`` local processes through ``torch.distributed.run``'s Python API
    (elastic_launch, the engine behind ``torchrun --standalone``): each gets RANK, WORLD_SIZE and
    a free MASTER_PORT in its environment. ``fn`` must be importable (a module-level function).
    Returns each rank's return value, by rank; a rank that died raises :class:`RankFailedError`.

    The launch itself has no time limit: ``fn`` bounds its waits with the timeout it gives
    ``torch.distributed.init_process_group``. The caller's signal handlers are restored on
    return; Ctrl-C (SIGINT) stops the processes and raises ``KeyboardInterrupt``, another handled
    signal stops them and is then delivered to the caller's own handler."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ConfigError(f"nproc must be an integer >= 1, got {nproc!r}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, start_method="spawn")
    saved = _handlers()
    try:
        return elastic_launch(config, fn)(*args)
    except ChildFailedError as error:
        failed = ", ".join(f"rank {rank} (exit status {f.exitcode})" for rank, f in sorted(error.failures.items()))
        raise RankFailedError(f"{failed} failed; its error is printed above") from None
    except SignalException as error:  # the processes are stopped by now
        received = error.sigval
    finally:
        _restore(saved)
    if received != signal.SIGINT:
        signal.raise_signal(received)  # the caller's own handling (by default the process ends)
    raise KeyboardInterrupt(f"the launch got {received.name}")
