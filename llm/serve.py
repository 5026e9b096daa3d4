"""An OpenAI-compatible HTTP API for a checkpoint:

    python -m llm.serve ckpt_path=CKPT [host=127.0.0.1] [port=8000] [api_key=KEY] [device=cpu] [max_batch=16]
                        [batch_wait_ms=5]

``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` (``stream: true`` as server-sent events), with
``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``n``, ``seed`` and usage counts, so the official ``openai``
client (and anything built on it) works against it. Concurrent requests are generated together: a scheduler
thread batches the waiting rows into one forward pass per step (llm/serving/scheduler.py); the HTTP side is
llm/serving/api.py. It listens on 127.0.0.1 unless ``host=`` says otherwise and prints where at start; ``port=0``
picks a free port. ``api_key=`` (or the environment variable ``LLM_SERVE_API_KEY``, which keeps the key out of
the process list) makes every request need ``Authorization: Bearer KEY``.

Why FastAPI + uvicorn rather than LitServe: LitServe batches whole requests through one ``predict()`` call,
but what we need is token-level streaming of a batch that steps together, with rows leaving it as they finish
(EOS, a stop string, a client gone). That scheduling is ours to write either way (``Generation`` already does
the stepping), so LitServe's batching would go unused, while FastAPI gives the request validation (pydantic
schemas that refuse wrong types and unknown keys) and server-sent events (``StreamingResponse``) directly.

A base model (no chat format in the checkpoint) serves ``/v1/completions``; ``/v1/chat/completions`` is then
refused with a 400 saying so, rather than inventing a chat format the model never saw.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from dataclasses import dataclass
from typing import Any

from llm.cli import parse_key_values
from llm.errors import LLMError, UserError

DEFAULTS: dict[str, Any] = {
    "ckpt_path": None,
    "host": "127.0.0.1",
    "port": 8000,
    "api_key": None,
    "device": "cpu",
    "max_batch": 16,
    "batch_wait_ms": 5.0,
    "allow_unsafe_checkpoint": False,  # true: plain pickle, which runs any code the file holds (trusted files only)
}


def _parse(argv: list[str]) -> Any:
    """key=value arguments as llm.generate takes them, typed and checked (a UserError names the bad one)."""
    args = parse_key_values(argv, DEFAULTS)
    for key, low, high in [("port", 0, 65535), ("max_batch", 1, None)]:
        value = args[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
            raise UserError(f"{key}={value!r} must be an integer {bounds}")
    try:
        args.batch_wait_ms = float(args.batch_wait_ms)
    except (TypeError, ValueError) as err:
        raise UserError(f"batch_wait_ms={args.batch_wait_ms!r} is not a number") from err
    if not 0 <= args.batch_wait_ms <= 1000:
        raise UserError(f"batch_wait_ms={args.batch_wait_ms} must be in [0, 1000]")
    args.host = str(args.host)
    # a key given as digits arrives as an int; an empty key would accept any request that sends "Bearer "
    key = args.api_key if args.api_key is not None else os.environ.get("LLM_SERVE_API_KEY")
    args.api_key = None if key is None or str(key) == "" else str(key)
    return args


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), so the address is known before serving starts."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        raise UserError(f"cannot listen on host={host} port={port}: {err.strerror or err}") from err
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


@dataclass
class Serving:
    """A running server: its address, the scheduler (counters, test hooks) and the uvicorn server."""

    url: str
    scheduler: Any  # llm.serving.scheduler.Scheduler
    server: Any  # uvicorn.Server
    thread: threading.Thread | None = None

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)
        self.scheduler.close()


def build(
    loaded: Any, sock: socket.socket, api_key: str | None = None, max_batch: int = 16, batch_wait_ms: float = 5.0
) -> Serving:
    """The scheduler (started) and an uvicorn server for ``loaded`` on ``sock``, not yet serving."""
    import uvicorn

    from llm.serving.api import create_app
    from llm.serving.scheduler import Scheduler

    ids = loaded.ids
    scheduler = Scheduler(loaded.model, loaded.tokenizer, ids["eos_ids"], loaded.pad_id, max_batch, batch_wait_ms)
    scheduler.start()
    app = create_app(loaded, scheduler, api_key)
    # access_log off and warnings only: the start-up line below says where it listens; a stream still open at
    # Ctrl-C gets 3 s to finish
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
    return Serving(url_of(sock), scheduler, uvicorn.Server(config))


def serve_in_thread(loaded: Any, host: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> Serving:
    """Start serving in a background thread (tests, notebooks); ``stop()`` ends it. Returns once it accepts."""
    sock = bind(host, port)
    serving = build(loaded, sock, **kwargs)
    serving.thread = threading.Thread(target=serving.server.run, kwargs={"sockets": [sock]}, daemon=True)
    serving.thread.start()
    while not serving.server.started and serving.thread.is_alive():  # uvicorn sets .started once it serves
        serving.thread.join(0.01)
    if not serving.server.started:
        serving.scheduler.close()
        raise RuntimeError("the server did not start (see its log above)")
    return serving


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parse(argv)
        try:
            import fastapi  # noqa: F401
            import uvicorn  # noqa: F401
        except ImportError as err:
            raise UserError(f"llm.serve needs FastAPI and uvicorn: pip install -e '.[serve]' ({err})") from err
        from llm.generate import load_model
        from llm.training import safe_load

        safe_load.allow_unsafe(args.allow_unsafe_checkpoint)
        loaded = load_model(args.ckpt_path, args.device)
        sock = bind(args.host, args.port)
    except LLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    serving = build(loaded, sock, api_key=args.api_key, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms)
    print(f"serving {loaded.name} on {serving.url} (OpenAI API at /v1)", flush=True)
    if args.api_key is None and not _loopback(args.host):
        print(f"warning: host={args.host} without api_key: anyone who reaches this port can use the model",
              file=sys.stderr, flush=True)  # fmt: skip
    try:
        serving.server.run(sockets=[sock])  # until Ctrl-C / SIGTERM (uvicorn's handlers shut it down gracefully)
    finally:
        serving.scheduler.close()
    return 0


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(socket.gethostbyname(host) if host != "::1" else host).is_loopback
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
