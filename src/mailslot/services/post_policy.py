"""S3 browser-upload POST policies (AWS Signature V4), as the avatar form of digest §8.1 uses them.

The same signer writes the form (``PUT /v1/profile`` with an avatar UPDATE) and checks a multipart
POST on the built-in store: signature, credential, expiry, and every condition of the policy
(exact fields, ``starts-with``, ``content-length-range``). With the S3 backend it signs with the
bucket's credentials, so clients may POST to the bucket itself or to the built-in endpoint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

ALGORITHM = "AWS4-HMAC-SHA256"
_COVERED = ("key", "acl", "x-amz-credential", "x-amz-algorithm", "x-amz-date")


class PolicyRejected(Exception):
    pass


def _hmac(key: bytes, data: str) -> bytes:
    return hmac.new(key, data.encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class PolicySigner:
    bucket: str
    region: str
    access_key: str
    secret_key: str

    def _signature(self, day: str, policy_b64: str) -> str:
        key = _hmac(("AWS4" + self.secret_key).encode(), day)
        for part in (self.region, "s3", "aws4_request"):
            key = _hmac(key, part)
        return hmac.new(key, policy_b64.encode(), hashlib.sha256).hexdigest()

    def form(self, key: str, max_bytes: int, lifetime_seconds: int, now: datetime | None = None) -> dict[str, str]:
        now = now or datetime.now(UTC)
        date = now.strftime("%Y%m%dT%H%M%SZ")
        credential = f"{self.access_key}/{date[:8]}/{self.region}/s3/aws4_request"
        expiration = (now + timedelta(seconds=lifetime_seconds)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        policy = {
            "expiration": expiration,
            "conditions": [
                {"bucket": self.bucket},
                {"key": key},
                {"acl": "private"},
                ["starts-with", "$Content-Type", ""],
                ["content-length-range", 1, max_bytes],
                {"x-amz-credential": credential},
                {"x-amz-algorithm": ALGORITHM},
                {"x-amz-date": date},
            ],
        }
        policy_b64 = base64.b64encode(json.dumps(policy, separators=(",", ":")).encode()).decode()
        return {
            "key": key, "credential": credential, "acl": "private", "algorithm": ALGORITHM, "date": date,
            "policy": policy_b64, "signature": self._signature(date[:8], policy_b64),
        }

    def check(self, fields: dict[str, str], now: datetime | None = None) -> tuple[str, int, int]:
        """Verify a POST's fields; returns (key, min size, max size) for the file that follows."""
        now = now or datetime.now(UTC)
        policy_b64 = fields.get("policy", "")
        signature = fields.get("x-amz-signature", "")
        credential = fields.get("x-amz-credential", "")
        date = fields.get("x-amz-date", "")
        parts = credential.split("/")
        if (fields.get("x-amz-algorithm") != ALGORITHM or len(parts) != 5 or parts[0] != self.access_key
                or parts[2] != self.region or parts[3:] != ["s3", "aws4_request"] or parts[1] != date[:8]):
            raise PolicyRejected("bad credential")
        if not hmac.compare_digest(self._signature(parts[1], policy_b64).encode(), signature.encode()):
            raise PolicyRejected("bad signature")
        try:
            policy: dict[str, Any] = json.loads(base64.b64decode(policy_b64, validate=True))
            expiration = datetime.strptime(str(policy["expiration"]), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            conditions = list(policy["conditions"])
        except (binascii.Error, ValueError, KeyError, TypeError) as exc:
            raise PolicyRejected("malformed policy") from exc
        if expiration <= now:
            raise PolicyRejected("policy expired")
        low, high = 0, -1
        covered: set[str] = set()
        values = {**{k.lower(): v for k, v in fields.items()}, "bucket": self.bucket}
        for condition in conditions:
            if isinstance(condition, dict) and len(condition) == 1:
                name, expected = next(iter(condition.items()))
                self._expect(values.get(name.lower()) == expected, name)
                covered.add(name.lower())
            elif isinstance(condition, list) and len(condition) == 3 and condition[0] == "content-length-range":
                low, high = int(condition[1]), int(condition[2])
            elif isinstance(condition, list) and len(condition) == 3 and condition[0] in ("eq", "starts-with"):
                name = str(condition[1]).lstrip("$").lower()
                value = values.get(name, "")
                ok = value == condition[2] if condition[0] == "eq" else value.startswith(str(condition[2]))
                self._expect(ok, name)
                covered.add(name)
            else:
                raise PolicyRejected("unknown condition")
        for name in _COVERED:
            self._expect(name in covered and name in values, name)
        if high < 0:
            raise PolicyRejected("the policy sets no content-length-range")
        return fields["key"], low, high

    @staticmethod
    def _expect(ok: bool, name: str) -> None:
        if not ok:
            raise PolicyRejected(f"{name} does not match the policy")
