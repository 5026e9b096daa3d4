"""What the human-evaluation tests share: a hand-written study and a real uvicorn server over it, in a thread."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from llm.human_eval.study import Study, write_study

ITEMS = [
    {"id": "item-1", "prompt": "Which novel has Mr. Darcy?", "a": "Pride and Prejudice.", "b": "Emma, I think."},
    {"id": "item-2", "prompt": "Who is Emma?", "a": "Emma Woodhouse, of Highbury.", "b": "A heroine."},
    {
        "id": "item-3",
        "prompt": "Name a town <b>in</b> Austen.",
        "a": "<script>window.pwned=1</script>",
        "b": 'Bath <img src=x onerror="window.pwned=1">',
    },
    {"id": "item-4", "prompt": "Describe Bath.\nIn two lines.", "a": "A spa town.\nWith a Pump Room.", "b": "Wet."},
]


def make_study(root: Path, items: list[dict] = ITEMS) -> Study:
    """A study with fixed items and secret (no model needed)."""
    meta = {"a": {"kind": "checkpoint", "path": "/ckpt/a.ckpt"}, "b": {"kind": "checkpoint", "path": "/ckpt/b.ckpt"}}
    return write_study(root, {**meta, "secret": "00" * 16}, items)


@contextmanager
def running(study_dir: Path) -> Iterator[str]:
    """The rating server on a free port of 127.0.0.1, in a thread; yields its base URL.

    The socket listens before the thread starts, so a client may connect at once (its connection waits in the
    backlog until uvicorn accepts it): no polling for readiness.
    """
    import uvicorn

    from llm.human_eval.server import create_app, listen

    app = create_app(study_dir)
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        app.state.store.close()
        sock.close()


@pytest.fixture
def study(tmp_path) -> Study:
    return make_study(tmp_path / "study")


@pytest.fixture
def server(study) -> Iterator[str]:
    with running(study.root) as url:
        yield url
