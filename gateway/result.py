"""What the gateway answers for one event, and how the idempotency window remembers it."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from seqguard.explain import Reason

OK, DEGRADED = "OK", "DEGRADED"
MAX_REASONS = 3              # reason codes per answer, strongest first (README, "The gRPC API")


@dataclass
class ScoreResult:
    event_id: str
    risk: float
    action: str
    model_version: str
    status: str = OK
    detail: str = ""
    reasons: list[Reason] = field(default_factory=list)
    sequence: int = 0            # position in the global order events were applied (0: not applied)
    rules: list[str] = field(default_factory=list)   # names of the rules that fired (settings.rules_path)

    def to_json(self) -> str:
        """What the idempotency window remembers ("seq":0 is filled in by the atomic write). The
        reasons' event ids are left out: no raw caller identifier is stored in Redis in the clear
        (the ring, which names them, is sealed: gateway/codec.py RingCipher)."""
        d = {"risk": self.risk, "action": self.action, "model_version": self.model_version,
             "reasons": [[r.code, r.message, r.weight, []] for r in self.reasons],
             "status": self.status, "seq": 0}
        if self.rules:
            d["rules"] = self.rules
        return json.dumps(d, separators=(",", ":"))

    @classmethod
    def from_json(cls, event_id: str, d: dict) -> "ScoreResult":
        return cls(event_id, d["risk"], d["action"], d["model_version"], d["status"],
                   "duplicate event_id: original result", [Reason(*r) for r in d["reasons"]], d["seq"],
                   list(d.get("rules", ())))
