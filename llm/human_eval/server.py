"""The rating server: one page and a small JSON API over one study directory, blind by construction.

- ``GET /``: the page (``page.html``, shipped in the package, no external resources).
- ``GET /api/next?rater=NAME``: ``{"item", "prompt", "left", "right"}``, the rater's next unrated item; 204 when done.
- ``GET /api/progress?rater=NAME``: ``{"rated", "total"}``.
- ``POST /api/rate``: ``{"item", "rater", "choice": "left"|"right"|"tie", "score": 1-5|null, "comment": str|null}``
  -> ``{"ok": true, "duplicate": bool}`` once the rating is on disk (ratings.RatingStore).

Blindness: which side is A is never sent. Each rater's order of the items and each (rater, item)'s left/right sides
come from an HMAC of the study's secret, so the server maps a posted ``left``/``right`` back to A/B itself and a
client can neither choose nor learn the mapping; different raters see different orders and sides.

Safety: the study directory is fixed when the app is made and no request names a file; bodies over 64 KiB are refused
(413), bodies must be JSON (415 otherwise: a cross-site form cannot post here), rater names are 1-64 letters, digits,
spaces and ``._-`` (400 otherwise); every error is ``{"error": "..."}``. The page renders all data as text
(``textContent``), and a Content-Security-Policy allows only the page's own script and style (by hash), so even
injected markup could not run. Bound to loopback, only ``localhost`` Host headers are served (DNS rebinding).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import socket
import sys
import unicodedata
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from llm.errors import UserError
from llm.human_eval.ratings import CHOICES, RATINGS_FILE, RatingStore
from llm.human_eval.study import Study

MAX_BODY = 64 * 1024
MAX_COMMENT = 4000  # characters
RATER = re.compile(r"[\w.\- ]{1,64}")  # \w: letters and digits of any script, and _
FIELDS = {"item", "rater", "choice", "score", "comment"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# -------------------------------------------------------------------------------------------------------- blinding


def _mac(secret: bytes, *parts: str) -> bytes:
    return hmac.new(secret, "\0".join(parts).encode("utf-8"), hashlib.sha256).digest()


def left_side(secret: bytes, rater: str, item: str) -> str:
    """Which side ("a" or "b") ``rater`` sees on the left for ``item``: fixed per (rater, item), even across restarts."""
    return "a" if _mac(secret, "side", rater, item)[0] & 1 == 0 else "b"


def order(secret: bytes, rater: str, items: list[str]) -> list[str]:
    """The rater's own order of the items (so position in the study does not line up with any rater's fatigue)."""
    return sorted(items, key=lambda item: _mac(secret, "order", rater, item))


def rater_name(raw: Any) -> str:
    """A valid rater name (NFC-normalised), else HTTP 400."""
    if not isinstance(raw, str):
        raise HTTPException(400, "rater: a name is required")
    name = unicodedata.normalize("NFC", raw)
    if not RATER.fullmatch(name) or name != name.strip():
        raise HTTPException(
            400, "rater: 1-64 letters, digits, spaces and . _ - (no leading or trailing space) are allowed"
        )
    return name


# --------------------------------------------------------------------------------------------------------- the app


def _csp(page: str) -> str:
    """A policy that allows the page's own inline script and style (by their SHA-256) and nothing else."""

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def create_app(study_dir: str | Path, host: str = "127.0.0.1") -> FastAPI:
    """The app over ``study_dir`` (read now: items, and ratings.jsonl opened for appending)."""
    study = Study.load(study_dir)
    store = RatingStore(study.root / RATINGS_FILE)
    secret, ids = study.secret, list(study.items)
    page = resources.files("llm.human_eval").joinpath("page.html").read_text(encoding="utf-8")
    headers = {
        "Content-Security-Policy": _csp(page),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "X-Frame-Options": "DENY",
        "Cache-Control": "no-store",
    }

    app = FastAPI(title="human evaluation", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.study, app.state.store = study, store
    if host in LOOPBACK:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", "::1"])

    @app.middleware("http")
    async def secure(request: Request, call_next: Any) -> Response:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            response: Response = JSONResponse({"error": f"request body over {MAX_BODY} bytes"}, status_code=413)
        else:
            response = await call_next(request)
        response.headers.update(headers)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(err.detail)}, status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": "bad request"}, status_code=400)

    @app.get("/")
    def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/next")
    def next_item(rater: str | None = None) -> Response:
        name = rater_name(rater)
        done = store.rated(name)
        item_id = next((i for i in order(secret, name, ids) if i not in done), None)
        if item_id is None:
            return Response(status_code=204)
        item = study.items[item_id]
        left = left_side(secret, name, item_id)
        right = "b" if left == "a" else "a"
        return JSONResponse({"item": item_id, "prompt": item["prompt"], "left": item[left], "right": item[right]})

    @app.get("/api/progress")
    def progress(rater: str | None = None) -> JSONResponse:
        name = rater_name(rater)
        return JSONResponse({"rated": len(store.rated(name) & study.items.keys()), "total": len(ids)})

    @app.post("/api/rate")
    async def rate(request: Request) -> JSONResponse:
        rating = _rating(await _json_body(request), study, secret)
        added = await run_in_threadpool(store.add, rating)
        return JSONResponse({"ok": True, "duplicate": not added})

    return app


async def _json_body(request: Request) -> dict[str, Any]:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "the body must be JSON (Content-Type: application/json)")
    body = bytearray()
    async for chunk in request.stream():  # counted as it comes: a chunked body has no Content-Length
        body += chunk
        if len(body) > MAX_BODY:
            raise HTTPException(413, f"request body over {MAX_BODY} bytes")
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HTTPException(400, f"the body is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return value


def _rating(body: dict[str, Any], study: Study, secret: bytes) -> dict[str, Any]:
    """A posted rating checked and mapped from left/right to A/B (HTTP 4xx naming the field otherwise)."""
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise HTTPException(400, f"unknown field(s): {', '.join(map(str, unknown))[:200]}")
    rater = rater_name(body.get("rater"))
    item = body.get("item")
    if not isinstance(item, str):
        raise HTTPException(400, "item: the item's id (a string) is required")
    if item not in study.items:
        raise HTTPException(404, "item: no such item in this study")
    choice = body.get("choice")
    if choice not in CHOICES:
        raise HTTPException(400, f"choice: one of {', '.join(CHOICES)}")
    score = body.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5):
        raise HTTPException(400, "score: an integer from 1 to 5, or null")
    comment = body.get("comment")
    if comment is not None and not isinstance(comment, str):
        raise HTTPException(400, "comment: a string, or null")
    if comment is not None and len(comment) > MAX_COMMENT:
        raise HTTPException(400, f"comment: at most {MAX_COMMENT} characters")
    left = left_side(secret, rater, item)
    winner = {"left": left, "right": "b" if left == "a" else "a", "tie": "tie"}[choice]
    return {
        "item": item,
        "rater": rater,
        "choice": choice,
        "left": left,
        "winner": winner,
        "score": score,
        "comment": (comment or "").strip() or None,
        "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
    }


# ------------------------------------------------------------------------------------------------------- serving


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: a free one), so the address printed is the one served."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return socket.create_server((host, port), family=family)
    except (OSError, OverflowError) as err:
        raise UserError(f"cannot listen on {host}:{port}: {err}") from err


def serve(study_dir: str | Path, host: str = "127.0.0.1", port: int = 8080, log: Any = sys.stdout) -> None:
    """Serve the study until interrupted; prints where it listens first."""
    import uvicorn

    app = create_app(study_dir, host)
    try:
        sock = listen(host, port)
    except UserError:
        app.state.store.close()
        raise
    bound = sock.getsockname()[1]
    study, store = app.state.study, app.state.store
    shown = f"[{host}]" if ":" in host else host
    print(
        f"human_eval: {len(study.items)} items, {len(store.ratings)} ratings so far in {study.root}; "
        f"rating page at http://{shown}:{bound}/ (Ctrl-C stops)",
        file=log,
        flush=True,
    )
    if host not in LOOPBACK:
        print(f"human_eval: listening on {host}: anyone who can reach this port can rate", file=log, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    finally:
        store.close()
