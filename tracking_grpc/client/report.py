"""What happened to a replay's or a simulation's fixes, per device and in total."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

from tracking_grpc.client.session import SessionStats

MAX_FAILURES_LISTED = 10


@dataclass(slots=True)
class ReplayReport:
    """Per-device outcome of a replay and its totals."""

    fixes: int
    offset_ms: int
    devices: int = 0
    elapsed_s: float = 0.0
    sessions: list[SessionStats] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(getattr(stats, name) for stats in self.sessions)

    def rejected(self) -> collections.Counter[str]:
        counts: collections.Counter[str] = collections.Counter()
        for stats in self.sessions:
            counts.update(stats.rejected)
        return counts

    def failed(self) -> list[SessionStats]:
        return [s for s in self.sessions if s.error or s.settled < s.sent]

    def all_rejected(self) -> bool:
        """Fixes were sent and the server turned every one away: none is stored,
        now or before."""
        kept = self.total("stored") + self.total("duplicates")
        kept += self.total("stored_before_ack")
        return self.total("sent") > 0 and kept == 0 and bool(self.rejected())

    def exit_code(self) -> int:
        """1 when a device failed or when every fix sent was rejected, else 0."""
        return 1 if self.failed() or self.all_rejected() else 0

    def summary(self, title: str) -> str:
        rate = self.total("sent") / self.elapsed_s if self.elapsed_s > 0 else 0.0
        devices = self.devices or len(self.sessions)
        lines = [
            f"{title}: {devices} devices, {self.fixes} fixes in the trace, "
            f"{self.total('sent')} sent in {self.elapsed_s:.1f} s ({rate:.0f} fixes/s)",
            "  ".join(
                f"{label} {self.total(attr)}"
                for label, attr in (
                    ("sent", "sent"),
                    ("stored", "stored"),
                    ("duplicates", "duplicates"),
                    ("stored-before-ack", "stored_before_ack"),
                    ("resent", "resent"),
                    ("reconnects", "reconnects"),
                )
            )
            + f"  rejected {sum(self.rejected().values())}",
        ]
        for reason, count in sorted(self.rejected().items()):
            lines.append(f"  rejected {reason}: {count}")
        if self.rejected().get("REJECT_REASON_ANCIENT_TIME", 0) > self.fixes // 2:
            lines.append(
                "  hint: most fixes were older than the server accepts; cap long "
                "pauses with --max-gap-s, or start the server with --max-fix-age-s 0"
            )
        if self.all_rejected():
            lines.append(
                "  FAILED: the server rejected every fix sent and stored none "
                "(the reasons above)"
            )
        failed = self.failed()
        for stats in failed[:MAX_FAILURES_LISTED]:
            lines.append(f"  FAILED {stats.device}: {stats.error or 'fixes unsettled'}")
        if len(failed) > MAX_FAILURES_LISTED:
            lines.append(f"  ... and {len(failed) - MAX_FAILURES_LISTED} more devices")
        return "\n".join(lines)
