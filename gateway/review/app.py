"""The review queue: a small server-rendered Starlette app for fraud analysts.

    GET  /                      open alerts, riskiest first; filters: action, rule, reason, time, min risk
    GET  /case/<user>           one (pseudonymised) user: risk over time, alerts with reasons and rules, holds
    POST /case/<user>/label     "fraud" / "legitimate": labels the case's alerts like ReportOutcome does,
                                then confirms (fraud) or releases (legitimate) the user's holds
    POST /case/<user>/hold      put the user on hold;  POST /case/<user>/release  end a hold
    GET/POST /login, POST /logout, GET /healthz

The app sees only pseudonymised ids (alerts carry hmac(user), hmac(event)); it never needs, and
is never given, the pseudonymisation key.
"""
from __future__ import annotations

import functools
import re
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import jinja2
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from ..holds import HOLD_ACTIONS, MAX_HOLD_TTL_S, HoldError, HoldStore
from ..redisconn import connect_redis, key_prefix
from ..state import StateUnavailable
from . import auth
from .cases import LABELS, AlertFilter, CaseReader, FilterError, outcome_store
from .config import ReviewConfig
from .plot import risk_plot

USER_KEY = re.compile(r"^[0-9a-f]{32}$")
TEMPLATES = Path(__file__).parent / "templates"


class _NoRawIds:
    """The app's HoldStore works on pseudonymised ids only; hashing a raw id here would be a bug."""

    def __call__(self, kind: str, value: str) -> str:
        raise RuntimeError("the review app has no pseudonymisation key and handles no raw ids")


def create_app(settings, config: ReviewConfig, tokens: list[bytes]) -> Starlette:
    """settings: gateway.settings.Settings (Redis, outcome TTL); tokens: accepted admin tokens (non-empty,
    serve.review_tokens)."""
    if not tokens:
        raise ValueError("the review app needs at least one admin token (SEQGUARD_ADMIN_TOKEN[_FILE])")
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["utc"] = lambda ms: time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000))
    prefix = key_prefix(settings)

    @asynccontextmanager
    async def lifespan(app):
        redis = connect_redis(settings, config.redis_timeout_s)
        app.state.cases = CaseReader(redis, prefix, config.scan_alerts)
        app.state.holds = HoldStore(redis, _NoRawIds(), prefix)
        app.state.outcomes = outcome_store(redis, prefix)
        try:
            yield
        finally:
            await redis.aclose()

    app = Starlette(routes=ROUTES, lifespan=lifespan)
    app.state.review = _Review(settings, config, tokens, Jinja2Templates(env=env))
    return app


@dataclass
class _Review:
    """What every handler needs besides Redis (app.state.review)."""
    settings: object
    config: ReviewConfig
    tokens: list[bytes]
    templates: Jinja2Templates


def _page(request: Request, name: str, status: int = 200, **ctx) -> Response:
    ctx.setdefault("analyst", getattr(request.state, "analyst", ""))
    ctx.setdefault("message", request.query_params.get("done", ""))
    return request.app.state.review.templates.TemplateResponse(request, name, ctx, status_code=status)


def _authenticated(fn):
    """An analyst's session cookie or an admin bearer token; form posts only from the app's own pages."""
    @functools.wraps(fn)
    async def inner(request: Request):
        tokens = request.app.state.review.tokens
        analyst = auth.session_analyst(tokens, request.cookies.get(auth.COOKIE))
        if analyst is None and auth.bearer_ok(tokens, request.headers.get("authorization")):
            analyst = "api"
        if analyst is None:
            if request.method == "GET":
                return RedirectResponse("/login?" + urlencode({"next": request.url.path}), 303)
            return PlainTextResponse("missing or invalid session", 401)
        if request.method == "POST" and not _same_origin(request):
            return PlainTextResponse("cross-origin form post refused", 403)
        request.state.analyst = analyst
        try:
            return await fn(request)
        except (StateUnavailable, RedisError, OSError) as e:
            return _page(request, "error.html", 503, error=f"Redis unavailable: {type(e).__name__}: {e}")
    return inner


async def _login(request: Request):
    nxt = request.query_params.get("next", "/")
    if request.method == "GET":
        return _page(request, "login.html", error="", next=nxt)
    form = await request.form()
    analyst, token = str(form.get("analyst", "")).strip(), str(form.get("token", ""))
    nxt = str(form.get("next", "/"))
    signer = auth.token_ok(request.app.state.review.tokens, token)
    if signer is None or not auth.valid_analyst(analyst):
        error = "unknown token" if signer is None else "name: 1-64 printable characters, no '.'"
        return _page(request, "login.html", 401, error=error, next=nxt)
    resp = RedirectResponse(nxt if nxt.startswith("/") and not nxt.startswith("//") else "/", 303)
    resp.set_cookie(auth.COOKIE, auth.make_session(signer, analyst), max_age=auth.SESSION_MAX_AGE_S,
                    httponly=True, samesite="strict", secure=request.url.scheme == "https", path="/")
    return resp


async def _logout(request: Request):
    resp = RedirectResponse("/login", 303)
    resp.delete_cookie(auth.COOKIE, path="/")
    return resp


@_authenticated
async def _queue(request: Request):
    try:
        flt = AlertFilter.from_query(request.query_params)
    except FilterError as e:
        return _page(request, "queue.html", 400, error=str(e), alerts=[], scanned=0, malformed=0,
                     q=request.query_params, actions=HOLD_ACTIONS)
    pg = await request.app.state.cases.queue(flt, request.app.state.review.config.page_size)
    return _page(request, "queue.html", error="", alerts=pg.alerts, scanned=pg.scanned, malformed=pg.malformed,
                 q=request.query_params, actions=HOLD_ACTIONS)


def _user(request: Request) -> str | None:
    u = request.path_params["user"]
    return u if USER_KEY.match(u) else None


@_authenticated
async def _case(request: Request):
    user = _user(request)
    if user is None:
        return _page(request, "error.html", 404, error="no such case (a user key is 32 hex characters)")
    st = request.app.state
    pg = await st.cases.case(user)
    holds = await st.holds.get([("user", user)])
    plot = risk_plot([(v.alert.ts, v.alert.risk, v.alert.action, v.label) for v in pg.alerts])
    history = [h for h in await st.holds.history() if h.get("key") == user][:50]
    return _page(request, "case.html", user=user, alerts=pg.alerts, scanned=pg.scanned, malformed=pg.malformed,
                 holds=holds, history=history, plot=plot, actions=HOLD_ACTIONS, hold_days=st.review.config.hold_days)


@_authenticated
async def _label(request: Request):
    user = _user(request)
    form = await request.form()
    verdict = str(form.get("label", ""))
    if user is None or verdict not in LABELS:
        return PlainTextResponse("field 'label': must be FRAUD or GENUINE", 400)
    st = request.app.state
    settings = st.review.settings
    pg = await st.cases.case(user)
    now = int(time.time() * 1000)
    changed = 0
    for v in pg.alerts:
        if v.label != verdict:
            await st.outcomes.record_outcome(v.alert.event, verdict, "", now, settings.outcome_ttl_s,
                                             settings.outcome_stream_max)
            changed += 1
    who = request.state.analyst
    for h in await st.holds.get([("user", user)]):
        if verdict == "GENUINE":
            await st.holds.release("user", hashed=user, who=who, reason="review: legitimate")
        else:
            await st.holds.audit("confirm", h, who, "review: fraud")
    return RedirectResponse(f"/case/{user}?" + urlencode({"done": f"{changed} alerts labelled {verdict}"}), 303)


@_authenticated
async def _hold(request: Request):
    user = _user(request)
    if user is None:
        return PlainTextResponse("no such case", 404)
    form = await request.form()
    max_days = MAX_HOLD_TTL_S // 86400
    try:
        days = int(form.get("days", ""))
    except ValueError:
        days = 0
    if not 1 <= days <= max_days:
        return PlainTextResponse(f"field 'days': a whole number in 1..{max_days}", 400)
    try:
        await request.app.state.holds.set("user", hashed=user, action=str(form.get("action", "")),
                                          reason=str(form.get("reason", "")).strip(),
                                          who=request.state.analyst, ttl_s=days * 86400)
    except HoldError as e:
        return PlainTextResponse(str(e), 400)
    return RedirectResponse(f"/case/{user}?" + urlencode({"done": "hold set"}), 303)


@_authenticated
async def _release(request: Request):
    user = _user(request)
    if user is None:
        return PlainTextResponse("no such case", 404)
    form = await request.form()
    gone = await request.app.state.holds.release("user", hashed=user, who=request.state.analyst,
                                                 reason=str(form.get("reason", "released in review"))[:200])
    return RedirectResponse(f"/case/{user}?" + urlencode({"done": "hold released" if gone else "no hold"}), 303)


async def _healthz(request: Request):
    return PlainTextResponse("ok")


ROUTES = [Route("/", _queue), Route("/case/{user}", _case), Route("/case/{user}/label", _label, methods=["POST"]),
          Route("/case/{user}/hold", _hold, methods=["POST"]),
          Route("/case/{user}/release", _release, methods=["POST"]),
          Route("/login", _login, methods=["GET", "POST"]), Route("/logout", _logout, methods=["POST"]),
          Route("/healthz", _healthz)]


def _same_origin(request: Request) -> bool:
    """A browser's form post carries Origin; it must be this app (defence in depth beside SameSite)."""
    origin = request.headers.get("origin")
    return origin is None or urlsplit(origin).netloc == request.headers.get("host", "")
