// dcrouter console, views: overview, proxy, mail (with the queue actions), certificates, DNS.
// Each view loads its JSON from /api/... (the same answers any client gets) and renders it
// with textContent only: reply texts, certificate names and record values come from outside
// and are never parsed as markup. Actions go through DC.act: a confirmation dialog first,
// then the API call with the token in the Authorization header.
"use strict";

(function () {
  var $ = DC.$, el = DC.el, row = DC.row;
  function historyPath() {
    var range = ($("chart-range") && $("chart-range").value || "60:60").split(":");
    return "/api/history?minutes=" + encodeURIComponent(range[0]) + "&step=" +
      encodeURIComponent(range[1]);
  }

  // -- overview ---------------------------------------------------------------------------
  var previous = null;   // the last summary, for per-minute rates between two refreshes
  var lastHistory = null;

  function perMinute(current, before, key) {
    if (!before || current[key] === null || before[key] === null ||
        current[key] === undefined || before[key] === undefined) { return null; }
    var seconds = current.time - before.time;
    if (seconds <= 0) { return null; }
    return Math.max(0, (current[key] - before[key]) / seconds * 60);
  }

  function renderServices(status) {
    DC.replace($("services"), Object.keys(status.services).sort().map(function (name) {
      var service = status.services[name];
      return row([name, {text: service.running ? "running" : "stopped",
                         class: service.running ? "running" : "stopped"},
                  service.listeners.map(function (l) {
                    return l.protocol + " " + l.host + ":" + l.port; }).join(", ")],
                 {"data-service": name});
    }));
  }

  function renderFigures(stats) {
    var s = stats.summary || {};
    $("queue-depth").textContent = DC.formatNumber(s.queue_depth);
    $("queue-state").textContent = s.queue_paused ? "paused" : "";
    $("msg-total").textContent = DC.formatNumber(s.messages_accepted_total);
    $("smtp-total").textContent = DC.formatNumber(s.smtp_sessions_total);
    $("smtp-active").textContent = DC.formatNumber(s.smtp_sessions_active);
    var msgRate = perMinute(s, previous, "messages_accepted_total");
    var smtpRate = perMinute(s, previous, "smtp_sessions_total");
    var proxyRate = perMinute(s, previous, "proxy_connections_total");
    $("msg-rate").textContent = DC.formatNumber(msgRate, 1);
    $("smtp-rate").textContent = DC.formatNumber(smtpRate, 1);
    $("proxy-rate").textContent = DC.formatNumber(proxyRate, 1);
    var both = (smtpRate === null && proxyRate === null) ? null : (smtpRate || 0) + (proxyRate || 0);
    $("conn-rate").textContent = DC.formatNumber(both, 1);
    previous = s;
  }

  function drawCharts(history) {
    document.querySelectorAll("#view-overview figure.chart").forEach(function (figure) {
      var per = figure.querySelector(".per");
      if (per) { per.textContent = history.step === 60 ? "per minute" : "per " + history.step + " s"; }
      DC.chart(figure, history, figure.getAttribute("data-series").split(" "),
               figure.getAttribute("data-unit"));
    });
    $("history-note").textContent = "(" + history.times.length + " buckets of " + history.step +
      " s, sampled every " + history.interval + " s in memory; Prometheus at /metrics keeps " +
      "the long-term record)";
  }

  DC.view("overview", {
    load: function () { return Promise.all([DC.getJSON("/api/stats"), DC.getJSON(historyPath())]); },
    render: function (data, status) {
      renderServices(status);
      renderFigures(data[0]);
      lastHistory = data[1];
      drawCharts(data[1]);
    },
    resize: function () { if (lastHistory) { drawCharts(lastHistory); } }
  });

  // -- proxy ------------------------------------------------------------------------------
  function match(route) {
    var parts = ["ports " + (route.ports || []).join(", ")];
    if (route.domains && route.domains.join(",") !== "*") { parts.push(route.domains.join(", ")); }
    if (route.path_prefix) { parts.push("path " + route.path_prefix + "*"); }
    if (route.client_ips && route.client_ips.length) { parts.push("from " + route.client_ips.join(", ")); }
    return parts.join(" · ");
  }

  function mode(route) {
    var text = route.mode || "";
    if (route.tls) { text += " " + route.tls; }
    if (route.load_balancing && (route.targets || []).length > 1) { text += ", " + route.load_balancing; }
    return text;
  }

  function errorsText(errors) {
    var keys = Object.keys(errors || {});
    var total = keys.reduce(function (sum, k) { return sum + errors[k]; }, 0);
    return {text: DC.formatNumber(total), title: keys.map(function (k) {
      return k + ": " + errors[k]; }).join(", ") || null, class: "num", field: "errors"};
  }

  function health(target) {
    return {nodes: [el("span", {class: "pill " + (target.healthy ? "up" : "down"),
                                text: target.healthy ? "up" : "down"})],
            field: "health"};
  }

  DC.view("proxy", {
    load: function () { return DC.getJSON("/api/proxy/routes"); },
    render: function (data) {
      $("proxy-active").textContent = DC.formatNumber(data.active_connections);
      var unrouted = Object.keys(data.unrouted || {});
      $("proxy-unrouted").textContent = unrouted.length ? unrouted.map(function (k) {
        return k + " " + data.unrouted[k]; }).join(", ") : "none";
      var rows = [];
      data.routes.forEach(function (route) {
        var stats = route.stats || {};
        var targets = stats.targets || {};
        var down = Object.keys(targets).filter(function (t) { return !targets[t].healthy; });
        rows.push(row([
          {text: route.name, header: true, field: "name"},
          {text: match(route), field: "match"}, {text: mode(route), field: "mode"},
          {text: Object.keys(targets).length ? (Object.keys(targets).length - down.length) + "/" +
            Object.keys(targets).length + " up" : "no targets", field: "health"},
          "", "",
          {text: DC.formatNumber(stats.active_connections), class: "num", field: "active"},
          {text: DC.formatNumber(stats.total_connections), class: "num", field: "connections"},
          {text: DC.formatNumber(stats.requests), class: "num", field: "requests"},
          {text: DC.formatBytes(stats.bytes_in), class: "num", field: "bytes_in",
           title: String(stats.bytes_in)},
          {text: DC.formatBytes(stats.bytes_out), class: "num", field: "bytes_out",
           title: String(stats.bytes_out)},
          errorsText(stats.errors)
        ], {"data-route": route.name, class: "route" + (down.length ? " degraded" : "")}));
        Object.keys(targets).forEach(function (label) {
          var t = targets[label];
          rows.push(row([
            {text: label, header: true, field: "name", class: "target"}, "", "", health(t),
            {text: DC.ago(t.since), field: "since", title: DC.formatDate(t.since)},
            {text: t.last_error || "", field: "last_error"},
            {text: DC.formatNumber(t.active), class: "num", field: "active"},
            {text: "", class: "num"}, {text: "", class: "num"}, {text: "", class: "num"},
            {text: "", class: "num"},
            {text: DC.formatNumber(t.failures), class: "num", field: "failures",
             title: "failed connects"}
          ], {"data-route": route.name, "data-target": label,
              class: "target-row " + (t.healthy ? "up" : "down")}));
        });
      });
      DC.replace($("proxy-routes"), rows.length ? rows : [DC.emptyRow(12, "No proxy routes.")]);
    }
  });

  // -- mail ---------------------------------------------------------------------------------
  function counterCells(c) {
    return ["accepted", "delivered", "deferred", "bounced"].map(function (name) {
      return {text: DC.formatNumber(c[name]), class: "num", field: name};
    });
  }

  function renderRules(routing) {
    $("rules-order").textContent = "(" + routing.priority_order + " precedence; counted since " +
      DC.formatTime(routing.since) + ")";
    var rows = routing.rules.map(function (rule) {
      return row([{text: rule.position, class: "num", field: "position"},
                  {text: rule.pattern, header: true, field: "pattern"},
                  {text: rule.mode, field: "mode"}].concat(counterCells(rule.counters))
                 .concat([{text: rule.detail, field: "detail"}]), {"data-rule": rule.pattern});
    });
    rows.push(row([{text: "", class: "num"}, {text: "(no rule matches)", header: true,
                   field: "pattern"}, {text: routing["default"].mode, field: "mode"}]
                  .concat(counterCells(routing["default"].counters))
                  .concat([{text: "default: " + routing["default"].detail, field: "detail"}]),
                  {"data-rule": "", class: "default"}));
    routing.other.forEach(function (other) {
      rows.push(row([{text: "", class: "num"}, {text: other.pattern, header: true, field: "pattern"},
                     ""].concat(counterCells(other.counters))
                    .concat([{text: other.why, field: "detail"}]),
                    {"data-rule": other.pattern, class: "other"}));
    });
    DC.replace($("rules"), rows);
  }

  function actionButton(label, key, handler, danger) {
    return el("button", {type: "button", text: label, "data-focus-key": key,
                         class: danger ? "danger" : null, onclick: handler});
  }

  function recipientsOf(item) {
    return (item.recipients || []).map(function (r) {
      return typeof r === "string" ? r : r.address; }).join(", ");
  }

  function renderQueue(queue) {
    $("q-size").textContent = DC.formatNumber(queue.size);
    $("q-paused").textContent = queue.paused ? "deliveries paused" : "deliveries running";
    $("q-pending").textContent = DC.formatNumber(queue.by_status.pending);
    $("q-processing").textContent = DC.formatNumber(queue.by_status.processing);
    $("q-deferred").textContent = DC.formatNumber(queue.by_status.deferred);
    $("q-oldest").textContent = queue.size ? DC.formatDuration(queue.oldest_age) : "–";
    $("q-pause").hidden = queue.paused;
    $("q-resume").hidden = !queue.paused;
    $("q-scan").textContent = queue.complete ? "" : "Destinations below are split from the " +
      queue.scanned + " oldest of " + queue.size + " items.";
    DC.replace($("q-destinations"), queue.destinations.length ? queue.destinations.map(function (d) {
      return row([{text: d.destination, header: true, field: "destination"},
                  {text: DC.formatNumber(d.total), class: "num", field: "total"},
                  {text: DC.formatNumber(d.by_status.pending), class: "num", field: "pending"},
                  {text: DC.formatNumber(d.by_status.processing), class: "num", field: "processing"},
                  {text: DC.formatNumber(d.by_status.deferred), class: "num", field: "deferred"},
                  {text: DC.formatDuration(d.oldest_age), class: "num", field: "oldest"},
                  {text: d.next_attempt ? DC.formatTime(d.next_attempt) : "", field: "next_attempt"},
                  {text: d.last_error || "", field: "last_error"}],
                 {"data-destination": d.destination});
    }) : [DC.emptyRow(8, "The queue is empty.")]);
    DC.replace($("q-items"), queue.items.length ? queue.items.map(function (item) {
      var id = item.id;
      return row([{text: id, header: true, field: "id"}, {text: item.mail_from || "<>", field: "from"},
                  {text: recipientsOf(item), field: "to"},
                  {text: item.destination || "", field: "destination"},
                  {text: item.status, field: "status"},
                  {text: DC.formatNumber(item.attempts), class: "num", field: "attempts"},
                  {text: DC.formatDuration(queue.time - item.created_at), field: "age"},
                  {text: item.last_error || "", field: "last_error"},
                  {nodes: [
                    actionButton("Retry now", "retry-" + id, function () {
                      DC.act("Retry queue item " + id + " now (to " + recipientsOf(item) + ")?",
                             "Retry now", "POST", "/api/queue/" + encodeURIComponent(id) + "/retry",
                             "Queue item " + id + " will be attempted now.");
                    }),
                    actionButton("Delete", "delete-" + id, function () {
                      DC.act("Delete queue item " + id + " (to " + recipientsOf(item) + ")? " +
                             "It is dropped without a bounce to the sender.", "Delete",
                             "DELETE", "/api/queue/" + encodeURIComponent(id),
                             "Queue item " + id + " deleted.");
                    }, true)], field: "actions", class: "actions-cell"}],
                 {"data-queue-id": id});
    }) : [DC.emptyRow(9, "No items wait.")]);
  }

  function recipientsCell(entry) {
    var text = entry.recipients.map(function (r) { return r.address + " (" + r.status + ")"; })
      .join(", ");
    if (entry.more_recipients) { text += " and " + entry.more_recipients + " more"; }
    return {text: text, field: "recipients"};
  }

  // the reply that matters: a failed or pending recipient's for a failure, else the first
  function replyOf(entry, delivered) {
    var failed = entry.recipients.filter(function (r) {
      return (delivered ? r.status === "delivered" : r.status !== "delivered") && r.reply; });
    var replies = (entry.outcome === "delivered" || !failed.length ? entry.recipients : failed)
      .map(function (r) { return r.reply; }).filter(Boolean);
    return replies.length ? replies[0] : entry.error;
  }

  function renderDeliveries(recent) {
    DC.replace($("deliveries"), recent.deliveries.length ? recent.deliveries.map(function (d) {
      return row([{text: DC.formatTime(d.time), field: "time"},
                  {text: d.queue_id, header: true, field: "queue_id"},
                  {text: d.rule || "(default)", field: "rule"}, recipientsCell(d),
                  {text: replyOf(d, true), field: "reply", class: "reply"}],
                 {"data-queue-id": d.queue_id});
    }) : [DC.emptyRow(5, "No delivery since the API started.")]);
    DC.replace($("failures"), recent.failures.length ? recent.failures.map(function (d) {
      return row([{text: DC.formatTime(d.time), field: "time"},
                  {text: d.queue_id, header: true, field: "queue_id"},
                  {nodes: [el("span", {class: "pill " + (d.outcome === "bounced" ? "down" : "warn"),
                                       text: d.outcome + " (attempt " + d.attempts + ")"})],
                   field: "outcome"},
                  recipientsCell(d), {text: replyOf(d), field: "reply", class: "reply"}],
                 {"data-queue-id": d.queue_id});
    }) : [DC.emptyRow(5, "No failure since the API started.")]);
  }

  function renderSuppression(data) {
    $("suppressed-count").textContent = "(" + data.count + ")";
    DC.replace($("suppression"), data.suppressed.length ? data.suppressed.map(function (s) {
      return row([{text: s.address, header: true, field: "address"},
                  {text: s.reason, field: "reason"}, {text: DC.formatDate(s.added), field: "added"},
                  {text: DC.formatDate(s.expires), field: "expires"},
                  {nodes: [actionButton("Lift", "lift-" + s.address, function () {
                    DC.act("Lift the suppression of " + s.address + "? Mail to it is accepted " +
                           "again.", "Lift", "DELETE",
                           "/api/email/suppression/" + encodeURIComponent(s.address),
                           "Suppression of " + s.address + " lifted.");
                  })], field: "actions"}], {"data-address": s.address});
    }) : [DC.emptyRow(5, "No recipient is suppressed.")]);
  }

  DC.view("mail", {
    load: function () {
      return Promise.all([DC.getJSON("/api/email/routing"), DC.getJSON("/api/queue/summary"),
                          DC.getJSON("/api/email/deliveries?limit=20"),
                          DC.getJSON("/api/email/suppression")]);
    },
    render: function (data) {
      renderRules(data[0]);
      renderQueue(data[1]);
      renderDeliveries(data[2]);
      renderSuppression(data[3]);
    }
  });

  function queueButtons() {
    $("q-pause").addEventListener("click", function () {
      DC.act("Pause the queue? Mail is still accepted and queued, but nothing is delivered " +
             "until it is resumed.", "Pause", "POST", "/api/queue/pause", "Deliveries paused.");
    });
    $("q-resume").addEventListener("click", function () {
      DC.act("Resume deliveries?", "Resume", "POST", "/api/queue/resume", "Deliveries resumed.");
    });
    $("q-retry-all").addEventListener("click", function () {
      DC.act("Attempt every deferred item now (postqueue -f)?", "Retry all", "POST",
             "/api/queue/retry", "Every deferred item will be attempted now.");
    });
  }

  // -- certificates -----------------------------------------------------------------------
  DC.view("certificates", {
    load: function () { return DC.getJSON("/api/certificates"); },
    render: function (data) {
      $("cert-threshold").textContent = "(warned within " + data.threshold_days + " days of expiry)";
      DC.replace($("cert-warnings"), data.warnings.map(function (w) {
        return el("li", {class: "warning " + w.level, "data-kind": w.kind, text: w.message});
      }));
      DC.replace($("certs"), data.certificates.length ? data.certificates.map(function (c) {
        return row([{text: c.service, field: "service"},
                    {text: c.served_for.join(", "), header: true, field: "served_for"},
                    {text: c.subject, field: "subject", title: (c.names || []).join(", ")},
                    {text: c.issuer + (c.self_signed ? " (self-signed)" : ""), field: "issuer"},
                    {text: c.source, field: "source"},
                    {text: DC.formatDate(c.not_after), field: "expires"},
                    {text: DC.formatNumber(c.days_left, 0), class: "num" +
                     (c.days_left < data.threshold_days ? " soon" : ""), field: "days_left"},
                    {text: c.key, field: "key", title: "SHA-256 " + c.sha256}],
                   {"data-sha256": c.sha256, "data-service": c.service});
      }) : [DC.emptyRow(8, "No TLS certificate is served.")]);
      DC.replace($("acme"), data.acme.length ? data.acme.map(function (o) {
        return row([{text: o.name, header: true, field: "name"},
                    {nodes: [el("span", {class: "pill " + ({valid: "up", failed: "down",
                      skipped: "down"}[o.state] || "warn"), text: o.state})], field: "state"},
                    {text: o.expires ? DC.formatDate(o.expires) : "none yet", field: "expires"},
                    {text: o.renew_at ? DC.formatDate(o.renew_at) : "", field: "renew_at"},
                    {text: DC.formatNumber(o.failures), class: "num", field: "failures"},
                    {text: o.last_error, field: "last_error"}], {"data-name": o.name});
      }) : [DC.emptyRow(6, "ACME is not enabled ([proxy.acme] enabled = true).")]);
      DC.replace($("dkim"), data.dkim.length ? data.dkim.map(function (k) {
        return row([{text: k.domain, field: "domain"}, {text: k.selector, field: "selector"},
                    {text: k.record_name, header: true, field: "record_name"},
                    {text: k.signing ? "yes" : "no", field: "signing"},
                    {text: k.published ? "yes" : (k.dns_served ? "a different record" : "no"),
                     field: "published"},
                    {nodes: [el("code", {text: k.error || k.record})], field: "record",
                     class: "record"}], {"data-record": k.record_name});
      }) : [DC.emptyRow(6, "No DKIM key.")]);
    }
  });

  // -- DNS ----------------------------------------------------------------------------------
  DC.view("dns", {
    load: function () {
      return Promise.all([DC.getJSON("/api/dns/zones?records=false"), DC.getJSON("/api/stats")]);
    },
    render: function (data) {
      var dns = data[1].dns || {};
      var rcodes = dns.queries_by_rcode || {};
      DC.replace($("dns-rcodes"), [el("div", {class: "figure"}, [
        el("div", {class: "label", text: "Queries"}),
        el("div", {class: "value", id: "dns-queries", text: DC.formatNumber(dns.queries)})])]
        .concat(Object.keys(rcodes).sort().map(function (rcode) {
          return el("div", {class: "figure", "data-rcode": rcode}, [
            el("div", {class: "label", text: rcode}),
            el("div", {class: "value", text: DC.formatNumber(rcodes[rcode])})]);
        })));
      DC.replace($("zones"), data[0].zones.length ? data[0].zones.map(function (z) {
        var types = Object.keys(z.records_by_type || {}).map(function (t) {
          return t + " " + z.records_by_type[t]; }).join(", ");
        var notify = z.notify.length ? z.notify.map(function (n) {
          return n.target + ": " + n.result + " (serial " + n.serial + ", " + DC.ago(n.at) + ")";
        }).join("; ") : (z.notify_targets.length ? "not sent yet" : "no secondaries (dns.notify)");
        return row([{text: z.origin, header: true, field: "origin"},
                    {text: String(z.serial), class: "num", field: "serial"},
                    {text: DC.formatNumber(z.record_count), class: "num", field: "records"},
                    {text: types, field: "types"},
                    {text: z.allow_transfer.join(", ") || "nobody", field: "allow_transfer"},
                    {text: notify, field: "notify"}], {"data-zone": z.origin});
      }) : [DC.emptyRow(6, "No zone is served.")]);
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    queueButtons();
    $("chart-range").addEventListener("change", DC.refreshSoon);
  });
}());
