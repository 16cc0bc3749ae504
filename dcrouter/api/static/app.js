// dcrouter status page: polls /api/status and /api/stats and shows services, queue depth
// and message/connection rates. No framework, no build step. The API token (api.token)
// comes from the form below or from the URL fragment "#token=..." and is kept in
// sessionStorage only (the fragment is never sent to the server and is removed at once).
"use strict";

(function () {
  var params = new URLSearchParams(window.location.search);
  var intervalSeconds = Math.max(0.5, parseFloat(params.get("interval") || "3") || 3);
  var previous = null;   // last summary, for rates
  var timer = null;

  function $(id) { return document.getElementById(id); }

  function takeTokenFromFragment() {
    var hash = window.location.hash.replace(/^#/, "");
    var fragment = new URLSearchParams(hash);
    if (fragment.get("token")) {
      sessionStorage.setItem("dcrouter-token", fragment.get("token"));
      history.replaceState(null, "", window.location.pathname + window.location.search);
    }
  }

  function token() { return sessionStorage.getItem("dcrouter-token") || ""; }

  function getJSON(path) {
    var headers = { "Accept": "application/json" };
    if (token()) { headers["Authorization"] = "Bearer " + token(); }
    return fetch(path, { headers: headers, cache: "no-store" }).then(function (response) {
      return response.json().catch(function () { return {}; }).then(function (body) {
        if (!response.ok) {
          var error = new Error((body.error && body.error.message) || ("HTTP " + response.status));
          error.status = response.status;
          throw error;
        }
        return body;
      });
    });
  }

  function formatNumber(value, digits) {
    if (value === null || value === undefined || isNaN(value)) { return "–"; }
    return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits || 0 });
  }

  function formatDuration(seconds) {
    seconds = Math.floor(seconds || 0);
    var d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
    var m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    if (d) { return d + "d " + h + "h"; }
    if (h) { return h + "h " + m + "m"; }
    if (m) { return m + "m " + s + "s"; }
    return s + "s";
  }

  function perMinute(current, before, key) {
    if (!before || current[key] === null || before[key] === null ||
        current[key] === undefined || before[key] === undefined) { return null; }
    var seconds = current.time - before.time;
    if (seconds <= 0) { return null; }
    return Math.max(0, (current[key] - before[key]) / seconds * 60);
  }

  function showError(message) {
    var box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function renderServices(status) {
    var body = $("services");
    while (body.firstChild) { body.removeChild(body.firstChild); }
    Object.keys(status.services).sort().forEach(function (name) {
      var service = status.services[name];
      var row = document.createElement("tr");
      row.setAttribute("data-service", name);
      var cells = [name, service.running ? "running" : "stopped",
        service.listeners.map(function (l) { return l.protocol + " " + l.host + ":" + l.port; })
          .join(", ") || "–"];
      cells.forEach(function (text, i) {
        var cell = document.createElement("td");
        cell.textContent = text;
        if (i === 1) { cell.className = service.running ? "running" : "stopped"; }
        row.appendChild(cell);
      });
      body.appendChild(row);
    });
  }

  function renderStats(stats) {
    var s = stats.summary || {};
    $("queue-depth").textContent = formatNumber(s.queue_depth);
    $("queue-state").textContent = s.queue_paused ? "paused" : "";
    $("msg-total").textContent = formatNumber(s.messages_accepted_total);
    $("smtp-total").textContent = formatNumber(s.smtp_sessions_total);
    $("smtp-active").textContent = formatNumber(s.smtp_sessions_active);
    var msgRate = perMinute(s, previous, "messages_accepted_total");
    var smtpRate = perMinute(s, previous, "smtp_sessions_total");
    var proxyRate = perMinute(s, previous, "proxy_connections_total");
    $("msg-rate").textContent = formatNumber(msgRate, 1);
    $("smtp-rate").textContent = formatNumber(smtpRate, 1);
    $("proxy-rate").textContent = formatNumber(proxyRate, 1);
    var both = (smtpRate === null && proxyRate === null) ? null : (smtpRate || 0) + (proxyRate || 0);
    $("conn-rate").textContent = formatNumber(both, 1);
    previous = s;
  }

  function refresh() {
    Promise.all([getJSON("/api/status"), getJSON("/api/stats")]).then(function (results) {
      var status = results[0];
      $("version").textContent = status.version;
      $("uptime").textContent = formatDuration(status.uptime);
      renderServices(status);
      renderStats(results[1]);
      $("last-update").textContent = new Date().toLocaleTimeString();
      document.body.setAttribute("data-refreshes",
        String(parseInt(document.body.getAttribute("data-refreshes") || "0", 10) + 1));
      $("token-form").hidden = true;
      showError("");
    }).catch(function (error) {
      if (error.status === 401 || error.status === 429) {
        $("token-form").hidden = false;
        showError(error.status === 401 ? "The API needs a token (api.token)." : error.message);
      } else {
        showError("Cannot reach the API: " + error.message);
      }
    });
  }

  function start() {
    takeTokenFromFragment();
    $("interval").textContent = String(intervalSeconds);
    $("token-form").addEventListener("submit", function (event) {
      event.preventDefault();
      sessionStorage.setItem("dcrouter-token", $("token-input").value.trim());
      $("token-input").value = "";
      previous = null;
      refresh();
    });
    refresh();
    timer = setInterval(refresh, intervalSeconds * 1000);
  }

  document.addEventListener("DOMContentLoaded", start);
}());
