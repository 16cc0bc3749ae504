"""Every plug-in point of dcrouter, as zope interfaces.

Implement one of these and name your class in the configuration (or pass an
instance to :func:`dcrouter.make_router` from a ``.tac`` file) to extend
dcrouter.  Methods that may wait return Deferreds.
"""

from __future__ import annotations

from twisted.cred.credentials import ICredentials
from zope.interface import Attribute, Interface


class IStatsProvider(Interface):
    """Something that reports figures for ``/api/stats`` and metrics."""

    def get_stats() -> dict:
        """A JSON-serialisable dict of current figures."""


# -- inbound mail -------------------------------------------------------------

class IMessageHandler(Interface):
    """What the SMTP server hands envelopes and messages to (the processor).

    Each method may return a Deferred; failing with
    :class:`dcrouter.errors.PolicyRejection` makes the server send that reply.
    """

    def check_sender(session, mail_from):
        """Vet MAIL FROM (``session`` is a :class:`dcrouter.message.SessionInfo`)."""

    def check_recipient(session, mail_from, recipient):
        """Vet one RCPT TO: relay policy, suppression list, rate limits."""

    def handle_message(message):
        """Route, scan, transform and enqueue a :class:`dcrouter.message.ReceivedMessage`.

        Fires with the list of queue ids once every part is durably queued.
        """


class IRecipientCheck(Interface):
    """Knows which recipients of a rule exist, so that the others are refused at RCPT.

    Named by a domain rule's ``recipient_check`` (``package.module:Class``, built
    without arguments) - Postfix's ``local_recipient_maps`` / ``relay_recipient_maps``
    as code: a directory lookup, a database, an API of the mailbox server.
    """

    def recipient_exists(address, rule_pattern, session):
        """True when ``address`` (canonical ``local@domain``) can be delivered, False when
        it is unknown (``550 5.1.1``).  May return a Deferred; an exception or a failed
        Deferred answers ``451 4.3.0`` (the client tries again later).  ``session`` is the
        :class:`dcrouter.message.SessionInfo`, ``rule_pattern`` the matched rule's pattern.
        """


class IEmailEventObserver(Interface):
    """Subscribes to the SMTP server's events (seed section 8.2)."""

    def connection_made(session):
        """A client connected (``session``: SessionInfo)."""

    def connection_lost(session, reason):
        """A client went away."""

    def auth_succeeded(session, username, mechanism):
        """AUTH succeeded."""

    def auth_failed(session, username, mechanism):
        """AUTH failed."""

    def message_received(session, message, queue_ids):
        """A message was accepted and queued."""

    def message_rejected(session, reason, code):
        """A command or message was refused; ``reason`` is a short class."""


class IXOAuth2Credentials(ICredentials):
    """SASL XOAUTH2 credentials: a user name and a bearer token."""

    username = Attribute("The user the client claims to be (bytes).")
    token = Attribute("The OAuth 2.0 access token (bytes).")


class IContentScanner(Interface):
    """A content scanner of process mode (spam, virus, attachment, or yours)."""

    name = Attribute("Short name used in headers and metrics, e.g. 'spam'.")

    def scan(message, context):
        """Scan a parsed :class:`email.message.EmailMessage`.

        ``context`` is a :class:`dcrouter.email.scanning.ScanContext` (session,
        envelope, raw size, spool path).  Fires with a
        :class:`dcrouter.email.scanning.ScanResult`.
        """


class ITransformation(Interface):
    """A transformation applied to a message in process mode."""

    def transform(message, context):
        """Change the :class:`email.message.EmailMessage` in place (may return a Deferred)."""


# -- queue and delivery --------------------------------------------------------

class IQueueStore(Interface):
    """Storage behind the delivery queue (memory, disk, Redis, or yours).

    A store keeps items (:class:`dcrouter.queue.item.QueueItem`), their bodies
    and the schedule of due items.  Methods return Deferreds unless noted.
    """

    durable = Attribute("True when an acknowledged item survives a crash.")
    shared = Attribute("True when several processes may use the store at once (Redis).")

    def open():
        """Prepare storage and recover; fires with the items found."""

    def add(items, body_path):
        """Durably store ``items`` sharing the body file ``body_path`` (taken over); fires when safe."""

    def update(item):
        """Persist a changed item (status, attempts, next_attempt...); reschedules waiting items."""

    def remove(item):
        """Forget an item; its body goes when no item uses it."""

    def read_body(item):
        """Fires with the item's message bytes."""

    def claim_due(now, limit, owner, lease_seconds, accept):
        """Lease up to ``limit`` items due at ``now`` to ``owner``; fires with them (processing).

        ``accept(item)`` (local stores) may refuse an item, which stays scheduled.
        """

    def renew(items, owner, seconds):
        """Extend the leases ``owner`` holds on ``items`` to ``seconds`` from now.

        Shared stores fire with the ids ``owner`` no longer holds (taken by another
        worker, or gone), and refuse ``update``/``remove`` of an item whose
        ``lease_owner`` does not hold it (firing with 0); local stores, whose leases
        never expire, may fire with None.
        """

    def get(item_id):
        """Fires with the item or None."""

    def list(status, limit, cursor):
        """Fires with (items ordered by id after ``cursor``, next cursor or None)."""

    def reschedule(when, statuses):
        """Make waiting items with those statuses due at ``when``; fires with the count."""

    def count(destination=None):
        """Items held, overall or for one destination (not a Deferred; may be cached)."""

    def stats():
        """Counts by status and destination, oldest creation time, bytes (not a Deferred)."""

    def close():
        """Flush and close."""


class IDeliveryObserver(Interface):
    """Hooks around delivery attempts (the seed's onDelivery* hooks)."""

    def on_delivery_start(item):
        """An attempt begins."""

    def on_delivery_success(item, result):
        """Every recipient of the item was delivered."""

    def on_delivery_failed(item, error, permanent):
        """The attempt failed; ``permanent`` means the item bounced."""


class IDnsChallengePublisher(Interface):
    """Publishes the TXT records of ACME dns-01 challenges (``_acme-challenge.<name>``).

    dcrouter's own DNS server implements it for the zones it serves; pass another
    implementation as ``Extensions.dns_challenge_publisher`` to use a DNS provider's API.
    """

    def serves(name):
        """True when a TXT record for ``name`` (an absolute name without the dot) can be
        published."""

    def add_txt(name, value):
        """Publish ``value`` at ``name`` (next to other values there); a Deferred that fires
        once authoritative answers carry it."""

    def remove_txt(name, value):
        """Withdraw one value published by :meth:`add_txt`; a Deferred."""


class IDkimKeyListener(Interface):
    """Told when DKIM keys appear or change (the DNS server publishes them)."""

    def dkim_keys_changed():
        """Re-read the key store's public records."""


class IPublishedRecords(Interface):
    """Records parts of dcrouter ask the DNS server to publish (``context.dns_records``)."""

    def set(source, records):
        """Replace the records of ``source`` (a name such as ``"mta-sts"``) with
        ``records`` (:class:`dcrouter.config.dns.RecordOptions`, absolute names)."""

    def records():
        """Every record of every source."""

    def add_listener(callback):
        """Call ``callback()`` whenever a source's records change."""
