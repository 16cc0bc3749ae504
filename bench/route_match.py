"""Route matching cost: microseconds per DomainRouter.match_rule for 10 and 10,000 rules.

For each rule count the script builds a rule set of mixed classes (exact
addresses, literal domains, subdomain wildcards, a few any-domain rules),
then matches a fixed mix of addresses (hits of every class and misses):

* uncached - ``route_cache_size = 0``: every lookup walks the index;
* cached - the same addresses again with the LRU warm;
* baseline - a linear ``fnmatch`` scan testing every rule (what most-specific
  precedence costs without an index), measured in the same run for comparison.

    .venv/bin/python bench/route_match.py [--lookups 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from dcrouter.config.email import DomainRuleOptions  # noqa: E402
from dcrouter.email.routing import DomainRouter  # noqa: E402


def make_rules(count: int) -> list[DomainRuleOptions]:
    """``count`` rules: 40% literal domains, 30% exact addresses, 28% subdomains, 2 any-domain."""
    rules = [DomainRuleOptions(pattern="postmaster@*", mode="mta"),
             DomainRuleOptions(pattern="*@*", mode="mta")]
    i = 0
    while len(rules) < count:
        kind = i % 10
        if kind < 4:
            pattern = f"*@d{i}.example"
        elif kind < 7:
            pattern = f"user{i}@d{i - 1}.example"
        else:
            pattern = f"*@*.s{i}.example"
        rules.append(DomainRuleOptions(pattern=pattern, mode="mta"))
        i += 1
    return rules[:count]


def make_addresses(count: int, n: int = 1000) -> list[str]:
    """A mix of hits of every class and misses, spread over the rule set."""
    out = []
    for j in range(n):
        i = (j * 7919) % max(count, 10)
        kind = j % 5
        if kind == 0:
            out.append(f"someone@d{i - i % 10}.example")          # literal domain
        elif kind == 1:
            out.append(f"user{i - i % 10 + 4}@d{i - i % 10 + 3}.example")  # exact address
        elif kind == 2:
            out.append(f"a@mail.s{i - i % 10 + 7}.example")      # subdomain
        elif kind == 3:
            out.append(f"postmaster@nowhere{j}.test")             # any-domain rule
        else:
            out.append(f"x{j}@unknown{j}.test")                   # only *@*
    return out


def per_lookup_us(fn, addresses: list[str], lookups: int) -> float:  # type: ignore
    n = len(addresses)
    start = time.perf_counter()
    for k in range(lookups):
        fn(addresses[k % n])
    return (time.perf_counter() - start) / lookups * 1e6


def linear(rules: list[DomainRuleOptions]):  # type: ignore
    patterns = [(r.pattern.lower(), r) for r in rules]

    def match(address: str):  # type: ignore
        # most-specific precedence without an index must test every rule
        a = address.lower()
        return [r for p, r in patterns if fnmatch.fnmatchcase(a, p)]
    return match


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lookups", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    print(f"cores: {os.cpu_count()}, python {sys.version.split()[0]}")
    print("| rules | uncached µs/match | cached µs/match | linear fnmatch scan of all rules µs/match |")
    print("|---:|---:|---:|---:|")
    for count in (10, 10000):
        rules = make_rules(count)
        addresses = make_addresses(count)
        uncached = DomainRouter(rules, cache_size=0)
        cached = DomainRouter(rules, cache_size=10000)
        for a in addresses:
            assert uncached.match_rule(a) is cached.match_rule(a)
            cached.match_rule(a)
        baseline = linear(rules)
        baseline_lookups = args.lookups if count <= 100 else max(200, args.lookups // 100)
        u, c, b = [], [], []
        for _ in range(args.runs):
            u.append(per_lookup_us(uncached.match_rule, addresses, args.lookups))
            c.append(per_lookup_us(cached.match_rule, addresses, args.lookups))
            b.append(per_lookup_us(baseline, addresses, baseline_lookups))
        print(f"| {count:,} | {statistics.median(u):.1f} | {statistics.median(c):.2f} | "
              f"{statistics.median(b):.1f} |")


if __name__ == "__main__":
    main()
