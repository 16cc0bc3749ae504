"""Running a process rule's scanners: one bounded analysis, verdicts, fail mode and limits.

:class:`ScanRunner` is what the processor calls at the end of DATA:

1. the built-in scanners (spam, virus, attachment) share one analysis of the
   spool file by a scan worker (:class:`ContentAnalysis`, a
   :class:`~dcrouter.email.scanning.pool.ScanPool` job with the
   ``[email.scan_limits]`` budget and ``scan_timeout``);
2. each built-in scanner turns the report into its verdict (and asks spamd or
   clamd when configured);
3. a passed limit or a broken archive is the ``unscannable`` verdict, judged
   by ``scan_limits.action`` (``reject``: 554 5.7.1, whatever scan_fail_mode);
4. plug-in scanners get the parsed message (parsed only now, so a message
   over the limits is never parsed in the gateway) and ``scan_timeout`` each.

A scanner that fails - the worker timed out or died, spamd or clamd down, a
plug-in raised - is judged by ``scan_fail_mode``: ``closed`` (the default)
answers 451 4.7.0 so the sender retries; ``open`` notes the error in
``X-Dcrouter-Scan`` and goes on.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Optional

from twisted.internet import defer

from dcrouter.email.scanning.limits import Limits
from dcrouter.email.scanning.pool import ScanPool
from dcrouter.email.scanning.types import ScanContext, ScannerError, ScanResult
from dcrouter.errors import PolicyRejection
from dcrouter.logsetup import get_logger

log = get_logger("email.scanning")


class ContentAnalysis:
    """The built-in scanners' shared step: a scan worker's report on a spool file."""

    def __init__(self, pool: ScanPool, limits: Limits = Limits(), timeout: float = 30.0) -> None:
        self.pool = pool
        self.limits = limits
        self.timeout = timeout

    def analyse(self, path: str, features: list[str],
                blocked: Optional[list[str]] = None) -> defer.Deferred:
        """Fires with the report (see scanning.analysis); ScannerError on failure.

        ``blocked``: the extensions of the attachment scanners (only those names come back)."""
        return self.pool.analyse(path, sorted(set(features)), self.limits, self.timeout,
                                 sorted(set(blocked)) if blocked is not None else None)


@dataclasses.dataclass
class ScanOutcome:
    """What the scanners decided for one group of recipients (when nothing refused it)."""

    results: list[ScanResult] = dataclasses.field(default_factory=list)
    scan_error: bool = False
    subject_prefixes: list[str] = dataclasses.field(default_factory=list)
    message: Any = None


def limits_from_options(options: Any) -> Limits:
    """``[email.scan_limits]`` to the worker's :class:`Limits`."""
    return Limits(max_scan_size=options.max_scan_size, max_file_size=options.max_file_size,
                  max_files=options.max_files, max_recursion=options.max_recursion,
                  max_ratio=options.max_ratio)


class ScanRunner:
    """Runs scanners for the processor; raises PolicyRejection to refuse at DATA."""

    def __init__(self, reactor: Any, verdicts: Optional[dict] = None,
                 pool: Optional[ScanPool] = None) -> None:
        self.reactor = reactor
        self.pool = pool if pool is not None else ScanPool.shared(reactor)
        self.analysis = ContentAnalysis(self.pool)
        self.verdicts: dict = verdicts if verdicts is not None else \
            collections.defaultdict(collections.Counter)
        self.fail_mode = "closed"
        self.limits_action = "reject"
        self.timeout = 30.0

    def configure(self, options: Any) -> None:
        """Take ``scan_fail_mode``, ``scan_timeout``, ``scan_workers`` and ``scan_limits``."""
        limits = options.scan_limits
        self.fail_mode = options.scan_fail_mode
        self.timeout = options.scan_timeout
        self.limits_action = limits.action
        self.analysis.limits = limits_from_options(limits)
        self.analysis.timeout = options.scan_timeout
        self.pool.configure(options.scan_workers, limits.max_memory)

    @defer.inlineCallbacks
    def run(self, scanners: list[tuple[Any, Any]], context: ScanContext,
            load_message: Callable[[], defer.Deferred]) -> Any:
        """Scan; fires with a ScanOutcome or fails with PolicyRejection."""
        outcome = ScanOutcome()
        builtin = [(s, o) for s, o in scanners if getattr(s, "builtin", False)]
        plugins = [(s, o) for s, o in scanners if not getattr(s, "builtin", False)]
        cid = context.correlation_id
        if builtin:
            features: list[str] = []
            blocked: list[str] = []
            for scanner, _opts in builtin:
                features.extend(scanner.features)
                blocked.extend(getattr(scanner, "blocked", ()))
            try:
                context.analysis = yield self.analysis.analyse(context.spool_path, features,
                                                               blocked)
            except ScannerError as e:
                context.analysis_error = str(e)
                log.warn("content scan failed: {error}", error=str(e),
                         fail_mode=self.fail_mode, correlation_id=cid)
                if self.fail_mode == "closed":
                    self._count("content", "error")
                    raise self._tempfail() from None
            else:
                log.debug("content scan: {spent}, {cpu}s CPU", spent=context.analysis["spent"],
                          cpu=context.analysis.get("cpu"), correlation_id=cid)
        for scanner, opts in builtin:
            result = yield self._one(scanner, opts, context, None)
            self._judge(outcome, result, opts, context)
        report = context.analysis
        if report is not None and report.get("verdict"):
            verdict = report["verdict"]
            result = ScanResult("limits", "unscannable",
                                details=[verdict["signature"], verdict["detail"]],
                                reason=_limit_reason(verdict))
            log.info("content scan stopped: {signature} ({detail}), action {action}",
                     signature=verdict["signature"], detail=verdict["detail"],
                     action=self.limits_action, correlation_id=cid)
            self._count(result.scanner, result.verdict)
            outcome.results.append(result)
            if self.limits_action == "reject":
                raise PolicyRejection(554, "5.7.1", f"Message rejected: {result.reason_text}",
                                      reason="unscannable")
        if plugins:
            outcome.message = yield load_message()
            for scanner, opts in plugins:
                result = yield self._one(scanner, opts, context, outcome.message)
                self._judge(outcome, result, opts, context)
        return outcome

    def _count(self, name: str, verdict: str) -> None:
        self.verdicts[name][verdict] += 1

    @staticmethod
    def _tempfail() -> PolicyRejection:
        return PolicyRejection(451, "4.7.0", "Temporary content scanning failure, "
                               "try again later", reason="scan_error")

    @defer.inlineCallbacks
    def _one(self, scanner: Any, opts: Any, context: ScanContext, message: Any) -> Any:
        name = getattr(scanner, "name", type(scanner).__name__)
        ctx = dataclasses.replace(context, options=opts)
        try:
            d = defer.maybeDeferred(scanner.scan, message, ctx)
            d.addTimeout(self.timeout, self.reactor)
            result = yield d
        except (ScannerError, defer.TimeoutError) as e:
            result = ScanResult(name, "error", error=str(e) or "timed out")
        except Exception as e:  # noqa: BLE001 - a broken plug-in must not become a 5xx
            log.failure("scanner {scanner} failed", scanner=name,
                        correlation_id=context.correlation_id)
            result = ScanResult(name, "error", error=type(e).__name__)
        return result

    def _judge(self, outcome: ScanOutcome, result: ScanResult, opts: Any,
               context: ScanContext) -> None:
        name = result.scanner
        self._count(name, result.verdict)
        outcome.results.append(result)
        if result.verdict == "error" or result.error:
            log.warn("scanner {scanner} failed: {error}", scanner=name, error=result.error,
                     fail_mode=self.fail_mode, correlation_id=context.correlation_id)
            if self.fail_mode == "closed":
                raise self._tempfail()
            outcome.scan_error = True
            if result.verdict == "error":
                return
        if not result.flagged:
            return
        action = (opts.action if opts is not None else result.action) or "tag"
        log.info("scanner {scanner}: {verdict} ({details}), action {action}", scanner=name,
                 verdict=result.verdict, details=", ".join(result.details[:5]),
                 action=action, correlation_id=context.correlation_id)
        if action == "reject":
            raise PolicyRejection(550, "5.7.1", f"Message rejected: {result.reason_text}",
                                  reason=result.verdict)
        if opts is not None and opts.subject_prefix:
            outcome.subject_prefixes.append(opts.subject_prefix)


def _limit_reason(verdict: dict) -> str:
    if verdict.get("kind") == "limits":
        return f"content exceeds scanning limits ({verdict['signature']})"
    return f"attachment cannot be scanned ({verdict['signature']})"


__all__ = ["ContentAnalysis", "ScanOutcome", "ScanRunner", "limits_from_options"]
