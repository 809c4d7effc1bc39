"""Container health for Docker's HEALTHCHECK and compose: exit 0 when healthy, 1 (with the reason) when not.

  aevae-healthcheck 127.0.0.1:50052                   grpc.health.v1 Check, SERVING expected
  aevae-healthcheck http://127.0.0.1:8080/api/status  HTTP GET, 200 expected

The gRPC check is plaintext and sends no token (health needs none). A service that serves TLS (--tls-cert)
cannot be asked that way on its own port: start it with `--health-port N` (grpc.health.v1 alone, plaintext)
and set AEVAE_HEALTH_PORT=N in the container's environment; the check then asks that port on the same host
instead of the one it was given, so the image's HEALTHCHECK line stays as it is. HTTP targets ignore it.

Kubernetes needs none of this: its native `grpc:` probe speaks grpc.health.v1 (see deploy/k8s/).
"""

from __future__ import annotations

import http.client
import os
import sys
import urllib.request

USAGE = "usage: aevae-healthcheck HOST:PORT | http://HOST:PORT/PATH [TIMEOUT_SECONDS]"
HEALTH_PORT = "AEVAE_HEALTH_PORT"  # the service's plaintext --health-port, when its own port serves TLS


def grpc_target(target: str, env: dict[str, str]) -> str:
    """`target`, or its host with the port AEVAE_HEALTH_PORT names when that is set; ValueError if it is not a
    port number."""
    port = env.get(HEALTH_PORT, "").strip()
    if not port:
        return target
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{HEALTH_PORT}={port!r} is not a port number")
    return f"{target.rpartition(':')[0] or '127.0.0.1'}:{port}"


def grpc_health(target: str, timeout: float) -> str | None:
    """None when the server says SERVING, else what it said or why it could not be asked."""
    import grpc

    from aevae.client.health import check

    with grpc.insecure_channel(target) as channel:
        try:
            status = check(channel, timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    return None if status == "SERVING" else status


def http_health(url: str, timeout: float) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except OSError as exc:  # URLError, HTTPError, timeouts
        return str(exc)
    except http.client.HTTPException as exc:  # a port that answers something else (gRPC): was a traceback
        return f"{url}: not an HTTP answer ({type(exc).__name__})"


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(USAGE, file=sys.stderr)
        return 1  # Docker reserves 2
    target = argv[0]
    try:
        timeout = float(argv[1]) if len(argv) == 2 else 2.0
    except ValueError:
        timeout = float("nan")
    if not 0 < timeout < 3600:  # nan too
        print(f"unhealthy: the timeout must be seconds, more than 0, got {argv[1]!r}\n{USAGE}", file=sys.stderr)
        return 1
    if target.startswith(("http://", "https://")):
        problem = http_health(target, timeout)
    else:
        try:
            target = grpc_target(target, dict(os.environ))
        except ValueError as exc:
            print(f"unhealthy: {exc}", file=sys.stderr)
            return 1
        problem = grpc_health(target, timeout)
    if problem is not None:
        print(f"unhealthy: {target}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
