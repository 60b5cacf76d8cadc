"""Gateway configuration: one settings object, from defaults < a JSON file < environment variables.

Every field can be set as SEQGUARD_<FIELD_NAME_UPPER> (e.g. SEQGUARD_REDIS_PORT=6380), or in a
JSON file named by SEQGUARD_CONFIG. The pseudonymisation key never lives in the repo: it comes
from SEQGUARD_PSEUDONYM_KEY or the file named by SEQGUARD_PSEUDONYM_KEY_FILE.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class Settings:
    model_dir: str = "runs/model"
    host: str = "127.0.0.1"
    port: int = 50051
    # Redis: per-user state (h, c, featuriser context, recent-event ring) and entity contexts
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    redis_db: int = 0
    redis_username: str = ""
    redis_password: str = ""
    redis_password_file: str = ""       # the password read from this file at load (a mounted Secret), not env
    redis_cluster: bool = False         # cluster-mode Redis: keys tagged "{sg}:" (one slot, see gateway/state.py)
    redis_timeout_ms: int = 50          # per command; an outage is detected within this
    state_ttl_s: int = 30 * 86400       # idle users / entities expire
    recent_events: int = 8              # ring of recent events per user (reason event ids, audit); 1..255
    rebuild_steps: int = 3              # newest ring events that keep their feature row, replayed to rebuild
                                        # h, c after a model version change; 0..recent_events (~70 B each)
    dedupe_ttl_s: int = 600             # a re-sent event_id within this window gets its original answer
    # Alerts: every applied REVIEW / CHALLENGE / BLOCK decision (and every rule hit) is appended to the
    # <prefix>alerts stream in the same atomic write as the state (gateway/alerts.py: format, webhook sink).
    # Approximate cap on the stream: the sink acknowledges, it does not delete.
    alerts_stream_max: int = 1_000_000
    # Alerts carry pseudonymised ids only; opt in to add the caller's raw user id (user_raw) where the
    # receiving system needs it and may hold it
    alerts_include_raw_ids: bool = False
    # Triton: the step encoder
    triton_url: str = "127.0.0.1:8001"
    triton_model: str = "seqguard_encoder"
    triton_model_version: str = ""      # "" = the artifact's metadata triton.model_version (always explicit)
    # per Triton step request of one row: an outage is detected within this. A wave of many rows (a
    # bulk batch's) gets this much per 64 rows, never past its request's deadline (gateway/triton_client.py)
    triton_timeout_ms: int = 100
    # "triton" (the serving path) or "local": the artifact's model.onnx on ONNX Runtime in the gateway
    # process, for CPU-only nodes. Both give the same bits (gateway/local_encoder.py).
    encoder: str = "triton"
    # with encoder "triton": score with the local model while Triton is unavailable instead of answering
    # DEGRADED and deferring steps; Triton is probed again every local_encoder_retry_ms
    local_encoder_fallback: bool = True
    local_encoder_retry_ms: int = 1000
    # Requests
    deadline_ms: int = 250              # server-side budget per Score (the client's deadline caps it)
    # server-side budget per ScoreBatch request and per Ingest chunk of 256 events (the client's deadline
    # caps it): bulk work grows with its events, and a bulk answer past deadline_ms would say DEGRADED
    # about events it applied. Online and bulk requests never share a batch (gateway/coalescer.py)
    bulk_deadline_ms: int = 5000
    fallback: str = "fail_open"         # fail_open: ALLOW, fail_closed: CHALLENGE, when degraded
    max_batch_events: int = 1000        # ScoreBatch limit
    max_message_bytes: int = 4 * 1024 * 1024
    # Clock skew accepted for live events, relative to the gateway's clock: an event "from the future"
    # would pin its device's and IP's last-seen time and stop their decaying counters for every user on
    # them. The past is not bounded by default (replays and late events are legitimate); Ingest (backfill)
    # is exempt from the past bound. 0 = no bound.
    max_future_skew_ms: int = 24 * 3600 * 1000
    max_past_skew_ms: int = 0
    max_in_flight: int = 2048           # queued + running events; beyond -> RESOURCE_EXHAUSTED
    # Coalescing: concurrent calls share one Redis round trip and one Triton request
    coalesce_max_events: int = 256
    coalesce_max_wait_us: int = 0       # 0 = adaptive: take whatever queued while the last batch ran
    # batches in flight at once (only ones sharing no user/entity/event id). 1 here: where the gateway
    # shares its cores with Redis and Triton a second batch splits the queue into smaller batches that
    # cost more CPU per request (BENCHMARKS.md); raise it where Redis and Triton are on other hosts and
    # the gateway mostly waits on them
    coalesce_max_concurrent: int = 1
    # Operations: Prometheus /metrics (0 = off; host "" = same as `host`) and hot model reload
    metrics_port: int = 0
    metrics_host: str = ""
    model_poll_s: float = 0.0           # check model_dir (e.g. an artifacts/current symlink) this often; 0 = SIGHUP only
    model_ready_timeout_s: float = 30.0  # a new model's Triton version must answer within this, else keep the old
    # Rules beside the model (seqguard/rules.py; configs/rules/default.toml is the shipped pack): evaluated
    # on every model-scored event after the detector, the answer's action never below the model's and the
    # names that fired in ScoreResponse.rules. "" = no rules. A file that does not load stops the start; a
    # later bad edit is rejected and the running rules stay (gateway/reload.py RulesReloader)
    rules_path: str = ""
    rules_poll_s: float = 0.0           # check rules_path for edits this often; 0 = SIGHUP only
    # freeze the heap once serving (gc.freeze, gateway/server.py freeze_heap): a full garbage collection
    # then skips the model and modules instead of stalling every request in flight; off only where the
    # gateway is embedded in a process that must still collect its own cycles (the test suite)
    gc_freeze: bool = True
    # Shadow mode: also score every applied event with a candidate artifact (never changes the answer);
    # results go to the sg:shadow stream and seqguard_shadow_risk_diff. "" = off
    shadow_model_dir: str = ""
    shadow_stream_max: int = 1_000_000  # approximate cap on sg:shadow
    shadow_queue_events: int = 20_000   # events waiting for the shadow worker; beyond -> dropped (counted)
    # Feedback: ReportOutcome labels (sg:o:<hmac(event_id)>) and the sg:outcomes export stream
    outcome_ttl_s: int = 180 * 86400    # chargebacks arrive weeks later; keep labels ~6 months
    outcome_stream_max: int = 5_000_000  # approximate cap on the stream (export it before it wraps)
    # Security: bearer-token auth (empty = off) and TLS (optional mTLS with a client CA). Two roles: a
    # scoring token may call Score, ScoreBatch, Ingest, GetUserState and reflection; only an admin token
    # may also write labels and holds (ReportOutcome, SetHold, ReleaseHold, ListHolds), so a compromised
    # scoring client cannot poison the labels retraining learns from. With auth on and no admin token
    # configured, those RPCs are refused (PERMISSION_DENIED).
    auth_token: str = ""
    auth_token_file: str = ""
    admin_token: str = ""
    admin_token_file: str = ""
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # plaintext grpc.health.v1 ONLY (no other service) on this port, for kubelet gRPC probes, which
    # cannot speak TLS; 0 = off (health is always on the main port too). Binds `host`.
    health_port: int = 0
    # Privacy: keyed hashing of user ids (and devices / IPs) in keys and logs
    pseudonym_key: str = ""
    pseudonym_key_file: str = ""

    @classmethod
    def load(cls, **overrides) -> "Settings":
        s = cls()
        path = os.environ.get("SEQGUARD_CONFIG")
        if path:
            with open(path) as f:
                s = s._merged(json.load(f), f"config file {path}")
        env = {f.name: os.environ[f"SEQGUARD_{f.name.upper()}"] for f in fields(cls)
               if f"SEQGUARD_{f.name.upper()}" in os.environ}
        s = s._merged(env, "environment")
        s = s._merged({k: v for k, v in overrides.items() if v is not None}, "arguments")
        if s.redis_password_file:
            if s.redis_password:
                raise ValueError("set redis_password or redis_password_file, not both")
            with open(s.redis_password_file) as f:
                s = replace(s, redis_password=f.read().strip())
            if not s.redis_password:
                raise ValueError(f"{s.redis_password_file}: empty Redis password file")
        s.validate()
        return s

    def _merged(self, values: dict, source: str) -> "Settings":
        known = {f.name: f for f in fields(self)}
        out = {}
        for k, v in values.items():
            if k not in known:
                raise ValueError(f"{source}: unknown setting {k!r}")
            typ = type(getattr(self, k))
            try:
                out[k] = typ(v) if typ is not bool else str(v).lower() in ("1", "true", "yes")
            except (TypeError, ValueError):
                raise ValueError(f"{source}: setting {k!r} must be {typ.__name__}, got {v!r}") from None
        return replace(self, **out)

    def validate(self) -> None:
        if self.encoder not in ("triton", "local"):
            raise ValueError(f"encoder must be triton or local, got {self.encoder!r}")
        if self.fallback not in ("fail_open", "fail_closed"):
            raise ValueError(f"fallback must be fail_open or fail_closed, got {self.fallback!r}")
        if self.max_future_skew_ms < 0 or self.max_past_skew_ms < 0:
            raise ValueError("max_future_skew_ms and max_past_skew_ms must be >= 0 (0 = no bound)")
        for name in ("deadline_ms", "bulk_deadline_ms", "redis_timeout_ms", "triton_timeout_ms", "max_batch_events",
                     "max_in_flight", "coalesce_max_events", "coalesce_max_concurrent"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if not 1 <= self.recent_events <= 255:      # the ring's entry count is one byte (gateway/state.py)
            raise ValueError(f"recent_events must be in 1..255, got {self.recent_events}")
        if not 0 <= self.rebuild_steps <= self.recent_events:
            raise ValueError(f"rebuild_steps must be in 0..recent_events ({self.recent_events}), "
                             f"got {self.rebuild_steps}")
        if not 0 <= self.health_port < 65536 or (self.health_port and self.health_port == self.port):
            raise ValueError(f"health_port must be 0 (off) or a TCP port other than port, got {self.health_port}")
        if not 0 <= self.metrics_port < 65536:
            raise ValueError(f"metrics_port must be 0 (off) or a TCP port, got {self.metrics_port}")
        if self.shadow_stream_max <= 0 or self.shadow_queue_events <= 0:
            raise ValueError("shadow_stream_max and shadow_queue_events must be > 0")
        if self.model_poll_s < 0 or self.model_ready_timeout_s <= 0:
            raise ValueError("model_poll_s must be >= 0 and model_ready_timeout_s > 0")
        if self.rules_poll_s < 0:
            raise ValueError("rules_poll_s must be >= 0 (0 = SIGHUP only)")

    def auth_tokens(self) -> list[bytes]:
        """Accepted scoring bearer tokens (one per line in the file); no tokens at all = auth disabled."""
        return _tokens(self.auth_token, self.auth_token_file)

    def admin_tokens(self) -> list[bytes]:
        """Bearer tokens of the admin role (labels and holds; they may score too)."""
        return _tokens(self.admin_token, self.admin_token_file)

    def key_bytes(self) -> bytes:
        """The pseudonymisation key; a missing key is an error, not a silent default."""
        if self.pseudonym_key:
            return self.pseudonym_key.encode()
        if self.pseudonym_key_file:
            with open(self.pseudonym_key_file, "rb") as f:
                key = f.read().strip()
            if len(key) < 16:
                raise ValueError(f"{self.pseudonym_key_file}: pseudonymisation key must be >= 16 bytes")
            return key
        raise ValueError("no pseudonymisation key: set SEQGUARD_PSEUDONYM_KEY or SEQGUARD_PSEUDONYM_KEY_FILE "
                         "(`seqguard up` creates a key file in its run directory)")


def _tokens(inline: str, path: str) -> list[bytes]:
    tokens = [inline.encode()] if inline else []
    if path:
        with open(path, "rb") as f:
            tokens += [t.strip() for t in f if t.strip()]
    return tokens
