"""launch/serve.py: the JSON API over HTTP and the page in a real headless browser.

The server runs as a subprocess on a free local port over the tiny trained run of
test_predict; each test talks to it as a client would. The browser test drives Debian's
Chromium with Playwright (never a downloaded browser) and skips, saying why, only when
Chromium or the Playwright client cannot be found.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.predict.test_predict import NEWS, NEWS2, USERS, tiny_predict_run
from tests.train_helpers import REPO, script_env

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body=None, timeout: float = 600):
    """(status, parsed JSON or text) for GET (body None) or a JSON POST; never raises on 4xx/5xx."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode("utf-8"))
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    text = raw.decode("utf-8")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


@pytest.fixture(scope="module")
def server():
    run = tiny_predict_run()
    port = _free_port()
    env = script_env(1)
    env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    log = open(os.path.join(run, f"serve_{port}.log"), "w+")
    proc = subprocess.Popen([sys.executable, str(REPO / "launch" / "serve.py"), "--workdir", run, "--port", str(port),
                             "--max_users", "10"], stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}: {log.read()[-3000:]}")
            try:
                status, info = _request(url + "/api/info", timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail("server did not come up within 600 s")
            time.sleep(1)
        yield url, info
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _check_crowd(res: dict, num_users: int, num_variants: int) -> None:
    labels = res["labels"]
    assert res["num_users"] == num_users and len(res["variants"]) == num_variants
    assert len(res["differences"]) == num_variants * (num_variants - 1) // 2
    for v in res["variants"]:
        p = np.array([v["distribution"][k] for k in labels])
        assert abs(p.sum() - 1) < 1e-6 and np.all(p >= 0)
        for k in labels:
            lo, hi = v["interval"][k]
            assert lo <= v["distribution"][k] <= hi
    assert res["distribution"] == res["variants"][0]["distribution"]
    for post in res["sample_posts"]:
        assert abs(sum(post["sentiment"].values()) - 1) < 1e-6 and isinstance(post["post"], str)


def test_api_predicts_and_rejects_bad_input_and_keeps_serving(server):
    url, info = server
    assert info["labels"] == ["negative", "neutral", "positive"] and info["pool_users"] > 10
    assert info["max_users"] == 10

    assert info["warning"].startswith("WARNING: random weights (random:tiny-qwen2)")  # the tiny run's base

    status, res = _request(url + "/predict", {"news": NEWS, "news2": NEWS2, "num_users": 3, "seed": 2})
    assert status == 200, res
    _check_crowd(res, 3, 2)
    assert res["seed"] == 2 and {p["variant"] for p in res["sample_posts"]} == {0, 1}
    # One hashtag for both wordings; the verdict rests on 3 users, too few to name one; random weights said.
    assert [v["topic"] for v in res["variants"]] == [res["topic"]] * 2 and res["topic_source"] == "derived from wording 1"
    (d,) = res["differences"]
    assert d["num_users"] == 3 and d["verdict"].startswith("underpowered: 3 users")
    assert set(d["reading"].values()) == {"underpowered (3 users)"}
    assert res["random_weights"] is True and res["warning"] == info["warning"]

    users = [json.loads(ln) for ln in USERS.read_text(encoding="utf-8").splitlines()]
    status, res = _request(url + "/predict", {"news": NEWS, "users": users[:2]})
    assert status == 200, res
    _check_crowd(res, 2, 1)
    assert [p["user_name"] for p in res["sample_posts"]] == [u["user_name"] for u in users[:2]]

    bad = [
        ({"news": "", "num_users": 2}, "field 'news': empty"),
        ({"news": NEWS}, "give the crowd as exactly one of"),
        ({"news": NEWS, "num_users": 11}, "field 'num_users': 11 is outside [1, 10]"),
        ({"news": NEWS, "users": [{"user_name": "a", "history": [{"txt": "x"}]}]},
         "users[0]: field 'history[0].text': missing"),
        ({"news": NEWS, "users_jsonl": '{"user_name": "a"}\n{oops'}, "users_jsonl: line 2: invalid JSON"),
        ({"news": "新闻" * 400, "num_users": 1}, "the prompt does not fit"),
        ({"news": NEWS, "num_users": 1, "colour": "red"}, "field 'colour': unknown"),
        (b"{not json", "not valid JSON"),
    ]
    for body, msg in bad:
        status, res = _request(url + "/predict", body)
        assert 400 <= status < 500, (body, status, res)
        assert msg in res["error"] and "\n" not in res["error"], (msg, res)

    status, res = _request(url + "/predict", {"news": NEWS, "num_users": 2})
    assert status == 200 and res["num_users"] == 2  # still serving

    with urllib.request.urlopen(url + "/favicon.ico", timeout=30) as r:  # a browser asks for it on every page
        assert r.status == 200 and r.headers["Content-Type"].startswith("image/svg+xml")
        import xml.etree.ElementTree as ET
        assert ET.fromstring(r.read()).tag == "{http://www.w3.org/2000/svg}svg"


@pytest.mark.parametrize("flag", ["--max_users", "--max_samples"])
def test_limits_below_one_are_one_line(flag):
    r = subprocess.run([sys.executable, str(REPO / "launch" / "serve.py"), "--workdir", tiny_predict_run(), flag, "0"],
                       capture_output=True, text=True, env=script_env(1), cwd=str(REPO), timeout=300)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: {flag} 0: expected an integer >= 1"]


def _chromium() -> str | None:
    for path in CHROMIUM_CANDIDATES:
        if os.path.exists(path):
            return path
    return shutil.which("chromium")


def test_page_in_a_headless_browser(server):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("no Chromium found (apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the Playwright client is not installed (pip install playwright; part of the [test] extra)")
    url, _ = server
    errors: list[str] = []
    failed: list[str] = []  # responses >= 400 other than the bad request the test sends on purpose
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("response", lambda r: failed.append(f"{r.status} {r.url}")
                    if r.status >= 400 and not r.url.endswith("/predict") else None)
            page.goto(url + "/")
            page.wait_for_function("document.getElementById('runinfo').textContent.startsWith('Model')")
            # Random weights: said at the top of the page before anything is asked.
            assert page.is_visible("#warning") and page.inner_text("#warning").startswith("WARNING: random weights")
            page.fill("#news", NEWS)
            page.fill("#news2", NEWS2)
            page.fill("#num_users", "3")
            page.click("#submit")
            page.wait_for_selector("#chart svg rect.bar", timeout=600_000)
            # One bar and one interval whisker per label and wording.
            assert page.locator("#chart svg rect.bar").count() == 3 * 2
            assert page.locator("#chart svg line.whisker").count() == 3 * 2
            shares = [float(t) for t in page.locator("#numbers td.share").all_inner_texts()]
            assert len(shares) == 6 and all(0 <= s <= 1 for s in shares)
            assert abs(sum(shares[0::2]) - 1) < 0.01 and abs(sum(shares[1::2]) - 1) < 0.01
            assert page.is_visible("#framing") and "reading" in page.inner_text("#diff")
            assert page.inner_text("#verdict").startswith("Verdict: underpowered: 3 users")
            assert "(paired over the same 3 users, the same hashtag)" in page.inner_text("#framing")
            assert page.inner_text("#hashtag").endswith("for every wording (derived from wording 1)")
            assert page.is_visible("#result_warning")
            # A random model's posts are listed only on request: the box is closed until clicked.
            assert page.locator("#posts li").count() == 6 and not page.is_visible("#posts li >> nth=0")
            page.click("#posts_summary")
            assert page.is_visible("#posts li >> nth=0")
            assert page.inner_text("#status").startswith("Done: 3 users")
            # Bad input shows the server's one-line message, nothing of the previous result stays on screen,
            # and the page keeps working.
            page.fill("#news", "")
            page.click("#submit")
            page.wait_for_function("document.getElementById('status').className === 'error'")
            assert "field 'news': empty" in page.inner_text("#status")
            assert not page.is_visible("#result") and page.locator("#chart svg").count() == 0
            assert page.locator("#posts li").count() == 0
        finally:
            browser.close()
    assert not errors, errors
    assert not failed, failed  # no 404 (the favicon included)
