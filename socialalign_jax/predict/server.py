"""The local web page and its JSON API (Starlette), on one `Predictor`.

    GET  /           the page (plain HTML + JS, the chart drawn by hand in SVG; no build step)
    GET  /favicon.ico  the page's icon (SVG)
    GET  /api/info   labels, run, limits, the size of the user pool, the random-weights warning
    POST /predict    {"news": str, "news2"?: str, "variants"?: [str], "topic"?: str,
                      "users": [user, ...] | "users_jsonl": str | "num_users": int,
                      "samples"?: int, "seed"?: int, "labeller"?: "lexicon" | "none"}
                     -> crowd.json's structure plus "sample_posts" and "warning" (random weights, else null)

Bad input is a 4xx with {"error": one line} and the server keeps serving. Predictions run
one at a time in a worker thread (the Predictor's lock), so requests queue instead of
racing to compile; more than `max_queue` waiting requests get 503.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import traceback
from typing import Any, Sequence

from socialalign_jax.core.errors import UserError, is_user_error, one_line
from socialalign_jax.evaluation.skill import skill_sentence
from socialalign_jax.predict.outputs import random_weights_warning
from socialalign_jax.predict.predictor import MAX_SEED, MIN_USERS_FOR_VERDICT, PredictError, Predictor
from socialalign_jax.predict.users import User, parse_users_jsonl, parse_users_list, sample_users

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "page.html")
REQUEST_KEYS = ("news", "news2", "variants", "topic", "users", "users_jsonl", "num_users", "samples", "seed",
                "labeller")
MAX_BODY_BYTES = 8 << 20
SAMPLE_POSTS = 12  # posts per wording returned for the page
# The page's icon: three bars, as on its chart (a browser asks for /favicon.ico on every page).
FAVICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect x="1" y="6" width="4" height="9" '
           'fill="#4c78a8"/><rect x="6" y="2" width="4" height="13" fill="#f58518"/><rect x="11" y="9" width="4" '
           'height="6" fill="#54a24b"/></svg>')

log = logging.getLogger("socialalign_jax.serve")


class RequestError(PredictError):
    """A malformed /predict body (400)."""


def _int(body: dict, key: str, default: int, lo: int, hi: int) -> int:
    v = body.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"request: field '{key}': expected an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise RequestError(f"request: field '{key}': {v} is outside [{lo}, {hi}]")
    return v


def parse_request(body: Any, *, pool: Sequence[User] | None, pool_source: str, max_users: int,
                  max_samples: int) -> dict:
    """Validate a /predict body -> keyword arguments of Predictor.predict (users resolved)."""
    if not isinstance(body, dict):
        raise RequestError(f"request: expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(REQUEST_KEYS))
    if unknown:
        raise RequestError(f"request: field '{unknown[0]}': unknown (expected some of {', '.join(REQUEST_KEYS)})")
    news = body.get("news")
    if not isinstance(news, str) or not news.strip():
        raise RequestError("request: field 'news': " + ("missing" if news is None else "empty" if isinstance(news, str)
                                                        else f"expected a string, got {type(news).__name__}"))
    variants = body.get("variants", [])
    if not isinstance(variants, list) or not all(isinstance(v, str) for v in variants):
        raise RequestError("request: field 'variants': expected a list of strings")
    if body.get("news2") not in (None, ""):
        if not isinstance(body["news2"], str):
            raise RequestError(f"request: field 'news2': expected a string, got {type(body['news2']).__name__}")
        if body["news2"].strip():
            variants = [body["news2"], *variants]
    for i, v in enumerate(variants):
        if not v.strip():
            raise RequestError(f"request: field 'variants': wording {i + 1} is empty")
    topic = body.get("topic")
    if topic == "":
        topic = None  # the page's empty box: derive the hashtag from the news
    if topic is not None and (not isinstance(topic, str) or not topic.strip()):
        raise RequestError("request: field 'topic': expected a non-empty string")
    given = [k for k in ("users", "users_jsonl", "num_users") if body.get(k) is not None]
    if len(given) != 1:
        raise RequestError("request: give the crowd as exactly one of 'users' (a list), 'users_jsonl' (a file's text) "
                           f"or 'num_users' (sampled from {pool_source or 'the server dataset'})")
    seed = _int(body, "seed", 0, 0, MAX_SEED)
    if given[0] == "users":
        users = parse_users_list(body["users"], "request")
    elif given[0] == "users_jsonl":
        if not isinstance(body["users_jsonl"], str):
            raise RequestError("request: field 'users_jsonl': expected the text of a .jsonl file")
        users = parse_users_jsonl(body["users_jsonl"], "request: users_jsonl")
    else:
        n = _int(body, "num_users", 0, 1, max_users)
        if not pool:
            raise RequestError("request: field 'num_users': this server has no dataset to sample users from; "
                               "send 'users' or 'users_jsonl' (or start it with --users_from DATASET_DIR)")
        users = sample_users(pool, n, seed, f"request: field 'num_users': {pool_source}")
    if len(users) > max_users:
        raise RequestError(f"request: {len(users)} users, more than this server's limit of {max_users}")
    labeller = body.get("labeller", "none")
    if labeller not in ("none", "lexicon", None):
        raise RequestError(f"request: field 'labeller': {labeller!r} is not 'lexicon' or 'none'")
    return dict(news=news, variants=variants, topic=topic, users=users, samples=_int(body, "samples", 1, 1, max_samples),
                seed=seed, labeller=labeller)


def response_json(pred) -> dict:
    out = pred.to_json()
    out["warning"] = random_weights_warning(pred.run)
    out["sample_posts"] = [{"variant": v, "user_name": u.user_name, "post": u.posts[0], "sentiment": u.sentiment}
                           for v, c in enumerate(pred.variants) for u in c.users[:SAMPLE_POSTS]]
    return out


def create_app(predictor: Predictor, *, pool: Sequence[User] | None = None, pool_source: str = "",
               max_users: int = 200, max_samples: int = 8, max_queue: int = 16):
    """The Starlette app; `pool` is the users `num_users` requests are sampled from."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route

    max_users = min(max_users, predictor.max_users)
    waiting = {"n": 0}
    guard = threading.Lock()
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": one_line(message)}, status_code=status)

    async def index(request: Request):
        return HTMLResponse(page)

    async def favicon(request: Request):
        return Response(FAVICON, media_type="image/svg+xml")

    async def info(request: Request):
        return JSONResponse({"labels": list(predictor.labels), "run": predictor.run, "max_users": max_users,
                             "max_samples": max_samples, "pool_users": len(pool or ()), "pool_source": pool_source,
                             "max_length": predictor.prompt_cfg.max_length,
                             "warning": random_weights_warning(predictor.run),
                             "min_users_for_verdict": MIN_USERS_FOR_VERDICT,
                             "forecast_skill": skill_sentence(predictor.skill)})

    async def predict(request: Request):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return error(413, f"request: body of {len(raw)} bytes, more than {MAX_BODY_BYTES}")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return error(400, f"request: not valid JSON ({e})")
        try:
            kw = parse_request(body, pool=pool, pool_source=pool_source, max_users=max_users, max_samples=max_samples)
        except UserError as e:  # RequestError, UsersError (a malformed user), PredictError
            return error(400, str(e))
        with guard:
            if waiting["n"] >= max_queue:
                return error(503, f"busy: {waiting['n']} requests are already waiting; retry shortly")
            waiting["n"] += 1
        try:
            pred = await run_in_threadpool(lambda: predictor.predict(kw.pop("news"), kw.pop("users"), **kw))
        except Exception as e:  # noqa: BLE001 - a user error is a 400; anything else a 500, and we keep serving
            if is_user_error(e):
                return error(400, str(e))
            log.error("prediction failed:\n%s", traceback.format_exc())
            return error(500, f"internal error: {type(e).__name__}: {e}")
        finally:
            with guard:
                waiting["n"] -= 1
        return JSONResponse(response_json(pred))

    return Starlette(routes=[Route("/", index), Route("/favicon.ico", favicon), Route("/api/info", info),
                             Route("/predict", predict, methods=["POST"])])
