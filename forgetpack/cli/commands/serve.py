"""``forgetpack serve``: the HTTP service (runtime.serve) under uvicorn, or as a Ray Serve deployment."""

from __future__ import annotations

from pathlib import Path

import click

from forgetpack.cli.render import echo, escape, print_json
from forgetpack.format.errors import ForgetpackError


@click.command()
@click.argument("source", metavar="DIR_OR_MODEL")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless told otherwise).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--patches", "patches_dir", type=click.Path(file_okay=False, path_type=Path),
              help="The patch registry folder (created if missing); without it uploads live in memory only.")
@click.option("--default-patch", "default_patches", multiple=True,
              help="A patch applied when a request names none: a registry id or a patch file (repeatable, in order).")
@click.option("--trusted-key", "keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Accept only patches signed by one of these public keys (repeatable).")
@click.option("--admin-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the bearer token for the write routes; without it they are disabled.")
@click.option("--max-batch", type=click.IntRange(1, 1024), default=32, show_default=True, help="Images per micro-batch.")
@click.option("--max-wait-ms", type=click.FloatRange(0, 1000), default=5.0, show_default=True,
              help="How long an image waits for others to batch with.")
@click.option("--max-queue", type=click.IntRange(1), default=512, show_default=True,
              help="Images queued before new requests get 503 with Retry-After.")
@click.option("--threads", type=int, default=None, help="onnxruntime intra-op threads.")
@click.option("--provider", "providers", multiple=True, help="Execution provider, e.g. cpu or cuda (repeatable).")
@click.option("--ray", "replicas", type=click.IntRange(1), default=None,
              help="Run as a Ray Serve deployment with this many replicas (needs forgetpack[ray]).")
@click.option("--check", is_flag=True, help="Load the model and registry (writing nothing), print what would be served, and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --check: machine-readable output.")
def serve(source: str, host: str, port: int, patches_dir: Path | None, default_patches: tuple[str, ...], keys: tuple[Path, ...],
          admin_token_file: Path | None, max_batch: int, max_wait_ms: float, max_queue: int, threads: int | None,
          providers: tuple[str, ...], replicas: int | None, check: bool, as_json: bool) -> None:
    """Serve an export directory over HTTP: each request picks its patches (see docs/serve.md)."""
    from runtime.serve.config import ServeConfig, read_admin_token

    if not Path(source).is_dir():
        raise ForgetpackError(f"{source}: not an export directory; the service runs on the torch-free runtime, "
                              f"so export first: forgetpack export {source} -o DIR")
    config = ServeConfig(
        source=source, patches_dir=str(patches_dir) if patches_dir else None, default_patches=default_patches,
        trusted_keys=tuple(str(k) for k in keys) or None,
        admin_token=read_admin_token(admin_token_file) if admin_token_file else None,
        max_batch=max_batch, max_wait_ms=max_wait_ms, max_queue=max_queue, threads=threads, providers=providers or None)
    if replicas is not None:
        from runtime.serve.ray_app import run_ray

        if check:
            raise ForgetpackError("--check and --ray do not go together")
        echo(f"serving {escape(source)} with Ray Serve, {replicas} replica(s), on http://{escape(host)}:{port}/", err=True)
        stopped_by = run_ray(config, replicas=replicas, host=host, port=port, block=True)
        echo(f"{stopped_by}: stopped taking requests, finished the accepted ones, shut Ray Serve down", err=True)
        return

    from runtime.serve.app import create_app
    from runtime.serve.service import Service

    service = Service(config, read_only=check)  # --check reads the registry, never creates or writes it
    if check:
        info = service.info()
        service.close()
        if as_json:
            print_json(info)
        else:
            echo(f"{escape(info['model'])} via {info['backend']}: default patch state {info['default']['digest']} "
                 f"({len(info['default']['patches'])} patch(es)), {len(service.registry.entries())} registered")
        return
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        echo(f"warning: binding {escape(host)}: the service is reachable from other machines", err=True)
    echo(f"serving {escape(source)} on http://{escape(host)}:{port}/ (Ctrl-C stops it after the accepted requests)", err=True)
    uvicorn.run(create_app(config, service), host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
