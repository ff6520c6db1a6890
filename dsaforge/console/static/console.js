// Live updates without a build step: while a run is active, poll its JSON and refresh the status, steps and log.
// Pages work without this script; it only saves a reload.
(function () {
  "use strict";
  function age(s) {
    if (s === null || s === undefined) return "";
    s = Math.floor(s);
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
    return Math.floor(s / 3600) + "h" + String(Math.floor(s / 60) % 60).padStart(2, "0") + "m";
  }
  function pct(x) { return x === null || x === undefined ? "" : Math.round(100 * x) + "%"; }
  function setStatus(el, value) { el.textContent = value; el.className = "status " + value; }

  function runPage(head) {
    var url = head.getAttribute("data-live");
    var timer = setInterval(function () {
      fetch(url, {credentials: "same-origin"}).then(function (r) { return r.json(); }).then(function (run) {
        setStatus(head, run.status);
        document.getElementById("run-seconds").textContent = age(run.seconds);
        document.getElementById("run-progress").textContent = pct(run.progress);
        (run.steps || []).forEach(function (step) {
          var row = document.querySelector('tr[data-step="' + step.name + '"]');
          if (!row) return;
          setStatus(row.querySelector('[data-field="state"]'), step.state);
          row.querySelector('[data-field="progress"]').textContent = pct(step.progress);
          row.querySelector('[data-field="seconds"]').textContent = age(step.seconds);
          var node = document.querySelector('g.node[data-task="' + step.name + '"]');
          if (node) node.setAttribute("class", "node " + step.state);
        });
        var log = document.getElementById("log");
        var atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
        log.textContent = run.log_tail;
        if (atEnd) log.scrollTop = log.scrollHeight;
        if (run.status !== "queued" && run.status !== "running") {
          clearInterval(timer);
          window.location.reload();     // the final page: artifacts, MLflow link, resume
        }
      }).catch(function () {});
    }, 2000);
  }

  function runsPage(table) {
    var timer = setInterval(function () {
      fetch(table.getAttribute("data-live"), {credentials: "same-origin"}).then(function (r) { return r.json(); })
        .then(function (data) {
          var active = false;
          data.runs.forEach(function (run) {
            var row = table.querySelector('tr[data-run="' + run.id + '"]');
            if (!row) return;
            setStatus(row.querySelector('[data-field="status"]'), run.status);
            row.querySelector('[data-field="progress"]').textContent = pct(run.progress);
            row.querySelector('[data-field="seconds"]').textContent = age(run.seconds);
            var steps = row.querySelector('[data-field="steps"]');
            steps.textContent = "";
            (run.steps || []).forEach(function (s) {
              var dot = document.createElement("span");
              dot.className = "dot " + s.state;
              dot.title = s.name + ": " + s.state;
              steps.appendChild(dot);
            });
            active = active || run.status === "queued" || run.status === "running";
          });
          if (!active) clearInterval(timer);
        }).catch(function () {});
    }, 3000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var head = document.getElementById("run-status");
    if (head && head.getAttribute("data-active") === "yes") runPage(head);
    var table = document.querySelector("table.runs[data-live]");
    if (table && table.querySelector(".status.running, .status.queued")) runsPage(table);
  });
})();
