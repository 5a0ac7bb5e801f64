"""Starting or joining a Ray cluster.

With no address (and no RAY_ADDRESS), rayq starts a local Ray instance bound to 127.0.0.1 with no
dashboard, so a laptop run opens no port beyond the loopback interface.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Initialise Ray unless it already is; return True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        logger.info("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        return True
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    logger.info("starting a local Ray instance on 127.0.0.1")
    # address="local" starts a new instance even where another local cluster is running.
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             _node_ip_address="127.0.0.1",
             logging_level=logging.WARNING, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    return True


def node_resources() -> list[dict[str, float]]:
    import ray

    return [dict(node.get("Resources", {})) for node in ray.nodes() if node.get("Alive")]


def shutdown(delete_spilled: bool) -> list[str]:
    """Shut Ray down; with `delete_spilled`, delete the local instance's spilled objects.

    Ray spills objects that do not fit the object store into `ray_spilled_objects*` folders of
    the session directory, which outlive the instance when a worker dies before deleting them.
    Returns the folders removed. Pass `delete_spilled` only for a local instance that this
    process started, never for a cluster it joined.
    """
    import glob
    import shutil

    import ray

    session = None
    if delete_spilled and ray.is_initialized():
        # NOTE: a private attribute of Ray 2.60; without it only the spill cleanup is skipped.
        node = getattr(ray._private.worker, "_global_node", None)
        session = node.get_session_dir_path() if node is not None else None
    ray.shutdown()
    removed = []
    for path in glob.glob(os.path.join(session, "ray_spilled_objects*")) if session else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
