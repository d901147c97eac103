"""The same app as a Ray Serve deployment with N replicas (``forgetpack serve DIR --ray N``).

Each replica builds its own ``Service`` (model, patch-state LRU, batcher) from the same
``ServeConfig``; replicas hold nothing but caches, and read patches, names and the default set
from the registry folder (``--patches``, which must be a folder every replica can see: on one
machine any folder, across machines a shared mount). A request with the same patch set is
therefore answered identically by every replica. Besides HTTP (through Ray's proxy), a
``DeploymentHandle`` can call ``classify``/``embed_text`` directly; their answers name the replica.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from runtime.serve.config import ServeConfig


def build(config: ServeConfig, replicas: int = 2, num_cpus: float = 1.0) -> Any:
    """A bound Ray Serve application (``serve.run(build(config))``); ray is imported only here."""
    from ray import serve

    @serve.deployment(name="forgetpack", num_replicas=replicas, ray_actor_options={"num_cpus": num_cpus},
                      max_ongoing_requests=64, graceful_shutdown_timeout_s=30)
    @serve.ingress()
    class ForgetpackReplica:
        def __init__(self, config: ServeConfig):
            from runtime.serve.service import Service

            self.service = Service(config)
            self.replica = serve.get_replica_context().replica_id.unique_id

        def __serve_build_asgi_app__(self) -> Any:
            from runtime.serve.app import create_app

            app = create_app(self.service.config, self.service)
            name = self.replica.encode()

            async def named(scope: dict[str, Any], receive: Any, send: Any) -> None:
                async def send_named(message: dict[str, Any]) -> None:
                    if message["type"] == "http.response.start":
                        message = {**message, "headers": [*message.get("headers", []), (b"x-forgetpack-replica", name)]}
                    await send(message)

                await app(scope, receive, send_named if scope["type"] == "http" else send)

            return named

        async def classify(self, images: list[bytes], labels: list[str], templates: list[str] | None = None,
                           patches: list[str] | None = None, top_k: int = 5) -> dict[str, Any]:
            return {**await self.service.classify(images, labels, templates, patches, top_k), "replica": self.replica}

        async def embed_text(self, texts: list[str], patches: list[str] | None = None) -> dict[str, Any]:
            return {**await self.service.embed_texts(texts, patches), "replica": self.replica}

    return ForgetpackReplica.bind(config)


APP = "forgetpack"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def run_ray(config: ServeConfig, replicas: int, host: str = "127.0.0.1", port: int = 8000, block: bool = True,
            num_cpus: float = 1.0) -> Any:
    """Start (or join) Ray, start Serve's HTTP proxy on ``host:port`` and run the deployment.

    ``block=False`` returns the deployment handle. ``block=True`` (from the main thread) serves until
    SIGTERM or SIGINT, then drains (:func:`drain`) and returns the signal's name; a second signal
    while draining stops at once (KeyboardInterrupt)."""
    import ray
    from ray import serve

    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False)
    if not block:
        serve.start(http_options={"host": host, "port": port})
        return serve.run(build(config, replicas, num_cpus), name=APP, route_prefix="/")
    received: list[str] = []
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)
        stop.set()

    # after ray.init: its driver replaces SIGTERM's handler with one that dumps a stack and dies
    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(config, replicas, num_cpus), name=APP, route_prefix="/")
        while not stop.wait(0.5):
            pass
        drain(shutdown_ray=started)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    return received[0]


def drain(shutdown_ray: bool = True) -> None:
    """Stop the deployment the way a rolling update does: the app is deleted first, so the proxy stops
    routing new requests to it while each replica finishes the ones it accepted (up to the deployment's
    ``graceful_shutdown_timeout_s``) and answers them through the proxy, still up; then Serve (proxy,
    controller) is shut down, and Ray too when ``shutdown_ray`` (this process started it)."""
    import ray
    from ray import serve

    serve.delete(APP)
    serve.shutdown()
    if shutdown_ray:
        ray.shutdown()
