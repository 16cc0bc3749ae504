// dcrouter console, core: the API token, JSON requests, the views and the refresh loop.
// No framework, no build step, nothing from a CDN. The API token (api.token) comes from the
// form or from the URL fragment "#token=..." and is kept in sessionStorage only (the fragment
// is never sent to the server and is removed from the address bar at once); every request
// carries it in the Authorization header, never in a URL.
// Views register with DC.view(name, {load, render}); the loop refreshes the visible view
// every interval seconds while the tab is visible, one request round at a time.
"use strict";

var DC = (function () {
  var params = new URLSearchParams(window.location.search);
  var requested = parseFloat(params.get("interval") || "");
  var state = {
    interval: requested > 0 ? Math.max(0.5, requested) : null,   // null: api.console_interval
    serverInterval: 5,
    live: true,
    view: "overview",
    views: {},
    timer: null,
    running: false,
    failures: 0,
    refreshes: 0
  };

  function $(id) { return document.getElementById(id); }

  // -- DOM helpers (text only: every value from the API is set as textContent) -------------
  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (key) {
      var value = attrs[key];
      if (value === null || value === undefined || value === false) { return; }
      if (key === "text") { node.textContent = String(value); }
      else if (key === "class") { node.className = value; }
      else if (key.indexOf("on") === 0) { node.addEventListener(key.slice(2), value); }
      else { node.setAttribute(key, value === true ? "" : String(value)); }
    });
    (children || []).forEach(function (child) {
      if (child === null || child === undefined) { return; }
      node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
    });
    return node;
  }

  // Replace a container's children, keeping keyboard focus on the element with the same
  // data-focus-key (a button of a re-rendered row keeps its focus across refreshes).
  function replace(container, nodes) {
    var active = document.activeElement;
    var key = active && container.contains(active) ? active.getAttribute("data-focus-key") : null;
    while (container.firstChild) { container.removeChild(container.firstChild); }
    nodes.forEach(function (node) { container.appendChild(node); });
    if (key) {   // the row is gone (an item deleted): its table keeps the focus
      var again = container.querySelector('[data-focus-key="' + CSS.escape(key) + '"]');
      var wrap = container.closest ? container.closest(".table-wrap") : null;
      if (again) { again.focus(); } else if (wrap) { wrap.focus(); }
    }
  }

  function row(cells, attrs) {
    return el("tr", attrs || {}, cells.map(function (cell) {
      if (cell && typeof cell === "object" && cell.nodeType) { return el("td", {}, [cell]); }
      if (cell && typeof cell === "object") {
        return el(cell.header ? "th" : "td", {class: cell.class, "data-field": cell.field,
          scope: cell.header ? "row" : null, colspan: cell.colspan, title: cell.title},
          cell.nodes || [cell.text === undefined ? "–" : cell.text]);
      }
      return el("td", {text: cell === null || cell === undefined || cell === "" ? "–" : cell});
    }));
  }

  function emptyRow(columns, text) {
    return el("tr", {class: "empty"}, [el("td", {colspan: columns, text: text})]);
  }

  // -- formatting -------------------------------------------------------------------------
  function formatNumber(value, digits) {
    if (value === null || value === undefined || isNaN(value)) { return "–"; }
    return Number(value).toLocaleString("en-US", {maximumFractionDigits: digits || 0});
  }

  function formatBytes(value) {
    if (value === null || value === undefined || isNaN(value)) { return "–"; }
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0, v = Number(value);
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(v < 10 ? 1 : 0) : String(Math.round(v))) + " " + units[i];
  }

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined || isNaN(seconds)) { return "–"; }
    seconds = Math.max(0, Math.floor(seconds));
    var d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
    var m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    if (d) { return d + "d " + h + "h"; }
    if (h) { return h + "h " + m + "m"; }
    if (m) { return m + "m " + s + "s"; }
    return s + "s";
  }

  function formatTime(unix) {
    if (!unix) { return "–"; }
    return new Date(unix * 1000).toLocaleTimeString("en-GB", {hour12: false});
  }

  function formatDate(unix) {
    if (!unix) { return "–"; }
    return new Date(unix * 1000).toISOString().slice(0, 16).replace("T", " ") + " UTC";
  }

  function ago(unix) {
    if (!unix) { return "–"; }
    return formatDuration(Date.now() / 1000 - unix) + " ago";
  }

  // -- the API ----------------------------------------------------------------------------
  function takeTokenFromFragment() {
    var fragment = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    if (fragment.get("token")) {
      sessionStorage.setItem("dcrouter-token", fragment.get("token"));
      var view = fragment.get("view") || "";
      history.replaceState(null, "", window.location.pathname + window.location.search +
        (view ? "#" + view : ""));
    }
  }

  function token() { return sessionStorage.getItem("dcrouter-token") || ""; }

  function request(method, path) {
    var headers = {"Accept": "application/json"};
    if (token()) { headers["Authorization"] = "Bearer " + token(); }
    return fetch(path, {method: method, headers: headers, cache: "no-store",
                        credentials: "omit"}).then(function (response) {
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

  function getJSON(path) { return request("GET", path); }

  function showError(message) {
    var box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function notice(message) {
    $("notice").textContent = message;
  }

  // -- confirmation dialog ----------------------------------------------------------------
  // Resolves true only when the operator pressed Confirm (Escape and Cancel resolve false).
  function confirmAction(text, okLabel) {
    var dialog = $("confirm");
    var back = document.activeElement;
    var backKey = back ? back.getAttribute("data-focus-key") : null;
    var region = back && back.closest ? back.closest(".table-wrap, section") : null;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel || "Confirm";
    return new Promise(function (resolve) {
      function finish(result) {
        $("confirm-ok").removeEventListener("click", ok);
        $("confirm-cancel").removeEventListener("click", cancel);
        dialog.removeEventListener("close", closed);
        if (dialog.open) { dialog.close(); }
        // back to the button that opened the dialog (or its re-rendered twin, or its table)
        var again = backKey ? document.querySelector('[data-focus-key="' + CSS.escape(backKey) + '"]')
                            : null;
        if (back && document.contains(back)) { back.focus(); }
        else if (again) { again.focus(); }
        else if (region) { region.focus(); }
        resolve(result);
      }
      function ok() { finish(true); }
      function cancel() { finish(false); }
      function closed() { finish(false); }
      $("confirm-ok").addEventListener("click", ok);
      $("confirm-cancel").addEventListener("click", cancel);
      dialog.addEventListener("close", closed);
      dialog.showModal();
      $("confirm-cancel").focus();
    });
  }

  // An action behind a confirmation: method + path, then a notice and a refresh.
  function act(text, okLabel, method, path, done) {
    return confirmAction(text, okLabel).then(function (confirmed) {
      if (!confirmed) { notice("Nothing was changed."); return null; }
      return request(method, path).then(function (body) {
        notice(done);
        refreshSoon();
        return body;
      }).catch(function (error) {
        showError(error.message);
        return null;
      });
    });
  }

  // -- views and the refresh loop --------------------------------------------------------
  function view(name, spec) { state.views[name] = spec; }

  function currentInterval() { return state.interval || state.serverInterval; }

  function selectView(name) {
    if (!state.views[name]) { return false; }
    state.view = name;
    document.querySelectorAll("main > .view").forEach(function (section) {
      section.hidden = section.id !== "view-" + name;
    });
    document.querySelectorAll("nav a[data-view]").forEach(function (link) {
      if (link.getAttribute("data-view") === name) { link.setAttribute("aria-current", "page"); }
      else { link.removeAttribute("aria-current"); }
    });
    document.title = "dcrouter console · " + name;
    document.body.setAttribute("data-view", name);
    return true;
  }

  function fromHash() {
    if (window.location.hash.indexOf("token=") >= 0) {   // a bookmark opened in this tab
      takeTokenFromFragment();
      state.failures = 0;
    }
    var name = window.location.hash.replace(/^#/, "");
    if (selectView(name || "overview")) { refreshSoon(); }
  }

  function header(status) {
    $("version").textContent = status.version;
    $("uptime").textContent = formatDuration(status.uptime);
    if (status.console && status.console.interval) {
      state.serverInterval = status.console.interval;
      $("interval").textContent = String(currentInterval());
    }
  }

  function refresh() {
    if (state.running) { return; }
    state.running = true;
    clearTimeout(state.timer);
    var name = state.view;
    var spec = state.views[name];
    Promise.all([getJSON("/api/status"), spec.load()]).then(function (results) {
      header(results[0]);
      if (state.view === name) { spec.render(results[1], results[0]); }
      $("last-update").textContent = new Date().toLocaleTimeString("en-GB", {hour12: false});
      state.refreshes++;
      document.body.setAttribute("data-refreshes", String(state.refreshes));
      document.body.setAttribute("data-rendered-" + name, String(state.refreshes));
      $("token-form").hidden = true;
      state.failures = 0;
      showError("");
    }).catch(function (error) {
      state.failures++;
      if (error.status === 401 || error.status === 429) {
        $("token-form").hidden = false;
        showError(error.status === 401 ? "The API needs a token (api.token)." : error.message);
      } else if (error.status) {   // the API answered: e.g. 503, a service not configured here
        showError("The " + name + " view is not available: " + error.message);
      } else {
        showError("Cannot reach the API: " + error.message);
      }
    }).then(function () {
      state.running = false;
      schedule();
    });
  }

  // the next round: after the interval, later after failures (up to a minute), never while
  // the tab is hidden or live updates are off
  function schedule() {
    clearTimeout(state.timer);
    if (!state.live || document.hidden) { return; }
    var wait = currentInterval() * Math.min(12, Math.pow(2, state.failures));
    state.timer = setTimeout(refresh, Math.min(60, wait) * 1000);
  }

  function refreshSoon() {
    clearTimeout(state.timer);
    state.timer = setTimeout(refresh, 0);
  }

  function start() {
    takeTokenFromFragment();
    $("interval").textContent = String(currentInterval());
    $("token-form").addEventListener("submit", function (event) {
      event.preventDefault();
      sessionStorage.setItem("dcrouter-token", $("token-input").value.trim());
      $("token-input").value = "";
      state.failures = 0;
      refreshSoon();
    });
    $("live-toggle").addEventListener("click", function () {
      state.live = !state.live;
      this.setAttribute("aria-pressed", String(state.live));
      this.textContent = "Live updates: " + (state.live ? "on" : "off");
      if (state.live) { refreshSoon(); } else { clearTimeout(state.timer); }
    });
    document.querySelector("a.skip").addEventListener("click", function (event) {
      event.preventDefault();
      $("main").focus();
    });
    document.addEventListener("visibilitychange", function () {
      if (!document.hidden) { refreshSoon(); } else { clearTimeout(state.timer); }
    });
    window.addEventListener("hashchange", fromHash);
    var resized = null;
    window.addEventListener("resize", function () {
      clearTimeout(resized);
      resized = setTimeout(function () {
        var spec = state.views[state.view];
        if (spec && spec.resize) { spec.resize(); }
      }, 150);
    });
    var first = window.location.hash.replace(/^#/, "");
    selectView(state.views[first] ? first : "overview");
    refresh();
  }

  document.addEventListener("DOMContentLoaded", start);

  return {
    $: $, el: el, replace: replace, row: row, emptyRow: emptyRow,
    formatNumber: formatNumber, formatBytes: formatBytes, formatDuration: formatDuration,
    formatTime: formatTime, formatDate: formatDate, ago: ago,
    getJSON: getJSON, request: request, act: act, notice: notice, showError: showError,
    view: view, refreshSoon: refreshSoon, state: state
  };
}());
