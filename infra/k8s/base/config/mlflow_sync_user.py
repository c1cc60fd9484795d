"""Job vilbert-mlflow-user: make the pipeline's MLflow account exist with the password of its Secret.

Runs in the MLflow server image. Waits for the server, then, with the basic-auth admin account, creates the
user named by PIPELINE_USERNAME (or, when it exists, sets its password), so re-running it is harmless and a
changed Secret takes effect. Environment: MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME / _PASSWORD (the admin),
PIPELINE_USERNAME / PIPELINE_PASSWORD, and optionally WAIT_SECONDS (default 600).
"""

from __future__ import annotations

import os
import sys
import time
import urllib.error
import urllib.request


def wait_for_server(uri: str, timeout_s: float) -> None:
    """Poll the unauthenticated /health endpoint until it answers 200 or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as exc:
            last = exc
        else:
            last = RuntimeError(f"status {response.status}")
        if time.monotonic() > deadline:
            raise SystemExit(f"MLflow at {uri} not healthy after {timeout_s:.0f} s: {last}")
        print(f"waiting for MLflow at {uri}: {last}", flush=True)
        time.sleep(5)


def sync_user(uri: str, username: str, password: str) -> str:
    """Create ``username`` or update its password; returns "created" or "updated"."""
    # Imported here: the module must be importable (for its tests) without MLflow's server extras.
    from mlflow.exceptions import RestException
    from mlflow.server import get_app_client

    client = get_app_client("basic-auth", tracking_uri=uri)
    try:
        client.create_user(username=username, password=password)
        return "created"
    except RestException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    client.update_user_password(username=username, password=password)
    return "updated"


def main() -> int:
    """Entry point of the Job's container."""
    uri = os.environ["MLFLOW_TRACKING_URI"]
    username, password = os.environ["PIPELINE_USERNAME"], os.environ["PIPELINE_PASSWORD"]
    if not username or not password:
        print("PIPELINE_USERNAME and PIPELINE_PASSWORD must not be empty", file=sys.stderr)
        return 2
    wait_for_server(uri, float(os.environ.get("WAIT_SECONDS", "600")))
    print(f"MLflow user {username}: {sync_user(uri, username, password)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
