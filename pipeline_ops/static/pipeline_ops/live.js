/* Live updates for the operations console: poll a small JSON view every few seconds.
 * Plain JS, no build step, no CDN. A page opts in with
 *   <div id="ops-live" data-url="/admin/pipeline_ops/pipelineinput/live/?view=..." hidden></div>
 * Every element with data-live="<metric>" gets that metric's value; when the view's "version"
 * changes (a list or an input changed since the page was drawn) a notice offers a reload
 * (never an automatic one: an operator may be selecting rows or typing a reason). */
(function () {
  "use strict";
  var root = document.getElementById("ops-live");
  if (!root || !window.fetch) { return; }
  var url = root.getAttribute("data-url");
  var interval = parseInt(root.getAttribute("data-interval") || "5000", 10);
  var firstVersion = null;
  var status = document.getElementById("ops-live-status");

  function show(metrics) {
    Object.keys(metrics).forEach(function (key) {
      var nodes = document.querySelectorAll('[data-live="' + key + '"]');
      for (var i = 0; i < nodes.length; i++) {
        var text = String(metrics[key]);
        if (nodes[i].textContent !== text) {
          nodes[i].textContent = text;
          nodes[i].classList.add("live-changed");
        }
      }
    });
  }

  function notice() {
    var box = document.getElementById("ops-live-notice");
    if (box) { box.hidden = false; }
  }

  function poll() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (body) {
        if (body.metrics) { show(body.metrics); }
        if (body.version) {
          if (firstVersion === null) { firstVersion = root.getAttribute("data-version") || body.version; }
          if (body.version !== firstVersion) { notice(); }
        }
        if (status) { status.textContent = "live: updated " + (body.as_of || new Date().toLocaleTimeString()); }
        root.setAttribute("data-polls", String(parseInt(root.getAttribute("data-polls") || "0", 10) + 1));
      })
      .catch(function (error) {
        if (status) { status.textContent = "live updates paused (" + error.message + "); retrying"; }
      })
      .then(function () { window.setTimeout(poll, interval); });
  }
  window.setTimeout(poll, Math.min(interval, 1000));
})();
