"""The console's aiohttp application: headers, authentication, pages, actions, jobs.

Every page is rendered by Jinja2 with autoescaping on, so a value from an
exhausted event is text wherever it appears; links are built from row and
job ids and from URL-encoded filter values after a constant path, never from
a payload. Every state-changing request is a POST that carries the session's
CSRF token (or a bearer token, which no browser sends by itself), and every
response carries a Content-Security-Policy that allows only the console's
own script and stylesheet.

Replays are dlqproc.exhausted jobs run by the engine inside this process,
each on a PostgreSQL connection of its own (the job's advisory lock lives on
it); a job the console was running when it stopped is continued with
`dlqproc exhausted replay --resume JOB`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import jinja2
from aiohttp import web
from multidict import MultiDictProxy, MultiMapping

from dlqproc import ratelog, redact
from dlqproc.broker import Broker
from dlqproc.config import Config
from dlqproc.console import auth, forms
from dlqproc.console.throttle import Throttle, retry_after
from dlqproc.exhausted import filters, render
from dlqproc.exhausted.engine import Engine
from dlqproc.exhausted.filters import Filter, FilterError
from dlqproc.exhausted.refusals import Target
from dlqproc.store.exhausted_ops import DBUnavailable, ExhaustedDB, Job

log = logging.getLogger("dlqproc.console")

HERE = Path(__file__).resolve().parent
MAX_BODY = 256 * 1024
# Seconds a client has to send a form's body once its head arrived: a body
# dribbled in a byte at a time would otherwise hold a connection (of the
# listener's bounded few) for as long as the client likes.
BODY_TIMEOUT = 10.0
SINGLE_WAIT = 5.0  # seconds a one-row replay is awaited before showing its job page
STOP_WAIT = 30.0
COUNT_CAP = 10_000  # the list page counts matches up to this many
FINISHED = ("done", "stopped", "failed")
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin rather than no-referrer: with no-referrer, Chrome sends
    # `Origin: null` on the console's own form posts, and the origin check refuses it.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Server": "dlqproc",
}
# Messages a redirect may ask a page to show: constant text chosen by key.
FLASH = {
    "resolved": "Resolved.",
    "unresolved": "Marked unresolved.",
    "annotated": "Note added.",
    "replayed": "Replayed.",
}
SESSION = web.RequestKey("session", auth.Session)
OPERATOR = web.RequestKey("operator", str)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Unavailable(Exception):
    """A server the console needs (NATS) cannot be reached."""


class Console:
    def __init__(self, cfg: Config, secrets: redact.Secrets | None = None) -> None:
        self.token = cfg.console.token
        self.dsn = cfg.postgres.dsn
        self.nats_url = cfg.nats.url
        self.dlq_subject = cfg.nats.dlq_subject
        self.secrets = secrets if secrets is not None else redact.secrets_of(cfg)
        self.db = ExhaustedDB(self.dsn, statement_timeout=30.0)
        self.sessions = auth.Sessions()
        # Sessions of the login form, apart: a client fetching it in a loop
        # evicts only its own kind, never an operator's session.
        self.pending = auth.Sessions(ttl=3600.0)
        # Token guesses: throttled per client and in all, logged a line per period.
        self.throttle = Throttle()
        self.failures = ratelog.Summary(log, "console: wrong token (sign-in or bearer)")
        self.throttled = ratelog.Summary(log, "console: token check refused, too many failures")
        self.running: dict[int, tuple[Engine, asyncio.Task[None]]] = {}
        self.totals: dict[int, int] = {}
        self._broker: Broker | None = None
        self._broker_lock = asyncio.Lock()
        self.env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self.env.globals.update(
            age=render.age, first_line=forms.first_line, when=when, chart_h=forms.CHART_H
        )

    # -- the application

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth], client_max_size=MAX_BODY)
        app.on_response_prepare.append(self._headers)
        app.on_cleanup.append(self._cleanup)
        r = app.router
        r.add_get("/login", self.login_page)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/", self.overview)
        r.add_get("/list", self.list_page)
        r.add_get(r"/events/{id:\d{1,18}}", self.detail)
        r.add_post(r"/events/{id:\d{1,18}}/replay", self.replay_one)
        r.add_post(r"/events/{id:\d{1,18}}/{action:resolve|unresolve|annotate}", self.act)
        r.add_get("/replay", self.bulk_page)
        r.add_post("/replay", self.bulk_start)
        r.add_get(r"/jobs/{id:\d{1,18}}", self.job_page)
        r.add_post(r"/jobs/{id:\d{1,18}}/stop", self.job_stop)
        r.add_get(r"/api/jobs/{id:\d{1,18}}", self.job_json)
        r.add_static("/static", HERE / "static", show_index=False, follow_symlinks=False)
        return app

    async def _headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(HEADERS)

    async def _cleanup(self, app: web.Application) -> None:
        for engine, _ in list(self.running.values()):
            engine.stop()
        tasks = [t for _, t in self.running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_WAIT)
        if self._broker is not None:
            await self._broker.close()
        await self.db.close()
        self.failures.close()
        self.throttled.close()

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except FilterError as exc:
            return self.render(request, "error.html", 400, title="Bad filter", message=str(exc))
        except BodyTimeout:
            response = self.render(
                request, "error.html", 408, title="Too slow", message="The form took too long."
            )
            response.force_close()
            return response
        except DBUnavailable as exc:
            log.warning("console: PostgreSQL unavailable: %s", self.secrets.scrub(str(exc)))
            message = "PostgreSQL is unavailable; the console's log says why."
            return self.render(request, "error.html", 503, title="Unavailable", message=message)
        except Unavailable as exc:
            log.warning("console: %s", self.secrets.scrub(str(exc)))
            message = "NATS is unavailable; the console's log says why."
            return self.render(request, "error.html", 503, title="Unavailable", message=message)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/static/"):
            return await handler(request)
        if request.method == "POST" and not self._same_origin(request):
            return self._refuse(request, 403, "cross-origin request refused")
        given = auth.bearer(request.headers.get("Authorization"))
        if given is not None:
            if (wait := self._check_token(request.remote, given)) > 0:
                return self._too_many(request, wait)
            if wait < 0:
                return self._refuse(request, 401, "wrong or no console token")
            operator = request.headers.get("X-Operator", "api")
            if not auth.valid_operator(operator):
                return self._refuse(request, 400, "X-Operator is not a valid operator name")
            request[OPERATOR] = operator
            return await handler(request)
        sid = request.cookies.get(auth.COOKIE)
        session = self.sessions.get(sid)
        if path in ("/login", "/logout"):
            session = session or self.pending.get(sid)
            if session is not None:
                request[SESSION] = session
            return await handler(request)
        if session is None or session.operator is None:
            if request.method == "GET" and not path.startswith("/api/"):
                raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
            return self._refuse(request, 401, "sign in first")
        request[SESSION] = session
        request[OPERATOR] = session.operator
        if request.method == "POST":
            form = await _form(request)
            if not auth.csrf_ok(session, _str(form.get("csrf"))):
                return self._refuse(request, 403, "missing or wrong CSRF token")
        return await handler(request)

    def _check_token(self, remote: str | None, given: str | None) -> float:
        """0 when `given` is the token; -1 when it is wrong; else seconds `remote` must wait.

        Synchronous, so concurrent guesses cannot all pass the wait.
        """
        if (wait := self.throttle.wait(remote)) > 0:
            self.throttled.add(remote or "")
            return wait
        if not auth.token_ok(self.token, given):
            self.throttle.failed(remote)
            self.failures.add(remote or "")
            return -1.0
        self.throttle.succeeded(remote)
        return 0.0

    @staticmethod
    def _same_origin(request: web.Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None:
            return True  # not a browser's cross-site form or fetch; the CSRF token decides
        return urlsplit(origin).netloc == request.host

    def _refuse(self, request: web.Request, status: int, why: str) -> web.Response:
        return web.Response(status=status, text=f"{status}: {why}\n", content_type="text/plain")

    def _too_many(self, request: web.Request, wait: float) -> web.Response:
        response = self._refuse(request, 429, "too many wrong tokens; try again later")
        response.headers["Retry-After"] = retry_after(wait)
        return response

    def render(
        self, request: web.Request, name: str, status: int = 200, **ctx: Any
    ) -> web.Response:
        session: auth.Session | None = request.get(SESSION)
        ctx.setdefault("operator", request.get(OPERATOR))
        ctx.setdefault("csrf", session.csrf if session is not None else "")
        ctx.setdefault("now", filters.utcnow())
        body = self.env.get_template(name).render(**ctx)
        return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")

    # -- signing in

    async def login_page(self, request: web.Request) -> web.StreamResponse:
        session = request.get(SESSION) or self.pending.anonymous()
        request[SESSION] = session
        response = self._login_form(request, 200, "")
        self._set_cookie(request, response, session)
        return response

    def _login_form(self, request: web.Request, status: int, error: str) -> web.Response:
        nxt = _local_path(request.query.get("next", "")) if request.method == "GET" else "/"
        return self.render(
            request,
            "login.html",
            status,
            operator=None,
            needs_token=bool(self.token),
            next=nxt,
            error=error,
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        session: auth.Session | None = request.get(SESSION)
        form = await _form(request)
        if not auth.csrf_ok(session, _str(form.get("csrf"))):
            return self._refuse(request, 403, "missing or wrong CSRF token; reload the page")
        assert session is not None
        operator = (_str(form.get("operator")) or "").strip()
        if not auth.valid_operator(operator):
            return self._login_form(request, 400, "Enter your name (letters, digits, . _ @ + -).")
        if self.token:
            if (wait := self._check_token(request.remote, _str(form.get("token")))) > 0:
                seconds = retry_after(wait)
                response = self._login_form(
                    request, 429, f"Too many wrong tokens: try again in {seconds} s."
                )
                response.headers["Retry-After"] = seconds
                return response
            if wait < 0:
                return self._login_form(request, 401, "Wrong token.")
        self.pending.drop(session)
        new = self.sessions.sign_in(session, operator)
        log.info("console: %s signed in from %s", operator, request.remote)
        response = web.HTTPSeeOther(_local_path(_str(form.get("next")) or "/"))
        self._set_cookie(request, response, new)
        raise response

    async def logout(self, request: web.Request) -> web.StreamResponse:
        session: auth.Session | None = request.get(SESSION)
        form = await _form(request)
        if session is not None and auth.csrf_ok(session, _str(form.get("csrf"))):
            self.sessions.drop(session)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(auth.COOKIE, path="/")
        raise response

    @staticmethod
    def _set_cookie(request: web.Request, response: web.StreamResponse, s: auth.Session) -> None:
        response.set_cookie(
            auth.COOKIE,
            s.id,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            max_age=int(auth.SESSION_TTL),
        )

    # -- pages

    async def overview(self, request: web.Request) -> web.StreamResponse:
        now = filters.utcnow()
        stats = await self.db.stats(now)
        jobs = await self.db.jobs(15)
        reasons, pivot = forms.pivot(stats)
        return self.render(
            request,
            "overview.html",
            now=now,
            stats=stats,
            reasons=reasons,
            pivot=pivot,
            bars=forms.chart(stats),
            chart_w=forms.CHART_W,
            jobs=jobs,
            running=[j for j in jobs if j.state in ("running", "paused")],
            tenant_link=lambda t, r=None: (
                "/list?" + urlencode([("tenant", t)] + ([("reason", r)] if r else []))
            ),
        )

    async def list_page(self, request: web.Request) -> web.StreamResponse:
        now = filters.utcnow()
        q = forms.parse(_multi(request.query), now)
        rows = await self.db.list_rows(q.filter, q.limit, q.after)
        # Bounded: an exact count of a broad filter on a big table takes seconds;
        # the bulk replay page counts exactly before anything is published.
        total = await self.db.count(q.filter, cap=COUNT_CAP)
        more = q.link(after=rows[-1].id, limit=q.limit) if len(rows) == q.limit else None
        return self.render(
            request,
            "list.html",
            now=now,
            q=q,
            rows=rows,
            total=total,
            capped=total >= COUNT_CAP,
            more=more,
            first=q.link() if q.after is not None else None,
            reasons_all=filters.REASONS,
        )

    async def detail(self, request: web.Request) -> web.StreamResponse:
        row_id = int(request.match_info["id"])
        d = await self.db.get(row_id)
        if d is None:
            raise web.HTTPNotFound(text="no such exhausted event\n")
        history = await self.db.history(row_id)
        chain = await self.db.chain(row_id)
        kind, text = forms.payload(d)
        return self.render(
            request,
            "detail.html",
            d=d,
            r=d.row,
            history=history,
            chain=chain,
            payload_kind=kind,
            payload=text,
            envelope=forms.envelope(d),
            flash=FLASH.get(request.query.get("done", "")),
        )

    # -- actions on one row

    async def act(self, request: web.Request) -> web.StreamResponse:
        row_id = int(request.match_info["id"])
        action = request.match_info["action"]
        form = await _form(request)
        note = (_str(form.get("note")) or "").strip() or None
        if action in ("resolve", "annotate") and note is None:
            message = f"{action.capitalize()} needs a note."
            return self.render(request, "error.html", 400, title="Note required", message=message)
        if note is not None:
            note = filters.parse_note(note)
        f = Filter(ids=(row_id,), state="all")
        n = await self.db.act(action, f, request[OPERATOR], note)  # type: ignore[arg-type]
        log.info("console: %s of %d by %s (%d rows)", action, row_id, request[OPERATOR], n)
        done = {"resolve": "resolved", "unresolve": "unresolved", "annotate": "annotated"}[action]
        raise web.HTTPSeeOther(f"/events/{row_id}?done={done}")

    async def replay_one(self, request: web.Request) -> web.StreamResponse:
        row_id = int(request.match_info["id"])
        form = await _form(request)
        job = await self._start_job(
            Filter(ids=(row_id,), state="all"),
            request[OPERATOR],
            target=_target(form),
            resolve=_checked(form, "resolve"),
            include_resolved=_checked(form, "include_resolved"),
            rate=None,
            max_rows=None,
            note=_note(form),
        )
        task = self.running.get(job.id, (None, None))[1]
        if task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), SINGLE_WAIT)
        final = await self.db.job(job.id)
        if final is not None and final.state == "done" and final.published == 1:
            raise web.HTTPSeeOther(f"/events/{row_id}?done=replayed")
        raise web.HTTPSeeOther(f"/jobs/{job.id}")

    # -- bulk replay

    async def bulk_page(self, request: web.Request) -> web.StreamResponse:
        now = filters.utcnow()
        q = forms.parse(_multi(request.query), now)
        total = await self.db.count(q.filter)
        sample = await self.db.list_rows(q.filter, 10)
        return self.render(
            request,
            "bulk.html",
            now=now,
            q=q,
            total=total,
            sample=sample,
            hidden=forms.frozen_values(q.filter),
            describe=q.filter.describe() or "no filter",
        )

    async def bulk_start(self, request: web.Request) -> web.StreamResponse:
        form = await _form(request)
        q = forms.parse(_multi(form), filters.utcnow())
        job = await self._start_job(
            q.filter,
            request[OPERATOR],
            target=_target(form),
            resolve=_checked(form, "resolve"),
            include_resolved=q.filter.state != "unresolved",
            rate=_positive(form, "rate", 100_000.0),
            max_rows=_int(_positive(form, "max", 10_000_000.0)),
            note=_note(form),
        )
        raise web.HTTPSeeOther(f"/jobs/{job.id}")

    # -- jobs

    async def _job(self, request: web.Request) -> Job:
        job = await self.db.job(int(request.match_info["id"]))
        if job is None:
            raise web.HTTPNotFound(text="no such job\n")
        return job

    def _progress(self, job: Job) -> dict[str, Any]:
        total = self.totals.get(job.id)
        if total is None and job.state in FINISHED:
            total = job.done
        engine = self.running.get(job.id, (None, None))[0]
        return {
            "id": job.id,
            "state": job.state,
            "published": job.published,
            "refused": job.refused,
            "failed": job.failed,
            "skipped": job.skipped,
            "uncertain": job.uncertain,
            "done": job.done + job.skipped,
            "total": total,
            "finished": job.state in FINISHED,
            "paused": engine.counts.paused if engine is not None else "",
        }

    async def job_page(self, request: web.Request) -> web.StreamResponse:
        job = await self._job(request)
        items = await self.db.job_items(job.id, "refused")
        return self.render(
            request,
            "job.html",
            job=job,
            p=self._progress(job),
            here=job.id in self.running,
            refused=items[:50],
            refused_more=max(0, len(items) - 50),
            describe=job.filter.describe() or "no filter",
            rows_link="/list?" + urlencode(forms.frozen_values(job.filter)),
        )

    async def job_json(self, request: web.Request) -> web.StreamResponse:
        job = await self._job(request)
        return web.json_response(self._progress(job))

    async def job_stop(self, request: web.Request) -> web.StreamResponse:
        job_id = int(request.match_info["id"])
        got = self.running.get(job_id)
        if got is not None:
            got[0].stop()
            log.info("console: job %d stopped by %s", job_id, request[OPERATOR])
        raise web.HTTPSeeOther(f"/jobs/{job_id}")

    async def _broker_conn(self) -> Broker:
        async with self._broker_lock:
            if self._broker is None:
                try:
                    self._broker = await Broker.connect(
                        self.nats_url, name="dlqproc-console", timeout=10.0
                    )
                except Exception as exc:
                    raise Unavailable(f"cannot connect to NATS: {exc}") from exc
            return self._broker

    async def _start_job(
        self,
        f: Filter,
        operator: str,
        *,
        target: Target,
        resolve: bool,
        include_resolved: bool,
        rate: float | None,
        max_rows: int | None,
        note: str | None,
    ) -> Job:
        broker = await self._broker_conn()
        total = await self.db.count(f if not include_resolved else _all_states(f))
        db = ExhaustedDB(self.dsn)
        try:
            job = await db.create_job(
                f,
                actor=operator,
                target=target,
                resolve=resolve,
                include_resolved=include_resolved,
                rate=rate,
                max_rows=max_rows,
                note=note,
            )
        except BaseException:
            await db.close()
            raise
        self.totals[job.id] = total if max_rows is None else min(total, max_rows)
        engine = Engine(db, broker, dlq_subject=self.dlq_subject)
        self.running[job.id] = (engine, asyncio.create_task(self._run(engine, db, job)))
        log.info(
            "console: replay job %d started by %s (%s), target %s",
            job.id,
            operator,
            f.describe() or "no filter",
            target,
        )
        return job

    async def _run(self, engine: Engine, db: ExhaustedDB, job: Job) -> None:
        try:
            final = await engine.run(job)
            log.info(
                "console: replay job %d %s: published %d, refused %d, failed %d, skipped %d",
                final.id,
                final.state,
                final.published,
                final.refused,
                final.failed,
                final.skipped,
            )
        except Exception as exc:
            log.error(
                "console: replay job %d ended: %s; continue it with"
                " `dlqproc exhausted replay --resume %d`",
                job.id,
                self.secrets.scrub(f"{type(exc).__name__}: {exc}"),
                job.id,
            )
        finally:
            await db.close()
            self.running.pop(job.id, None)


def _multi(values: MultiMapping[Any]) -> dict[str, list[str]]:
    """Every value of every name (a repeated name is kept, for `reason`)."""
    return {k: [v for v in values.getall(k) if isinstance(v, str)] for k in set(values.keys())}


def _all_states(f: Filter) -> Filter:
    return Filter(**{**_fields(f), "state": "all"})


def _fields(f: Filter) -> dict[str, Any]:
    return {name: getattr(f, name) for name in f.__struct_fields__}


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _checked(form: MultiDictProxy[Any], name: str) -> bool:
    return _str(form.get(name)) in ("1", "on", "yes")


def _target(form: MultiDictProxy[Any]) -> Target:
    return "dlq" if _str(form.get("target")) == "dlq" else "source"


def _note(form: MultiDictProxy[Any]) -> str | None:
    note = (_str(form.get("note")) or "").strip()
    return filters.parse_note(note) if note else None


def _positive(form: MultiDictProxy[Any], name: str, limit: float) -> float | None:
    text = (_str(form.get(name)) or "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise FilterError(f"{name}: not a number") from None
    if not 0 < value <= limit:
        raise FilterError(f"{name}: between 0 and {limit:g}")
    return value


def _int(value: float | None) -> int | None:
    return None if value is None else max(1, int(value))


def _local_path(path: str) -> str:
    """`path` if it stays on this console (an open redirect otherwise), else `/`."""
    if not path.startswith("/") or path.startswith("//") or "\\" in path:
        return "/"
    if any(ord(c) < 0x21 for c in path):
        return "/"
    return path


def when(dt: datetime | None) -> str:
    return dt.isoformat(timespec="seconds") if dt is not None else "-"


class BodyTimeout(Exception):
    """A form's body did not arrive within BODY_TIMEOUT."""


async def _form(request: web.Request) -> MultiDictProxy[str | bytes | Any]:
    try:
        async with asyncio.timeout(BODY_TIMEOUT):
            return await request.post()
    except TimeoutError:
        raise BodyTimeout from None
