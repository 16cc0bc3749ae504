// dcrouter console, charts: line charts as inline SVG, drawn by hand (no library).
// DC.chart(figure, history, names, unit) draws the series `names` of a /api/history answer
// into the <figure>: one polyline per series (split where buckets have no sample), a
// y axis from 0 to a round maximum, the times of the first, middle and last buckets, and a
// legend that states each series' value in the last bucket and its total (counters) or
// maximum (gauges) over the window. The SVG is sized to its container in CSS pixels, so
// text stays legible on a phone; it is redrawn on resize. Colours come from style.css
// (classes s0..s7), so dark mode needs no code here.
"use strict";

(function () {
  var SVG = "http://www.w3.org/2000/svg";
  var HEIGHT = 170, LEFT = 52, RIGHT = 10, TOP = 10, BOTTOM = 24;

  function svg(tag, attrs, text) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (key) { node.setAttribute(key, String(attrs[key])); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  // 1, 2, 5 x 10^n at or above value (at least 1)
  function niceMax(value) {
    if (!(value > 0)) { return 1; }
    var power = Math.pow(10, Math.floor(Math.log10(value)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) {
      if (steps[i] * power >= value) { return steps[i] * power; }
    }
    return 10 * power;
  }

  function format(value, unit) {
    if (unit === "bytes") { return DC.formatBytes(value); }
    if (Math.abs(value) >= 1e6) { return (value / 1e6).toFixed(1).replace(/\.0$/, "") + "M"; }
    if (Math.abs(value) >= 1e4) { return (value / 1e3).toFixed(1).replace(/\.0$/, "") + "k"; }
    return DC.formatNumber(value, value < 10 && value % 1 ? 1 : 0);
  }

  function hhmm(unix) {
    return new Date(unix * 1000).toLocaleTimeString("en-GB", {hour: "2-digit", minute: "2-digit",
                                                              hour12: false});
  }

  // the series of a history answer a chart asks for ("dns.queries.*" takes every rcode)
  function pick(history, names) {
    var out = [];
    names.forEach(function (name) {
      if (name.slice(-1) === "*") {
        Object.keys(history.series).sort().forEach(function (key) {
          if (key.indexOf(name.slice(0, -1)) === 0) { out.push(key); }
        });
      } else if (history.series[name]) {
        out.push(name);
      }
    });
    return out;
  }

  function summary(series) {
    var points = series.points, last = null, total = 0, max = null, count = 0;
    points.forEach(function (p) {
      if (p === null || p === undefined) { return; }
      last = p; total += p; count++;
      max = max === null ? p : Math.max(max, p);
    });
    return {last: last, total: total, max: max, count: count};
  }

  function draw(figure, history, names, unit) {
    var keys = pick(history, names);
    var width = Math.max(260, Math.floor(figure.clientWidth || 600));
    var plotW = width - LEFT - RIGHT, plotH = HEIGHT - TOP - BOTTOM;
    var buckets = history.times.length;
    var top = 0;
    keys.forEach(function (key) {
      history.series[key].points.forEach(function (p) { if (p > top) { top = p; } });
    });
    top = niceMax(top);
    var x = function (i) { return LEFT + (buckets > 1 ? i * plotW / (buckets - 1) : plotW / 2); };
    var y = function (v) { return TOP + plotH - (v / top) * plotH; };

    var caption = figure.querySelector("figcaption");
    var titleId = figure.id + "-title";
    var root = svg("svg", {width: width, height: HEIGHT, viewBox: "0 0 " + width + " " + HEIGHT,
                           role: "img", "aria-labelledby": titleId, "data-max": top,
                           "data-buckets": buckets, "class": "plot"});
    var descriptions = [];
    var grid = svg("g", {"class": "grid"});
    [0, 0.5, 1].forEach(function (fraction) {
      var value = top * fraction, at = y(value);
      grid.appendChild(svg("line", {x1: LEFT, x2: width - RIGHT, y1: at, y2: at}));
      grid.appendChild(svg("text", {x: LEFT - 6, y: at + 4, "text-anchor": "end", "class": "tick"},
                           format(value, unit)));
    });
    [0, Math.floor((buckets - 1) / 2), buckets - 1].forEach(function (i, n) {
      if (i < 0 || (n === 1 && (i === 0 || i === buckets - 1))) { return; }
      grid.appendChild(svg("text", {x: x(i), y: HEIGHT - 6, "class": "tick",
        "text-anchor": n === 0 ? "start" : (n === 2 ? "end" : "middle")},
        hhmm(history.times[i] + (n === 2 ? history.step : 0))));
    });
    root.appendChild(grid);

    var legend = document.createElement("ul");
    legend.className = "legend";
    keys.forEach(function (key, index) {
      var series = history.series[key];
      var group = svg("g", {"class": "series s" + (index % 8), "data-series": key});
      var run = [];
      var flush = function () {
        if (run.length === 1) {
          group.appendChild(svg("circle", {cx: run[0][0], cy: run[0][1], r: 2.5}));
        } else if (run.length > 1) {
          group.appendChild(svg("polyline", {points: run.map(function (p) {
            return p[0].toFixed(1) + "," + p[1].toFixed(1); }).join(" ")}));
        }
        run = [];
      };
      series.points.forEach(function (p, i) {
        if (p === null || p === undefined) { flush(); return; }
        run.push([x(i), y(p)]);
      });
      flush();
      root.appendChild(group);
      var s = summary(series);
      var counter = series.kind === "counter";
      var item = DC.el("li", {"class": "s" + (index % 8), "data-series": key,
                              "data-last": s.last === null ? "" : s.last,
                              "data-total": counter ? s.total : "",
                              "data-max": s.max === null ? "" : s.max}, [
        DC.el("span", {"class": "swatch", "aria-hidden": "true"}),
        DC.el("span", {"class": "name", text: series.label}), " ",
        DC.el("span", {"class": "value", "data-field": "last",
                       text: s.last === null ? "–" : format(s.last, unit)}),
        DC.el("span", {"class": "meta", text: counter ? " last " + stepText(history) + " · "
                                                      : " now · "}),
        DC.el("span", {"class": "value", "data-field": counter ? "total" : "max",
                       text: counter ? format(s.total, unit) : (s.max === null ? "–" :
                                                                format(s.max, unit))}),
        DC.el("span", {"class": "meta", text: counter ? " in " + windowText(history)
                                                      : " at most"})
      ]);
      legend.appendChild(item);
      descriptions.push(series.label + " " + (s.last === null ? "no data" : format(s.last, unit)));
    });
    root.insertBefore(svg("title", {id: titleId},
      (caption ? caption.textContent : "") + ", last " + windowText(history) + ": " +
      (descriptions.join("; ") || "no data yet")), root.firstChild);
    if (!keys.length) {
      root.appendChild(svg("text", {x: LEFT + plotW / 2, y: TOP + plotH / 2, "text-anchor": "middle",
                                    "class": "tick"}, "no data yet"));
    }
    Array.prototype.slice.call(figure.children).forEach(function (child) {
      if (child !== caption) { figure.removeChild(child); }
    });
    figure.appendChild(root);
    figure.appendChild(legend);
  }

  function stepText(history) {
    return history.step === 60 ? "minute" : history.step + " s";
  }

  function windowText(history) {
    return Math.round((history.end - history.start) / 60) + " min";
  }

  DC.chart = draw;
  DC.niceMax = niceMax;
}());
