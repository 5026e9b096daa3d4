"""The rating API over a real uvicorn on 127.0.0.1: blind, deterministic, durable, and strict about what it accepts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from llm.human_eval.__main__ import main
from llm.human_eval.ratings import read_ratings
from llm.human_eval.server import left_side, order
from tests.llm.human_eval.conftest import ITEMS

ROOT = Path(__file__).resolve().parents[3]
BY_ID = {item["id"]: item for item in ITEMS}


def post(client: httpx.Client, url: str, **body) -> httpx.Response:
    return client.post(f"{url}/api/rate", json=body)


def test_next_rate_duplicate_and_done(server, study):
    ratings = study.root / "ratings.jsonl"
    with httpx.Client(timeout=10) as client:
        first = client.get(f"{server}/api/next", params={"rater": "alice"})
        assert first.status_code == 200
        shown = first.json()
        assert set(shown) == {"item", "prompt", "left", "right"}  # nothing says which side is A
        item = BY_ID[shown["item"]]
        assert shown["prompt"] == item["prompt"] and {shown["left"], shown["right"]} == {item["a"], item["b"]}
        assert client.get(f"{server}/api/next", params={"rater": "alice"}).json() == shown  # the same until rated

        reply = post(client, server, item=shown["item"], rater="alice", choice="left", score=4, comment=" fine ")
        assert reply.status_code == 200 and reply.json() == {"ok": True, "duplicate": False}
        (stored,) = read_ratings(ratings)  # on disk before the reply
        assert stored["winner"] == ("a" if shown["left"] == item["a"] else "b")  # left mapped back to A/B
        assert (stored["choice"], stored["score"], stored["comment"]) == ("left", 4, "fine")

        again = post(client, server, item=shown["item"], rater="alice", choice="right")
        assert again.status_code == 200 and again.json() == {"ok": True, "duplicate": True}
        assert len(ratings.read_text().splitlines()) == 1  # kept once: the first

        seen = [shown["item"]]
        for choice in ("right", "tie", "left"):
            nxt = client.get(f"{server}/api/next", params={"rater": "alice"}).json()
            assert nxt["item"] not in seen
            seen.append(nxt["item"])
            assert post(client, server, item=nxt["item"], rater="alice", choice=choice).json()["duplicate"] is False
        assert seen == order(study.secret, "alice", list(BY_ID))  # the rater's own order
        done = client.get(f"{server}/api/next", params={"rater": "alice"})
        assert done.status_code == 204 and done.content == b""
        assert client.get(f"{server}/api/progress", params={"rater": "alice"}).json() == {"rated": 4, "total": 4}
        assert client.get(f"{server}/api/next", params={"rater": "bob"}).status_code == 200  # bob has his own

    for r in read_ratings(ratings):  # the sides a rater saw are the HMAC's, and the winner follows from them
        left = left_side(study.secret, "alice", r["item"])
        right = "b" if left == "a" else "a"
        assert r["left"] == left and r["winner"] == {"left": left, "right": right, "tie": "tie"}[r["choice"]]


def test_sides_are_per_rater_and_item_and_never_chosen_by_the_client(study):
    sides = {left_side(study.secret, f"rater {i}", item) for i in range(16) for item in BY_ID}
    assert sides == {"a", "b"}  # both orders occur
    assert all(left_side(study.secret, "x", i) == left_side(study.secret, "x", i) for i in BY_ID)
    assert left_side(b"another secret", "x", "item-1") in ("a", "b")


def test_bad_posts_are_4xx_with_a_json_error_and_store_nothing(server, study):
    good = {"item": "item-1", "rater": "alice", "choice": "left"}
    bad = [
        ({**good, "rater": ""}, 400),
        ({**good, "rater": "x" * 65}, 400),
        ({**good, "rater": "<script>"}, 400),
        ({**good, "rater": " alice"}, 400),
        ({**good, "rater": "../etc"}, 400),
        ({**good, "rater": None}, 400),
        ({k: v for k, v in good.items() if k != "rater"}, 400),
        ({**good, "item": "nope"}, 404),
        ({**good, "item": "../study.json"}, 404),
        ({**good, "item": 3}, 400),
        ({**good, "choice": "a"}, 400),
        ({**good, "choice": None}, 400),
        ({**good, "score": 0}, 400),
        ({**good, "score": 6}, 400),
        ({**good, "score": "5"}, 400),
        ({**good, "score": True}, 400),
        ({**good, "comment": 5}, 400),
        ({**good, "comment": "x" * 5000}, 400),
        ({**good, "winner": "a"}, 400),  # the client cannot name the winner
    ]
    with httpx.Client(timeout=10) as client:
        for body, status in bad:
            reply = client.post(f"{server}/api/rate", json=body)
            assert reply.status_code == status, (body, reply.text)
            assert isinstance(reply.json()["error"], str)
        raw = [
            (b"{not json", "application/json", 400),
            (b"[1, 2]", "application/json", 400),
            (json.dumps(good).encode(), "text/plain", 415),  # what a cross-site form could send
            (json.dumps({**good, "comment": "x" * 70_000}).encode(), "application/json", 413),
        ]
        for content, kind, status in raw:
            reply = client.post(f"{server}/api/rate", content=content, headers={"Content-Type": kind})
            assert reply.status_code == status and "error" in reply.json()
        chunked = client.post(  # no Content-Length: counted as it comes
            f"{server}/api/rate",
            content=iter([b'{"comment": "', b"x" * 70_000, b'"}']),
            headers={"Content-Type": "application/json"},
        )
        assert chunked.status_code == 413 and "error" in chunked.json()
        for rater in ["", "a" * 65, "<b>x</b>", "tab\tname"]:
            reply = client.get(f"{server}/api/next", params={"rater": rater})
            assert reply.status_code == 400 and "error" in reply.json()
        assert client.get(f"{server}/api/next").status_code == 400
        assert client.get(f"{server}/api/next", params={"rater": "Zoë O'Neil".replace("'", "")}).status_code == 200
    assert not (study.root / "ratings.jsonl").read_text()


def test_no_request_reaches_a_file_and_the_page_is_locked_down(server, study):
    with httpx.Client(timeout=10) as client:
        for path in [
            "/study.json",
            "/items.jsonl",
            "/ratings.jsonl",
            "/../study.json",
            "/%2e%2e/study.json",
            "/static/study.json",
            "/docs",
            "/openapi.json",
            "/api/next/../../study.json",
        ]:
            reply = client.get(server + path)
            assert reply.status_code in (400, 404), path
            assert study.meta["secret"] not in reply.text and "Pride" not in reply.text
        page = client.get(server + "/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "unsafe-inline" not in policy and "http" not in policy
        assert "innerHTML" not in page.text and 'src="http' not in page.text and "<link" not in page.text
        assert client.get(server + "/", headers={"Host": "attacker.example"}).status_code == 400  # DNS rebinding


def test_a_killed_server_loses_no_acknowledged_rating_and_the_rater_continues(study):
    def start() -> tuple[subprocess.Popen, str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llm.human_eval", "serve", str(study.root), "--port", "0"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = proc.stdout.readline()  # printed once the socket listens
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        return proc, line.split("http://")[1].split("/")[0]

    proc, address = start()
    acknowledged = []
    try:
        with httpx.Client(timeout=10) as client:
            for choice in ("left", "tie"):
                item = client.get(f"http://{address}/api/next", params={"rater": "carol"}).json()["item"]
                assert post(client, f"http://{address}", item=item, rater="carol", choice=choice).status_code == 200
                acknowledged.append(item)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert [r["item"] for r in read_ratings(study.root / "ratings.jsonl")] == acknowledged

    with (study.root / "ratings.jsonl").open("a") as f:  # what a kill in the middle of a write would leave
        f.write('{"item": "item-4", "rater": "car')
    proc, address = start()
    try:
        with httpx.Client(timeout=10) as client:
            rest = order(study.secret, "carol", list(BY_ID))[len(acknowledged) :]
            for item in rest:
                shown = client.get(f"http://{address}/api/next", params={"rater": "carol"}).json()
                assert shown["item"] == item  # where carol left off
                assert post(client, f"http://{address}", item=item, rater="carol", choice="right").status_code == 200
            assert client.get(f"http://{address}/api/next", params={"rater": "carol"}).status_code == 204
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) in (0, 130, -signal.SIGINT)
        proc.stdout.close()
        proc.stderr.close()
    lines = (study.root / "ratings.jsonl").read_text().splitlines()
    assert [json.loads(line)["item"] for line in lines] == acknowledged + rest  # the torn line was cut


def test_serve_errors_are_one_line(study, capsys):
    for argv, message in [
        (["serve", "/nonexistent/study"], "not a study"),
        (["serve", str(study.root), "--port", "-5"], "cannot listen on 127.0.0.1:-5"),
        (["serve", str(study.root), "--port", "http"], "invalid int value"),
        (["serve"], "the following arguments are required: study_dir"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1, err
    proc = subprocess.run(  # the real command: one line, no traceback
        [sys.executable, "-m", "llm.human_eval", "serve", "/nonexistent/study"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1


def test_the_server_and_summary_do_not_import_torch():
    code = "import sys, llm.human_eval.server, llm.human_eval.__main__; print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"  # serving starts in a second, without the model code
