"""Starting or joining Ray for LR search, so that nothing leaves the machine unless asked.

Ray is an optional dependency (``pip install "ray[tune]>=2.60"``, what the ``search`` extra adds),
imported only through :func:`import_ray`. Before Ray is imported, :func:`init` switches off Ray's usage statistics
(``RAY_USAGE_STATS_ENABLED=0``: Ray would otherwise report to its maintainers). A local start
(no ``address``) also sets ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray then takes the loopback
address as the node's IP, and its services (GCS, raylet, workers, agents) listen on 127.0.0.1
only, where on Linux they would listen on every interface. The dashboard is off unless asked for,
and bound to 127.0.0.1 when on. Joining a cluster (``address=``) leaves the node IP to Ray, since
the nodes must reach each other.
"""

from __future__ import annotations

import os
import secrets
import sys
import warnings

__all__ = ["ensure_token", "import_ray", "init", "session_dir_in"]

_LOCAL_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Where Ray looks for its authentication mode and token.
_AUTH_MODE = "RAY_AUTH_MODE"
_TOKEN_SETTINGS = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_TOKEN_FILE = os.path.expanduser("~/.ray/auth_token")


def import_ray():
    """Import Ray with Tune, or raise an ImportError that says how to install it."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    try:
        import ray
        import ray.tune  # noqa: F401  (ray without the [tune] extra lacks its dependencies)
    except ImportError as error:
        raise ImportError(f'LR search needs Ray Tune, which is not installed ({error}): pip install "ray[tune]>=2.60"'
                          ) from error
    return ray


def init(address: str | None = None, num_cpus: int | None = None, num_gpus: int | None = None,
         include_dashboard: bool = False, session_dir: str | None = None, **kwargs) -> bool:
    """Start a local Ray on this machine, or join the cluster at ``address`` (``"auto"``: the one
    this machine belongs to); do nothing when Ray is already initialised in this process.

    Args:
        address: ``None`` for a local Ray; else a cluster address as ``ray.init`` takes it.
        num_cpus, num_gpus: resources of a local Ray (default: what the machine has).
        include_dashboard: start Ray's dashboard (on 127.0.0.1).
        session_dir: where a local Ray keeps its session folders (logs, sockets, spilled objects);
            default: Ray's (``RAY_TMPDIR``, else ``/tmp/ray``), which outlive the session.
        kwargs: further ``ray.init`` arguments.

    Returns:
        Whether this call started or joined Ray (then the caller shuts it down afterwards).
    """
    if address is None:
        if "ray" in sys.modules and os.environ.get(_LOCAL_ONLY) != "0":
            warnings.warn("lrfuse: Ray was imported before lrfuse started it, so its services may listen on every "
                          f"interface; set {_LOCAL_ONLY}=0 before importing ray (or let lrfuse import it) to keep "
                          "them on 127.0.0.1", stacklevel=3)
        os.environ.setdefault(_LOCAL_ONLY, "0")
    # Tune warns whenever checkpoints come faster than every 5 s, which a small model's do.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    ray = import_ray()
    if ray.is_initialized():
        return False
    if address is None:
        ensure_token()
    kwargs.setdefault("log_to_driver", False)  # trials report through Tune; their logs stay in the session dir
    kwargs.setdefault("configure_logging", False)
    if address is None:
        if session_dir is not None:
            kwargs.setdefault("_temp_dir", session_dir)
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=include_dashboard,
                 dashboard_host="127.0.0.1", **kwargs)
    else:
        ray.init(address=address, **kwargs)
    return True


def ensure_token() -> None:
    """Give a local Ray an authentication token through the environment, unless authentication is
    off (``RAY_AUTH_MODE`` other than ``token``) or the user has a token (``RAY_AUTH_TOKEN``,
    ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``). Ray (2.60) turns token authentication on for a
    local start (setting ``RAY_AUTH_MODE=token`` in the process, which its children inherit) and,
    finding no token, writes one to ``~/.ray/auth_token``, a file that would outlive the search.
    The token stays for the process: Ray keeps the first one it reads, so every later start must
    use it too."""
    if os.environ.get(_AUTH_MODE, "token").lower() != "token":
        return
    if not any(k in os.environ for k in _TOKEN_SETTINGS) and not os.path.exists(_TOKEN_FILE):
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


def session_dir_in(folder: str) -> str | None:
    """The ``session_dir`` for :func:`init` that keeps a local Ray's session folders in ``folder``
    (so they go when its owner removes it): ``folder/ray``; ``None`` (Ray's default) when
    ``RAY_TMPDIR`` says where they go, or when the path is too long for Ray's sockets
    (``.../session_<date>_<pid>/sockets/<name>`` must fit in 107 bytes)."""
    folder = os.path.join(folder, "ray")
    longest = len(folder) + len("/session_2026-12-02_13-28-42_276898_1234567/sockets/plasma_store")
    return None if "RAY_TMPDIR" in os.environ or longest > 107 else folder
