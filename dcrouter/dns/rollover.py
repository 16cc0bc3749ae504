"""The timeline of a zone's DNSSEC keys: what is published, what signs, what the parent
should hold, and when that changes (RFC 6781, RFC 7583, RFC 7344).

The timeline is data (:class:`KeyTimes` per key, absolute Unix times) and
these functions are pure: given the keys, the policy and ``now`` they say
what each key does and create the successors that are due, so every worker
process agrees and a test drives the whole life of a zone with a fake clock.

**ZSK rollover by pre-publication** (RFC 7583 3.2.1)::

    publish new ZSK ----Ipub----> new signs, old stops ----Iret----> old removed
    Ipub = DNSKEY TTL + propagation delay      Iret = largest TTL in the zone + delay

so a validator always holds a DNSKEY set with the key of any signature it
has cached.

**KSK rollover, double-KSK with CDS** (RFC 7583 3.3.2, RFC 7344/8078)::

    publish new KSK (it signs the DNSKEY set too)
      --Ipub--> CDS/CDNSKEY and `dcrouterctl dns ds` name the new key ("active")
      --the parent serves its DS ("ds_seen": parent_servers, a served parent,
        or the operator's `--submitted`)--
      --parent DS TTL + delay--> old KSK removed

The old KSK stays published and signing until the new DS has been seen and
the old one can have left every cache, so the zone validates from either DS
throughout; without a confirmation it simply stays (harmless).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

ZSK = "zsk"
KSK = "ksk"


@dataclasses.dataclass
class KeyTimes:
    """The timeline of one key (Unix times; None: not planned yet)."""

    tag: int
    role: str                       # "ksk" or "zsk"
    algorithm: int
    created: float
    publish: float                  # DNSKEY appears
    active: float                   # ZSK: signs the zone; KSK: the key the parent should have
    retire: Optional[float] = None  # ZSK: stops signing
    remove: Optional[float] = None  # DNSKEY goes (KSK: also stops signing)
    ds_seen: Optional[float] = None  # KSK: the parent served its DS from then

    def as_dict(self) -> dict[str, Any]:
        """For keys.json."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KeyTimes":
        """From keys.json."""
        def opt(key: str) -> Optional[float]:
            value = data.get(key)
            return None if value is None else float(value)
        role = str(data["role"])
        if role not in (ZSK, KSK):
            raise ValueError(f"unknown key role {role!r}")
        return cls(int(data["tag"]), role, int(data["algorithm"]), float(data["created"]),
                   float(data["publish"]), float(data["active"]), opt("retire"),
                   opt("remove"), opt("ds_seen"))


@dataclasses.dataclass(frozen=True)
class RolloverPolicy:
    """The intervals a zone's rollovers use (seconds)."""

    algorithm: int
    zsk_lifetime: int
    ksk_lifetime: int
    dnskey_ttl: int
    propagation_delay: int
    parent_ds_ttl: int
    #: The largest TTL of the zone's records (signatures live in caches that long).
    max_ttl: int

    @property
    def publish_interval(self) -> int:
        """Ipub: a new DNSKEY is in every cache after this long."""
        return self.dnskey_ttl + self.propagation_delay

    @property
    def retire_interval(self) -> int:
        """Iret: signatures of a retired ZSK have left every cache after this long."""
        return self.max_ttl + self.propagation_delay

    @property
    def ds_interval(self) -> int:
        """After the parent serves a new DS, the old one has left every cache after this."""
        return self.parent_ds_ttl + self.propagation_delay


def published(key: KeyTimes, now: float) -> bool:
    """In the DNSKEY set at ``now``."""
    return key.publish <= now and (key.remove is None or now < key.remove)


def zsk_signing(keys: list[KeyTimes], now: float) -> list[KeyTimes]:
    """The ZSKs that sign the zone's RRsets at ``now`` (one, outside mistakes)."""
    return [k for k in keys if k.role == ZSK and published(k, now) and k.active <= now
            and (k.retire is None or now < k.retire)]


def ksk_signing(keys: list[KeyTimes], now: float) -> list[KeyTimes]:
    """The KSKs that sign DNSKEY, CDS and CDNSKEY at ``now``: every published KSK."""
    return [k for k in keys if k.role == KSK and published(k, now)]


def parent_set(keys: list[KeyTimes], now: float) -> list[KeyTimes]:
    """The KSK the parent's DS should name at ``now`` (CDS/CDNSKEY): the latest active."""
    active = [k for k in keys if k.role == KSK and published(k, now) and k.active <= now]
    return [max(active, key=lambda k: (k.active, k.created))] if active else []


def waiting_for_ds(keys: list[KeyTimes], now: float) -> Optional[KeyTimes]:
    """The active KSK whose DS the parent has not been seen serving while an older KSK is
    still published (the rollover waits for it), or None."""
    current = parent_set(keys, now)
    if not current or current[0].ds_seen is not None:
        return None
    new = current[0]
    older = [k for k in keys if k.role == KSK and k is not new and published(k, now)
             and k.publish <= new.publish]
    return new if older else None


def _successor(keys: list[KeyTimes], role: str, of: KeyTimes) -> Optional[KeyTimes]:
    later = [k for k in keys if k.role == role and k is not of and k.publish >= of.publish
             and k.created >= of.created and k.remove is None]
    return later[0] if later else None


def _current(keys: list[KeyTimes], role: str, now: float) -> Optional[KeyTimes]:
    """The newest key of ``role`` without a planned end."""
    live = [k for k in keys if k.role == role and published(k, now) and k.remove is None
            and k.retire is None]
    return max(live, key=lambda k: (k.publish, k.created)) if live else None


def roll_due(keys: list[KeyTimes], role: str, policy: RolloverPolicy) -> Optional[float]:
    """When the next key of ``role`` is to be published (None: no rollover planned)."""
    lifetime = policy.zsk_lifetime if role == ZSK else policy.ksk_lifetime
    current = [k for k in keys if k.role == role and k.remove is None and k.retire is None]
    if not lifetime or not current:
        return None
    newest = max(current, key=lambda k: (k.publish, k.created))
    if rolling(keys, role):
        return None
    return newest.active + lifetime - policy.publish_interval


def rolling(keys: list[KeyTimes], role: str) -> bool:
    """A rollover of ``role`` is under way (an old key is still there)."""
    if role == KSK:
        return len([k for k in keys if k.role == KSK]) > 1
    return any(k.role == ZSK and k.remove is not None for k in keys)


NewKey = Callable[[str, float, float], KeyTimes]


def advance(keys: list[KeyTimes], policy: RolloverPolicy, now: float, new_key: NewKey,
            roll: tuple[str, ...] = ()) -> tuple[list[KeyTimes], list[KeyTimes], bool]:
    """Apply every step due at ``now``: first keys, successors, planned ends, removals.

    ``new_key(role, publish, active)`` creates a key (files and all) and returns
    its times; ``roll`` names roles to roll now whatever their age.  Returns
    (the keys kept, the keys dropped, whether anything changed).
    """
    keys = list(keys)
    changed = False
    for role in (KSK, ZSK):
        if not any(k.role == role and k.remove is None for k in keys if published(k, now)) \
                and not any(k.role == role and k.publish > now for k in keys):
            keys.append(new_key(role, now, now))
            changed = True
    for role in (ZSK, KSK):
        due = roll_due(keys, role, policy)
        current = _current(keys, role, now)
        if current is None or _successor(keys, role, current) is not None \
                or rolling(keys, role):
            continue
        if role in roll or (due is not None and now >= due):
            new = new_key(role, now, now + policy.publish_interval)
            keys.append(new)
            if role == ZSK:
                current.retire = new.active
                current.remove = new.active + policy.retire_interval
            changed = True
    for key in keys:  # a KSK rollover ends once the new DS is seen
        if key.role != KSK or key.remove is not None:
            continue
        successor = _successor(keys, KSK, key)
        if successor is not None and successor.ds_seen is not None:
            key.remove = max(successor.ds_seen, successor.active) + policy.ds_interval
            changed = True
    dropped = [k for k in keys if k.remove is not None and k.remove <= now]
    if dropped:
        keys = [k for k in keys if k not in dropped]
        changed = True
    return keys, dropped, changed


def mark_ds_seen(keys: list[KeyTimes], tag: int, now: float) -> bool:
    """Record that the parent serves the DS of KSK ``tag`` (True when that is news)."""
    for key in keys:
        if key.role == KSK and key.tag == tag and key.ds_seen is None:
            key.ds_seen = now
            return True
    return False


def next_event(keys: list[KeyTimes], policy: RolloverPolicy, now: float) -> Optional[float]:
    """The next time the keys' roles change (a rebuild is due then)."""
    times: list[float] = []
    for key in keys:
        times.extend(t for t in (key.publish, key.active, key.retire, key.remove)
                     if t is not None)
    for role in (ZSK, KSK):
        due = roll_due(keys, role, policy)
        if due is not None:
            times.append(due)
    future = [t for t in times if t > now]
    return min(future) if future else None


def describe(key: KeyTimes, now: float) -> str:
    """A key's state at ``now`` in words (for logs, the API and `dcrouterctl`)."""
    if not published(key, now):
        return "planned" if key.publish > now else "removed"
    if key.role == ZSK:
        if key.active > now:
            return "published"
        if key.retire is not None and now >= key.retire:
            return "retired"
        return "active"
    if key.active > now:
        return "published"
    if key.remove is not None:
        return "retiring"
    return "active"
