"""The review queue end to end in a real headless browser (Debian's chromium driven by Playwright)
against the real app (uvicorn) and a real redis-server: log in, open the queue, filter it, open a
case, mark it, and find the label stored and the hold released (or confirmed) in Redis.

SEQGUARD_SCREENSHOTS=docs writes docs/review_queue.png and docs/review_case.png (else tmp_path).
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from seqguard.gateway.alerts import AlertRecord
from seqguard.gateway.holds import HoldStore
from seqguard.gateway.state import Pseudonymizer
from seqguard.services import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "review-test-token-0123456789"                # an admin token: the app writes labels and holds
SCORING_TOKEN = "scoring-test-token-0123456789"      # a payment client's token: must not open the app
P = Pseudonymizer(b"test-pseudonym-key-0123456789")
T0 = 1767225600000                    # 2026-01-01 00:00 UTC
ALICE, BOB, CAROL = P("user", "alice"), P("user", "bob"), P("user", "carol")


def _alert(i, user, risk, action, reasons, rules=(), minutes=0):
    return AlertRecord(str(i), P("event", f"ev-{i}"), user, risk, action, reasons, rules, "m-2026-01",
                       T0 + minutes * 60_000, T0 + minutes * 60_000 + 40)


ALERTS = [
    _alert(1, ALICE, 0.71, "REVIEW", ("NEW_DEVICE", "NEW_COUNTRY"), minutes=0),
    _alert(2, BOB, 0.64, "REVIEW", ("HIGH_VELOCITY",), ("velocity",), minutes=3),
    _alert(3, ALICE, 0.93, "CHALLENGE", ("LOGIN_FAILURE_BURST",), ("failed_logins",), minutes=5),
    _alert(4, CAROL, 0.55, "REVIEW", ("COUPON_BURST",), minutes=7),
    _alert(5, ALICE, 0.995, "BLOCK", ("NEW_DEVICE_AND_COUNTRY", "RISKY_SESSION"), ("ato_pattern",), minutes=9),
    _alert(6, BOB, 0.97, "BLOCK", ("MACHINE_TIMING", "SHARED_DEVICE"), ("velocity",), minutes=12),
]


class ReviewServerThread:
    """gateway.review.serve.ReviewServer (what `seqguard review` runs) in its own thread and event loop."""

    def __init__(self, settings):
        import asyncio

        from seqguard.gateway.review.config import ReviewConfig
        from seqguard.gateway.review.serve import ReviewServer
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.review = ReviewServer(settings, ReviewConfig(port=free_port()), settings.admin_tokens())
        self.url = asyncio.run_coroutine_threadsafe(self.review.start(), self.loop).result(30).rstrip("/")

    def stop(self):
        import asyncio
        try:
            asyncio.run_coroutine_threadsafe(self.review.stop(), self.loop).result(20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


@pytest.fixture
def seeded(redis_server):
    """Six alerts of three users (one already labelled), holds on alice (CHALLENGE) and bob (BLOCK)."""
    r = redis_server.client()
    r.flushall()
    for a in ALERTS:
        r.xadd("sg:alerts", a.to_fields())
    r.set(f"sg:o:{P('event', 'ev-4')}", json.dumps({"label": "GENUINE", "family": "", "ts": T0}))

    async def holds():
        import redis.asyncio as aioredis
        client = aioredis.Redis(port=redis_server.port)
        store = HoldStore(client, P, "sg:")
        await store.set("user", hashed=ALICE, action="CHALLENGE", reason="new device + country", who="rule:ato",
                        ttl_s=86400)
        await store.set("user", hashed=BOB, action="BLOCK", reason="bot timing", who="analyst-1", ttl_s=86400)
        await client.aclose()
    asyncio.run(holds())
    return r


@pytest.fixture
def review_app(redis_server):
    from seqguard.gateway.settings import Settings
    srv = ReviewServerThread(Settings.load(redis_port=redis_server.port, auth_token=SCORING_TOKEN,
                                                admin_token=TOKEN))
    yield srv
    srv.stop()


@pytest.fixture
def browser():
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if not exe:
        pytest.skip("chromium not installed: apt-get install chromium (scripts/setup.sh installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install -e '.[dev]')")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield b
        finally:
            b.close()


def _shots(tmp_path) -> Path:
    d = os.environ.get("SEQGUARD_SCREENSHOTS")
    return Path(__file__).resolve().parent.parent / d if d else tmp_path


@pytest.mark.slow
def test_review_queue_case_and_marking_in_a_browser(seeded, review_app, browser, tmp_path):
    r = seeded
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.set_default_timeout(15_000)

    page.goto(review_app.url + "/")
    assert "/login" in page.url                                   # not logged in: sent to the login form
    page.fill("#analyst", "dana")
    page.fill("#token", "wrong-token")
    page.click("#login")
    assert "unknown token" in page.inner_text("#error")
    page.fill("#analyst", "dana")
    page.fill("#token", TOKEN)
    page.click("#login")
    page.wait_for_selector("#queue")

    # the queue: open alerts only (carol's is labelled), riskiest first
    rows = page.locator("#queue .alert-row")
    assert rows.count() == 5
    risks = [float(rows.nth(i).locator("td").first.inner_text()) for i in range(5)]
    assert risks == sorted(risks, reverse=True) == [0.995, 0.97, 0.93, 0.71, 0.64]
    page.screenshot(path=str(_shots(tmp_path) / "review_queue.png"), full_page=True)

    page.select_option("#f-action", "BLOCK")                     # filters: action, then rule
    page.click("#filter")
    page.wait_for_url("**action=BLOCK**")
    assert page.locator("#queue .alert-row").count() == 2
    page.goto(review_app.url + "/?rule=velocity&show=all")
    assert page.locator("#queue .alert-row").count() == 2
    page.goto(review_app.url + "/?since=2026-01-01T00:06")
    assert page.locator("#queue .alert-row").count() == 2         # alice's 09:00 and bob's 12:00 (carol's labelled)
    page.goto(review_app.url + "/?since=yesterday")
    assert "filter 'since'" in page.inner_text("#error")

    # alice's case: from the queue's top row
    page.goto(review_app.url + "/")
    page.locator("#queue .alert-row").first.locator("a.case-link").click()
    page.wait_for_selector("#case-user")
    assert page.inner_text("#case-user") == ALICE
    assert page.locator("#timeline .alert-row").count() == 3
    assert page.locator("svg.riskplot circle").count() == 3
    assert "LOGIN_FAILURE_BURST" in page.inner_text("#timeline") and "ato_pattern" in page.inner_text("#timeline")
    assert page.locator("#holds .hold-row").count() == 1 and "CHALLENGE" in page.inner_text("#holds")
    page.screenshot(path=str(_shots(tmp_path) / "review_case.png"), full_page=True)

    page.click("#mark-legit")
    page.wait_for_selector("#message")
    assert page.inner_text("#message") == "3 alerts labelled GENUINE"
    assert page.locator("#no-holds").count() == 1
    assert page.locator("#timeline td.label").all_inner_texts() == ["GENUINE"] * 3

    # stored the way ReportOutcome stores it, and the hold released with an audit record naming the analyst
    for i in (1, 3, 5):
        h = P("event", f"ev-{i}")
        assert json.loads(r.get(f"sg:o:{h}"))["label"] == "GENUINE" and r.ttl(f"sg:o:{h}") > 0
    outcomes = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange("sg:outcomes")]
    assert sorted(o["event"] for o in outcomes) == sorted(P("event", f"ev-{i}") for i in (1, 3, 5))
    assert not r.exists(f"sg:h:user:{ALICE}")
    audit = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange("sg:audit")]
    assert (audit[-1]["op"], audit[-1]["key"], audit[-1]["who"]) == ("release", ALICE, "dana")

    # alice is gone from the open queue; bob marked fraud: labelled, hold kept and confirmed
    page.goto(review_app.url + "/")
    assert page.locator("#queue .alert-row").count() == 2
    page.goto(f"{review_app.url}/case/{BOB}")
    page.click("#mark-fraud")
    page.wait_for_selector("#message")
    assert page.inner_text("#message") == "2 alerts labelled FRAUD"
    assert r.exists(f"sg:h:user:{BOB}") and page.locator("#holds .hold-row").count() == 1
    assert json.loads(r.get(f"sg:o:{P('event', 'ev-6')}"))["label"] == "FRAUD"
    audit = [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange("sg:audit")]
    assert (audit[-1]["op"], audit[-1]["key"], audit[-1]["who"]) == ("confirm", BOB, "dana")
    page.goto(review_app.url + "/")
    assert page.locator("#queue .alert-row").count() == 0

    # put carol on hold from her case page, then release it
    page.goto(f"{review_app.url}/case/{CAROL}")
    page.fill("input[name=reason]", "linked to bob's device")
    page.click("#set-hold")
    page.wait_for_selector("#holds")
    assert json.loads(r.get(f"sg:h:user:{CAROL}"))["who"] == "dana"
    page.click("#release")
    page.wait_for_selector("#no-holds")
    assert not r.exists(f"sg:h:user:{CAROL}")


def _post(url, data: dict, headers: dict | None = None) -> int:
    req = urllib.request.Request(url, data=urllib.parse.urlencode(data).encode(), headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_review_app_refuses_without_auth_and_cross_origin(seeded, review_app):
    from seqguard.gateway.review import auth
    r = seeded
    url = f"{review_app.url}/case/{ALICE}/label"
    assert _post(url, {"label": "FRAUD"}) == 401
    forged = auth.make_session(b"not-the-token-0123456789", "mallory")
    assert _post(url, {"label": "FRAUD"}, {"Cookie": f"{auth.COOKIE}={forged}"}) == 401
    expired = auth.make_session(TOKEN.encode(), "dana", now_ms=int(time.time() * 1000) - 13 * 3600 * 1000)
    assert _post(url, {"label": "FRAUD"}, {"Cookie": f"{auth.COOKIE}={expired}"}) == 401
    good = auth.make_session(TOKEN.encode(), "dana")
    assert _post(url, {"label": "FRAUD"}, {"Cookie": f"{auth.COOKIE}={good}", "Origin": "http://evil.example"}) == 403
    assert r.keys("sg:o:*") == [f"sg:o:{P('event', 'ev-4')}".encode()] and not r.exists("sg:outcomes")
    assert _post(url, {"label": "FRAUD"}, {"Authorization": f"Bearer {SCORING_TOKEN}"}) == 401
    assert _post(url, {"label": "MAYBE"}, {"Authorization": f"Bearer {TOKEN}"}) == 400
    assert _post(url, {"label": "FRAUD"}, {"Authorization": f"Bearer {TOKEN}"}) == 200   # 303 followed to the case
    assert json.loads(r.get(f"sg:o:{P('event', 'ev-1')}"))["label"] == "FRAUD"
    with urllib.request.urlopen(f"{review_app.url}/case/{ALICE}", timeout=10) as resp:   # GET without a session
        assert "/login" in resp.url


def test_review_pages_escape_what_alerts_carry(seeded, review_app):
    """Rule names come from an editable rules file and user_raw from callers: rendered as text, never markup."""
    evil = "<script>alert(1)</script>"
    seeded.xadd("sg:alerts", AlertRecord("99", P("event", "ev-99"), ALICE, 0.99, "BLOCK", ("NEW_DEVICE",), (evil,),
                                         "m", T0, T0, user_raw=evil).to_fields())
    req = urllib.request.Request(f"{review_app.url}/?show=all", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        html = resp.read().decode()
    assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_hold_form_input_is_validated(seeded, review_app):
    r = seeded
    url, bearer = f"{review_app.url}/case/{CAROL}/hold", {"Authorization": f"Bearer {TOKEN}"}
    for form, field in [({"action": "BLOCK", "reason": "x", "days": "400"}, "days"),
                        ({"action": "BLOCK", "reason": "x", "days": "two"}, "days"),
                        ({"action": "ALLOW", "reason": "x", "days": "3"}, "action"),
                        ({"action": "BLOCK", "reason": "", "days": "3"}, "reason")]:
        req = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(), headers=bearer)
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=10)
        assert exc.value.code == 400 and f"field '{field}'" in exc.value.read().decode()
    assert not r.exists(f"sg:h:user:{CAROL}")
    assert _post(url, {"action": "BLOCK", "reason": "mule", "days": "3"}, bearer) == 200
    assert 3 * 86400 - 10 < r.ttl(f"sg:h:user:{CAROL}") <= 3 * 86400


def test_review_tokens_are_admin_tokens_or_a_generated_private_one(tmp_path):
    from seqguard.gateway.review.serve import review_tokens
    from seqguard.gateway.settings import Settings
    said = []
    assert review_tokens(Settings(auth_token="s" * 20, admin_token="a" * 20), tmp_path, said.append) == [b"a" * 20]
    assert not said and not (tmp_path / "review.token").exists()
    generated = review_tokens(Settings(auth_token="s" * 20), tmp_path, said.append)   # scoring token only
    path = tmp_path / "review.token"
    assert generated != [b"s" * 20] and len(generated[0]) >= 32 and str(path) in said[0]
    assert path.stat().st_mode & 0o777 == 0o600
    assert review_tokens(Settings(), tmp_path, said.append) == generated               # kept across restarts


def test_review_app_answers_503_when_redis_is_down():
    from seqguard.gateway.settings import Settings
    srv = ReviewServerThread(Settings.load(redis_port=free_port(), admin_token=TOKEN))
    try:
        for path in ("/", f"/case/{ALICE}"):
            req = urllib.request.Request(srv.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
            with pytest.raises(urllib.error.HTTPError) as exc:
                urllib.request.urlopen(req, timeout=30)
            assert exc.value.code == 503 and "Redis unavailable" in exc.value.read().decode()
    finally:
        srv.stop()


def test_seqguard_review_command_prints_its_url_and_stops_on_sigterm(redis_server, tmp_path):
    import signal
    import subprocess
    import sys
    port = free_port()
    env = dict(os.environ, SEQGUARD_REDIS_PORT=str(redis_server.port))
    for k in ("SEQGUARD_CONFIG", "SEQGUARD_ADMIN_TOKEN", "SEQGUARD_ADMIN_TOKEN_FILE"):
        env.pop(k, None)
    proc = subprocess.Popen([sys.executable, "-m", "seqguard.cli", "review", "--port", str(port),
                             "--run-dir", str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert str(tmp_path / "review.token") in lines[0]               # no admin token: a generated one
        assert f"review queue: http://127.0.0.1:{port}/" in lines[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert resp.read() == b"ok"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr.read()[-2000:]
