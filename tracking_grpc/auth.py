"""Who is calling: tenant, subject and role, from a JWT bearer token or the default.

Authentication is off by default: every call is an admin of the default tenant. With
``auth_mode = "jwt"`` every call needs one ``authorization: Bearer <token>`` header
(several are refused: which one a proxy would pass on is unknown), a JWT signed
with HS256 (shared secret) or RS256 (public key) whose claims carry ``tenant``,
``sub`` and ``role`` (``device``, ``viewer`` or ``admin``). A device token may publish
only its own device id (its ``sub``).

A caller may be limited to coarse positions (:mod:`tracking_grpc.core.precision`):
the token's ``precision_m`` claim, a number of metres (0: exact), or, without one,
the ``default_precision_m`` setting, which is also every caller's when auth is off.

Time claims are checked here, not by the JWT library (which lets ``exp`` of 1e30
through, and fails with an overflow on a huge integer): ``exp`` must be a finite
number no further ahead than ``max_token_lifetime_s``; ``iat`` and ``nbf``, when
present, finite numbers not in the future (``CLOCK_SKEW_S`` allowed for the issuer's
clock), and ``exp - iat`` within the maximum lifetime too.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import reprlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import jwt

from tracking_grpc.config import Settings
from tracking_grpc.core.precision import MAX_PRECISION_M, MIN_PRECISION_M
from tracking_grpc.errors import FailedPrecondition, PermissionDenied, Unauthenticated
from tracking_grpc.observability import logs

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_TENANT_LENGTH = 256
EXPIRED = "token expired during the stream; reconnect with a new one"
PRECISION_CLAIM = "precision_m"
CLOCK_SKEW_S = 60.0  # how far the issuer's clock may run ahead of ours


class Role(enum.IntEnum):
    """Roles in increasing power: each may do what the ones below it may."""

    DEVICE = 1
    VIEWER = 2
    ADMIN = 3


@dataclass(frozen=True, slots=True)
class Caller:
    tenant: str
    subject: str
    role: Role
    expires_at: float | None = None  # the token's exp, Unix seconds
    precision_m: float = 0.0  # positions it reads are snapped to this grid; 0: exact

    def check_not_expired(self) -> None:
        """A stream outliving its token is ended: the device must re-authenticate."""
        if self.expires_at is not None and time.time() >= self.expires_at:
            raise Unauthenticated(EXPIRED)

    async def before_expiry(self, waiting: Awaitable[T]) -> T:
        """What ``waiting`` gives, or UNAUTHENTICATED once the token expires: a
        watch ends at expiry by a timer, even when nothing arrives meanwhile."""
        if self.expires_at is None:
            return await waiting
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.expires_at - time.time())
        try:
            async with asyncio.timeout_at(deadline) as timer:
                result = await waiting
        except TimeoutError:
            if timer.expired():
                raise Unauthenticated(EXPIRED) from None
            raise
        self.check_not_expired()  # what was ready at once still goes out in time
        return result

    def require_writer(self) -> None:
        """Publishing fixes is for devices (their own) and admins, not viewers."""
        if self.role == Role.VIEWER:
            raise PermissionDenied(
                "role viewer may read and watch but not publish fixes"
            )

    def require(self, role: Role) -> None:
        """Raise PERMISSION_DENIED unless the caller has at least ``role``."""
        if self.role == Role.DEVICE and role != Role.DEVICE:
            raise PermissionDenied(f"role {self.role.name.lower()} may not do this")
        if self.role < role:
            raise PermissionDenied(
                f"role {self.role.name.lower()} may not do this "
                f"(needs {role.name.lower()})"
            )

    def require_device(self, device_id: str) -> None:
        """A device token may only speak for its own device."""
        if self.role == Role.DEVICE and device_id != self.subject:
            raise PermissionDenied(
                f"device token for {self.subject!r} may not publish for {device_id!r}"
            )


class Authenticator:
    """Turns a call's metadata into a :class:`Caller`."""

    def __init__(self, settings: Settings) -> None:
        self.mode = settings.auth_mode
        self.default_precision_m = settings.default_precision_m
        self.default = Caller(
            settings.default_tenant,
            "anonymous",
            Role.ADMIN,
            precision_m=settings.default_precision_m,
        )
        self.audience = settings.jwt_audience or None
        self.max_lifetime_s = settings.max_token_lifetime_s
        self._keys: list[tuple[str, str | bytes]] = []
        if self.mode not in {"off", "jwt"}:
            raise FailedPrecondition(f"auth_mode must be off or jwt, not {self.mode!r}")
        if self.mode == "jwt":
            if settings.jwt_hs256_secret:
                self._keys.append(("HS256", settings.jwt_hs256_secret))
            if settings.jwt_rs256_public_key_file:
                pem = Path(settings.jwt_rs256_public_key_file).read_bytes()
                self._keys.append(("RS256", pem))
            if not self._keys:
                raise FailedPrecondition(
                    "auth_mode jwt needs jwt_hs256_secret or jwt_rs256_public_key_file"
                )

    def caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """The call's caller; its tenant goes on every log line of the call."""
        caller = self._caller(context)
        logs.bind(tenant=caller.tenant)
        return caller

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        if self.mode == "off":
            return self.default
        headers = [
            value
            for key, value in context.invocation_metadata() or ()
            if key == "authorization"
        ]
        if len(headers) > 1:
            # Which one would count is up to the proxies on the way: refuse them all.
            raise Unauthenticated("more than one authorization header")
        header = headers[0] if headers else ""
        if not isinstance(header, str) or not header.lower().startswith("bearer "):
            raise Unauthenticated("missing bearer token in the authorization header")
        return self.verify(header[7:].strip())

    def verify(self, token: str) -> Caller:
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"malformed token: {exc}") from exc
        key = next((k for alg, k in self._keys if alg == algorithm), None)
        if key is None or algorithm is None:
            raise Unauthenticated(f"token algorithm {algorithm!r} is not accepted")
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                options={
                    "require": ["sub", "exp"],
                    "verify_aud": bool(self.audience),
                    # checked by check_times, which bounds them
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.PyJWTError as exc:
            raise Unauthenticated(f"token rejected: {exc}") from exc
        expires_at = check_times(claims, time.time(), self.max_lifetime_s)
        tenant = _text(claims, "tenant")
        role_name = (_text(claims, "role") or "").upper()
        if not tenant:
            raise Unauthenticated("token has no tenant claim")
        if len(tenant) > MAX_TENANT_LENGTH or not tenant.isprintable():
            # Stores keep tenants as text: a NUL cannot go into PostgreSQL.
            raise Unauthenticated(
                f"token tenant must be printable and at most {MAX_TENANT_LENGTH} "
                "characters"
            )
        if role_name not in Role.__members__:
            raise Unauthenticated("token role must be device, viewer or admin")
        subject = _text(claims, "sub")
        if not subject or not subject.strip():
            # A device token's sub is the one device it may publish for.
            raise Unauthenticated("token sub must be a non-blank string")
        precision_m = _precision(claims, self.default_precision_m)
        return Caller(tenant, subject, Role[role_name], expires_at, precision_m)


def check_times(claims: dict, now: float, max_lifetime_s: float) -> float:
    """The token's ``exp`` once its time claims are sane at ``now``; otherwise
    UNAUTHENTICATED naming the claim.

    >>> check_times({"exp": 1_060.0, "iat": 1_000}, 1_000.0, 3_600.0)
    1060.0
    """
    exp = _seconds(claims, "exp")
    iat = _seconds(claims, "iat")
    nbf = _seconds(claims, "nbf")
    if exp is None:
        raise Unauthenticated("token has no exp claim")
    if now >= exp:
        raise Unauthenticated("token expired")
    if exp - now > max_lifetime_s + CLOCK_SKEW_S:
        raise Unauthenticated(
            "token exp is further ahead than max_token_lifetime_s "
            f"({max_lifetime_s:g} s)"
        )
    if iat is not None and iat > now + CLOCK_SKEW_S:
        raise Unauthenticated("token iat (issued at) is in the future")
    if iat is not None and exp - iat > max_lifetime_s:
        raise Unauthenticated(
            "token was issued for longer (exp - iat) than max_token_lifetime_s "
            f"({max_lifetime_s:g} s)"
        )
    if nbf is not None and nbf > now + CLOCK_SKEW_S:
        raise Unauthenticated("token is not valid yet (nbf is in the future)")
    return exp


def _precision(claims: dict, default_m: float) -> float:
    """The token's ``precision_m`` claim (0, or metres in [MIN_PRECISION_M,
    MAX_PRECISION_M]), or the server's default when the token has none;
    UNAUTHENTICATED otherwise."""
    metres = _number(claims, PRECISION_CLAIM, "metres")
    if metres is None:
        return default_m
    if metres != 0 and not MIN_PRECISION_M <= metres <= MAX_PRECISION_M:
        raise Unauthenticated(
            f"token {PRECISION_CLAIM} must be 0 (exact) or a number of metres from "
            f"{MIN_PRECISION_M:g} to {MAX_PRECISION_M:.0f}, "
            f"not {reprlib.repr(claims[PRECISION_CLAIM])}"
        )
    return metres


def _text(claims: dict, name: str) -> str | None:
    """A claim that must be a JSON string, or None when the token has none;
    UNAUTHENTICATED naming the claim when it is of another type."""
    value = claims.get(name)
    if value is None or isinstance(value, str):
        return value
    raise Unauthenticated(
        f"token {name} claim must be a string, not {reprlib.repr(value)}"
    )


def _number(claims: dict, name: str, unit: str) -> float | None:
    """A claim that must be a JSON number, as a float (an integer beyond any float
    is infinite), or None when the token has none; UNAUTHENTICATED otherwise."""
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Unauthenticated(f"token {name} must be a number of {unit}")
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _seconds(claims: dict, name: str) -> float | None:
    """A time claim as seconds since the epoch: a finite JSON number, or None."""
    seconds = _number(claims, name, "seconds")
    if seconds is None:
        return None
    if not math.isfinite(seconds):
        raise Unauthenticated(f"token {name} must be a finite number of seconds")
    return seconds
